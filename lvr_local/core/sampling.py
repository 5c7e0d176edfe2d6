"""Choosing a piece from the combined distribution: greedy, temperature, top-k, top-p, min-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


class Sampler:
    """Owns the random generator, so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def choose(self, logp: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logp))
        scores = logp / p.temperature
        keep = np.isfinite(scores)
        if p.top_k > 0 and p.top_k < int(keep.sum()):
            threshold = np.partition(scores, -p.top_k)[-p.top_k]
            keep &= scores >= threshold
        candidates = np.flatnonzero(keep)
        probs = np.exp(scores[candidates] - scores[candidates].max())
        probs /= probs.sum()
        if p.min_p > 0:
            mask = probs >= p.min_p * probs.max()
            candidates, probs = candidates[mask], probs[mask] / probs[mask].sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            n = int(np.searchsorted(cumulative, p.top_p)) + 1  # smallest set reaching top_p
            chosen = order[:n]
            candidates, probs = candidates[chosen], probs[chosen] / probs[chosen].sum()
        index = int(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"))
        return int(candidates[min(index, len(candidates) - 1)])
