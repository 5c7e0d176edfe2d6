"""JSON that strict parsers accept: every `--json` record, stream event and saved line.

Python's `json` writes NaN and Infinity as bare `NaN` / `-Infinity`, which is not JSON:
a strict parser (JavaScript's JSON.parse, jq, most other languages) rejects the whole
record. A log-probability of an impossible text is -inf and a weight can be NaN, so
those values do occur. Here every non-finite number becomes null (documented in the
README): "no finite value". NumPy scalars and arrays are converted to plain numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any


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
