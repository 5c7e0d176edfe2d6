"""`lvr bench`: native and ensemble speeds, measured side by side in one run.

Every decoder generates greedily from the same prompt: each model through plain
llama-cpp-python (native), each model alone through the reduction engine, and the
ensembles over the common vocabulary (at once and in turn) and over bytes, each with raw
completion's rule (the product). The runs take turns of equal time, so a burst of load
on a shared machine hits all alike, and the
report gives ratios between runs of one process, never absolute targets.
`python -m lvr_local.benchmarks ensemble` prints the same report for the bundled pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import llama_cpp  # before numpy: the other order segfaulted on a CUDA machine
import numpy as np

from lvr_local.core.reduction import DEFAULT_PRUNE
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

PROMPT = b"Question: What is 12 plus 30?\nAnswer:"
# The ensembles are timed over the same length of text, this many bytes per step of the
# other runs (about the MCV ensemble's bytes per piece): a byte-level ensemble writes a
# byte a step, and bytes/s over texts of different lengths would not compare.
ENSEMBLE_BYTES_PER_STEP = 2


@dataclass(frozen=True)
class ReducedRate:
    """One model alone through the engine over the common vocabulary."""

    pieces_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class EnsembleRate:
    """One ensemble run: its speed, its speed against the ideal sequential ensemble,
    and the llama.cpp work it did per piece."""

    threads: list[int]  # n_threads of each member
    concurrent: bool  # members decoded at once (True) or in turn
    pieces_per_s: float
    bytes_per_s: float
    ratio_to_ideal: float  # pieces/s over 1/(t_A + t_B), the native step times summed
    forward_passes_per_piece: float  # llama_decode calls, all members
    rows_per_piece: float  # tokens evaluated, all members: on a CPU, the cost


@dataclass(frozen=True)
class BenchReport:
    """What `lvr bench` prints, and with --json writes (the field names are the keys)."""

    steps: int
    threads: int
    native_tokens_per_s: dict[str, float]
    native_one_thread_tokens_per_s: dict[str, float]  # only when threads > 1
    native_bytes_per_s: dict[str, float]
    reduced_single_model: dict[str, ReducedRate]
    ideal_sequential_pieces_per_s: float
    ensembles: dict[str, EnsembleRate]
    engine_overhead_ms_per_piece: float  # in-turn MCV step minus t_A + t_B
    default_vs_mcv_bytes_per_s: float  # the default ensemble (over bytes) against the MCV
    bytes_vs_mcv_bytes_per_s: float  # the byte level with every fresh node scored
    peak_rss_mib: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def greedy_without_end(logq: np.ndarray) -> int:
    """Greedy, END excluded (END is the last id): like the plain loop, which ignores EOS,
    every decoder runs the full number of steps."""
    return int(np.argmax(logq[:-1]))


class PlainGreedy:
    """Plain llama-cpp-python: high-level Llama, eval one token at a time, argmax over the
    logits read into numpy (a zero-copy view)."""

    def __init__(self, path: Path, prompt: list[int], threads: int) -> None:
        self.path = path
        self.model = llama_cpp.Llama(
            str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.n_vocab = self.model.n_vocab()
        self.model.eval(prompt)
        self.tokens: list[int] = []

    def step(self) -> None:
        pointer = llama_cpp.llama_get_logits(self.model.ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        self.tokens.append(int(logits.argmax()))
        self.model.eval([self.tokens[-1]])

    @property
    def n_bytes(self) -> int:
        """Bytes spelled by the tokens so far (control and END tokens spell none). It reads
        the vocabulary from the GGUF file: ask after the timing, not during it."""
        vocab = load_vocabulary(self.path)
        return sum(len(vocab.token_bytes(t) or b"") for t in self.tokens)

    def close(self) -> None:
        self.model.close()


class EnsembleRun:
    """An ensemble of `specs` generating greedily from PROMPT. threads=None and
    concurrent=None: what `lvr generate` does."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        sub_vocab: str,
        threads: int | None,
        concurrent: bool | None,
        **changed: float,
    ) -> None:
        settings = RunSettings(n_ctx=2048, sub_vocab=sub_vocab, n_threads=threads or 0)
        settings = replace(settings, **changed).for_mode("raw")
        self.runner = Runner(specs, settings, concurrent=concurrent).load()
        self.ensemble = self.runner.ensemble
        self.ensemble.mixing = settings.mixing()  # what `lvr generate --raw` combines by
        self.ensemble.start_raw(PROMPT + b" ")
        self.n_bytes = 0
        self.steps = 0
        self._after_prompt = self._work_so_far()  # the prompt's work is not the generation's

    def step(self) -> None:
        self.n_bytes += len(self.ensemble.step(greedy_without_end).text)
        self.steps += 1

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


