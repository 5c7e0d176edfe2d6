"""The one question the reduction engine asks a language model.

"Give me the next-token scores after each of these token prefixes." A prefix is the
tuple of token ids generated (or forced) after the prompt; the empty tuple is the
prompt itself. Asking for a *set* of prefixes at once lets the llama.cpp backend put
all of them in one batched decode that shares the KV cache of their common ancestors.
`release` tells the model which prefixes the engine will never extend again, so a
backend can free their sequences; it is a hint, never required for correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

TokenPrefix = tuple[int, ...]


class NextTokenModel(Protocol):
    """What the engine needs from a model: scores over its whole vocabulary."""

    @property
    def n_vocab(self) -> int: ...

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        """One array of shape (n_vocab,) per prefix, in order: unnormalised log-scores
        (logits) or log-probabilities; the engine applies its own log-softmax. The engine
        keeps a returned array without copying it, so it must not change afterwards."""
        ...

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        """These prefixes will not be asked for again (nor extended)."""
        ...
