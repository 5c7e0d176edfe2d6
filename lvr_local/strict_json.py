"""JSON that strict parsers accept: every `--json` record, stream event and saved line.

Python's `json` writes NaN and Infinity as bare `NaN` / `-Infinity`, which is not JSON:
a strict parser (JavaScript's JSON.parse, jq, most other languages) rejects the whole
record. A log-probability of an impossible text is -inf and a weight can be NaN, so
those values do occur. Here every non-finite number becomes null (documented in the
README): "no finite value". NumPy scalars and arrays are converted to plain numbers.

Files of such records, one per line, are appended to as work is done (`lvr eval`'s
log, the TUI's conversations); `end_torn_line` keeps a line torn by a crash from
swallowing the record written after it.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinity (at any depth) replaced by None."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return finite_or_none(value.tolist())
    return value


def dumps(value: Any, **options: Any) -> str:
    """json.dumps for strict parsers: non-finite numbers become null; never emits NaN."""
    options.setdefault("ensure_ascii", False)
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def end_torn_line(file: IO[str]) -> None:
    """Before appending to a JSON-lines file (opened "a+", so readable): if its last
    line was torn by a crash (no final newline), end it, so that the next record starts
    a line of its own instead of joining the torn one and being lost with it."""
    size = os.fstat(file.fileno()).st_size
    if size and os.pread(file.fileno(), 1, size - 1) != b"\n":
        file.write("\n")
        file.flush()