class Decoder(Protocol):
    """One of the runs that take turns: a greedy step, and the bytes spelled so far."""

    @property
    def n_bytes(self) -> int: ...

    def step(self) -> None: ...

    def close(self) -> None: ...


def measure(specs: Sequence[ModelSpec], n_steps: int = 128, block_s: float = 0.1) -> BenchReport:
    """Native speed of each model and ensemble speeds, measured side by side in one run:
    the runs take turns, about `block_s` seconds each, so that a burst of load on a
    shared machine hits all alike. Turns of equal time rather than single steps: right
    after another context's decode, llama.cpp's idle threads still spin for a while and
    slow the next run's first step, and equal turns give every run the same number of
    such switches per second (turns of 8 steps gave a byte-level ensemble, at one byte a
    step, twice the switches per byte of the MCV ensemble)."""
    from lvr_local.machine import physical_cores

    threads = physical_cores()
    runs = _decoders(specs, threads)
    try:
        total = _time_in_turns(runs, n_steps, block_s)
        return _report(runs, total, n_steps, threads, [s.name for s in specs])
    finally:
        for run in runs.values():
            run.close()


def _decoders(specs: Sequence[ModelSpec], threads: int) -> dict[str, Decoder]:
    """Every decoder of `lvr bench`, by label: native, one model through the engine,
    and the ensembles."""
    from lvr_local.llama.backend import LlamaBackend

    runs: dict[str, Decoder] = {}
    for spec in specs:
        path = spec.resolve_path()
        with LlamaBackend(path, n_ctx=256, n_threads=threads) as probe:
            prompt = probe.tokenize(PROMPT, True, False)
        runs[f"native {spec.name}"] = PlainGreedy(path, prompt, threads)
        if threads > 1:  # how the model scales over threads decides how to share cores
            runs[f"native {spec.name}, 1 thread"] = PlainGreedy(path, prompt, 1)
    for spec in specs:  # each model alone through the engine
        runs[f"reduced {spec.name}"] = EnsembleRun([spec], "mcv", None, None)
    runs["ensemble mcv"] = EnsembleRun(specs, "mcv", None, None)
    runs["ensemble mcv, in turn"] = EnsembleRun(specs, "mcv", threads, concurrent=False)
    runs["ensemble default"] = EnsembleRun(specs, "auto", None, None)  # bytes, §7.4
    # The byte level as it was: every fresh node above `prune` scored (a forward pass).
    runs["ensemble bytes, all fresh"] = EnsembleRun(
        specs, "bytes", None, None, fresh_prune=DEFAULT_PRUNE
    )
    return runs


def _time_in_turns(runs: dict[str, Decoder], n_steps: int, turn_s: float) -> dict[str, float]:
    """Total seconds of each run's `n_steps` steps (an ensemble's: until it has written
    ENSEMBLE_BYTES_PER_STEP * n_steps bytes), the runs taking turns of about `turn_s`
    seconds, each round starting one run later. Rates come from total time
    (throughput): byte-level steps are bimodal (a forward pass or none), so a median
    step would misstate them."""
    labels = list(runs)
    total = dict.fromkeys(labels, 0.0)
    done = dict.fromkeys(labels, 0)

    def finished(label: str) -> bool:
        run = runs[label]
        if label.startswith("ensemble") and isinstance(run, EnsembleRun):
            return run.n_bytes >= ENSEMBLE_BYTES_PER_STEP * n_steps
        return done[label] >= n_steps

    rounds = 0
    while waiting := [label for label in labels if not finished(label)]:
        shift = rounds % len(waiting)
        for label in waiting[shift:] + waiting[:shift]:
            spent = 0.0
            while not finished(label) and spent < turn_s:
                start = time.perf_counter()
                runs[label].step()
                spent += time.perf_counter() - start
                done[label] += 1
            total[label] += spent
        rounds += 1
    return total


