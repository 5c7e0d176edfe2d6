"""The one question the reduction engine asks a language model.

"Give me the next-token scores after each of these token prefixes." A prefix is the
tuple of token ids generated (or forced) after the prompt; the empty tuple is the
prompt itself. Asking for a *set* of prefixes at once lets the llama.cpp backend put
all of them in one batched decode that shares the KV cache of their common ancestors.
`release` tells the model which prefixes the engine will never extend again, so a
backend can free their sequences; it is a hint, never required for correctness.

A model's memory for prefixes is finite (llama.cpp: the KV cache's n_ctx cells). When
the prefixes asked for cannot be held beside those still alive, `next_logits` raises
`ModelMemoryFull`; the engine then drops its least likely branches, releases them and
asks again (reduction.py, `_shed_branches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lvr_local.errors import LvrError

TokenPrefix = tuple[int, ...]


class ModelMemoryFull(LvrError):
    """The model cannot hold the prefixes asked for beside the ones still alive. Nothing
    was lost: release some prefixes and ask again. The message says what is full."""


class NextTokenModel(Protocol):
    """What the engine needs from a model: scores over its whole vocabulary."""

    @property
    def n_vocab(self) -> int: ...

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        """One array of shape (n_vocab,) per prefix, in order: unnormalised log-scores
        (logits) or log-probabilities; the engine applies its own log-softmax. The engine
        keeps a returned array without copying it, so it must not change afterwards.
        Raises ModelMemoryFull when these prefixes do not fit beside the alive ones."""
        ...

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        """These prefixes will not be asked for again (nor extended)."""
        ...
