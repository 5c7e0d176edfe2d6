"""scoring: the exact numeric path against the fast one, side by side."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from lvr_local.benchmarks.common import BUNDLED, ENGLISH
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings


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
