"""Chat messages -> one model's own prompt text, through llama.cpp's template engine.

Each model formats the conversation with its own chat template (from its GGUF, or the
`chat_template` override in models.toml: a llama.cpp built-in name such as "chatml" or
"gemma", or a template text that llama.cpp recognises).
"""

from __future__ import annotations

import ctypes
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
