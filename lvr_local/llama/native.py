"""Small owners of llama.cpp handles, in the spirit of llama-cpp-python's `_internals.py`.

Each class owns one C handle and frees it. llama.cpp's own log goes to `llama.log` in
the user directory and into a ring buffer, so that a failed load can be explained to
the user with llama.cpp's last words instead of a wall of loader output over their
terminal (or over the TUI's screen). `set_verbose(True)` (`lvr --verbose`, or
LVR_VERBOSE=1) also prints it on stderr.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import llama_cpp as L
import numpy as np

from lvr_local import interrupts
from lvr_local.errors import LvrError, ModelFileError
from lvr_local.llama.gguf_check import check_gguf
from lvr_local.paths import log_file

LOG_ROTATE_BYTES = 8 * 2**20  # llama.log is moved to llama.log.1 beyond this size
_recent_log: collections.deque[str] = collections.deque(maxlen=40)
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size")
_model_buffers: list[str] = []  # the buffer types of the model being loaded
_backend_ready = False
_verbose = os.environ.get("LVR_VERBOSE") == "1"
_log: TextIO | None = None


def set_verbose(on: bool) -> None:
    """Also print llama.cpp's log on stderr (it always goes to the log file)."""
    global _verbose
    _verbose = on or os.environ.get("LVR_VERBOSE") == "1"


