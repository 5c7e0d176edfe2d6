"""Checking a GGUF file before llama.cpp sees it, so a bad file cannot kill the process.

llama.cpp reports most problems of a file as an error, but some it only asserts, and a
failed GGML_ASSERT aborts the whole interpreter (exit 134, no message of ours). Each
check below mirrors such an assert, or a crash of the same kind, in the vendored
llama.cpp sources (llama-cpp-python 0.3.36):

- llama-vocab.cpp, `load()`: `GGML_ASSERT(id_to_token.size() == token_to_id.size())`
  fails when the vocabulary holds the same token string twice (an empty string counts
  as "[EMPTY_<id>]", as llama.cpp renames it). Checked: `_check_vocabulary`.
- llama-vocab.cpp, `load()`: scores and token types shorter than the vocabulary, or of
  another element type. llama.cpp reports these as errors itself; they are checked here
  too so that every vocabulary problem is named the same way.
- llama-model.cpp, `load_hparams()`: `GGML_ASSERT(n_layer > 0 && n_layer <=
  LLAMA_MAX_LAYERS)` (512), `GGML_ASSERT(n_expert <= LLAMA_MAX_EXPERTS)` (1024),
  `GGML_ASSERT(n_expert_used <= n_expert)`. Checked: `_check_hyperparameters`.
- llama-model.cpp: n_embd / n_head and n_head / n_head_kv are integer divisions (a zero
  head count would be a division by zero), and the tensor shapes derive from these
  numbers, so absurd ones ask for absurd allocations. Checked: every size is in range
  (HYPERPARAMETERS). Some of these llama.cpp would report as a tensor shape error; a
  context length of 0 it would even accept: it describes no usable model either way.
- llama-model-loader.cpp: `GGML_ASSERT(t_meta.ne[dim] >= 1)`; and a tensor whose data
  lies beyond the end of a truncated file (llama.cpp reports that one as an error, "data
  is not within the file bounds"). Checked: `_check_tensors` (dimensions, known types,
  every tensor's bytes inside the file), so a truncated file is called truncated.

The parser reads only the header (metadata and tensor table) through mmap; token strings
are sliced, not decoded, so even a 262,144-token vocabulary takes a fraction of a second
(0.25 s for SmolLM2, 0.36 s for Gemma, where the `gguf` package's GGUFReader, which
builds every array, took 2 s and 9 s: too slow for every load, hence this reader). A
file that passes is remembered for the rest of the process.

What cannot be checked here: asserts that depend on the architecture's own tensor list
(llama-model.cpp's per-architecture shape asserts). They concern files whose tensors
disagree with their own hyperparameters; llama.cpp mostly reports those as errors.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvr_local.errors import ModelFileError

MAX_LAYERS = 512  # llama-hparams.h LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # llama-hparams.h LLAMA_MAX_EXPERTS
MAX_DIMS = 4  # ggml.h GGML_MAX_DIMS
MAX_SIZE = 2**20  # embedding, feed-forward, head sizes: far beyond any real model
MAX_CONTEXT = 2**31 - 1  # llama.cpp keeps n_ctx_train in 32 bits

# GGUF value types (gguf.h): code -> struct format of one scalar.
SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9
GGUF_MAGIC = b"GGUF"
INT32, FLOAT32 = 5, 6


@dataclass(frozen=True)
class ArrayValue:
    """An array's element type, length and where its elements start (not read)."""

    elem_type: int
    n: int
    start: int
    items: list[bytes] | None = None  # string arrays only: each element's raw bytes


@dataclass(frozen=True)
class KeyValue:
    """One metadata record: its key, type, value, and the byte span it occupies."""

    key: str
    type: int
    value: Any
    start: int
    end: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int  # relative to the start of the data section


@dataclass
class GGUFHeader:
    """What a GGUF file says before its tensor data."""

    version: int
    fields: dict[str, KeyValue] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    kv_end: int = 0  # where the tensor table starts
    table_end: int = 0  # where the tensor table ends
    alignment: int = 32
    data_start: int = 0
    file_size: int = 0


