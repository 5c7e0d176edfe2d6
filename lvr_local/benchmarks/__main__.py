"""`python -m lvr_local.benchmarks NAME`: run one developer benchmark (see __init__)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from lvr_local.bench import measure, print_report
from lvr_local.benchmarks import (
    backend,
    chat,
    code,
    engine,
    extra_buffers,
    precision,
    prune,
    rpc,
    scoring,
    serve,
)
from lvr_local.benchmarks.common import BUNDLED


def ensemble() -> None:
    """`lvr bench` for the bundled pair."""
    print_report(measure(BUNDLED))


BENCHMARKS: dict[str, Callable[[], None]] = {
    "engine": engine.engine,
    "backend": backend.backend,
    "ensemble": ensemble,
    "precision": precision.precision,
    "prune": prune.prune,
    "serve": serve.serve,
    "rpc": rpc.rpc,
    "extra-buffers": extra_buffers.extra_buffers,
}
WITH_OPTIONS: dict[str, Callable[[Sequence[str]], None]] = {
    "scoring": scoring.scoring,
    "chat": chat.chat,
    "code": code.code,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks")
    parser.add_argument("name", choices=sorted(BENCHMARKS | WITH_OPTIONS))
    args, rest = parser.parse_known_args(argv)
    if args.name in WITH_OPTIONS:
        WITH_OPTIONS[args.name](rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        BENCHMARKS[args.name]()


if __name__ == "__main__":
    main()
