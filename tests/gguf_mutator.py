"""Mutated copies of a GGUF file: changed header fields, damaged vocabularies, truncation.

Built on lvr_local.llama.gguf_check's header parser: a mutant re-encodes one metadata
record and keeps everything else (the tensor table, then the data, re-aligned), so
that each mutant is damaged in exactly one place.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lvr_local.llama.gguf_check import (
    ARRAY,
    SCALARS,
    STRING,
    ArrayValue,
    GGUFHeader,
    KeyValue,
    read_header,
)


def _string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: int, value: object) -> bytes:
    """A value of type `vtype`: a scalar, bytes for a string, (elem_type, items) for an array."""
    if vtype in SCALARS:
        return struct.pack("<" + SCALARS[vtype], value)
    if vtype == STRING:
        assert isinstance(value, bytes)
        return _string(value)
    elem, items = value  # type: ignore[misc]
    body = b"".join(encode_value(elem, v) for v in items)
    return struct.pack("<IQ", elem, len(items)) + body


def encode_record(key: str, vtype: int, value: object) -> bytes:
    return _string(key.encode()) + struct.pack("<I", vtype) + encode_value(vtype, value)


def array_items(buf: bytes, kv: KeyValue) -> list[object]:
    """The elements of an array record, decoded."""
    value = kv.value
    assert isinstance(value, ArrayValue)
    if value.items is not None:
        return list(value.items)
    fmt = "<" + SCALARS[value.elem_type]
    size = struct.calcsize(fmt)
    return [struct.unpack_from(fmt, buf, value.start + i * size)[0] for i in range(value.n)]


def with_record(buf: bytes, header: GGUFHeader, key: str, record: bytes) -> bytes:
    """The file with metadata record `key` replaced by `record` (tensor data re-aligned)."""
    kv = header.fields[key]
    head = buf[: kv.start] + record + buf[kv.end : header.table_end]
    padding = -len(head) % header.alignment
    return head + b"\0" * padding + buf[header.data_start :]


@dataclass(frozen=True)
class Mutant:
    """One way to damage a file; `kind` groups mutants for the report."""

    name: str
    kind: str  # "hyperparameter", "vocabulary", "truncation"
    apply: Callable[[bytes, GGUFHeader], bytes]


def set_scalar(key: str, value: int, vtype: int | None = None) -> Callable:
    def apply(buf: bytes, header: GGUFHeader) -> bytes:
        full = key.replace("{arch}", header.fields["general.architecture"].value.decode())
        t = vtype if vtype is not None else header.fields[full].type
        return with_record(buf, header, full, encode_record(full, t, value))

    return apply


def edit_array(key: str, edit: Callable[[list[object]], list[object]], elem: int | None = None):
    def apply(buf: bytes, header: GGUFHeader) -> bytes:
        kv = header.fields[key]
        assert isinstance(kv.value, ArrayValue)
        items = edit(array_items(buf, kv))
        new_elem = kv.value.elem_type if elem is None else elem
        return with_record(buf, header, key, encode_record(key, ARRAY, (new_elem, items)))

    return apply


def _numbered(items: list[object]) -> list[object]:
    return list(range(len(items)))


def _duplicate(items: list[object]) -> list[object]:
    items[301] = items[300]
    return items


def truncate(fraction: float) -> Callable:
    return lambda buf, header: buf[: int(len(buf) * fraction)]


def truncate_in_table(buf: bytes, header: GGUFHeader) -> bytes:
    return buf[: (header.kv_end + header.table_end) // 2]


def _all_mutants() -> list[Mutant]:
    h, v, t = "hyperparameter", "vocabulary", "truncation"
    u32, f32, i32 = 4, 6, 5
    return [
        Mutant("block_count=0", h, set_scalar("{arch}.block_count", 0)),
        Mutant("block_count=513", h, set_scalar("{arch}.block_count", 513)),
        Mutant("block_count=2**32-1", h, set_scalar("{arch}.block_count", 2**32 - 1)),
        Mutant("context_length=0", h, set_scalar("{arch}.context_length", 0)),
        Mutant("embedding_length=0", h, set_scalar("{arch}.embedding_length", 0)),
        Mutant("embedding_length=2**31", h, set_scalar("{arch}.embedding_length", 2**31)),
        Mutant("head_count=0", h, set_scalar("{arch}.attention.head_count", 0)),
        Mutant("head_count_kv=0", h, set_scalar("{arch}.attention.head_count_kv", 0)),
        Mutant("head_count_kv>head_count", h, set_scalar("{arch}.attention.head_count_kv", 90)),
        Mutant(
            "feed_forward_length=2**32-1", h, set_scalar("{arch}.feed_forward_length", 2**32 - 1)
        ),
        Mutant("expert_used>expert_count", h, _add_experts_used),
        Mutant("duplicate token string", v, edit_array("tokenizer.ggml.tokens", _duplicate)),
        Mutant("empty vocabulary", v, edit_array("tokenizer.ggml.tokens", lambda items: [])),
        Mutant(
            "token_type too short", v, edit_array("tokenizer.ggml.token_type", lambda x: x[:-5])
        ),
        Mutant("token_type as float32", v, edit_array("tokenizer.ggml.token_type", list, f32)),
        Mutant("token_type as uint32", v, edit_array("tokenizer.ggml.token_type", list, u32)),
        Mutant("tokens not strings", v, edit_array("tokenizer.ggml.tokens", _numbered, i32)),
        Mutant("bos id out of range", v, set_scalar("tokenizer.ggml.bos_token_id", 10**9, u32)),
        Mutant("truncated in the header", t, lambda buf, header: buf[: header.kv_end // 2]),
        Mutant("truncated in the tensor table", t, truncate_in_table),
        Mutant("truncated at 50%", t, truncate(0.5)),
        Mutant("truncated at 99.9%", t, truncate(0.999)),
        Mutant("last bytes cut", t, lambda buf, header: buf[:-7]),
        Mutant("version 7", t, lambda buf, header: buf[:4] + struct.pack("<I", 7) + buf[8:]),
        Mutant("absurd tensor count", t, lambda b, h: b[:8] + struct.pack("<Q", 2**60) + b[16:]),
    ]


def _add_experts_used(buf: bytes, header: GGUFHeader) -> bytes:
    """Give a dense model an `expert_used_count`, in place of its (optional) licence."""
    arch = header.fields["general.architecture"].value.decode()
    record = encode_record(f"{arch}.expert_used_count", 4, 4)
    return with_record(buf, header, "general.license", record)


MUTANTS = _all_mutants()


def write_mutant(source: bytes, mutant: Mutant, target: Path) -> Path:
    target.write_bytes(mutant.apply(source, read_header(source)))
    return target
