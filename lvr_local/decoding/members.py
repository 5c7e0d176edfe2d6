"""An ensemble's members: a vocabulary, a model behind a protocol, a weight.

The ensemble reaches each model through `MemberModel`, not through the llama.cpp
backend, so the whole decoding layer (byte phase, hand-over, scheduling) also runs on
the synthetic models of the test suite, where brute force can check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lvr_local.core.lm import NextTokenModel
from lvr_local.core.vocabulary import Vocabulary


class MemberModel(NextTokenModel, Protocol):
    """What the ensemble needs from a model beyond next-token scores: a prompt to
    condition on, its own tokenizer, and a thread count it may change."""

    @property
    def n_threads(self) -> int: ...

    def set_threads(self, n_threads: int) -> None: ...

    def set_prompt(self, tokens: Sequence[int]) -> None: ...

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]: ...


@dataclass(eq=False)
class Member:
    """One model of the ensemble. `role` is "chat" or "base" (roles.py: how it reads a
    conversation); `enabled` is the front ends' on/off switch (it takes effect at the
    next prompt); `auto_threads` means no thread count was configured, so the scheduler
    shares the cores out."""

    name: str
    vocab: Vocabulary
    backend: MemberModel
    weight: float = 1.0
    chat_template: str | None = None
    role: str = "chat"
    enabled: bool = True
    auto_threads: bool = False

    @property
    def leads(self) -> bool:
        """A chat member leads: it can end a conversation's turn (§7.1) and base members
        defer to its certainty (§7.6). Any role but "base" is a chat role."""
        return self.role != "base"
