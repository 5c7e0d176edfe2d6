"""llama.cpp's RPC backend: a model's layers on other machines' `rpc-server` processes.

The RPC backend is llama.cpp's own distributed engine (ggml/src/ggml-rpc): the client
keeps the vocabulary, the sampling and the logits; the servers hold the offloaded
layers and compute them. lvr-local only finds that backend and checks the servers
before llama.cpp sees them, for one reason: llama.cpp's RPC client *aborts the process*
on a server it cannot reach, a handshake it does not like, or a server that stops
answering, and an abort cannot be caught in Python. So:

- `preflight` connects to each server itself, with a short timeout, and does the RPC
  hello in Python, so an unreachable server, a busy one or another protocol version is
  a clear error naming the endpoint instead of an abort;
- a member that uses RPC runs in a child process (isolated.py), so a server that dies
  mid-generation kills only that child.

Where the backend comes from, first found wins: a llama-cpp-python built with
`-DGGML_RPC=on` (it ships `libggml-rpc.so`); the module named by $LVR_GGML_RPC; the
module `lvr rpc-build` compiled into the user directory. Otherwise asking for RPC is an
error that gives the rebuild command.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L

from lvr_local.errors import LvrError
from lvr_local.paths import user_dir

RPC_PROTO_MAJOR = 7  # ggml-rpc.h's RPC_PROTO_MAJOR_VERSION in llama-cpp-python 0.3.36
RPC_PROTO_MINOR = 0
RPC_CMD_HELLO = 14  # ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14"
RPC_CONN_CAPS_SIZE = 24  # transport.h: the hello's capability bytes
CONNECT_TIMEOUT_S = 3.0
MODULE_ENV = "LVR_GGML_RPC"
REBUILD_HINT = (
    'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
)
_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Endpoint:
    """One RPC server, "host:port" (an IPv6 host in brackets: "[::1]:50052")."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def bare_host(self) -> str:
        return self.host.strip("[]")


def parse_endpoint(text: str) -> Endpoint:
    """ "host:port" -> Endpoint, or a LvrError saying what is expected."""
    match = _ENDPOINT.match(text.strip()) if isinstance(text, str) else None
    port = int(match["port"]) if match else 0
    if not match or not 1 <= port <= 65535:
        raise LvrError(
            f"RPC endpoint {text!r} is not host:port with a port from 1 to 65535 "
            "(for example 192.168.1.20:50052)"
        )
    return Endpoint(match["host"], port)


def is_endpoint(text: object) -> bool:
    """Whether `text` parses as an RPC endpoint (for the config's checks)."""
    try:
        parse_endpoint(text)  # type: ignore[arg-type]
    except LvrError:
        return False
    return True


# ----------------------------------------------------------------- preflight


def preflight(endpoint: Endpoint, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect to the server and exchange llama.cpp's RPC hello, within `timeout` seconds
    per step; returns its protocol version. Raises LvrError naming the endpoint when it
    is unreachable, silent, not an RPC server, or speaks another major version.

    The server serves one client at a time and goes back to accepting when this
    connection closes, so llama.cpp's own connection that follows is served next."""
    try:
        sock = socket.create_connection((endpoint.bare_host, endpoint.port), timeout)
    except TimeoutError as e:
        raise LvrError(
            f"RPC server {endpoint} is unreachable: no answer within {timeout:g} s"
        ) from e
    except OSError as e:
        raise LvrError(
            f"RPC server {endpoint} is unreachable: {e.strerror or e} (is `lvr rpc-server` "
            "or llama.cpp's rpc-server running there, on that port?)"
        ) from e
    with sock:
        sock.settimeout(timeout)
        size, reply = _hello(sock, endpoint, timeout)
    return _check_hello(endpoint, size, reply)


def _hello(sock: socket.socket, endpoint: Endpoint, timeout: float) -> tuple[int, bytes]:
    """Send the hello; return the announced size of the answer and the answer."""
    request = bytes(RPC_CONN_CAPS_SIZE)
    try:
        sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, len(request)) + request)
        size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
        return size, _recv_exact(sock, size) if size <= 4096 else b""
    except TimeoutError as e:
        raise LvrError(
            f"RPC server {endpoint} did not answer within {timeout:g} s (a server busy with "
            "another client: it serves one at a time, or not an RPC server)"
        ) from e
    except OSError as e:  # closed (see _recv_exact) or reset
        raise LvrError(
            f"RPC server {endpoint} closed the connection during the hello: a protocol "
            f"version mismatch (this build speaks RPC {RPC_PROTO_MAJOR}.x; install the same "
            "llama-cpp-python version on both machines), or not an RPC server"
        ) from e


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionAbortedError("closed by the server")
        data += chunk
    return data


