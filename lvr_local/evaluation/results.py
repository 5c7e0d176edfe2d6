"""An evaluation's output folder: the per-item log, resumption, the summary, and the
paired bootstrap.

Every finished item is appended to `items.jsonl` at once (one JSON object per line,
flushed), keyed by (system, view, item id). A rerun reads the log and skips the keys it
holds, so Ctrl-C loses at most the item in progress. `run.json` records what the
results depend on (task, data, models, decoding settings); a rerun whose settings
differ is refused rather than mixed into the same table.

Several processes may share a folder, each with its own `--systems` (one core each,
say): reading the log and each append hold an exclusive `flock` on it, so no line is
read half-written or interleaved, and a key found twice counts once (the later
record). A rerun with every system then prints the whole table.

Each record carries its metrics as (numerator, denominator) pairs, so every figure is a
ratio of sums: accuracy is correct / items, bits per byte is bits / bytes. The paired
bootstrap resamples items (the same draw for both systems) and recomputes the ratio.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lvr_local.atomic import write_atomic
from lvr_local.errors import LvrError
from lvr_local.strict_json import end_torn_line

ITEMS = "items.jsonl"
RUN = "run.json"
SUMMARY = "summary.json"
BOOTSTRAP_SAMPLES = 2000
LOWER_IS_BETTER = {"bits_per_byte"}


class ResultLog:
    """The folder of one evaluation: what is done, and appending what gets done."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self._records: dict[tuple[str, str, str], dict[str, Any]] = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LvrError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
        self._check_fingerprint(fingerprint)
        try:
            self._file = (folder / ITEMS).open("a+", encoding="utf-8")
            with locked(self._file, fcntl.LOCK_EX):
                self._read()
        except OSError as e:
            raise LvrError(f"cannot write to {folder / ITEMS}: {e.strerror or e}") from e

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record, one per (system, view, item)."""
        return list(self._records.values())

    def _check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        path = self.folder / RUN
        recorded = self._recorded_fingerprint(path)
        if recorded is None:
            self._write(path, fingerprint)
            return
        differ = differences(recorded, fingerprint)
        if differ:
            details = "; ".join(f"{k}: {old} there, {new} now" for k, old, new in differ)
            raise LvrError(
                f"{self.folder} holds results made with other settings ({details}): "
                "rerun with the same options, or another --output"
            )

    def _recorded_fingerprint(self, path: Path) -> dict[str, Any] | None:
        """run.json's fingerprint; None when there is none yet. A damaged one (left by
        a version that wrote it in place, or edited by hand) is rebuilt when no result
        depends on it, and refused otherwise: which settings made those is unknown."""
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable, empty, cut short: not JSON
            recorded = None
        if isinstance(recorded, dict):
            return recorded
        items = self.folder / ITEMS
        if not items.exists() or items.stat().st_size == 0:
            return None
        raise LvrError(
            f"{path} is damaged, so the settings of the results in {self.folder} are "
            "unknown: give another --output, or delete the folder to start again"
        )

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        """A whole file, atomically; a failure names the file and keeps the items."""
        try:
            write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise LvrError(f"cannot write {path}: {e.strerror or e}") from e

    def _read(self) -> None:
        """The records so far; a last line cut short by a hard kill is skipped (that item
        is redone) and ended, so that the next record starts a line of its own."""
        self._file.seek(0)
        for line in self._file.read().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._records[key_of(record)] = record
        end_torn_line(self._file)

    def has(self, system: str, view: str, item_id: str) -> bool:
        return (system, view, item_id) in self._records

    def append(self, record: dict[str, Any]) -> None:
        """One finished item, on a line of its own. A failed write (a full disk) is
        reported; the items before it stay, and a torn last line is redone on rerun."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            with locked(self._file, fcntl.LOCK_EX):
                data = line.encode("utf-8")
                while data:  # a short write (the disk filling up) is followed by an error
                    data = data[os.write(self._file.fileno(), data) :]
        except OSError as e:
            raise LvrError(
                f"cannot write to {self.folder / ITEMS}: {e.strerror or e}; the "
                f"{len(self._records)} results before it are kept, rerun to continue"
            ) from e
        self._records[key_of(record)] = record

    def close(self) -> None:
        self._file.close()

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.folder / SUMMARY
        self._write(path, summary)
        return path


