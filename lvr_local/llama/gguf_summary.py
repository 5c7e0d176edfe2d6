"""What a GGUF file's header says about its model, without loading it.

A listing of every model on disk (runner/discovery.py) and the memory check before a
load (llama/memory_estimate.py) both need a few facts per file: architecture, parameter
count, quantization, tokenizer, whether it carries a chat template, and the sizes that
decide its memory (tensor bytes, layers, key/value heads). They are all in the header,
read here with gguf_check's own reader with the token strings skipped (12 ms for
SmolLM2, 31 ms for Gemma's 262,144 tokens), never through llama.cpp.

A model split into parts (NAME-00001-of-00003.gguf, as llama.cpp's gguf-split and
gguf-py write them, with `split.no` and `split.count` in every part's header) is loaded
by llama.cpp from its first part, which finds the others by name. Its summary is read
from the first part's header, with the tensors of every part counted; a later part, or
a set with a part missing, is refused with a message naming the first part.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lvr_local.errors import ModelFileError
from lvr_local.llama.gguf_check import SCALARS, ArrayValue, GGUFHeader, KeyValue, read_header


@dataclass(frozen=True)
class GGUFSummary:
    """One model file as its header describes it. Sizes in bytes; None: not stated."""

    architecture: str
    name: str | None
    finetune: str | None
    parameters: int  # elements of every tensor
    quantization: str  # general.file_type's name ("Q4_K_M"), else the commonest tensor type
    tokenizer_model: str
    tokenizer_pre: str | None
    n_vocab: int
    has_chat_template: bool
    context_length: int | None
    n_layer: int
    n_embd: int
    n_ff: int
    kv_width: int  # per cell, summed over layers: key and value elements of every layer
    weights_bytes: int  # the tensor data llama.cpp maps, of every part of a split model
    split_count: int = 1  # the parts of a split model

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GGUFSummary:
        return cls(**record)


SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_paths(first: Path, count: int) -> list[Path]:
    """Every part of a split model, from its first part's path, as llama.cpp names them
    (llama_split_path: PREFIX-%05d-of-%05d.gguf)."""
    match = SPLIT_NAME.match(first.name)
    if match is None or int(match["no"]) != 1:
        raise ValueError(
            f"its header says it is the first of {count} parts, but its name does not end "
            f"in -00001-of-{count:05d}.gguf, which llama.cpp needs to find the others"
        )
    prefix = match["prefix"]
    return [first.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def summarize_gguf(path: Path) -> GGUFSummary:
    """The header summary of a GGUF file; ModelFileError when it is not one. For the
    first part of a split model, the summary of the whole model."""
    try:
        header, summary = _read_summary(path)
        split_no, split_count = _split_position(header)
        if split_no != 0:
            first = SPLIT_NAME.sub(r"\g<prefix>-00001-of-\g<count>.gguf", path.name)
            raise ValueError(
                f"part {split_no + 1} of a model split in {split_count}: name its first "
                f"part ({first}); llama.cpp loads the others from it"
            )
        if split_count == 1:
            return summary
        n_params, n_bytes = summary.parameters, summary.weights_bytes
        for part in split_part_paths(path, split_count)[1:]:
            if not part.is_file():
                raise ValueError(f"part {part.name} of this split model is missing")
            part_header, _ = _read_summary(part)
            params, size = _tensor_totals(part_header)
            n_params, n_bytes = n_params + params, n_bytes + size
        return replace(summary, parameters=n_params, weights_bytes=n_bytes, split_count=split_count)
    except (OSError, ValueError, struct.error) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ModelFileError(f"{path}: {detail}") from e


def _read_summary(path: Path) -> tuple[GGUFHeader, GGUFSummary]:
    """One file's header and its summary (its own tensors only)."""
    if path.stat().st_size < 4:
        raise ValueError("not a GGUF file (empty or shorter than its magic)")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"not a GGUF file (it starts with {bytes(buf[:4])!r})")
        header = read_header(buf, keep_strings=False)
        return header, _summary(header, buf)


