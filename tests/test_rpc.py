"""Remote members through llama.cpp's RPC backend, with a real `lvr rpc-server` on localhost.

The installed llama-cpp-python wheel is usually built without RPC, so the session
compiles the RPC backend alone (`lvr rpc-build`'s code, seconds) from the installed
version's source distribution into the test data directory, once per version, and
points $LVR_GGML_RPC at it; a build with RPC built in is used as it is. The fast tier
checks the configuration, the missing-backend error and the Python hello against fake
peers (a closed port, a server of another protocol version, a silent one).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from lvr_local.errors import ConfigError, LvrError
from lvr_local.llama import rpc
from lvr_local.runner.config import parse_config
from lvr_local.runner.settings import RunSettings

LVR = [sys.executable, "-m", "lvr_local.cli"]
TEXT = "The quick brown fox jumps over the lazy dog. It barked twice."
BIT_FOR_BIT = platform.machine().lower() in ("x86_64", "amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- fast: configuration


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("127.0.0.1:50052", "127.0.0.1", 50052), ("gpu-box.lan:1", "gpu-box.lan", 1)],
)
def test_endpoints_parse(text: str, host: str, port: int) -> None:
    assert rpc.parse_endpoint(text) == rpc.Endpoint(host, port)
    assert str(rpc.parse_endpoint("[::1]:50052")) == "[::1]:50052"


@pytest.mark.parametrize("bad", ["localhost", "host:0", "host:70000", ":50052", "a b:1", "h:x"])
def test_bad_endpoints_are_refused_by_name(bad: str) -> None:
    with pytest.raises(LvrError, match="not host:port"):
        rpc.parse_endpoint(bad)
    data = {"model": [{"name": "m", "source": "m.gguf", "rpc": [bad]}]}
    with pytest.raises(ConfigError, match=r"\[\[model\]\] #1: 'rpc' must be a list of"):
        parse_config(data, Path("models.toml"))


def test_rpc_in_defaults_and_per_model() -> None:
    data = {
        "defaults": {"rpc": ["10.0.0.2:50052"]},
        "model": [
            {"name": "far", "source": "a.gguf"},
            {"name": "near", "source": "b.gguf", "rpc": []},
            {"name": "other", "source": "c.gguf", "rpc": ["10.0.0.3:1", "10.0.0.4:2"]},
        ],
    }
    config = parse_config(data, Path("models.toml"))
    servers = [m.rpc_servers(config.defaults) for m in config.models]
    assert servers == [("10.0.0.2:50052",), (), ("10.0.0.3:1", "10.0.0.4:2")]
    assert RunSettings().rpc == ()
    with pytest.raises(ConfigError, match=r"\[defaults\]: 'rpc' must be"):
        parse_config({"defaults": {"rpc": "10.0.0.2:50052x"}}, Path("models.toml"))


def test_a_build_without_rpc_gives_the_rebuild_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "libggml-rpc.so"
    monkeypatch.setattr(rpc, "_candidates", lambda: [(missing, f"${rpc.MODULE_ENV}")])
    with pytest.raises(LvrError) as info:
        rpc._load_rpc_backend()
    message = str(info.value)
    assert "\n" not in message
    assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir' in message
    assert "lvr rpc-build" in message and str(missing) in message


# ----------------------------------------------------------------- fast: the hello


def _fake_server(answer: Callable[[socket.socket], None]) -> tuple[rpc.Endpoint, socket.socket]:
    """A listening socket on localhost whose one connection is handled by `answer`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    return rpc.Endpoint("127.0.0.1", listener.getsockname()[1]), listener


def _hello_reply(major: int) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        request = conn.recv(1 + 8 + rpc.RPC_CONN_CAPS_SIZE)
        assert request[0] == rpc.RPC_CMD_HELLO
        reply = bytes([major, 0, 0, 0]) + bytes(rpc.RPC_CONN_CAPS_SIZE)
        conn.sendall(struct.pack("<Q", len(reply)) + reply)

    return answer


