"""backend: greedy decoding speed of the prefix-cached llama.cpp backend (one alive prefix,
the engine's common case) against plain llama-cpp-python, for both bundled models."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lvr_local.bench import PROMPT, PlainGreedy, greedy_without_end
from lvr_local.benchmarks.common import GEMMA3, SMOLLM2
from lvr_local.core import subvocab
from lvr_local.core.lm import TokenPrefix
from lvr_local.core.reduction import ReducedState
from lvr_local.core.subvocab import SubVocabulary
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.sources import resolve_source


class BackendGreedy:
    """The backend's common case: one alive prefix, extended by its argmax each step
    (ask for the child, then release the parent, as the engine does)."""

    def __init__(self, path: Path, prompt: list[int], threads: int) -> None:
        from lvr_local.llama.backend import LlamaBackend

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


class ReducedGreedy:
    """Backend + reduction engine: greedy over the reduced next-piece distribution."""

    def __init__(self, path: Path, prompt: list[int], threads: int, sub: SubVocabulary) -> None:
        from lvr_local.core.decompose import decomposition_tables
        from lvr_local.llama.backend import LlamaBackend

        self.backend = LlamaBackend(path, n_ctx=1024, n_threads=threads)
        self.backend.set_prompt(prompt)
        tables = decomposition_tables(load_vocabulary(path), sub)
        self.state = ReducedState(self.backend, tables)
        self.n_bytes = 0

    def step(self) -> None:
        piece = greedy_without_end(self.state.next_piece_logprobs())
        self.state.advance(piece)
        self.n_bytes += len(self.state.tables.sub.piece_bytes(piece))

    def close(self) -> None:
        self.state.close()
        self.backend.close()


def bench_backend_model(
    name: str, source: str, n_tokens: int, threads: int, mcv: SubVocabulary
) -> None:
    """The decoders side by side in one process, one step each in turn (rotating order),
    so that bursts of load on a shared machine hit all alike; medians of per-step times.
    Plain and backend steps are tokens; engine steps are pieces, so bytes/s is compared
    too (plain's bytes are those of its greedy tokens)."""
    from lvr_local.llama.backend import LlamaBackend

    path = resolve_source(source)
    vocab = load_vocabulary(path)
    own = SubVocabulary.from_pieces("own", vocab.byte_strings, [vocab])
    with LlamaBackend(path, n_ctx=256, n_threads=threads) as probe:
        prompt = probe.tokenize(PROMPT, True, False)
    plain, ours = PlainGreedy(path, prompt, threads), BackendGreedy(path, prompt, threads)
    engines = {
        "engine-own": ReducedGreedy(path, prompt, threads, own),
        "engine-mcv": ReducedGreedy(path, prompt, threads, mcv),
    }
    decoders: dict[str, PlainGreedy | BackendGreedy | ReducedGreedy]
    decoders = {"plain": plain, "backend": ours, **engines}
    times: dict[str, list[float]] = {k: [] for k in decoders}
    labels = list(decoders)
    for i in range(n_tokens):
        shift = i % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            decoders[label].step()
            times[label].append(time.perf_counter() - start)
    pairs = zip(ours.tokens, plain.tokens, strict=True)
    same = next((i for i, (x, y) in enumerate(pairs) if x != y), n_tokens)
    rate = {k: 1.0 / float(np.median(v)) for k, v in times.items()}
    byte_rate = {
        "plain": plain.n_bytes / float(np.sum(times["plain"])),
        **{k: d.n_bytes / float(np.sum(times[k])) for k, d in engines.items()},
    }
    for decoder in decoders.values():
        decoder.close()
    print(
        f"  {name}: plain llama-cpp-python {rate['plain']:.1f} tok/s ({byte_rate['plain']:.0f} "
        f"bytes/s); greedy tokens identical to the backend's for {same}/{n_tokens} steps"
    )
    print(
        f"    backend            {rate['backend']:6.1f} tok/s     ratio "
        f"{rate['backend'] / rate['plain']:.3f} (target >= 0.95)"
    )
    for label, target in (("engine-own", 0.95), ("engine-mcv", 0.9)):
        print(
            f"    {label:<18} {rate[label]:6.1f} pieces/s  ratio "
            f"{rate[label] / rate['plain']:.3f} (target >= {target}); bytes/s ratio "
            f"{byte_rate[label] / byte_rate['plain']:.3f}"
        )


def backend(n_tokens: int = 256) -> None:
    from lvr_local.machine import physical_cores

    threads = physical_cores()
    print(
        f"greedy decoding, {n_tokens} tokens after a {len(PROMPT)}-byte prompt, "
        f"n_threads={threads}, tok/s from the median step time:"
    )
    mcv = subvocab.common([load_vocabulary(resolve_source(s)) for s in (SMOLLM2, GEMMA3)])
    for name, source in (("SmolLM2", SMOLLM2), ("Gemma3", GEMMA3)):
        bench_backend_model(name, source, n_tokens, threads, mcv)
