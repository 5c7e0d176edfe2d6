"""Small owners of llama.cpp handles, in the spirit of llama-cpp-python's `_internals.py`.

Each class owns one C handle and frees it. llama.cpp's own log goes into a ring buffer
(printed only when LVR_VERBOSE=1) so that a failed load can be explained to the user
with llama.cpp's last words instead of a wall of loader output.
"""

from __future__ import annotations

import collections
import ctypes
import os
from pathlib import Path

import llama_cpp as L

from lvr_local.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_recent_log: collections.deque[str] = collections.deque(maxlen=40)
_backend_ready = False


@L.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    _recent_log.append(line)
    if os.environ.get("LVR_VERBOSE") == "1":
        print(line, end="", flush=True)


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and route its log to our buffer."""
    global _backend_ready
    if not _backend_ready:
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True


def recent_errors(limit: int = 3) -> str:
    """The last few llama.cpp log lines that look like errors, for user-facing messages."""
    lines = [ln.strip() for ln in _recent_log if ln.strip()]
    keys = ("error", "failed", "unknown", "invalid", "unsupported", "cannot")
    picked = [ln for ln in lines if any(k in ln.lower() for k in keys)]
    return "; ".join((picked or lines)[-limit:])


def check_gguf_file(path: Path) -> None:
    """Fail early, with a clear message, on a path that cannot be a GGUF model."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')"
        )


class LlamaModel:
    """Owns one `llama_model*`. `vocab_only=True` reads metadata and vocabulary, no weights."""

    def __init__(self, path: Path, *, vocab_only: bool = False, n_gpu_layers: int = 0) -> None:
        path = Path(path)
        check_gguf_file(path)
        ensure_backend()
        params = L.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = n_gpu_layers
        _recent_log.clear()
        self.path = path
        self.ptr = L.llama_model_load_from_file(str(path).encode(), params)
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
