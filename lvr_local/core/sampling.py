"""Choosing a piece from the combined distribution: greedy, or sampling with top-k,
top-p, min-p and a temperature, in llama.cpp's order (common/sampling.cpp: the
truncations see the distribution before the temperature reshapes it)."""

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
        """A piece from `logp` (log-probabilities, or penalised scores): greedy at
        temperature 0; else llama.cpp's chain (`truncate`), then a draw."""
        if self.params.temperature <= 0:
            return int(np.argmax(logp))
        candidates, scores = truncate(logp, self.params)
        weights = np.exp(scores - scores.max())
        draw = self.rng.random() * weights.sum()
        index = int(np.searchsorted(np.cumsum(weights), draw, side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


def truncate(logp: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's chain before the draw: top-k, top-p and min-p on the distribution as
    given, then the temperature on what is left. Returns the candidates that survive
    (most likely first when any truncation is on) and their scores divided by the
    temperature (unnormalised log weights); -inf entries of `logp` never survive.
    Needs temperature > 0."""
    candidates = np.flatnonzero(np.isfinite(logp))
    scores = logp[candidates]
    if params.top_k <= 0 and params.top_p >= 1.0 and params.min_p <= 0:
        return candidates, scores / params.temperature  # nothing to cut: no sort
    if 0 < params.top_k < len(candidates):
        keep = np.argpartition(-scores, params.top_k - 1)[: params.top_k]
        candidates, scores = candidates[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    n = len(candidates)
    if params.top_p < 1.0:  # the smallest head reaching top_p
        n = min(n, int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1)
    if params.min_p > 0:
        n = min(n, int(np.count_nonzero(probs >= params.min_p * probs[0])))
    return candidates[:n], scores[:n] / params.temperature
