"""The settings of a run: one dataclass, each default written once, each value checked.

A run's settings come from three places, later ones winning: these defaults, the
`[defaults]` table of models.toml, and the front end (command-line flags, the TUI's
settings form, a server request). Every value passes the same checks wherever it comes
from, and a bad one is reported with its name, where it came from, and what is expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lvr_local.core.combine import RULES
from lvr_local.core.reduction import (
    DEFAULT_MAX_BRANCHES,
    DEFAULT_PRUNE,
    DEFAULT_TEXT_PRUNE,
    EngineOptions,
)
from lvr_local.core.sampling import SamplingParams
from lvr_local.decoding.ensemble import METHODS
from lvr_local.decoding.generation import Budget
from lvr_local.errors import ConfigError

NUMERICS = ("auto", "exact", "fast")
SUB_VOCAB_PATTERN = re.compile(r"^(mcv|bytes|maxlen:[1-9][0-9]*)$")
MAX_CTX = 2**20  # llama.cpp takes n_ctx as a 32-bit value; no model here needs more


@dataclass(frozen=True)
class RunSettings:
    """Everything a run can be told. Models: n_ctx, n_gpu_layers, n_threads, numerics
    (auto: exact for scoring, fast for generation; docs/algorithm.md §8). Reduction
    (docs/algorithm.md §4-7): sub_vocab, method, combine, prune (generation),
    text_prune (known text: scoring, forced prompt tails), max_branches, token_top_k.
    Sampling over pieces: temperature, top_k, top_p, min_p, seed. Budgets: max_pieces,
    max_bytes, stop."""

    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int = 0
    numerics: str = "auto"
    sub_vocab: str = "mcv"
    method: str = "lossless"
    combine: str = "mean"
    prune: float = DEFAULT_PRUNE
    text_prune: float = DEFAULT_TEXT_PRUNE
    max_branches: int = DEFAULT_MAX_BRANCHES
    token_top_k: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_pieces: int = 256
    max_bytes: int | None = None
    stop: tuple[str, ...] = ()

    def exact_numerics(self, scoring: bool) -> bool:
        """Whether a run takes llama.cpp's exact path: `auto` means scoring does (its
        numbers must not move with batching) and generation does not (speed)."""
        return self.numerics == "exact" or (self.numerics == "auto" and scoring)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            prune=self.prune,
            text_prune=self.text_prune,
            token_top_k=self.token_top_k or None,
            max_branches=self.max_branches or None,
        )

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def budget(self) -> Budget:
        return Budget(self.max_pieces, self.max_bytes, self.stop)

    def ensemble_key(self) -> tuple[object, ...]:
        """The settings an ensemble is built with: a change rebuilds it (models stay)."""
        return (
            self.sub_vocab,
            self.method,
            self.combine,
            self.prune,
            self.text_prune,
            self.max_branches,
            self.token_top_k,
        )

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["stop"] = list(self.stop)
        return record


# name -> (accepted Python types, what is expected, extra check or None)
Check = tuple[tuple[type, ...], str, Any]


def _finite(v: float) -> bool:
    return math.isfinite(v)


SCHEMA: dict[str, Check] = {
    "n_ctx": ((int,), f"an integer from 16 to {MAX_CTX}", lambda v: 16 <= v <= MAX_CTX),
    "n_gpu_layers": ((int,), "an integer >= -1 (-1 = all layers)", lambda v: v >= -1),
    "n_threads": (
        (int,),
        "an integer from 0 to 1024 (0 = the cores shared among the models)",
        lambda v: 0 <= v <= 1024,
    ),
    "numerics": ((str,), "one of " + ", ".join(NUMERICS), lambda v: v in NUMERICS),
    "sub_vocab": ((str,), "one of mcv, bytes, maxlen:K", SUB_VOCAB_PATTERN.match),
    "method": ((str,), "one of " + ", ".join(METHODS), lambda v: v in METHODS),
    "combine": ((str,), "one of " + ", ".join(RULES), lambda v: v in RULES),
    "prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "text_prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "max_branches": ((int,), "an integer >= 0 (0 = no cap)", lambda v: v >= 0),
    "token_top_k": ((int,), "an integer >= 0 (0 = every token)", lambda v: v >= 0),
    "temperature": ((int, float), "a number from 0 to 100", lambda v: 0 <= v <= 100),
    "top_k": ((int,), "an integer >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": ((int, float), "a number in (0, 1]", lambda v: 0 < v <= 1),
    "min_p": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "seed": ((int,), "an integer from 0 to 2**63 - 1", lambda v: 0 <= v < 2**63),
    "max_pieces": ((int,), "an integer >= 1", lambda v: v >= 1),
    "max_bytes": ((int,), "an integer >= 1", lambda v: v >= 1),
    "stop": ((tuple, list), "a list of strings", lambda v: all(isinstance(s, str) for s in v)),
}
assert set(SCHEMA) == {f.name for f in fields(RunSettings)}, "every setting has a check"


def checked(values: dict[str, Any], where: str, allowed: dict[str, Check] = SCHEMA) -> dict:
    """`values` if every key is known and every value passes its check, else a
    ConfigError naming where, the key, the value and what is expected."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{unknown[0]}' (expected one of: {', '.join(allowed)})"
        )
    for key, value in values.items():
        types, expected, check = allowed[key]
        # bool is an int in Python; only accept it where a bool is expected.
        bad_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        numeric_nan = isinstance(value, float) and not _finite(value)
        if bad_type or numeric_nan or (check is not None and not check(value)):
            raise ConfigError(f"{where}: '{key}' must be {expected}, got {value!r}")
    return dict(values)


def with_overrides(
    settings: RunSettings, where: str = "command line", **overrides: Any
) -> RunSettings:
    """Settings with `overrides` applied; None means 'not given'."""
    given = checked({k: v for k, v in overrides.items() if v is not None}, where)
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    for key in ("prune", "text_prune", "temperature", "top_p", "min_p"):
        if key in given:
            given[key] = float(given[key])
    return replace(settings, **given)
