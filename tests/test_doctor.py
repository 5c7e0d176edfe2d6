"""`lvr doctor` on the real build and the real bundled models: a healthy setup, and
broken ones (a missing model, a damaged cache entry, RPC servers without an RPC module)."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.llama import rpc


def doctor(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [*args, "doctor"])
    return result.exit_code, result.output


def doctor_json(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, [*args, "doctor", "--json"])
    return result.exit_code, json.loads(result.output)


def _config(tmp_path: Path, models: dict[str, Path], extra: str = "") -> Path:
    lines = [extra]
    for name, path in models.items():
        lines += ["[[model]]", f'name = "{name}"', f"source = {json.dumps(str(path))}"]
    config = tmp_path / "models.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_a_healthy_setup(bundled_paths: dict[str, Path]) -> None:
    status, out = doctor()
    assert status == 0, out
    assert f"llama-cpp-python {llama_cpp.__version__}" in out
    assert "GPU backends" in out and "RAM" in out and "VRAM" in out
    assert "everything looks right" in out or "0 broken" in out
    for name in ("smollm2-135m", "gemma3-270m"):
        assert f"{name}" in out and "GGUF ok" in out
        assert f"{name} extra buffers" in out
    status, report = doctor_json()
    assert status == 0 and report["ok"] is True
    sections = {f["section"] for f in report["findings"]}
    assert sections == {"llama.cpp", "cpu", "machine", "user directory", "models"}
    assert not [f for f in report["findings"] if f["broken"]]


def test_a_missing_model_is_broken_and_names_the_fix(smollm2_path: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, {"here": smollm2_path, "gone": tmp_path / "gone.gguf"})
    status, report = doctor_json("--config", str(config))
    assert status == 1 and report["ok"] is False
    (gone,) = [f for f in report["findings"] if f["name"] == "gone"]
    assert gone["broken"] and "gone.gguf" in gone["problem"]
    assert "source" in gone["fix"]
    (here,) = [f for f in report["findings"] if f["name"] == "here"]
    assert not here["broken"] and "GGUF ok" in here["value"]
    status, out = doctor("--config", str(config))
    assert status == 1 and "BROKEN" in out and "fix:" in out


def test_a_damaged_cache_entry_is_broken_and_names_the_fix(
    smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "own-home"  # not the session's shared cache: it gets damaged
    monkeypatch.setenv("LVR_HOME", str(home))
    config = _config(tmp_path, {"s": smollm2_path})
    assert doctor_json("--config", str(config))[0] == 0  # fills the vocabulary cache
    (entry,) = (home / "cache" / "vocab").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # cut in half
    status, report = doctor_json("--config", str(config))
    assert status == 1
    (damaged,) = [f for f in report["findings"] if f["broken"]]
    assert damaged["value"] == entry.name and "damaged" in damaged["problem"]
    assert damaged["fix"] == f"delete it (it is rebuilt when needed): rm {entry}"


def test_rpc_servers_without_an_rpc_module_are_broken(
    smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc, "_candidates", lambda: [(tmp_path / "libggml-rpc.so", "test")])
    monkeypatch.setattr(rpc, "_rpc", None)
    plain = _config(tmp_path, {"s": smollm2_path})
    status, report = doctor_json("--config", str(plain))
    (module,) = [f for f in report["findings"] if f["name"] == "RPC module"]
    assert status == 0 and not module["broken"] and "lvr rpc-build" in module["value"]

    remote = _config(tmp_path, {"s": smollm2_path}, '[defaults]\nrpc = ["127.0.0.1:50052"]')
    status, report = doctor_json("--config", str(remote))
    (module,) = [f for f in report["findings"] if f["name"] == "RPC module"]
    assert status == 1 and module["broken"]
    assert "lvr rpc-build" in module["fix"] and rpc.REBUILD_HINT in module["fix"]


def test_a_bad_models_toml_is_reported_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "models.toml"
    bad.write_text("[defaults]\nn_ctx = 'many'\n")
    status, report = doctor_json("--config", str(bad))
    assert status == 1
    (finding,) = [f for f in report["findings"] if f["broken"]]
    assert "n_ctx" in finding["problem"]