class _Reader:
    """Reads little-endian GGUF values from a buffer, failing cleanly past its end."""

    def __init__(self, buf: Any, *, keep_strings: bool = True) -> None:
        self.buf, self.pos = buf, 0
        self.keep_strings = keep_strings  # False: string arrays are walked, not copied

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"the header ends early (at byte {self.pos})")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def raw_string(self) -> bytes:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at byte {self.pos} runs past the file")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def skip_strings(self, n: int) -> None:
        """Step over n strings reading only their lengths (a header summary needs a
        vocabulary's size, not its tokens)."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), struct.Struct("<Q")
        for _ in range(n):
            if pos + 8 > end:
                raise ValueError(f"the header ends early (at byte {pos})")
            pos += 8 + length.unpack_from(buf, pos)[0]
        if pos > end:
            raise ValueError(f"a string array at byte {self.pos} runs past the file")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.raw_string()
        if vtype == ARRAY:
            return self.array()
        raise ValueError(f"unknown value type {vtype} at byte {self.pos}")

    def array(self) -> ArrayValue:
        elem, n = self.unpack("I"), self.unpack("Q")
        start = self.pos
        if elem == STRING:
            if n > len(self.buf):
                raise ValueError(f"an array of {n} strings cannot fit in the file")
            if not self.keep_strings:
                self.skip_strings(n)
                return ArrayValue(elem, n, start)
            return ArrayValue(elem, n, start, [self.raw_string() for _ in range(n)])
        if elem not in SCALARS:
            raise ValueError(f"array of unsupported element type {elem} at byte {start}")
        size = n * struct.calcsize("<" + SCALARS[elem])
        if start + size > len(self.buf):
            raise ValueError(f"an array of {n} values at byte {start} runs past the file")
        self.pos += size
        return ArrayValue(elem, n, start)


def read_header(buf: Any, *, keep_strings: bool = True) -> GGUFHeader:
    """Parse a GGUF buffer's metadata and tensor table (ValueError on malformed data).
    With `keep_strings=False` the elements of string arrays (the tokens, the merges) are
    skipped, not kept: several times faster on a large vocabulary."""
    r = _Reader(buf, keep_strings=keep_strings)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError("not a GGUF file")
    r.pos = 4
    header = GGUFHeader(version=r.unpack("I"), file_size=len(buf))
    if header.version not in (2, 3):
        raise ValueError(f"GGUF version {header.version} is not 2 or 3")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > len(buf) or n_kv > len(buf):
        raise ValueError(f"absurd counts: {n_tensors} tensors, {n_kv} metadata keys")
    for _ in range(n_kv):
        start = r.pos
        key = r.raw_string().decode("utf-8", errors="replace")
        vtype = r.unpack("I")
        header.fields[key] = KeyValue(key, vtype, r.value(vtype), start, r.pos)
    header.kv_end = r.pos
    for _ in range(n_tensors):
        name = r.raw_string().decode("utf-8", errors="replace")
        n_dims = r.unpack("I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(r.unpack("q") for _ in range(n_dims))
        header.tensors.append(TensorInfo(name, dims, r.unpack("I"), r.unpack("Q")))
    header.table_end = r.pos
    align = header.fields.get("general.alignment")
    header.alignment = int(align.value) if align and isinstance(align.value, int) else 32
    if header.alignment < 1 or header.alignment & (header.alignment - 1):
        raise ValueError(f"general.alignment {header.alignment} is not a power of two")
    header.data_start = -(-r.pos // header.alignment) * header.alignment
    return header


def _check_vocabulary(header: GGUFHeader) -> None:
    """The token strings are unique, and scores and types cover every token."""
    tokens = header.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return  # llama.cpp reports a missing vocabulary itself
    if not isinstance(tokens.value, ArrayValue) or tokens.value.items is None:
        raise ValueError("tokenizer.ggml.tokens is not an array of strings")
    items = tokens.value.items
    if not items:
        raise ValueError("the vocabulary (tokenizer.ggml.tokens) is empty")
    seen: dict[bytes, int] = {}
    for i, raw in enumerate(items):
        text = raw or f"[EMPTY_{i}]".encode()
        if text in seen:
            shown = text.decode("utf-8", errors="replace")
            raise ValueError(f"tokens {seen[text]} and {i} are both {shown!r}")
        seen[text] = i
    for key, elem in (("tokenizer.ggml.scores", FLOAT32), ("tokenizer.ggml.token_type", INT32)):
        kv = header.fields.get(key)
        if kv is None:
            continue
        value = kv.value
        if not isinstance(value, ArrayValue) or value.elem_type != elem:
            raise ValueError(
                f"{key} is not an array of {'float32' if elem == FLOAT32 else 'int32'}"
            )
        if value.n < len(items):
            raise ValueError(f"{key} has {value.n} entries for {len(items)} tokens")


def _numbers(kv: KeyValue | None, key: str) -> list[int | float]:
    """A hyperparameter's value(s): a scalar, or a per-layer array of numbers."""
    if kv is None:
        return []
    if isinstance(kv.value, ArrayValue):
        if kv.value.elem_type not in SCALARS:
            raise ValueError(f"{key} is an array of non-numbers")
        return []  # per-layer arrays (some layers may have no heads): llama.cpp's to check
    if isinstance(kv.value, bool) or not isinstance(kv.value, int | float):
        raise ValueError(f"{key} is not a number")
    return [kv.value]


