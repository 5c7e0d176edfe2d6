"""The settings of a run: one dataclass, each default written once, each value checked.

A run's settings come from three places, later ones winning: these defaults, the
`[defaults]` table of models.toml, and the front end (command-line flags, the TUI's
settings form, a server request). Every value passes the same checks wherever it comes
from, and a bad one is reported with its name, where it came from, and what is expected.

Sampling depends on the mode. A conversation samples like llama.cpp and Ollama do
(temperature, top-k, top-p, min-p, a mild DRY repetition penalty); a raw completion, like
scoring, keeps the exact conventions (greedy, nothing penalised), so that it shows what
the ensemble predicts. Those settings default to None, "the mode's", and PROFILES holds
each mode's value, written once; a value set in models.toml or on the command line
applies in both modes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lvr_local.core.combine import RULES, Mixing
from lvr_local.core.node_scoring import PRECISIONS
from lvr_local.core.reduction import (
    DEFAULT_FRESH_PRUNE,
    DEFAULT_MAX_BRANCHES,
    DEFAULT_PRUNE,
    DEFAULT_TEXT_PRUNE,
    EngineOptions,
)
from lvr_local.core.repetition import RepetitionParams
from lvr_local.core.sampling import SamplingParams
from lvr_local.decoding.ensemble import METHODS
from lvr_local.decoding.generation import Budget
from lvr_local.errors import ConfigError
from lvr_local.llama.extra_buffers import SETTINGS as EXTRA_BUFFERS
from lvr_local.llama.rpc import is_endpoint

NUMERICS = ("auto", "exact", "fast")
SAMPLE_ON = ("tokens", "pieces")
SUB_VOCAB_PATTERN = re.compile(r"^(auto|mcv|bytes|maxlen:[1-9][0-9]*)$")
MAX_CTX = 2**20  # llama.cpp takes n_ctx as a 32-bit value; no model here needs more


MODES = ("chat", "raw")
_REPETITION = RepetitionParams()  # llama.cpp's defaults: every penalty off

# The settings whose default depends on the mode (None in RunSettings), chosen by
# `python -m lvr_local.benchmarks chat` and `... code` (README, "Measured"). Both modes
# combine by the product over bytes (the `auto` sub-vocabulary, docs/algorithm.md §7.4),
# which conditions every member on the text itself. Chat: llama.cpp's sampling defaults
# (common/common.h) with DRY at 0.8, its authors' suggested strength, acting on each
# member's own tokens (`sample_on`, §7.5), which ended replies as often as bayes over the
# MCV did and repeated no line. Raw: greedy and unpenalised, which keeps code on its
# indentation grid and predicted code and prose best, with the base member deferring to
# a sure chat member at 5 (§7.6): the middle of 4-6, where greedy HumanEval reaches
# SmolLM2 alone (10/164) and runs to the budget no more often (0-3 and 8 fall short).
PROFILES: dict[str, dict[str, Any]] = {
    "chat": {
        "combine": "product",
        "defer": 0.0,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "dry_multiplier": 0.8,
    },
    "raw": {
        "combine": "product",
        "defer": 5.0,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "dry_multiplier": _REPETITION.dry_multiplier,
    },
}


@dataclass(frozen=True)
class RunSettings:
    """Everything a run can be told. Models: n_ctx, n_gpu_layers, n_threads, rpc (the
    llama.cpp RPC servers, "host:port", that hold the models' offloaded layers; empty:
    this machine), extra_buffers (llama.cpp's repacked weight layouts, AMX and CPU_REPACK:
    auto = where a probe decode found them safe, llama/extra_buffers.py), numerics (auto:
    exact for scoring, fast for generation; docs/algorithm.md §8), precision (of the
    engine's full-vocabulary exp: float32, or float64 for the last ~1e-7 nats; README,
    "Exactness"). Reduction
    (docs/algorithm.md §4-7): sub_vocab, method, combine, calibrate, switch_rate, defer
    (how strongly base members give way to a sure chat member, §7.6), prune
    (generation), fresh_prune (generation, new branches: they cost a forward pass),
    text_prune (known text: scoring, forced prompt tails), max_branches,
    token_top_k. Sampling: temperature, top_k, top_p, min_p, seed, and sample_on: where
    the truncations, the temperature and the penalties act, on each member's own tokens
    before the reduction ("tokens", the default: as llama.cpp samples the member alone;
    docs/algorithm.md §7.5) or on the combined pieces ("pieces").
    Repetition (llama.cpp's names): repeat_penalty, repeat_last_n, presence_penalty,
    frequency_penalty, dry_*. Budgets: max_pieces, max_bytes, stop. None: the mode's
    value (PROFILES)."""

    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int = 0
    rpc: tuple[str, ...] = ()
    extra_buffers: str = "auto"
    numerics: str = "auto"
    precision: str = "float32"
    sub_vocab: str = "auto"
    method: str = "lossless"
    combine: str | None = None
    calibrate: bool = Mixing.calibrate
    switch_rate: float = Mixing.switch_rate
    defer: float | None = None
    prune: float = DEFAULT_PRUNE
    fresh_prune: float = DEFAULT_FRESH_PRUNE
    text_prune: float = DEFAULT_TEXT_PRUNE
    max_branches: int = DEFAULT_MAX_BRANCHES
    token_top_k: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    sample_on: str = "tokens"
    repeat_penalty: float = _REPETITION.repeat_penalty
    repeat_last_n: int = _REPETITION.repeat_last_n
    presence_penalty: float = _REPETITION.presence_penalty
    frequency_penalty: float = _REPETITION.frequency_penalty
    dry_multiplier: float | None = None
    dry_base: float = _REPETITION.dry_base
    dry_allowed_length: int = _REPETITION.dry_allowed_length
    dry_penalty_last_n: int = _REPETITION.dry_penalty_last_n
    dry_sequence_breakers: tuple[str, ...] = _REPETITION.dry_sequence_breakers
    # Over bytes (the default ensemble) a piece is a byte: 1024 is about 256 tokens of text.
    max_pieces: int = 1024
    max_bytes: int | None = None
    stop: tuple[str, ...] = ()

    def exact_numerics(self, scoring: bool) -> bool:
        """Whether a run takes llama.cpp's exact path: `auto` means scoring does (its
        numbers must not move with batching) and generation does not (speed)."""
        return self.numerics == "exact" or (self.numerics == "auto" and scoring)

    def for_mode(self, mode: str) -> RunSettings:
        """These settings with every mode-dependent one not set taken from the mode's
        profile: "chat" (conversations) or "raw" (raw completion)."""
        unset = {k: v for k, v in PROFILES[mode].items() if getattr(self, k) is None}
        return replace(self, **unset)

    def _resolved(self, key: str) -> Any:
        value = getattr(self, key)
        if value is None:
            raise ValueError(f"'{key}' depends on the mode: call for_mode() first")
        return value

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            prune=self.prune,
            text_prune=self.text_prune,
            fresh_prune=self.fresh_prune,
            token_top_k=self.token_top_k or None,
            max_branches=self.max_branches or None,
            precision=self.precision,
        )

    def mixing(self) -> Mixing:
        return Mixing(
            self._resolved("combine"), self.calibrate, self.switch_rate, self._resolved("defer")
        )

    def sampling(self) -> SamplingParams:
        values = (self._resolved(k) for k in ("temperature", "top_k", "top_p", "min_p"))
        return SamplingParams(*values, self.seed)

    def member_sampling(self, scoring: bool = False) -> SamplingParams | None:
        """The sampler each member applies to its own tokens (docs/algorithm.md §7.5):
        in sampled generation with sample_on "tokens" and the lossless method (the naive
        baseline has no token-level model to sample); None otherwise (greedy, scoring)."""
        params = self.sampling()
        on_tokens = self.sample_on == "tokens" and self.method == "lossless"
        return params if on_tokens and params.temperature > 0 and not scoring else None

    def piece_sampling(self) -> SamplingParams:
        """How a piece is drawn from the combined distribution: a plain draw (seeded)
        when the members already sampled on their tokens, else the settings' sampler."""
        params = self.sampling()
        if self.member_sampling() is None:
            return params
        return SamplingParams(temperature=1.0, seed=params.seed)

    def member_repetition(self, scoring: bool = False) -> RepetitionParams | None:
        """The penalties each member's sampler applies to its own tokens: the run's,
        when the members sample on their tokens (`member_sampling`); else None."""
        return self.repetition() if self.member_sampling(scoring) is not None else None

    def piece_repetition(self) -> RepetitionParams:
        """The penalties on the combined pieces: none when the members apply them."""
        return RepetitionParams() if self.member_sampling() is not None else self.repetition()

    def repetition(self) -> RepetitionParams:
        return RepetitionParams(
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            dry_multiplier=self._resolved("dry_multiplier"),
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            dry_penalty_last_n=self.dry_penalty_last_n,
            dry_sequence_breakers=self.dry_sequence_breakers,
        )

    def budget(self) -> Budget:
        return Budget(self.max_pieces, self.max_bytes, self.stop)

    def ensemble_key(self) -> tuple[object, ...]:
        """The settings an ensemble is built with: a change rebuilds it (models stay)."""
        return (
            self.sub_vocab,
            self.method,
            self.prune,
            self.fresh_prune,
            self.text_prune,
            self.max_branches,
            self.token_top_k,
            self.precision,
        )

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["stop"] = list(self.stop)
        record["dry_sequence_breakers"] = list(self.dry_sequence_breakers)
        record["rpc"] = list(self.rpc)
        return record