def _check_hello(endpoint: Endpoint, size: int, reply: bytes) -> tuple[int, int, int]:
    if size < 3 or len(reply) != size:
        raise LvrError(
            f"RPC server {endpoint} answered the hello with {size} bytes: not an llama.cpp "
            f"RPC server of protocol {RPC_PROTO_MAJOR}.x"
        )
    major, minor, patch = reply[0], reply[1], reply[2]
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise LvrError(
            f"RPC protocol version mismatch: server {endpoint} speaks {major}.{minor}.{patch}, "
            f"this build speaks {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x; install the same "
            "llama-cpp-python version on both machines"
        )
    return major, minor, patch


# ----------------------------------------------------------------- the backend


def module_path() -> Path:
    """Where `lvr rpc-build` puts the module for this llama-cpp-python version."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return user_dir() / "rpc" / f"libggml-rpc-{L.__version__}{suffix}"


def _candidates() -> list[tuple[Path, str]]:
    lib = Path(L.__file__).parent / "lib"
    found = [(p, "built in") for p in sorted(lib.glob("*ggml-rpc.*"))]
    if env := os.environ.get(MODULE_ENV):
        found.append((Path(env).expanduser(), f"${MODULE_ENV}"))
    found.append((module_path(), "lvr rpc-build"))
    return found


class RpcBackend:
    """The RPC functions of ggml-rpc, from whichever library provides them."""

    def __init__(self, lib: ctypes.CDLL, origin: str) -> None:
        self.origin = origin
        self.add_server = lib.ggml_backend_rpc_add_server
        self.add_server.argtypes = [ctypes.c_char_p]
        self.add_server.restype = ctypes.c_void_p
        self.start_server = lib.ggml_backend_rpc_start_server
        self.start_server.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.start_server.restype = None


_rpc: RpcBackend | None = None


def rpc_backend() -> RpcBackend:
    """The RPC backend (loaded once), or a one-line LvrError with the rebuild command."""
    global _rpc
    if _rpc is None:
        _rpc = _load_rpc_backend()
    return _rpc


def _load_rpc_backend() -> RpcBackend:
    from lvr_local.llama.native import ensure_backend

    ensure_backend()  # libggml-base is loaded first: the module links against it
    tried = []
    for path, origin in _candidates():
        if not path.is_file():
            tried.append(f"{path} ({origin}): not found")
            continue
        try:
            return RpcBackend(ctypes.CDLL(str(path)), f"{origin}: {path}")
        except (OSError, AttributeError) as e:
            tried.append(f"{path} ({origin}): {e}")
    raise LvrError(
        "RPC was requested, but this llama-cpp-python build has no RPC backend. Rebuild it "
        f"with: {REBUILD_HINT}; or compile the module alone with `lvr rpc-build` "
        f"(or point ${MODULE_ENV} at a libggml-rpc built from llama-cpp-python "
        f"{L.__version__}). Tried: {'; '.join(tried[-2:])}"
    )


def rpc_devices(endpoints: list[Endpoint]) -> list[int]:
    """The llama.cpp devices of these servers (each server may offer several), after a
    preflight of each: call it only in a process that can afford an abort (isolated.py)."""
    rpc = rpc_backend()
    ggml = L.llama_cpp._lib  # libllama links libggml-base, whose symbols it exposes
    count, get = _reg_functions(ggml)
    devices: list[int] = []
    for endpoint in endpoints:
        preflight(endpoint)
        reg = rpc.add_server(str(endpoint).encode())
        if not reg:
            raise LvrError(f"RPC server {endpoint} offers no device")
        devices.extend(get(reg, i) for i in range(count(reg)))
    return devices


def _reg_functions(lib: ctypes.CDLL) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    count = lib.ggml_backend_reg_dev_count
    count.argtypes, count.restype = [ctypes.c_void_p], ctypes.c_size_t
    get = lib.ggml_backend_reg_dev_get
    get.argtypes, get.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p
    return count, get


# ----------------------------------------------------------------- the server side


def local_devices() -> list[int]:
    """The devices an RPC server offers, as llama.cpp's rpc-server picks them: every GPU
    (and other non-CPU, non-accelerator device), else the CPU."""
    from lvr_local.llama.devices import device_handles

    handles = device_handles()
    gpus = [h for h, kind in handles if kind not in ("CPU", "ACCEL")]
    return gpus or [h for h, kind in handles if kind == "CPU"][:1]


def serve(endpoint: Endpoint, *, threads: int, cache: Path | None) -> None:
    """Run llama.cpp's RPC server on `endpoint` until the process is signalled. It blocks
    in C; the caller restores the default SIGINT/SIGTERM actions first, so that Ctrl-C
    and `kill` end it (Python's handlers would never get to run)."""
    rpc = rpc_backend()
    devices = local_devices()
    if not devices:
        raise LvrError("llama.cpp reports no device to serve")
    array = (ctypes.c_void_p * len(devices))(*devices)
    cache_arg = str(cache).encode() if cache else None
    rpc.start_server(str(endpoint).encode(), cache_arg, threads, len(devices), array)
    # It returns only when it could not start (the reason is on stderr).
    raise LvrError(
        f"the RPC server could not listen on {endpoint} (port in use, or an address of "
        "another machine?)"
    )
