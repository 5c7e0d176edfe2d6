"""Generated command lines and models.toml files: every value is checked at the boundary.

Whatever a user types for a numeric option, or writes in models.toml, the command either
runs or stops with one `Error:` line that names the setting and the range expected;
never a traceback, never a silently accepted NaN, infinity or out-of-range number.
Models are never loaded here (the model path does not exist), so each example is fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fault_tally import tally
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvr_local.cli import cli
from lvr_local.runner.settings import SCHEMA

# --option -> the setting it sets (None: not a run setting)
NUMERIC_OPTIONS = {
    "--switch-rate": "switch_rate",
    "--defer": "defer",
    "--prune": "prune",
    "--text-prune": "text_prune",
    "--max-branches": "max_branches",
    "--token-top-k": "token_top_k",
    "--temperature": "temperature",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--min-p": "min_p",
    "--seed": "seed",
    "--repeat-penalty": "repeat_penalty",
    "--repeat-last-n": "repeat_last_n",
    "--presence-penalty": "presence_penalty",
    "--frequency-penalty": "frequency_penalty",
    "--dry-multiplier": "dry_multiplier",
    "--dry-base": "dry_base",
    "--dry-allowed-length": "dry_allowed_length",
    "--dry-penalty-last-n": "dry_penalty_last_n",
    "--max-pieces": "max_pieces",
    "--max-bytes": "max_bytes",
    "--weight": None,
}

typed_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-inf", "inf", "1e400", "-0", "0x10", "", "abc", " 3", "1_000"]),
)


def _parsed(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(NUMERIC_OPTIONS)), typed_numbers)
def test_any_typed_number_is_run_or_refused_with_its_range(option: str, typed: str) -> None:
    result = CliRunner().invoke(cli, ["generate", "x", "-m", "absent.gguf", option, typed])
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    held = not escaped and result.exit_code in (1, 2) and "Error:" in result.output
    accepted = "model file not found" in result.output
    if held and accepted:  # the value passed every check: it is a finite number
        value = _parsed(typed)
        held = value is not None and math.isfinite(value)
    elif held and result.exit_code == 1:  # refused by the settings: name and range
        setting = NUMERIC_OPTIONS[option]
        expected = SCHEMA[setting][1] if setting else "finite number"
        held = expected in result.output
    tally("cli options", held)
    assert held, (option, typed, result.output, result.exception)


def _toml(value: Any) -> str:
    """A TOML literal for `value` (NaN and infinities included: TOML has them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


toml_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=5) | st.text(max_size=3), max_size=3),
    st.sampled_from([0, 1, -1, 16, 2**31, 2**32 + 16, 0.5, 1.0, "mcv", "bytes", "maxlen:4"]),
)
MODEL_KEYS = ["weight", "enabled", "n_ctx", "n_gpu_layers", "role", "chat_template"]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(st.sampled_from(sorted(SCHEMA)), toml_values, max_size=3),
    st.dictionaries(st.sampled_from(MODEL_KEYS), toml_values, max_size=2),
)
def test_any_models_toml_value_is_loaded_or_refused(
    tmp_path: Path, defaults: dict[str, Any], model: dict[str, Any]
) -> None:
    lines = ["[defaults]", *(f"{k} = {_toml(v)}" for k, v in defaults.items())]
    lines += ["[[model]]", 'name = "m"', 'source = "m.gguf"']
    lines += [f"{k} = {_toml(v)}" for k, v in model.items()]
    config = tmp_path / "models.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(config), "settings", "--json"])
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    held = not escaped and result.exit_code in (0, 1)
    if held and result.exit_code == 0:

        def refuse(constant: str) -> None:
            raise ValueError(constant)

        values = json.loads(result.stdout, parse_constant=refuse)["settings"]
        held = all(values[k] == v or isinstance(v, list) for k, v in defaults.items())
    elif held:
        held = "Error:" in result.output and str(config) in result.output
    tally("models.toml values", held)
    assert held, (lines, result.output, result.exception)
