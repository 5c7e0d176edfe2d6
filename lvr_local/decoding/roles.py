"""Member roles: a chat model or a base model, and how each one sees a conversation.

A *chat* model was fine-tuned on a chat template; it reads the conversation in that
template and ends its turn with an end-of-turn token (END). A *base* model (pretrained
only) has never seen such markers: given them, it rarely predicts the end of a turn.
It reads the conversation as a plain transcript instead, the kind of text it was
trained on, and it ends its turn by starting a new one on a new line ("\\nUser:").

Members never have to share a prompt: each is conditioned on its own native format,
and the reduction then follows the same reply text in all of them (docs/algorithm.md
§7). The transcript ends with "Assistant: " (with the space the reply's first word
takes in running text); the prompt's byte-level phase (§6) sums over the tokens that
straddle that space, so the base member's reply is exact from its first byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lvr_local.core.chat import Message
from lvr_local.core.vocabulary import Vocabulary

ROLES = ("chat", "base")

# An instruction-tuned model's name usually says so: "Instruct", "Chat", "-it", "IT".
CHAT_NAME = re.compile(r"(instruct|chat|(^|[\s_-])it($|[\s_-]))", re.IGNORECASE)

# The plain transcript a base member reads. A base model ends the assistant's turn by
# starting a new turn on a new line, so these separators, once written, end the reply.
SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATORS = ("\nUser:", "\nAssistant:")

# What the transcript begins with: who is speaking and how the assistant answers, so
# that a base model reads the assistant's line as an answer to write, not as a line to
# copy. Beside a chat member, nothing more: after a finished example exchange the base
# member announced its answer ("I'll write a haiku about the wind.") or took up the
# example's words, and the default ensemble's first-command replies were usable 70
# times in 90 seeds with "Hello." answered, 82 with the line alone (README, "Measured").
PREAMBLE = (
    "A chat between a curious user and a helpful assistant. The assistant answers each "
    "request directly, in its own words.\n\n"
)
# A base model with no chat member beside it carries the turn alone: one short question
# answered in a word shows it an answer that comes at once and a turn that ends. Gemma 3
# 270M alone then wrote a usable first-command reply in 29 of 30 seeds (21 with the line
# alone), and answers "What is the capital of France?" with "Paris." where the line
# alone had it restate the question.
EXAMPLE = "User: What is 2 + 2?\nAssistant: 4.\n"


def detect_role(vocab: Vocabulary, chat_template: str | None = None) -> str:
    """'chat' when the model carries a chat template (its GGUF's, or one configured in
    models.toml), a fine-tune label (GGUF general.finetune), or an instruct/chat/-it
    marker in its name; else 'base'."""
    template = bool(chat_template or vocab.chat_template)
    return role_from_metadata(template, vocab.finetune, vocab.model_name)


def role_from_metadata(has_chat_template: bool, finetune: str | None, name: str | None) -> str:
    """The same rule from the GGUF's metadata alone (a listing reads no vocabulary)."""
    if has_chat_template or finetune:
        return "chat"
    return "chat" if CHAT_NAME.search(name or "") else "base"


def format_transcript(messages: Sequence[Message], example: bool = False) -> str:
    """A conversation as plain text for a base model: the preamble (and EXAMPLE when
    `example`: no chat member is taking part), then one line per message, ending where
    the assistant's reply begins: "User: ...\\nAssistant: "."""
    lines = [f"{SPEAKERS[m.role]}: {m.content.strip()}" for m in messages]
    head = PREAMBLE + (EXAMPLE if example else "")
    return head + "\n".join([*lines, f"{SPEAKERS['assistant']}: "])
