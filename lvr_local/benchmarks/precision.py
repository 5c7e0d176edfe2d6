"""precision: `lvr score` against the independent oracle (oracle.py), on short texts
after an empty prompt, for each `precision` and with text pruning off, so that each
source of the gap shows apart: the float32 exp, and pruning (`text_prune`)."""

from __future__ import annotations

from dataclasses import replace

from lvr_local.benchmarks.common import BUNDLED
from lvr_local.benchmarks.oracle import oracle_score
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

TEXTS = (b"x=1;", b"Hello", "café".encode())
WAYS = (  # (label, settings changed from the defaults)
    ("float32 (default)", {}),
    ("float64", {"precision": "float64"}),
    ("float32, text_prune 0", {"text_prune": 0.0}),
    ("float64, text_prune 0", {"precision": "float64", "text_prune": 0.0}),
)


def precision() -> None:
    base = RunSettings(n_ctx=1024)
    print("lvr score minus the oracle's float64 sum over every tokenization, in nats:")
    print(f"  {'model':<8} {'text':<9} {'oracle':>12}  " + "  ".join(f"{w:>22}" for w, _ in WAYS))
    for spec in BUNDLED:
        runner = Runner([spec], base).load()
        try:
            for text in TEXTS:
                expected = oracle_score(runner, text)
                gaps = [
                    runner.score(text, b"", replace(base, **changes)).run()["models"][spec.name][
                        "logprob"
                    ]
                    - expected
                    for _, changes in WAYS
                ]
                print(
                    f"  {spec.name:<8} {text.decode()!r:<9} {expected:12.7f}  "
                    + "  ".join(f"{g:>+22.1e}" for g in gaps),
                    flush=True,
                )
        finally:
            runner.close()