# hyperparameter (after "<arch>.") -> (lowest, highest) accepted value
HYPERPARAMETERS: dict[str, tuple[int, int]] = {
    "block_count": (1, MAX_LAYERS),
    "context_length": (1, MAX_CONTEXT),
    "embedding_length": (1, MAX_SIZE),
    "feed_forward_length": (0, 16 * MAX_SIZE),
    "attention.head_count": (1, 2**16),
    "attention.head_count_kv": (1, 2**16),
    "attention.key_length": (1, MAX_SIZE),
    "attention.value_length": (1, MAX_SIZE),
    "expert_count": (0, MAX_EXPERTS),
    "expert_used_count": (0, MAX_EXPERTS),
}


def _check_hyperparameters(header: GGUFHeader) -> None:
    """Every size llama.cpp divides by, allocates from or asserts on is in range."""
    arch_kv = header.fields.get("general.architecture")
    if arch_kv is None or not isinstance(arch_kv.value, bytes):
        return  # llama.cpp reports an unknown architecture itself
    arch = arch_kv.value.decode("utf-8", errors="replace")
    values: dict[str, int | float] = {}
    for name, (low, high) in HYPERPARAMETERS.items():
        key = f"{arch}.{name}"
        for v in _numbers(header.fields.get(key), key):
            if not low <= v <= high:
                raise ValueError(f"{key} is {v}, outside {low}..{high}")
            values[name] = v
    used, experts = values.get("expert_used_count", 0), values.get("expert_count", 0)
    if used > experts:
        raise ValueError(f"{arch}.expert_used_count ({used}) exceeds expert_count ({experts})")
    heads, kv_heads = values.get("attention.head_count"), values.get("attention.head_count_kv")
    if heads is not None and kv_heads is not None and kv_heads > heads:
        raise ValueError(
            f"{arch}.attention.head_count_kv ({kv_heads}) exceeds head_count ({heads})"
        )


def _check_tensors(header: GGUFHeader) -> None:
    """Each tensor has a known type, positive dimensions, and its bytes inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # slow to import

    data_size = header.file_size - header.data_start
    for t in header.tensors:
        if any(d < 1 for d in t.dims):
            raise ValueError(f"tensor '{t.name}' has dimensions {t.dims}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor '{t.name}' has unknown type {t.type}") from None
        n = 1
        for d in t.dims:
            n *= d
        if n % block:
            raise ValueError(f"tensor '{t.name}': {n} elements are not whole blocks of {block}")
        end = t.offset + n // block * type_size
        if end > data_size:
            raise ValueError(
                f"tensor '{t.name}' needs bytes up to {header.data_start + end:,}, but the "
                f"file has {header.file_size:,} (truncated?)"
            )


_checked: set[tuple[str, int, int]] = set()


def _symlink_loop(path: Path) -> bool:
    """Whether following `path`'s symbolic links never ends (ELOOP)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _check_path(path: Path) -> None:
    """A clear message for a path that cannot be a GGUF model at all."""
    if not path.exists():
        if _symlink_loop(path):
            raise ModelFileError(f"model path {path}: its symbolic links form a loop")
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


def check_gguf(path: Path) -> None:
    """Raise ModelFileError, naming the problem, if the path is not a GGUF file or
    llama.cpp could abort on it. The one check before every load."""
    _check_path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _checked:
        return
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = read_header(buf)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a valid GGUF file: {e}") from e
    try:
        _check_vocabulary(header)
        _check_hyperparameters(header)
        _check_tensors(header)
    except ValueError as e:
        raise ModelFileError(f"{path} is damaged or malformed: {e}") from e
    _checked.add(key)
