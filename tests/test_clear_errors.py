"""The last tracebacks, each now one `Error:` line (exit 1, or 2 for a usage error), said
before the slow part where it can be: output to a full device, symbolic link loops, a
cache folder that cannot be made, an address `lvr serve` cannot listen on, an empty API
key. Each runs the real `lvr` as its own process, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from disks import make_read_only, small_disk

LVR = [sys.executable, "-m", "lvr_local"]


def lvr(*args: str, stdout: int | None = subprocess.DEVNULL, timeout: int = 300) -> tuple[int, str]:
    """Run `lvr ARGS`; its exit status and stderr."""
    done = subprocess.run(
        [*LVR, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout
    )
    return done.returncode, done.stderr


def one_error_line(err: str) -> str:
    """The single Error: line of `err`, which must start a line and be the only one."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), err
    return errors[0]


@pytest.mark.parametrize(
    "args",
    [
        ("settings", "--json"),
        ("vocab", "smollm2-135m", "--dump"),
        ("score", "--text", "hello", "-m", "smollm2-135m", "--json"),
        ("generate", "hi", "-m", "smollm2-135m", "--max-pieces", "4"),
    ],
    ids=["settings", "vocab", "score", "generate"],
)
def test_output_to_a_full_device_is_one_error_line(smollm2_path: Path, args: tuple[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    with open("/dev/full", "w") as full:
        code, err = lvr(*args, stdout=full.fileno())
    assert code == 1, err
    assert one_error_line(err) == "Error: cannot write the output: No space left on device"


def test_a_symbolic_link_loop_as_a_model_is_one_error_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(tmp_path / "other.gguf")
    (tmp_path / "other.gguf").symlink_to(loop)
    config = tmp_path / "models.toml"
    config.write_text(f'[[model]]\nname = "looped"\nsource = "{loop}"\n')
    for args in (
        ("generate", "hi", "-m", str(loop)),
        ("vocab", str(loop)),
        ("--config", str(config), "generate", "hi"),
    ):
        code, err = lvr(*args)
        assert code == 1, (args, err)
        assert "symbolic links form a loop" in one_error_line(err), (args, err)
    code, err = lvr("--config", str(config), "generate", "hi")
    lines = err.splitlines()  # the error starts its own line, never after "loading ..."
    assert any(line.startswith("Error: ") for line in lines), err
    assert not any("loading" in line and "Error:" in line for line in lines), err


def test_an_rpc_cache_under_a_file_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, err = lvr("rpc-server", "--cache", str(tmp_path / "file" / "cache"), timeout=60)
    assert code == 1
    assert "cannot create the --cache folder" in one_error_line(err) and "Not a dir" in err


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, err = lvr("serve", "--port", port, timeout=60)
    assert code == 1 and "loading" not in err, err
    assert "the port is in use" in one_error_line(err)
    code, err = lvr("serve", "--host", "999.1.1.1", timeout=60)
    assert code == 1 and "loading" not in err, err
    assert "--host 999.1.1.1" in one_error_line(err)


def test_serve_refuses_an_empty_api_key(tmp_path: Path) -> None:
    code, err = lvr("serve", "--api-key", "", timeout=60)
    assert code == 2 and "loading" not in err, err
    assert "--api-key" in one_error_line(err) and "empty" in err


def test_a_read_only_user_directory_is_read_and_warned_about_once(
    smollm2_path: Path, tmp_path: Path
) -> None:
    """A read-only user directory used to be refused outright, even for `lvr paths`.
    Now what is cached there is read, and one warning says nothing new is saved."""
    with small_disk(tmp_path / "home", size="64m") as home:
        env = {**os.environ, "LVR_HOME": str(home)}
        cached = subprocess.run(
            [*LVR, "vocab", "smollm2-135m"], env=env, capture_output=True, text=True
        )
        assert cached.returncode == 0, cached.stderr
        entries = sorted((home / "cache" / "vocab").iterdir())
        assert entries
        make_read_only(home)
        for args in (("paths",), ("vocab", "smollm2-135m")):
            done = subprocess.run([*LVR, *args], env=env, capture_output=True, text=True)
            assert done.returncode == 0, (args, done.stderr)
            assert done.stderr.count("warning:") == 1 and "read-only" in done.stderr, done.stderr
        assert sorted((home / "cache" / "vocab").iterdir()) == entries
        done = subprocess.run(
            [*LVR, "generate", "The cat", "--raw", "-m", "smollm2-135m", "--max-pieces", "3"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        assert done.stderr.count("warning:") == 1, done.stderr


@pytest.mark.parametrize("flag", ["--seeds", "--first-seeds"])
def test_the_chat_benchmark_refuses_a_seed_count_below_zero(flag: str) -> None:
    """0 skips that part of the benchmark; before, 0 and below divided by zero after
    loading the models."""
    done = subprocess.run(
        [sys.executable, "-m", "lvr_local.benchmarks", "chat", flag, "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument {flag}: '-1' is not a whole number >= 0" in done.stderr