# name -> (accepted Python types, what is expected, extra check or None)
Check = tuple[tuple[type, ...], str, Any]


def _finite(v: float) -> bool:
    return math.isfinite(v)


def _penalty_factor(v: float) -> bool:
    return 0.01 <= v <= 100


def _bounded(v: float) -> bool:
    return -100 <= v <= 100


def _strings(v: list[Any] | tuple[Any, ...]) -> bool:
    return all(isinstance(s, str) for s in v)


def _endpoints(v: list[Any] | tuple[Any, ...]) -> bool:
    return all(is_endpoint(s) for s in v)


_WINDOW = "an integer >= -1 (pieces; -1 = the whole reply, 0 = off)"


SCHEMA: dict[str, Check] = {
    "n_ctx": ((int,), f"an integer from 16 to {MAX_CTX}", lambda v: 16 <= v <= MAX_CTX),
    "n_gpu_layers": ((int,), "an integer >= -1 (-1 = all layers)", lambda v: v >= -1),
    "n_threads": (
        (int,),
        "an integer from 0 to 1024 (0 = the cores shared among the models)",
        lambda v: 0 <= v <= 1024,
    ),
    "rpc": ((tuple, list), 'a list of "host:port" RPC servers', _endpoints),
    "extra_buffers": (
        (str,),
        "one of " + ", ".join(EXTRA_BUFFERS),
        lambda v: v in EXTRA_BUFFERS,
    ),
    "numerics": ((str,), "one of " + ", ".join(NUMERICS), lambda v: v in NUMERICS),
    "precision": ((str,), "one of " + ", ".join(PRECISIONS), lambda v: v in PRECISIONS),
    "sub_vocab": ((str,), "one of auto, mcv, bytes, maxlen:K", SUB_VOCAB_PATTERN.match),
    "method": ((str,), "one of " + ", ".join(METHODS), lambda v: v in METHODS),
    "combine": ((str,), "one of " + ", ".join(RULES), lambda v: v in RULES),
    "calibrate": ((bool,), "true or false", None),
    "switch_rate": ((int, float), "a number in [0, 1) (0 = plain bayes)", lambda v: 0 <= v < 1),
    "defer": ((int, float), "a number from 0 to 16 (0 = off)", lambda v: 0 <= v <= 16),
    "prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "fresh_prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "text_prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "max_branches": ((int,), "an integer >= 0 (0 = no cap)", lambda v: v >= 0),
    "token_top_k": ((int,), "an integer >= 0 (0 = every token)", lambda v: v >= 0),
    "temperature": ((int, float), "a number from 0 to 100", lambda v: 0 <= v <= 100),
    "top_k": ((int,), "an integer >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": ((int, float), "a number in (0, 1]", lambda v: 0 < v <= 1),
    "min_p": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "seed": ((int,), "an integer from 0 to 2**63 - 1", lambda v: 0 <= v < 2**63),
    "sample_on": ((str,), "one of " + ", ".join(SAMPLE_ON), lambda v: v in SAMPLE_ON),
    "repeat_penalty": ((int, float), "a number from 0.01 to 100 (1 = off)", _penalty_factor),
    "repeat_last_n": ((int,), _WINDOW, lambda v: v >= -1),
    "presence_penalty": ((int, float), "a number from -100 to 100 (0 = off)", _bounded),
    "frequency_penalty": ((int, float), "a number from -100 to 100 (0 = off)", _bounded),
    "dry_multiplier": ((int, float), "a number from 0 to 100 (0 = off)", lambda v: 0 <= v <= 100),
    "dry_base": ((int, float), "a number from 1 to 100", lambda v: 1 <= v <= 100),
    "dry_allowed_length": ((int,), "an integer >= 0", lambda v: v >= 0),
    "dry_penalty_last_n": ((int,), _WINDOW, lambda v: v >= -1),
    "dry_sequence_breakers": ((tuple, list), "a list of strings", _strings),
    "max_pieces": ((int,), "an integer >= 1", lambda v: v >= 1),
    "max_bytes": ((int,), "an integer >= 1", lambda v: v >= 1),
    "stop": ((tuple, list), "a list of strings", _strings),
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
    for key in ("stop", "dry_sequence_breakers", "rpc"):
        if key in given:
            given[key] = tuple(given[key])
    for key, kind in SCHEMA.items():
        if key in given and kind[0] == (int, float):
            given[key] = float(given[key])
    return replace(settings, **given)


for _mode, _profile in PROFILES.items():
    assert set(_profile) == set(PROFILES["chat"]), "every profile sets the same settings"
    checked(_profile, f"profile {_mode}")