def _log_line(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    _recent_log.append(line)
    if found := _BUFFER_LINE.search(line):
        _model_buffers.append(found[1])
    try:
        if _log is not None:
            _log.write(line)
        if _verbose:
            print(line, end="", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed file at interpreter exit: nothing to report to
        pass


_log_callback = L.llama_log_callback(_log_line)


def _load_progress(progress: float, user_data: ctypes.c_void_p) -> bool:
    """llama.cpp asks whether to go on loading: not once a signal is pending."""
    return interrupts.pending() is None


_progress_callback = L.llama_progress_callback(_load_progress)
# A signal arriving inside these callbacks cannot be raised there (ctypes would swallow
# it): it waits until the C call returns (lvr_local/interrupts.py).
interrupts.register_callback(_log_line.__code__)
interrupts.register_callback(_load_progress.__code__)


def _open_log() -> TextIO | None:
    """The log file, appended to; None when it cannot be written (logging never fails a run)."""
    try:
        path = log_file()
        if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
        out = path.open("a", encoding="utf-8", buffering=1)
    except (OSError, LvrError):
        return None
    out.write(f"--- lvr-local pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return out


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and route its log to our file and buffer."""
    global _backend_ready, _log
    if not _backend_ready:
        _log = _open_log()
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True


def recent_errors(limit: int = 3) -> str:
    """The last few llama.cpp log lines that look like errors, for user-facing messages."""
    lines = [ln.strip() for ln in _recent_log if ln.strip()]
    keys = ("error", "failed", "unknown", "invalid", "unsupported", "cannot")
    picked = [ln for ln in lines if any(k in ln.lower() for k in keys)]
    return "; ".join((picked or lines)[-limit:])


class LlamaModel:
    """Owns one `llama_model*`. `vocab_only=True` reads metadata and vocabulary, no weights."""

    def __init__(
        self,
        path: Path,
        *,
        vocab_only: bool = False,
        n_gpu_layers: int = 0,
        devices: Sequence[int] = (),
        extra_buffers: bool = True,
    ) -> None:
        """`devices`: llama.cpp devices (ggml_backend_dev_t) to offload the
        n_gpu_layers to, instead of every device the build has (the RPC servers).
        `extra_buffers`: let llama.cpp repack weights into its extra buffer types (AMX,
        CPU_REPACK) where the CPU has kernels for them; they fault on some machines
        (extra_buffers.py decides). `buffer_types` lists the buffers the weights got."""
        path = Path(path)
        check_gguf(path)  # what llama.cpp would abort on, reported as an error instead
        ensure_backend()
        params = L.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_buffers
        if devices:  # a NULL-terminated array, alive until the load returns
            device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            params.devices = ctypes.cast(device_array, ctypes.c_void_p)
        params.progress_callback = _progress_callback
        _recent_log.clear()
        _model_buffers.clear()
        self.path = path
        with interrupts.deferred():  # Ctrl-C stops the load, then is raised here
            self.ptr = L.llama_model_load_from_file(str(path).encode(), params)
        self.buffer_types = tuple(dict.fromkeys(_model_buffers))
        if not self.ptr:
            detail = recent_errors() or "no detail from llama.cpp"
            raise ModelFileError(
                f"llama.cpp could not load {path} (corrupt file, or a format this "
                f"llama.cpp build does not know): {detail}"
            )
        self.vocab = L.llama_model_get_vocab(self.ptr)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value rendered as a string by llama.cpp, or None when absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = L.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            L.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class LlamaContext:
    """Owns one `llama_context*` and its KV memory: decoding, logits rows, sequence edits.

    The context keeps a reference to its model so the model cannot be freed first.
    Not thread-safe: llama.cpp contexts must be driven from one thread.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        n_ubatch: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or n_batch
        params.n_seq_max = n_seq_max
        # The low-level default (4) is far too many on small machines: set both explicitly.
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # One pool of cells for all sequences: otherwise each gets only n_ctx / n_seq_max.
        params.kv_unified = True
        # Branches trim back arbitrarily far; a sliding-window cache cut to the window
        # (Gemma 3) could not do that.
        params.swa_full = True
        params.no_perf = True
        # Flash attention on the CPU visits a token's cells one by one in buffer order,
        # skipping masked ones: with each sequence's cells in position order the result
        # equals a fresh evaluation bit for bit (the exact path relies on it, see
        # backend.py). On a GPU llama.cpp chooses.
        params.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if n_gpu_layers == 0 else L.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        _recent_log.clear()
        self.model = model
        with interrupts.deferred():
            self.ptr = L.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            detail = recent_errors() or "no detail from llama.cpp"
            raise LvrError(
                f"llama.cpp could not create a context for {model.path} "
                f"(n_ctx={n_ctx}, n_batch={n_batch}, n_seq_max={n_seq_max}): {detail}"
            )
        self.memory = L.llama_get_memory(self.ptr)
        self.n_ctx = L.llama_n_ctx(self.ptr)
        self.n_batch = L.llama_n_batch(self.ptr)
        self.n_seq_max = L.llama_n_seq_max(self.ptr)

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next decodes (both one-token and batch decodes)."""
        L.llama_set_n_threads(self.ptr, n_threads, n_threads)

    def decode(self, batch: LlamaBatch) -> int:
        """llama_decode's status: 0 ok, 1 no KV slot (memory left unchanged), else failure."""
        with interrupts.deferred():  # a signal during the decode is raised after it
            return L.llama_decode(self.ptr, batch.struct)

    def logits_row(self, i: int, n_vocab: int) -> np.ndarray:
        """A copy of the logits of output `i` of the last decode (only that row is copied)."""
        ptr = L.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise LvrError(f"llama.cpp returned no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Let `dst` share the cells of `src` at positions [p0, p1): no data is copied."""
        L.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """Drop `seq` from its cells at positions [p0, p1) (p1 < 0: to the end)."""
        return bool(L.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_pos_range(self, seq: int) -> tuple[int, int]:
        """(lowest, highest) position `seq` holds; (-1, -1) when it is empty."""
        return (
            L.llama_memory_seq_pos_min(self.memory, seq),
            L.llama_memory_seq_pos_max(self.memory, seq),
        )

    def clear(self) -> None:
        L.llama_memory_clear(self.memory, False)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            L.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


class LlamaBatch:
    """Owns one `llama_batch` of fixed capacity, one sequence id per token.

    llama.cpp aborts the whole process on a batch larger than the context's n_batch, so
    the capacity is n_batch and `fill` refuses more instead of letting that happen.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.struct = L.llama_batch_init(capacity, 0, 1)
        b = self.struct
        self._tokens = np.ctypeslib.as_array(b.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self._n_seq_id = np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        self._seq_slots = [b.seq_id[i] for i in range(capacity)]
        self._n_seq_id[:] = 1

    def fill(
        self, tokens: list[int], positions: list[int], seqs: list[int], want_logits: list[bool]
    ) -> None:
        """Lay out one batch: token i goes to sequence seqs[i] at positions[i]."""
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"batch of {n} tokens exceeds its capacity {self.capacity}")
        self._tokens[:n] = tokens
        self._pos[:n] = positions
        self._logits[:n] = want_logits
        for slot, seq in zip(self._seq_slots, seqs, strict=False):
            slot[0] = seq
        self.struct.n_tokens = n

    def close(self) -> None:
        if getattr(self, "struct", None) is not None:
            # Drop the views first: they point into the memory freed below.
            self._tokens = self._pos = self._n_seq_id = self._logits = None
            self._seq_slots = []
            L.llama_batch_free(self.struct)
            self.struct = None

    def __del__(self) -> None:
        self.close()