def test_a_closed_port_fails_fast_naming_the_endpoint() -> None:
    endpoint = rpc.Endpoint("127.0.0.1", _free_port())
    start = time.perf_counter()
    with pytest.raises(LvrError, match=f"RPC server {endpoint} is unreachable"):
        rpc.preflight(endpoint)
    assert time.perf_counter() - start < 5


def test_another_protocol_version_is_named() -> None:
    endpoint, listener = _fake_server(_hello_reply(rpc.RPC_PROTO_MAJOR - 1))
    with listener, pytest.raises(LvrError, match="RPC protocol version mismatch") as info:
        rpc.preflight(endpoint)
    assert f"server {endpoint} speaks 6.0.0, this build speaks 7.0.x" in str(info.value)


def test_the_same_version_passes_and_a_hang_up_is_explained() -> None:
    endpoint, listener = _fake_server(_hello_reply(rpc.RPC_PROTO_MAJOR))
    with listener:
        assert rpc.preflight(endpoint) == (rpc.RPC_PROTO_MAJOR, 0, 0)
    endpoint, listener = _fake_server(lambda conn: None)  # an older server hangs up
    with listener, pytest.raises(LvrError, match="closed the connection during the hello"):
        rpc.preflight(endpoint)


def test_a_silent_server_times_out() -> None:
    quiet = threading.Event()
    endpoint, listener = _fake_server(lambda conn: quiet.wait(5))
    with listener, pytest.raises(LvrError, match=f"RPC server {endpoint} did not answer"):
        rpc.preflight(endpoint, timeout=0.5)
    quiet.set()


# ----------------------------------------------------------------- a real server


