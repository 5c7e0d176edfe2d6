"""Brute-force text probability: the sum over every tokenization that covers a text.

Q(text) = sum over token sequences w = v1..vm with b(v1..vm-1) a strict prefix of the
text and b(v1..vm) starting with it, of P(w) (docs/algorithm.md §2, with S = bytes). Every
prefix is scored by the model; like the engine, control tokens are excluded and each
next-token distribution renormalised over tokens with bytes or END.
"""

from __future__ import annotations

import numpy as np

from lvr_local.core.lm import NextTokenModel
from lvr_local.core.vocabulary import Vocabulary


def _log_softmax_valid(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = np.where(valid, logits.astype(np.float64), -np.inf)
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())


def brute_force_log_q(
    model: NextTokenModel, vocab: Vocabulary, text: bytes, min_share: float = 0.0
) -> float:
    """log Q(text) after the model's current prompt, by enumerating the relative cover.
    `min_share` > 0: a path below that fraction of the best finished term found so far
    is not followed (for long real texts, where exhaustive enumeration explodes)."""
    strings = vocab.all_token_bytes
    valid = vocab.has_bytes | vocab.is_end
    by_bytes: dict[bytes, list[int]] = {}
    for token, b in enumerate(strings):
        if b is not None:
            by_bytes.setdefault(b, []).append(token)
    # For each position: tokens completing the cover (bytes start with the rest) and
    # tokens that stay strictly inside the text (bytes are a shorter prefix of the rest).
    finishing = {
        pos: np.array([t for t, b in enumerate(strings) if b and b.startswith(text[pos:])])
        for pos in range(len(text))
    }
    terms: list[float] = []
    frontier: list[tuple[tuple[int, ...], float, int]] = [((), 0.0, 0)]
    while frontier:
        rows = model.next_logits([prefix for prefix, _, _ in frontier])
        floor = max(terms, default=-np.inf) + (np.log(min_share) if min_share else -np.inf)
        next_frontier = []
        for (prefix, log_p, pos), logits in zip(frontier, rows, strict=True):
            logp = _log_softmax_valid(np.asarray(logits), valid)
            ends = finishing[pos]
            if len(ends):
                top = logp[ends].max()
                terms.append(log_p + top + np.log(np.exp(logp[ends] - top).sum()))
            rest = text[pos:]
            for length in range(1, len(rest)):
                for token in by_bytes.get(rest[:length], []):
                    child = log_p + logp[token]
                    if floor == -np.inf or child > floor:
                        next_frontier.append(((*prefix, token), child, pos + length))
        frontier = next_frontier
    terms_arr = np.array(terms)
    top = terms_arr.max()
    return float(top + np.log(np.exp(terms_arr - top).sum()))
