"""prune: what the pruning threshold costs (forward-pass rows per byte) and changes."""

from __future__ import annotations

import time

from lvr_local.benchmarks.common import BUNDLED, ENGLISH
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings


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
