"""A model backend in a child process: how a member whose layers run on RPC servers is run.

Why a process: llama.cpp's RPC client aborts the whole process when a server stops
answering mid-generation ("Remote RPC server crashed or returned malformed response"),
and an abort cannot be caught in Python. Behind `IsolatedBackend` the member's
`LlamaBackend` lives in a child process, so an abort kills only the child: the parent
reads the end of the pipe, stops the child, and raises an LvrError naming the servers
and quoting llama.cpp's last words. The run then ends with stop reason "error" and
keeps the text produced so far (runner/run.py), like any other error.

`IsolatedBackend` has exactly the methods and attributes the runner and the ensemble use
of a `LlamaBackend`. Each call is one request and one reply over the child's stdin and
stdout, framed by length: a pickled (method, arguments) pair and a pickled (status,
result, counters) triple, between two processes of this program over pipes it made.
A logits row is 4 bytes per token (196 KB for SmolLM2): small next to a forward pass.
Every reply must arrive within a time limit, so a server that vanishes without closing
its connection cannot hang the run either.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from lvr_local import interrupts
from lvr_local.core.lm import ModelMemoryFull, TokenPrefix
from lvr_local.errors import LvrError
from lvr_local.llama.backend import BackendCounters, LlamaBackend
from lvr_local.llama.rpc import Endpoint, preflight, rpc_backend

CALL_TIMEOUT_S = float(os.environ.get("LVR_RPC_TIMEOUT", "120"))  # one request's reply
LOAD_TIMEOUT_S = 30 * 60  # loading sends the weights over the network: minutes for big models
_HEADER = struct.Struct("<Q")
_CALLS = frozenset({"set_prompt", "next_logits", "release", "tokenize", "set_threads", "set_exact"})


class IsolatedBackend:
    """A `LlamaBackend` (same arguments, plus the RPC servers that hold its layers) in a
    child process. Not thread-safe, like the backend it stands for."""

    def __init__(
        self,
        path: Path | str,
        *,
        endpoints: Sequence[Endpoint],
        n_ctx: int,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_seq_max: int = 16,
        extra_buffers: str = "auto",
    ) -> None:
        self.path = Path(path)
        self.endpoints = list(endpoints)
        rpc_backend()  # no RPC in this build: the one-line error, before any process
        for endpoint in self.endpoints:
            preflight(endpoint)  # unreachable or another protocol: named, within seconds
        self.counters = BackendCounters()
        self._prompt: list[int] = []
        self._stderr: collections.deque[str] = collections.deque(maxlen=30)
        self._child: subprocess.Popen[bytes] | None = _spawn()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        options = {
            "path": str(self.path),
            "endpoints": [str(e) for e in self.endpoints],
            "n_ctx": n_ctx,
            "n_gpu_layers": n_gpu_layers,
            "n_threads": n_threads,
            "n_seq_max": n_seq_max,
            "extra_buffers": extra_buffers,
        }
        try:  # loading may take minutes: Ctrl-C stops it at once, the child with it
            sizes = self._call("open", options, timeout=LOAD_TIMEOUT_S, interruptible=True)
        except BaseException:
            self._stop_child()
            raise
        self._n_vocab, self._n_ctx, self._n_seq_max, self.n_threads = sizes

    # ----- what the runner and the ensemble use ------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_seq_max(self) -> int:
        return self._n_seq_max

    @property
    def prompt(self) -> list[int]:
        return list(self._prompt)

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        rows = self._call("next_logits", [tuple(p) for p in prefixes])
        for row in rows:
            row.flags.writeable = False
        return rows

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        if self._child is not None:  # after a failure: nothing is held any more
            self._call("release", [tuple(p) for p in prefixes])

    def set_prompt(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        self._call("set_prompt", tokens)
        self._prompt = tokens

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        return self._call("tokenize", text, add_special, parse_special)

    def set_threads(self, n_threads: int) -> None:
        self._call("set_threads", n_threads)
        self.n_threads = n_threads

    def set_exact(self, exact: bool) -> None:
        self._call("set_exact", bool(exact))

    # ----- the pipe ---------------------------------------------------------------

    def _call(
        self,
        method: str,
        *args: Any,
        timeout: float = CALL_TIMEOUT_S,
        interruptible: bool = False,
    ) -> Any:
        """One request and its reply; a child that dies or falls silent is stopped and
        reported as an LvrError naming the servers. A signal waits for the reply unless
        `interruptible` (then the caller stops the child)."""
        child = self._child
        if child is None:
            raise LvrError(f"the model backend of {self.path.name} is closed")
        assert child.stdin is not None and child.stdout is not None
        try:
            with contextlib.nullcontext() if interruptible else _signals_after():
                _write_frame(child.stdin, (method, args))
                status, result, counters = _read_frame(child.stdout, timeout)
        except (OSError, EOFError, TimeoutError) as e:
            raise self._died(e) from None
        self.counters = BackendCounters(**counters)
        if status == "memory_full":
            raise ModelMemoryFull(result)
        if status == "error":
            raise LvrError(result)
        if status != "ok":
            raise RuntimeError(f"the backend process of {self.path.name} failed:\n{result}")
        return result

    def _died(self, cause: BaseException) -> LvrError:
        """Stop the child and say what happened, with llama.cpp's last line."""
        silent = isinstance(cause, TimeoutError)
        self._stop_child()
        servers = ", ".join(str(e) for e in self.endpoints)
        last = next((ln.strip() for ln in reversed(self._stderr) if ln.strip()), "")
        last = re.sub(r"^\S+\.(c|cpp):\d+: ", "", last)  # the source file of an abort
        said = f" (llama.cpp: {last})" if last else ""
        what = f"did not answer within {CALL_TIMEOUT_S:g} s" if silent else "stopped answering"
        return LvrError(f"RPC server {servers} {what}; {self.path.name} cannot go on{said}")

    def _drain_stderr(self) -> None:
        """Keep the child's last stderr lines (llama.cpp prints its abort reason there)."""
        child = self._child
        if child is None or child.stderr is None:
            return
        for raw in child.stderr:
            line = raw.decode("utf-8", errors="replace")
            self._stderr.append(line)
            if os.environ.get("LVR_VERBOSE") == "1":
                print(line, end="", file=sys.stderr, flush=True)

    # ----- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        child = self._child
        if child is None:
            return
        try:
            assert child.stdin is not None
            _write_frame(child.stdin, ("close", ()))
            child.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._stop_child()

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> IsolatedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_child", None) is not None:
            self.close()