def _report(
    runs: dict[str, Decoder], total: dict[str, float], n_steps: int, threads: int, names: list
) -> BenchReport:
    """The rates from the total times; ensembles against the ideal sequential rate."""
    import resource

    t_native = {name: total[f"native {name}"] / n_steps for name in names}
    ensembles = _ensemble_rates(runs, total, n_steps, 1.0 / sum(t_native.values()))
    in_turn_run = runs["ensemble mcv, in turn"]
    assert isinstance(in_turn_run, EnsembleRun)
    in_turn = total["ensemble mcv, in turn"] / in_turn_run.steps  # same threads as native
    return BenchReport(
        steps=n_steps,
        threads=threads,
        native_tokens_per_s={k: round(1.0 / v, 1) for k, v in t_native.items()},
        native_one_thread_tokens_per_s={
            name: round(n_steps / total[key], 1)
            for name in names
            if (key := f"native {name}, 1 thread") in total
        },
        native_bytes_per_s={
            name: round(runs[f"native {name}"].n_bytes / total[f"native {name}"], 1)
            for name in names
        },
        reduced_single_model={
            name: ReducedRate(
                pieces_per_s=round(n_steps / total[f"reduced {name}"], 1),
                bytes_per_s=round(runs[f"reduced {name}"].n_bytes / total[f"reduced {name}"], 1),
            )
            for name in names
        },
        ideal_sequential_pieces_per_s=round(1.0 / sum(t_native.values()), 1),
        ensembles=ensembles,
        engine_overhead_ms_per_piece=round(1e3 * (in_turn - sum(t_native.values())), 2),
        default_vs_mcv_bytes_per_s=_bytes_ratio(ensembles, "ensemble default"),
        bytes_vs_mcv_bytes_per_s=_bytes_ratio(ensembles, "ensemble bytes, all fresh"),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def _bytes_ratio(ensembles: dict[str, EnsembleRate], label: str) -> float:
    """An ensemble's bytes/s over the MCV ensemble's, measured side by side."""
    return round(ensembles[label].bytes_per_s / ensembles["ensemble mcv"].bytes_per_s, 3)


def _ensemble_rates(
    runs: dict[str, Decoder], total: dict[str, float], n_steps: int, ideal: float
) -> dict[str, EnsembleRate]:
    """Each ensemble's rates against the ideal sequential rate, and its work per piece."""
    rates: dict[str, EnsembleRate] = {}
    for label, run in runs.items():
        if not isinstance(run, EnsembleRun) or not label.startswith("ensemble"):
            continue
        rate = run.steps / total[label]
        calls, rows = run.work()
        rates[label] = EnsembleRate(
            threads=[b.n_threads for b in run.runner.backends],
            concurrent=run.ensemble.concurrent,
            pieces_per_s=round(rate, 1),
            bytes_per_s=round(run.n_bytes / total[label], 1),
            ratio_to_ideal=round(rate / ideal, 3),
            forward_passes_per_piece=round(calls / run.steps, 2),
            rows_per_piece=round(rows / run.steps, 2),
        )
    return rates


def print_report(report: BenchReport) -> None:
    native = report.native_tokens_per_s
    print(
        f"{report.steps} greedy steps each (the ensembles: "
        f"{ENSEMBLE_BYTES_PER_STEP * report.steps} bytes of text each), side by side, "
        f"n_threads={report.threads}"
    )
    for name, rate in native.items():
        alone = report.native_one_thread_tokens_per_s.get(name)
        with_one = f" ({alone} with 1 thread)" if alone else ""
        native_bytes = report.native_bytes_per_s[name]
        print(f"  native {name:<10} {rate:8.1f} tokens/s {native_bytes:6.1f} bytes/s{with_one}")
    for name, r in report.reduced_single_model.items():
        ratio = r.pieces_per_s / native[name]
        print(
            f"  reduced {name:<9} {r.pieces_per_s:8.1f} pieces/s {r.bytes_per_s:6.1f} bytes/s"
            f"  (alone over the MCV; pieces/s vs native tokens/s {ratio:.3f})"
        )
    print(
        f"  ideal sequential ensemble 1/(t_A + t_B): {report.ideal_sequential_pieces_per_s} "
        "pieces/s"
    )
    for label, e in report.ensembles.items():
        how = "at once" if e.concurrent else "in turn"
        threads = "+".join(str(t) for t in e.threads)
        print(
            f"  {label:<22} {e.pieces_per_s:6.1f} pieces/s {e.bytes_per_s:6.1f} bytes/s"
            f"  ratio to ideal {e.ratio_to_ideal:.3f}  forward passes/piece "
            f"{e.forward_passes_per_piece} ({e.rows_per_piece} rows)"
            f"  threads {threads}, {how}"
        )
    print(
        f"  default ensemble (bytes) bytes/s vs MCV bytes/s: "
        f"{report.default_vs_mcv_bytes_per_s} (target >= 0.9); with every fresh node "
        f"scored: {report.bytes_vs_mcv_bytes_per_s}"
    )
    print(
        f"  engine overhead per MCV piece (in-turn step minus t_A + t_B): "
        f"{report.engine_overhead_ms_per_piece} ms"
    )
    print(f"  peak memory (RSS): {report.peak_rss_mib} MiB")