def _split_position(header: GGUFHeader) -> tuple[int, int]:
    """split.no (from 0) and split.count, as llama.cpp's split writer sets them."""
    count = _int(header.fields.get("split.count"), 1)
    return _int(header.fields.get("split.no"), 0), max(count, 1)


def _summary(header: GGUFHeader, buf: Any) -> GGUFSummary:
    fields = header.fields
    arch = _text(fields.get("general.architecture")) or "unknown"

    def number(key: str, default: int = 0) -> int:
        return _int(fields.get(f"{arch}.{key}"), default)

    def per_layer(key: str, n_layer: int, default: int) -> list[int]:
        return _per_layer(fields.get(f"{arch}.{key}"), buf, n_layer, default)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count", 1) or 1
    head_k = number("attention.key_length", n_embd // n_head)
    head_v = number("attention.value_length", n_embd // n_head)
    kv_heads = per_layer("attention.head_count_kv", n_layer, n_head)
    tokens = fields.get("tokenizer.ggml.tokens")
    n_params, n_bytes = _tensor_totals(header)
    return GGUFSummary(
        architecture=arch,
        name=_text(fields.get("general.name")),
        finetune=_text(fields.get("general.finetune")),
        parameters=n_params,
        quantization=_quantization(header),
        tokenizer_model=_text(fields.get("tokenizer.ggml.model")) or "none",
        tokenizer_pre=_text(fields.get("tokenizer.ggml.pre")),
        n_vocab=tokens.value.n if tokens and isinstance(tokens.value, ArrayValue) else 0,
        has_chat_template=bool(_text(fields.get("tokenizer.chat_template"))),
        context_length=number("context_length") or None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=max(per_layer("feed_forward_length", n_layer, 0), default=0),
        kv_width=sum(kv_heads) * (head_k + head_v),
        weights_bytes=n_bytes,
    )


def _text(kv: KeyValue | None) -> str | None:
    if kv is None or not isinstance(kv.value, bytes):
        return None
    return kv.value.decode("utf-8", errors="replace")


def _int(kv: KeyValue | None, default: int) -> int:
    if kv is None or isinstance(kv.value, bool) or not isinstance(kv.value, int):
        return default
    return kv.value


def _per_layer(kv: KeyValue | None, buf: Any, n_layer: int, default: int) -> list[int]:
    """A size given once for all layers or as a per-layer array (hybrid models: some
    layers have no key/value heads, hence no cache)."""
    value = kv.value if kv is not None else None
    if isinstance(value, ArrayValue) and SCALARS.get(value.elem_type, "f") in "BbHhIiQq":
        fmt = SCALARS[value.elem_type]
        return list(struct.unpack_from(f"<{value.n}{fmt}", buf, value.start))
    return [_int(kv, default)] * n_layer


def _tensor_totals(header: GGUFHeader) -> tuple[int, int]:
    """Parameters and bytes of all tensors (gguf's quantization table: block sizes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # slow to import

    n_params = n_bytes = 0
    for t in header.tensors:
        n = 1
        for d in t.dims:
            n *= d
        n_params += n
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor '{t.name}' has unknown type {t.type}") from None
        n_bytes += n // block * type_size
    return n_params, n_bytes


def _quantization(header: GGUFHeader) -> str:
    """general.file_type's name, else the type holding most of the tensor bytes."""
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    file_type = header.fields.get("general.file_type")
    if file_type is not None and isinstance(file_type.value, int):
        try:
            return LlamaFileType(file_type.value).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    counts: dict[int, int] = {}
    for t in header.tensors:
        n = 1
        for d in t.dims:
            n *= d
        counts[t.type] = counts.get(t.type, 0) + n
    if not counts:
        return "unknown"
    commonest = max(counts, key=counts.__getitem__)
    try:
        return GGMLQuantizationType(commonest).name
    except ValueError:
        return f"type {commonest}"
