"""Chat messages -> one model's own prompt text, through llama.cpp's template engine.

Each model formats the conversation with its own chat template (from its GGUF, or the
`chat_template` override in models.toml: a llama.cpp built-in name such as "chatml" or
"gemma", or a template text that llama.cpp recognises).

What the user and the assistant wrote is text, never markup: a user who types
`<|im_end|>` or `<end_of_turn>` must not end their turn or forge a role. So the
formatted prompt comes back in parts (`chat_parts`): the template's own text, whose
control-token strings are read as those tokens, and each message's content, which is
tokenized as plain text (llama.cpp's parse_special off).
"""

from __future__ import annotations

import ctypes
import secrets
from collections.abc import Sequence

import llama_cpp as L

from lvr_local.core.chat import Message
from lvr_local.errors import LvrError


def builtin_templates() -> list[str]:
    """Names of the chat templates llama.cpp knows without a Jinja engine."""
    n = L.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    L.llama_chat_builtin_templates(names, n)
    return sorted(name.decode() for name in names)


def format_chat(
    template: str | None, messages: Sequence[Message], *, model: str, add_assistant: bool = True
) -> str:
    """The prompt text of `messages` for one model, ending with the assistant's turn start."""
    if not template:
        raise LvrError(
            f"model '{model}' has no chat template: set chat_template in models.toml "
            f"(one of: {', '.join(builtin_templates())}) or use raw prompts (--raw)"
        )
    chat = (L.llama_chat_message * len(messages))(
        *(L.llama_chat_message(m.role.encode(), m.content.encode()) for m in messages)
    )
    size = 2 * sum(len(m.content.encode()) + 64 for m in messages) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_chat_apply_template(
            template.encode(), chat, len(messages), add_assistant, buf, size
        )
        if n < 0:
            raise LvrError(
                f"llama.cpp does not support the chat template of model '{model}': set "
                f"chat_template in models.toml to one of: {', '.join(builtin_templates())}"
            )
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    raise LvrError(f"chat template of model '{model}' produced no stable output")


# (text, is_content): template text (control strings are tokens) or a message's content.
ChatPart = tuple[str, bool]


def chat_parts(
    template: str | None, messages: Sequence[Message], *, model: str, add_assistant: bool = True
) -> list[ChatPart]:
    """The prompt of `messages` for one model, split into the template's text and each
    message's content. The template is applied once with a unique placeholder in place
    of every content, which marks where the contents go; a template that trims its
    contents (Gemma's) gets them trimmed."""
    nonce = secrets.token_hex(8)
    marks = [f"@@lvr-content-{i}-{nonce}@@" for i in range(len(messages))]
    marked = [Message(m.role, mark) for m, mark in zip(messages, marks, strict=True)]
    skeleton = format_chat(template, marked, model=model, add_assistant=add_assistant)
    real = format_chat(template, messages, model=model, add_assistant=add_assistant)
    for trim in (False, True):
        parts = _fill(skeleton, marks, [m.content.strip() if trim else m.content for m in messages])
        if "".join(text for text, _ in parts) == real:
            return parts
    return _fill(skeleton, marks, [m.content for m in messages])


def _fill(skeleton: str, marks: list[str], contents: list[str]) -> list[ChatPart]:
    """Split `skeleton` at each mark, putting the mark's content in its place."""
    parts: list[ChatPart] = []
    rest = skeleton
    for mark, content in zip(marks, contents, strict=True):
        head, found, rest = rest.partition(mark)
        if not found:  # the template dropped this message: its text stays as it was
            rest = head
            continue
        parts += [(head, False), (content, True)]
    parts.append((rest, False))
    return [(text, is_content) for text, is_content in parts if text]
