"""Damaged GGUF files never kill the process: each mutant of the bundled SmolLM2 file is
either loaded or refused with one `Error:` line (exit 1), never an abort (134) or a
traceback. Every command runs in a child process: an abort inside llama.cpp would take
pytest down with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_tally import tally
from gguf_mutator import MUTANTS, Mutant, encode_record, with_record, write_mutant

from lvr_local.llama.gguf_check import check_gguf, read_header

# Mutants llama.cpp itself would abort on (found by running them without the check).
ABORTS_WITHOUT_CHECK = {
    "block_count=0",
    "block_count=513",
    "block_count=2**32-1",
    "expert_used>expert_count",
    "duplicate token string",
}


def lvr(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LVR_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "lvr_local.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.fixture(scope="module")
def source(smollm2_path: Path) -> bytes:
    return smollm2_path.read_bytes()


def test_the_mutator_round_trips_an_intact_file(source: bytes, tmp_path: Path) -> None:
    """A record rewritten with its own value leaves a file llama.cpp still loads: the
    mutants differ from the original only where they are damaged."""
    header = read_header(source)
    record = encode_record("general.name", 8, b"renamed")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(with_record(source, header, "general.name", record))
    check_gguf(copy)
    done = lvr("score", "--text", "hi", "-m", str(copy), "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_a_damaged_file_is_an_error_not_an_abort(
    mutant: Mutant, source: bytes, tmp_path: Path
) -> None:
    path = write_mutant(source, mutant, tmp_path / "mutant.gguf")
    done = lvr("score", "--text", "hi there", "-m", str(path), home=tmp_path)
    held = done.returncode in (0, 1) and "Traceback" not in done.stderr
    held = held and (done.returncode == 0 or "Error:" in done.stderr)
    tally(f"gguf {mutant.kind}", held)
    assert held, (done.returncode, done.stderr[-2000:])
    if mutant.name in ABORTS_WITHOUT_CHECK:
        assert done.returncode == 1 and "damaged or malformed" in done.stderr


@pytest.mark.parametrize("command", ["models", "vocab"])
def test_listing_commands_survive_a_duplicate_vocabulary(
    command: str, source: bytes, tmp_path: Path
) -> None:
    """The issue's first case: `lvr models` on a config naming the damaged file."""
    duplicate = next(m for m in MUTANTS if m.name == "duplicate token string")
    path = write_mutant(source, duplicate, tmp_path / "dup.gguf")
    config = tmp_path / "models.toml"
    config.write_text(f'[[model]]\nname = "dup"\nsource = "{path}"\n')
    args = ("models",) if command == "models" else ("vocab", "dup")
    done = lvr("--config", str(config), *args, home=tmp_path)
    tally("gguf vocabulary", done.returncode in (0, 1) and "Traceback" not in done.stderr)
    assert "Traceback" not in done.stderr and done.returncode in (0, 1), done.stderr
    assert "tokens 300 and 301" in done.stdout + done.stderr
