"""extra-buffers: llama.cpp's repacked weights (AMX, CPU_REPACK) on and off, side by side."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lvr_local.benchmarks.common import GEMMA3, SMOLLM2
from lvr_local.runner.sources import resolve_source


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
