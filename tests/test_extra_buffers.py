"""llama.cpp's extra buffer types (AMX, CPU_REPACK): the probe, its cached verdict, the
setting that overrides it, and what a fatal signal leaves behind.

On a machine whose kernels work the unsafe path is reached through the probe's test-only
$LVR_TEST_PROBE_FAULT: the probe child then dies of a real SIGSEGV, hangs, or fails before
loading, exactly as a faulting kernel, a stuck one or a broken install would look to the
parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.errors import ConfigError
from lvr_local.llama import extra_buffers
from lvr_local.llama.backend import LlamaBackend
from lvr_local.runner.config import parse_config

LVR = [sys.executable, "-m", "lvr_local.cli"]
FATAL = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user directory whose cache is not the session's shared one (verdicts written
    here, faulty ones included, stay here)."""
    home = tmp_path / "own-home"
    monkeypatch.setenv("LVR_HOME", str(home))
    return home


def _probes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every probe run (the real probe still runs)."""
    calls: list[Path] = []
    real = extra_buffers.run_probe

    def counted(path: Path, timeout: float = extra_buffers.PROBE_TIMEOUT_S):
        calls.append(path)
        return real(path, timeout)

    monkeypatch.setattr(extra_buffers, "run_probe", counted)
    return calls


# ----------------------------------------------------------------- the verdict


def test_a_working_probe_is_safe_and_names_what_was_repacked(gemma_path: Path) -> None:
    found = extra_buffers.run_probe(gemma_path)
    assert found.safe and found.kept, found.reason
    # Gemma's Q4_K weights have repacked kernels wherever llama.cpp has AVX2 or NEON
    # kernels for them; SmolLM2's Q4_1 has none on x86 (checked with the log below).
    assert "passed" in found.reason or "no extra buffer" in found.reason
    assert set(found.buffer_types) <= {"CPU_REPACK", "AMX", "CPU_AARCH64", "KLEIDIAI"}


def test_a_probe_killed_by_a_signal_means_off(
    gemma_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    monkeypatch.setenv(extra_buffers.FAULT_ENV, "signal")
    found = extra_buffers.verdict(gemma_path)
    assert not found.safe and found.kept
    assert "died of SIGSEGV" in found.reason
    monkeypatch.delenv(extra_buffers.FAULT_ENV)
    kept = extra_buffers.cached_verdict(gemma_path)  # the machine's answer is remembered
    assert kept is not None and not kept.safe and kept.cached
    assert extra_buffers.decide("auto", gemma_path) == (False, f"auto: {found.reason}")
    assert extra_buffers.decide("on", gemma_path)[0] is True  # the user overrides it


def test_a_hanging_probe_is_killed_at_its_time_limit(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(extra_buffers.FAULT_ENV, "hang")
    found = extra_buffers.run_probe(smollm2_path, timeout=20)
    assert not found.safe and "hung (killed after 20 s)" in found.reason


def test_a_probe_stopped_from_outside_gives_no_verdict(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    """SIGKILL (the OOM killer, say) is not a kernel's fault: "off" for now, not kept."""
    monkeypatch.setenv(extra_buffers.FAULT_ENV, "kill")
    found = extra_buffers.verdict(smollm2_path)
    assert not found.safe and not found.kept and "stopped by SIGKILL" in found.reason
    assert extra_buffers.cached_verdict(smollm2_path) is None


