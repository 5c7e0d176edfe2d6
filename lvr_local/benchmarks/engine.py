"""engine: (a) cold build time of Gemma's decomposition tables over the common vocabulary
of the bundled pair; (b) the reduction engine's own work per piece (everything but the
forward pass), fed by a fake model that returns precomputed peaked logits."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from lvr_local.benchmarks.common import GEMMA3, SMOLLM2
from lvr_local.core import subvocab
from lvr_local.core.decompose import build_tables
from lvr_local.core.lm import TokenPrefix
from lvr_local.core.node_scoring import NodeScorer
from lvr_local.core.reduction import EngineOptions, ReducedState
from lvr_local.core.sampling import SamplingParams
from lvr_local.core.subvocab import SubVocabulary
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.sources import resolve_source


class FakeModel:
    """Precomputed float32 logits shaped like a real model's: a wide normal background
    and 20 boosted tokens, so that the top token has probability ~0.3-0.9. The boosted
    tokens are drawn from `likely` (frequent text lives in tokens both models share)."""

    def __init__(self, n_vocab: int, likely: np.ndarray, n_rows: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rows = []
        for _ in range(n_rows):
            x = rng.normal(0.0, 2.0, n_vocab).astype(np.float32)
            boosted = rng.choice(likely, 20, replace=False)
            x[boosted] += rng.uniform(8.0, 16.0, 20).astype(np.float32)
            self.rows.append(x)
        self._n_vocab = n_vocab

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        return [self.rows[(len(p) * 7 + sum(p[-2:])) % len(self.rows)] for p in prefixes]

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        pass


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_build(gemma: Vocabulary, sub: SubVocabulary) -> None:
    first = timed(lambda: build_tables(gemma, sub))
    again = [timed(lambda: build_tables(gemma, sub)) for _ in range(3)]
    print(f"(a) tables of {gemma.name} ({gemma.n_tokens:,} tokens) over {sub.describe()}:")
    print(
        f"    first build in this process {first * 1e3:.0f} ms, "
        f"then median {np.median(again) * 1e3:.0f} ms (target < 2000 ms)"
    )


def bench_steps(
    gemma: Vocabulary,
    sub: SubVocabulary,
    likely: np.ndarray,
    label: str,
    precision: str = "float32",
    steps: int = 400,
) -> None:
    """Greedy piece choices for `steps` pieces; times next_piece_logprobs + advance."""
    tables = build_tables(gemma, sub)
    model = FakeModel(gemma.n_tokens, likely)
    state = ReducedState(model, tables, EngineOptions(prune=1e-9, precision=precision))
    times, nodes, scored = [], [], []
    for i in range(steps + 20):
        start = time.perf_counter()
        logq = state.next_piece_logprobs()
        middle = time.perf_counter()
        piece = int(np.argmax(logq[:-1]))  # the ensemble's choice, not engine work
        resume = time.perf_counter()
        state.advance(piece)
        end = time.perf_counter()
        if i >= 20:
            times.append((middle - start) + (end - resume))
            nodes.append(len(state.nodes()))
            scored.append(sum(1 for n in state.nodes() if not n.pending))
    ms = np.array(times) * 1e3
    label = f"{label}, {precision} exp"
    print(
        f"    {label:<50} median {np.median(ms):.3f} ms  p90 {np.percentile(ms, 90):.3f} ms"
        f"  (alive nodes {np.mean(nodes):.2f}, fresh {np.mean(scored):.2f})"
    )


def engine() -> None:
    smol = load_vocabulary(resolve_source(SMOLLM2))
    gemma = load_vocabulary(resolve_source(GEMMA3))
    start = time.perf_counter()
    mcv = subvocab.common([smol, gemma])
    print(
        f"common vocabulary of the bundled pair: {mcv.describe()} "
        f"in {(time.perf_counter() - start) * 1e3:.0f} ms"
    )
    bench_build(gemma, mcv)
    own = SubVocabulary.from_pieces(
        "gemma-own", gemma.byte_strings | set(subvocab.ALL_BYTES), [gemma]
    )
    print(
        "(b) engine work per piece: next_piece_logprobs + advance, fake forward pass, "
        "prune 1e-9 (target median < 0.5 ms):"
    )
    likely = np.flatnonzero(build_tables(gemma, mcv).n_pieces == 1)
    for precision in ("float32", "float64"):
        bench_steps(gemma, own, likely, "(i) gemma over its own vocabulary", precision)
        bench_steps(gemma, mcv, likely, "(ii) gemma over the common vocabulary", precision)
    print("(c) scoring one fresh node over bytes, the model as it is and with the chat")
    print("    sampler on its tokens (sample_on = tokens, docs/algorithm.md §7.5):")
    for vocab in (smol, gemma):
        bench_node_scoring(vocab)


def bench_node_scoring(vocab: Vocabulary, repeats: int = 50) -> None:
    """Median time of NodeScorer.score on a random row of the vocabulary's size, plain
    and with llama.cpp's chat chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8)
    applied to the tokens, measured side by side."""
    tables = build_tables(vocab, subvocab.byte_level())
    row = (np.random.default_rng(0).normal(size=vocab.n_tokens) * 3).astype(np.float32)
    chain = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
    scorers = {"plain": NodeScorer(tables), "sampled": NodeScorer(tables, sampling=chain)}
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, scorer in scorers.items():
            start = time.perf_counter()
            scorer.score(row)
            times[name].append(time.perf_counter() - start)
    plain, sampled = (1e3 * float(np.median(times[k])) for k in ("plain", "sampled"))
    label = f"{vocab.name} ({vocab.n_tokens} tokens)"
    print(f"    {label}: {plain:.2f} ms plain, {sampled:.2f} ms sampled")