@contextlib.contextmanager
def _signals_after() -> Iterator[None]:
    """Hold back Ctrl-C (and the command line's SIGTERM) until the block is done: one
    request and its reply, a forward pass. Raised inside it, it would leave a reply
    half-read and the pipe out of step. The command line's handler waits within
    `interrupts.deferred()`; Python's default one is replaced for the block. Only the
    main thread receives signals, so only there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        with interrupts.deferred():
            yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def _spawn() -> subprocess.Popen[bytes]:
    """The child: this module run as a script, with this process's import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["GGML_NO_BACKTRACE"] = "1"  # an abort would otherwise run gdb on the child first
    return subprocess.Popen(
        [sys.executable, "-m", "lvr_local.llama.isolated"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _write_frame(out: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _read_frame(stream: IO[bytes], timeout: float | None) -> Any:
    """One framed message; EOFError at the end of the pipe, TimeoutError when nothing
    comes within `timeout` seconds (None: wait)."""
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size, timeout))
    return pickle.loads(_read_exact(stream, size, timeout))


def _read_exact(stream: IO[bytes], n: int, timeout: float | None) -> bytes:
    fd = stream.fileno()
    chunks: list[bytes] = []
    left = n
    while left:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------- the child


def _open(options: dict[str, Any]) -> LlamaBackend:
    from lvr_local.llama.rpc import parse_endpoint, rpc_devices

    devices = rpc_devices([parse_endpoint(e) for e in options.pop("endpoints")])
    return LlamaBackend(options.pop("path"), devices=devices, **options)


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer requests until "close" or the end of the pipe (the parent is gone)."""
    backend: LlamaBackend | None = None
    while True:
        try:
            method, args = _read_frame(requests, None)
        except EOFError:
            break
        if method == "close":
            break
        try:
            if method == "open":
                backend = _open(dict(args[0]))
                result: Any = (backend.n_vocab, backend.n_ctx, backend.n_seq_max, backend.n_threads)
            elif method in _CALLS and backend is not None:
                result = getattr(backend, method)(*args)
            else:
                raise LvrError(f"unknown request {method!r} to a backend process")
            reply: tuple[str, Any] = ("ok", result)
        except ModelMemoryFull as e:  # the engine sheds branches and asks again
            reply = ("memory_full", str(e))
        except LvrError as e:
            reply = ("error", str(e))
        except Exception:
            import traceback

            reply = ("crash", traceback.format_exc())
        counters = vars(backend.counters) if backend is not None else vars(BackendCounters())
        _write_frame(replies, (*reply, counters))
    if backend is not None:
        backend.close()


def main() -> None:
    """The child's entry: requests on stdin, replies on the original stdout; anything
    llama.cpp prints goes to stderr, which the parent keeps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, replies)


ModelBackend = LlamaBackend | IsolatedBackend  # what a run's member is backed by


if __name__ == "__main__":
    main()
