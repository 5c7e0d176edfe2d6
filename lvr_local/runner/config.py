"""models.toml: the model registry and the defaults of every run.

Which file: `--config PATH`, else $LVR_CONFIG, else `models.toml` in the user directory,
else the file shipped with lvr-local. A bad file is reported once, naming the file, the
table, the key and what is expected; nothing is half-loaded.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lvr_local.decoding.roles import ROLES
from lvr_local.errors import ConfigError, LvrError
from lvr_local.paths import user_dir
from lvr_local.runner.settings import SCHEMA, Check, RunSettings, checked, with_overrides
from lvr_local.runner.sources import resolve_source


@dataclass(frozen=True)
class ModelSpec:
    """One [[model]] table. n_ctx, n_gpu_layers, rpc and extra_buffers: None takes the
    run's settings; role None: detected from the GGUF (roles.py)."""

    name: str
    source: str
    weight: float = 1.0
    enabled: bool = True
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    chat_template: str | None = None
    role: str | None = None
    rpc: tuple[str, ...] | None = None
    extra_buffers: str | None = None
    base_dir: Path | None = field(default=None, compare=False)

    def resolve_path(self, *, assemble: bool = True) -> Path:
        return resolve_source(self.source, self.base_dir, assemble=assemble)

    def rpc_servers(self, settings: RunSettings) -> tuple[str, ...]:
        """The RPC servers that hold this model's offloaded layers (empty: it runs on
        this machine): its own `rpc`, else the run's."""
        return self.rpc if self.rpc is not None else settings.rpc


WEIGHT = "a finite number (negative allowed for product)"


def is_weight(value: float) -> bool:
    """The rule for one weight. Its sign is the combination rule's business: product
    takes a negative weight, mean, max and bayes refuse one when they combine."""
    return math.isfinite(value)


def check_weights(weights: Sequence[float | None], n_models: int, name: str) -> None:
    """The one check of a list of member weights, wherever it comes from (`--weight`, a
    request's `weights`, `/weights` in lvr chat, the TUI): one per model, each a weight
    (None: that model keeps its own). `name` is what the user wrote them as; a front end
    passes the LvrError on in its own form."""
    if len(weights) != n_models:
        raise LvrError(f"{len(weights)} {name} values for {n_models} models")
    bad = [w for w in weights if w is not None and not is_weight(w)]
    if bad:
        raise LvrError(f"{name} must be {WEIGHT}, got {bad[0]}")


@dataclass(frozen=True)
class Config:
    path: Path
    defaults: RunSettings
    models: tuple[ModelSpec, ...]

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def enabled_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.enabled)


_MODEL_KEYS: dict[str, Check] = {
    "name": ((str,), "a non-empty name", lambda v: bool(v.strip())),
    "source": (
        (str,),
        "a .gguf path, package:NAME, or an ollama:, hf:, lmstudio:, gpt4all: or jan: NAME",
        lambda v: bool(v.strip()),
    ),
    "weight": ((int, float), WEIGHT, is_weight),
    "enabled": ((bool,), "true or false", None),
    "n_ctx": SCHEMA["n_ctx"],
    "n_gpu_layers": SCHEMA["n_gpu_layers"],
    "chat_template": ((str,), "a llama.cpp template name or a Jinja template", None),
    "role": ((str,), "one of " + ", ".join(ROLES), lambda v: v in ROLES),
    "rpc": SCHEMA["rpc"],
    "extra_buffers": SCHEMA["extra_buffers"],
}
_TOP_KEYS = ("defaults", "model")


def default_config_path() -> Path:
    """The models.toml shipped in the wheel, or the project root's in a source checkout."""
    packaged = Path(str(resources.files("lvr_local").joinpath("models.toml")))
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "models.toml"


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
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: top level: unknown key '{unknown[0]}' (expected one of: "
            f"{', '.join(_TOP_KEYS)})"
        )
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    defaults = with_overrides(RunSettings(), f"{path}: [defaults]", **raw_defaults)
    tables = data.get("model", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: 'model' must be written as [[model]] tables")
    models = tuple(_model(t, i, path) for i, t in enumerate(tables, start=1))
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise ConfigError(f"{path}: two [[model]] tables are named '{m.name}'")
        seen.add(m.name)
    return Config(path=path, defaults=defaults, models=models)


def _model(table: Any, number: int, path: Path) -> ModelSpec:
    where = f"{path}: [[model]] #{number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    values = checked(table, where, _MODEL_KEYS)
    for key in ("name", "source"):
        if key not in values:
            raise ConfigError(f"{where}: missing key '{key}' ({_MODEL_KEYS[key][1]})")
    if "weight" in values:
        values["weight"] = float(values["weight"])
    if "rpc" in values:
        values["rpc"] = tuple(values["rpc"])
    return ModelSpec(base_dir=path.parent, **values)