def key_of(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["system"], record["view"], record["id"]


@contextmanager
def locked(file: IO[str], how: int) -> Iterator[None]:
    """Hold an flock on `file` (another process appending to the same log waits)."""
    fcntl.flock(file.fileno(), how)
    try:
        yield
    finally:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------- figures


@dataclass(frozen=True)
class Comparison:
    """`system` against `baseline` on one metric, over the items both have: the
    difference of the ratios and its paired-bootstrap 95% interval."""

    system: str
    baseline: str
    metric: str
    n_items: int
    difference: float
    low: float
    high: float


def ratio(pairs: Iterable[Sequence[float]]) -> float:
    num = den = 0.0
    for n, d in pairs:
        num, den = num + n, den + d
    return num / den if den else math.nan


def paired_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    seed: int,
    samples: int = BOOTSTRAP_SAMPLES,
) -> tuple[float, float, float]:
    """ratio(a) - ratio(b) over paired items, and the 2.5 and 97.5 percentiles of that
    difference over `samples` resamplings of the items (a seeded numpy Generator, so the
    same seed gives the same interval)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired bootstrap needs the same, non-empty items on both sides")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = ratio(x.tolist()) - ratio(y.tolist())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(samples, len(x)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rx = x[picks, 0].sum(1) / x[picks, 1].sum(1)
        ry = y[picks, 0].sum(1) / y[picks, 1].sum(1)
    low, high = np.nanpercentile(rx - ry, [2.5, 97.5])
    return float(difference), float(low), float(high)


def base_metric(key: str) -> str:
    """The metric a key names: `bits_per_byte`, or lm-eval's `TASK/METRIC,FILTER`."""
    return key.rpartition("/")[2].partition(",")[0]


def metric_pairs(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list]]:
    """(system, metric) -> {item id: (numerator, denominator)}."""
    table: dict[tuple[str, str], dict[str, list]] = {}
    for record in records:
        for metric, pair in record.get("metrics", {}).items():
            table.setdefault((record["system"], metric), {})[record["id"]] = pair
    return table


def compare(
    pairs: dict[tuple[str, str], dict[str, list]],
    systems: Sequence[str],
    members: Sequence[str],
    seed: int,
) -> list[Comparison]:
    """Every non-member system against the best member, metric by metric."""
    out: list[Comparison] = []
    metrics = dict.fromkeys(m for _, m in pairs)
    for metric in metrics:
        scored = [m for m in members if (m, metric) in pairs and m in systems]
        if not scored:
            continue
        sign = -1 if base_metric(metric) in LOWER_IS_BETTER else 1
        best = max(scored, key=lambda m: sign * ratio(pairs[(m, metric)].values()))
        for system in systems:
            if system in members or (system, metric) not in pairs:
                continue
            ids = sorted(pairs[(system, metric)].keys() & pairs[(best, metric)].keys())
            if not ids:
                continue
            a = [pairs[(system, metric)][i] for i in ids]
            b = [pairs[(best, metric)][i] for i in ids]
            diff, low, high = paired_bootstrap(a, b, seed)
            out.append(Comparison(system, best, metric, len(ids), diff, low, high))
    return out


def summarize(
    records: Iterable[dict[str, Any]],
    systems: Sequence[str],
    members: Sequence[str],
    item_ids: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """The summary of the records of these systems on these items: each system's
    metrics, item counts, wall time and prompt tokens, and the comparisons against the
    best member."""
    wanted = set(item_ids)
    kept = [r for r in records if r["system"] in systems and r["id"] in wanted]
    pairs = metric_pairs(kept)
    rows = {name: system_figures(name, kept, pairs) for name in systems}
    comparisons = compare(pairs, systems, members, seed)
    return {
        "items": len(item_ids),
        "systems": rows,
        "comparisons": [vars(c) for c in comparisons],
        "seed": seed,
    }


def system_figures(
    name: str, records: Sequence[dict[str, Any]], pairs: dict[tuple[str, str], dict[str, list]]
) -> dict[str, Any]:
    """One row: metric values, items done per view, seconds per view, and the prompt
    tokens evaluated per item: the first item a process evaluated (cold cache) against
    the mean of the later ones."""
    mine = [r for r in records if r["system"] == name]
    views = sorted({r["view"] for r in mine})
    cold = [r["prompt_tokens"] for r in mine if "prompt_tokens" in r and r.get("cold")]
    warm = [r["prompt_tokens"] for r in mine if "prompt_tokens" in r and not r.get("cold")]
    return {
        "metrics": {m: ratio(p.values()) for (s, m), p in pairs.items() if s == name},
        "items": {v: sum(r["view"] == v for r in mine) for v in views},
        "seconds": {v: round(sum(r["seconds"] for r in mine if r["view"] == v), 1) for v in views},
        "prompt_tokens": {
            "first": float(np.mean(cold)) if cold else None,
            "later": float(np.mean(warm)) if warm else None,
        },
    }


def differences(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(key, old value, new value) for each value that differs, nested keys dotted
    (settings.temperature), values shown as JSON."""
    found: list[tuple[str, str, str]] = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        else:
            found.append((f"{prefix}{key}", _shown(a), _shown(b)))
    return found


def _shown(value: Any) -> str:
    """A fingerprint value in an error message: JSON, cut short when long."""
    text = "(none)" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."