def _rpc_built_in() -> bool:
    return any((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-rpc.*"))


@pytest.fixture(scope="session")
def rpc_module() -> Iterator[None]:
    """The RPC backend for this session: built in, $LVR_GGML_RPC, or compiled once per
    llama-cpp-python version into the test data directory."""
    from conftest import _test_data_dir

    from lvr_local.llama.rpc_build import build_rpc_module

    given = os.environ.get(rpc.MODULE_ENV)
    if _rpc_built_in() or (given and Path(given).is_file()):
        yield
        return
    data = _test_data_dir()
    module = data / f"rpc-module-{llama_cpp.__version__}" / "libggml-rpc.so"
    if not module.is_file():
        build_rpc_module(module, downloads=data / "sdist")
    os.environ[rpc.MODULE_ENV] = str(module)
    yield
    os.environ.pop(rpc.MODULE_ENV, None)


def _start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [*LVR, "rpc-server", "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    endpoint = rpc.Endpoint("127.0.0.1", port)
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.preflight(endpoint, timeout=1)
            return server
        except LvrError as e:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"rpc-server did not start: {server.stderr.read()!r}") from e
            time.sleep(0.2)


@pytest.fixture
def rpc_server(rpc_module: None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `lvr rpc-server` on a free localhost port: (endpoint, its process)."""
    port = _free_port()
    server = _start_server(port)
    yield f"127.0.0.1:{port}", server
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    server.stderr.close()


def _config(tmp_path: Path, model: Path, rpc_servers: list[str] | None) -> Path:
    lines = ["[[model]]", 'name = "smollm2"', f"source = {json.dumps(str(model))}"]
    if rpc_servers is not None:
        lines.append(f"rpc = {json.dumps(rpc_servers)}")
    path = tmp_path / f"models-{'rpc' if rpc_servers else 'local'}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _lvr(config: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LVR, "--config", str(config), *args], capture_output=True, text=True, timeout=timeout
    )


def test_a_member_through_rpc_scores_and_generates_like_the_local_one(
    rpc_server: tuple[str, subprocess.Popen[bytes]], smollm2_path: Path, tmp_path: Path
) -> None:
    """Bit for bit on x86-64: the server computes with the same CPU kernels, on one
    thread, and the exact path decodes one token at a time, so every row is the local
    row. Elsewhere within 0.01 nats: on ARM, llama.cpp repacks SmolLM2's Q8_0 output
    matrix for its NEON kernels in local memory, but not in an RPC server's buffers."""
    endpoint, _ = rpc_server
    remote = _config(tmp_path, smollm2_path, [endpoint])
    local = _config(tmp_path, smollm2_path, None)
    shown = _lvr(remote, "models", "--json")
    assert json.loads(shown.stdout)["models"][0]["runs_on"] == f"rpc {endpoint}"
    scores = []
    for config in (remote, local):
        done = _lvr(config, "score", "--json", "--text", TEXT)
        assert done.returncode == 0, done.stderr
        scores.append(json.loads(done.stdout)["models"]["smollm2"]["logprob"])
    if BIT_FOR_BIT:
        assert scores[0] == scores[1]
    else:
        assert scores[0] == pytest.approx(scores[1], abs=0.01)
    texts = []
    for config in (remote, local):
        done = _lvr(config, "generate", "--raw", "--json", "--max-pieces", "20", "Once upon a")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["pieces"] == 20
        texts.append(record["text"])
    assert texts[0] == texts[1]


def test_a_closed_port_fails_within_seconds(smollm2_path: Path, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    done = _lvr(_config(tmp_path, smollm2_path, [endpoint]), "generate", "--raw", "Hi")
    assert time.perf_counter() - start < 10
    assert done.returncode == 1
    assert f"Error: RPC server {endpoint} is unreachable" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("as_json", [False, True], ids=["streamed", "json"])
def test_a_server_killed_mid_generation_ends_the_run_keeping_its_text(
    rpc_server: tuple[str, subprocess.Popen[bytes]],
    smollm2_path: Path,
    tmp_path: Path,
    as_json: bool,
) -> None:
    endpoint, server = rpc_server
    config = _config(tmp_path, smollm2_path, [endpoint])
    args = ["generate", "--raw", "--max-pieces", "4000", "Once upon a time"]
    client = subprocess.Popen(
        [*LVR, "--config", str(config), *args, *(["--json"] if as_json else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stderr is not None
    if as_json:  # nothing streams: wait for the progress line that ends loading
        while b"building the sub-vocabulary ..." not in (line := client.stderr.readline()):
            assert line, "the client ended before generating"
        time.sleep(4)  # generating (4,000 pieces take minutes)
        seen = b""
    else:  # the first pieces are out
        seen = b""
        while len(seen) < 20:
            chunk = client.stdout.read1(4096)
            assert chunk, "the client ended before generating"
            seen += chunk
    server.kill()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 1, err  # not 134: llama.cpp's abort stayed in the child
    message = err.decode()
    assert f"Error: RPC server {endpoint} stopped answering" in message
    assert "Remote RPC server crashed" in message and "Traceback" not in message
    if as_json:
        record = json.loads(out)
        assert record["stop_reason"] == "error" and record["error"] in message
        assert len(record["text"]) > 10 and record["pieces"] < 4000
    else:
        assert (seen + out).decode().startswith(",") and len(seen + out) > 10


def test_ctrl_c_through_rpc_keeps_the_text(
    rpc_server: tuple[str, subprocess.Popen[bytes]], smollm2_path: Path, tmp_path: Path
) -> None:
    """Ctrl-C reaches the whole process group, the member's child process included: the
    child ignores it and the run ends as any interrupted run (exit 130, text kept)."""
    endpoint, server = rpc_server
    config = _config(tmp_path, smollm2_path, [endpoint])
    args = ["generate", "--raw", "--max-pieces", "4000", "Once upon a time"]
    client = subprocess.Popen(
        [*LVR, "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert client.stdout is not None
    seen = b""
    while len(seen) < 20:
        chunk = client.stdout.read1(4096)
        assert chunk, "the client ended before generating"
        seen += chunk
    os.killpg(client.pid, signal.SIGINT)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 130, err
    assert b"[interrupted]" in err and b"Traceback" not in err
    assert (seen + out).startswith(b",") and server.poll() is None
