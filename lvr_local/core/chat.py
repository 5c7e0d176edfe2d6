"""A conversation as data: messages with a role and text content.

Formatting a conversation into one model's prompt needs that model's chat template and
lives with the llama.cpp adapters (`chat_template.py`); this module only says what a
message is, so that every layer can pass conversations around.
"""

from __future__ import annotations

from dataclasses import dataclass

from lvr_local.errors import LvrError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise LvrError(f"unknown chat role '{self.role}': expected one of {', '.join(ROLES)}")
