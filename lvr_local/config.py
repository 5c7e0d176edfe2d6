"""models.toml: the model registry and the defaults of every run.

Which file: `--config PATH`, else $LVR_CONFIG, else `models.toml` in the user directory,
else the file shipped with lvr-local. A bad file is reported once, naming the file, the
table, the key and what is expected; nothing is half-loaded.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lvr_local.errors import ConfigError
from lvr_local.paths import user_dir
from lvr_local.sources import resolve_source

COMBINE_RULES = ("mean", "product", "max", "naive")
SUB_VOCAB_PATTERN = re.compile(r"^(mcv|bytes|maxlen:[1-9][0-9]*)$")


@dataclass(frozen=True)
class Defaults:
    """Run settings every model and command starts from."""

    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int = 0
    sub_vocab: str = "mcv"
    combine: str = "mean"
    prune: float = 1e-4
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_pieces: int = 256


@dataclass(frozen=True)
class ModelSpec:
    """One [[model]] table, with the defaults already applied."""

    name: str
    source: str
    weight: float = 1.0
    enabled: bool = True
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    chat_template: str | None = None
    base_dir: Path | None = field(default=None, compare=False)

    def resolve_path(self, *, assemble: bool = True) -> Path:
        return resolve_source(self.source, self.base_dir, assemble=assemble)


@dataclass(frozen=True)
class Config:
    path: Path
    defaults: Defaults
    models: tuple[ModelSpec, ...]

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def enabled_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.enabled)


# key -> (accepted Python types, description of what is expected, extra check or None)
_Check = tuple[tuple[type, ...], str, Any]
_DEFAULT_KEYS: dict[str, _Check] = {
    "n_ctx": ((int,), "an integer >= 16", lambda v: v >= 16),
    "n_gpu_layers": ((int,), "an integer >= -1 (-1 = all layers)", lambda v: v >= -1),
    "n_threads": (
        (int,),
        "an integer >= 0 (0 = the cores shared among the models)",
        lambda v: v >= 0,
    ),
    "sub_vocab": ((str,), "one of mcv, bytes, maxlen:K", SUB_VOCAB_PATTERN.match),
    "combine": ((str,), "one of " + ", ".join(COMBINE_RULES), lambda v: v in COMBINE_RULES),
    "prune": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "temperature": ((int, float), "a number >= 0", lambda v: v >= 0),
    "top_k": ((int,), "an integer >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": ((int, float), "a number in (0, 1]", lambda v: 0 < v <= 1),
    "min_p": ((int, float), "a number in [0, 1)", lambda v: 0 <= v < 1),
    "seed": ((int,), "an integer", None),
    "max_pieces": ((int,), "an integer >= 1", lambda v: v >= 1),
}
_MODEL_KEYS: dict[str, _Check] = {
    "name": ((str,), "a non-empty name", lambda v: bool(v.strip())),
    "source": ((str,), "a .gguf path or package:NAME", lambda v: bool(v.strip())),
    "weight": ((int, float), "a number (negative allowed for product)", None),
    "enabled": ((bool,), "true or false", None),
    "n_ctx": _DEFAULT_KEYS["n_ctx"],
    "n_gpu_layers": _DEFAULT_KEYS["n_gpu_layers"],
    "chat_template": ((str,), "a llama.cpp template name or a Jinja template", None),
}
_TOP_KEYS = ("defaults", "model")


def default_config_path() -> Path:
    """The models.toml shipped in the wheel, or the project root's in a source checkout."""
    packaged = Path(str(resources.files("lvr_local").joinpath("models.toml")))
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "models.toml"


def find_config_path(explicit: Path | str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if env := os.environ.get("LVR_CONFIG"):
        return Path(env).expanduser()
    user_file = user_dir() / "models.toml"
    return user_file if user_file.is_file() else default_config_path()


def load_config(explicit: Path | str | None = None) -> Config:
    path = find_config_path(explicit)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    _reject_unknown(data, _TOP_KEYS, f"{path}: top level")
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    defaults = Defaults(**_checked(raw_defaults, _DEFAULT_KEYS, f"{path}: [defaults]"))
    tables = data.get("model", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: 'model' must be written as [[model]] tables")
    models = tuple(_model(t, i, defaults, path) for i, t in enumerate(tables, start=1))
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise ConfigError(f"{path}: two [[model]] tables are named '{m.name}'")
        seen.add(m.name)
    return Config(path=path, defaults=defaults, models=models)


def _model(table: Any, number: int, defaults: Defaults, path: Path) -> ModelSpec:
    where = f"{path}: [[model]] #{number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    values = _checked(table, _MODEL_KEYS, where)
    for key in ("name", "source"):
        if key not in values:
            raise ConfigError(f"{where}: missing key '{key}' ({_MODEL_KEYS[key][1]})")
    values.setdefault("n_ctx", defaults.n_ctx)
    values.setdefault("n_gpu_layers", defaults.n_gpu_layers)
    if "weight" in values:
        values["weight"] = float(values["weight"])
    return ModelSpec(base_dir=path.parent, **values)


def _checked(table: dict[str, Any], schema: dict[str, _Check], where: str) -> dict[str, Any]:
    _reject_unknown(table, tuple(schema), where)
    for key, value in table.items():
        types, expected, check = schema[key]
        # bool is an int in Python; only accept it where a bool is expected.
        bad_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if bad_type or (check is not None and not check(value)):
            raise ConfigError(f"{where}: '{key}' must be {expected}, got {value!r}")
    return dict(table)


def _reject_unknown(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{unknown[0]}' (expected one of: {', '.join(allowed)})"
        )


def with_overrides(defaults: Defaults, **overrides: Any) -> Defaults:
    """Command-line flags over the file's defaults; None means 'not given'."""
    given = {k: v for k, v in overrides.items() if v is not None}
    checked = _checked(given, _DEFAULT_KEYS, "command line")
    return replace(defaults, **checked)