def test_a_probe_that_cannot_run_means_off_and_is_not_kept(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    monkeypatch.setenv(extra_buffers.FAULT_ENV, "error")
    found = extra_buffers.verdict(smollm2_path)
    assert not found.safe and not found.kept
    assert "could not run" in found.reason and "ImportError" in found.reason
    assert extra_buffers.cached_verdict(smollm2_path) is None  # asked again next time


def test_the_verdict_goes_stale_with_the_build_or_the_cpu(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    calls = _probes(monkeypatch)
    first = extra_buffers.verdict(smollm2_path)
    again = extra_buffers.verdict(smollm2_path)
    assert len(calls) == 1 and not first.cached and again.cached and again.safe == first.safe

    monkeypatch.setattr(llama_cpp, "__version__", llama_cpp.__version__ + ".other")
    assert extra_buffers.cached_verdict(smollm2_path) is None
    extra_buffers.verdict(smollm2_path)
    assert len(calls) == 2

    flags = extra_buffers.cpu_flags()
    monkeypatch.setattr(extra_buffers, "cpu_flags", lambda: sorted({*flags, "amx_tile"}))
    assert extra_buffers.cached_verdict(smollm2_path) is None
    extra_buffers.verdict(smollm2_path)
    assert len(calls) == 3
    assert extra_buffers.verdict(smollm2_path).cached


def test_a_damaged_verdict_file_is_probed_again(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    extra_buffers.verdict(smollm2_path)
    extra_buffers.verdict_file().write_text('{"machine": ')
    calls = _probes(monkeypatch)
    assert not extra_buffers.verdict(smollm2_path).cached and len(calls) == 1


# ----------------------------------------------------------------- the setting


def test_the_backend_loads_without_extra_buffers_when_the_verdict_says_so(
    gemma_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: Path
) -> None:
    monkeypatch.setenv(extra_buffers.FAULT_ENV, "signal")
    with LlamaBackend(gemma_path, n_ctx=256, n_threads=1) as backend:
        assert not backend.use_extra_buffers
        assert "SIGSEGV" in backend.extra_buffers_reason
        assert "CPU_REPACK" not in backend._model.buffer_types
        backend.set_prompt(backend.tokenize(b"The sea is", True, False))
        assert len(backend.next_logits([(), ()])) == 2
    with LlamaBackend(gemma_path, n_ctx=256, n_threads=1, extra_buffers="on") as backend:
        assert backend.use_extra_buffers and backend.extra_buffers_reason == "extra_buffers = on"


def test_extra_buffers_in_defaults_per_model_and_refused_when_wrong() -> None:
    data = {
        "defaults": {"extra_buffers": "off"},
        "model": [{"name": "a", "source": "a.gguf", "extra_buffers": "on"}],
    }
    config = parse_config(data, Path("models.toml"))
    assert config.defaults.extra_buffers == "off" and config.models[0].extra_buffers == "on"
    with pytest.raises(ConfigError, match="'extra_buffers' must be one of auto, on, off"):
        parse_config({"defaults": {"extra_buffers": "yes"}}, Path("models.toml"))


def test_settings_show_the_extra_buffers_in_force_and_why(
    smollm2_path: Path, tmp_path: Path
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[defaults]\nextra_buffers = "off"\n[[model]]\nname = "s"\nsource = "{smollm2_path}"\n'
        f'[[model]]\nname = "t"\nsource = "{smollm2_path}"\nextra_buffers = "auto"\n'
    )
    extra_buffers.verdict(smollm2_path)
    result = CliRunner().invoke(cli, ["--config", str(config), "settings"])
    assert result.exit_code == 0, result.output
    assert "s: off (extra_buffers = off (run settings))" in result.output
    expected = extra_buffers.cached_verdict(smollm2_path)
    assert expected is not None
    state = "on" if expected.safe else "off"
    assert f"t: {state} (auto: {expected.reason})" in result.output


# ----------------------------------------------------------------- deaths by signal


def _died_of_a_signal(status: int) -> bool:
    return status < 0 or status - 128 in FATAL


def test_the_readmes_first_command_does_not_die_of_a_signal(bundled_paths: dict) -> None:
    done = subprocess.run(
        [*LVR, "generate", "Write a haiku about the sea.", "--max-pieces", "12"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not _died_of_a_signal(done.returncode), done.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_a_fatal_signal_leaves_the_stack_in_llama_log_and_names_it(
    isolated_home: Path,
) -> None:
    crash = (
        "from lvr_local import crash_report\n"
        "crash_report.install()\n"
        "import ctypes\n"
        "ctypes.string_at(0)  # a real SIGSEGV, as a faulting kernel would raise\n"
    )
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert done.returncode == -signal.SIGSEGV
    log = isolated_home / "llama.log"
    assert f"the Python stack are in {log}" in done.stderr
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "string_at" in text


def test_a_normal_exit_says_nothing_about_crashes(isolated_home: Path) -> None:
    done = subprocess.run([*LVR, "paths"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "crashed" not in done.stderr
    assert (
        not (isolated_home / "llama.log").exists()
        or "Fatal" not in (isolated_home / "llama.log").read_text()
    )


def test_the_probe_child_runs_from_a_clean_environment(smollm2_path: Path) -> None:
    """The probe is `python -m lvr_local.llama.extra_buffers PATH`: it prints the buffer
    types after loading and whether the logits were finite after decoding."""
    env = {k: v for k, v in os.environ.items() if k != extra_buffers.FAULT_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "lvr_local.llama.extra_buffers", str(smollm2_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert '"extra_buffers": [' in done.stdout and '"finite": true' in done.stdout
