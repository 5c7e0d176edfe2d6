"""A model's vocabulary as exact bytes: what every token id spells, read from its GGUF.

The runtime source of truth is llama.cpp itself (a `vocab_only` load and
`llama_token_to_piece`, special tokens not rendered): that is what the model's text is
made of when llama.cpp detokenizes. `gguf_tokens.py` decodes the same bytes independently
from the GGUF token strings; the test suite checks that the two agree.

Reading 262,144 pieces through ctypes takes most of a second, so the derived arrays are
cached on disk, keyed by the file's identity (path, size, modification time).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import llama_cpp as L
import numpy as np

from lvr_local.errors import UnsupportedTokenizerError
from lvr_local.native import LlamaModel
from lvr_local.paths import cache_dir

# GGUF `tokenizer.ggml.token_type` codes.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {
    0: "undefined",
    NORMAL: "normal",
    UNKNOWN: "unknown",
    CONTROL: "control",
    USER_DEFINED: "user-defined",
    UNUSED: "unused",
    BYTE: "byte",
}

# Tokenizer models whose per-token bytes are exact (checked token by token in the tests).
SUPPORTED_TOKENIZERS = {
    "gpt2": "byte-level BPE",
    "llama": "SentencePiece",
    "gemma4": "Gemma 4 BPE",
}

CACHE_FORMAT = 2


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Every token's bytes (none for control tokens), type and role, plus prompt settings.

    Bytes live in one buffer: token i spells `blob[offsets[i]:offsets[i + 1]]`. A token
    has bytes when that slice is non-empty and it is not an end-of-generation token;
    end-of-generation tokens (EOS, EOT, chat-turn enders) all mean END.
    """

    name: str
    path: Path
    tokenizer_model: str
    tokenizer_pre: str | None
    token_type: np.ndarray
    offsets: np.ndarray
    blob: bytes
    is_end: np.ndarray
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None = field(repr=False)
    n_undecodable: int = 0

    @classmethod
    def from_token_bytes(
        cls, name: str, tokens: list[bytes | None], end_ids: tuple[int, ...] = ()
    ) -> Vocabulary:
        """A vocabulary built in memory: synthetic test models and hand-made vocabularies.
        Tokens given as None are control tokens; `end_ids` mark end-of-generation tokens."""
        pieces = [t or b"" for t in tokens]
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        is_end = np.zeros(len(pieces), dtype=bool)
        is_end[list(end_ids)] = True
        types = np.where([t is None for t in tokens], CONTROL, NORMAL).astype(np.int8)
        return cls(
            name=name,
            path=Path(name),
            tokenizer_model="synthetic",
            tokenizer_pre=None,
            token_type=types,
            offsets=offsets,
            blob=b"".join(pieces),
            is_end=is_end,
            bos_id=None,
            eos_id=end_ids[0] if end_ids else None,
            add_bos=False,
            add_space_prefix=False,
            chat_template=None,
        )

    @property
    def n_tokens(self) -> int:
        return len(self.token_type)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def has_bytes(self) -> np.ndarray:
        return (self.lengths > 0) & ~self.is_end

    @cached_property
    def end_ids(self) -> np.ndarray:
        return np.flatnonzero(self.is_end)

    def token_bytes(self, token: int) -> bytes | None:
        if not self.has_bytes[token]:
            return None
        return self.blob[self.offsets[token] : self.offsets[token + 1]]

    @cached_property
    def all_token_bytes(self) -> list[bytes | None]:
        """Python list view, for code that builds dictionaries once (not for the hot path)."""
        blob, offs, has = self.blob, self.offsets.tolist(), self.has_bytes.tolist()
        return [blob[offs[i] : offs[i + 1]] if has[i] else None for i in range(self.n_tokens)]

    @cached_property
    def byte_strings(self) -> frozenset[bytes]:
        """The distinct byte strings of the ordinary tokens."""
        return frozenset(b for b in self.all_token_bytes if b is not None)

    def summary(self) -> dict[str, object]:
        types = np.bincount(self.token_type.astype(np.int64), minlength=7)
        lengths = self.lengths[self.has_bytes]
        return {
            "name": self.name,
            "path": str(self.path),
            "tokenizer_model": self.tokenizer_model,
            "tokenizer_pre": self.tokenizer_pre,
            "n_tokens": self.n_tokens,
            "n_with_bytes": int(self.has_bytes.sum()),
            "n_distinct_byte_strings": len(self.byte_strings),
            "token_types": {TYPE_NAMES[t]: int(c) for t, c in enumerate(types) if c},
            "end_ids": [int(i) for i in self.end_ids],
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "add_space_prefix": self.add_space_prefix,
            "max_token_bytes": int(lengths.max()) if len(lengths) else 0,
            "mean_token_bytes": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
            "has_chat_template": self.chat_template is not None,
            "n_undecodable": self.n_undecodable,
        }


def load_vocabulary(path: Path | str, name: str | None = None) -> Vocabulary:
    """The vocabulary of a GGUF file, from the disk cache when the file is unchanged."""
    path = Path(path).expanduser().resolve()
    name = name or path.stem
    cache_file = _cache_file(path)
    if cache_file is not None and cache_file.exists():
        try:
            return _read_cache(cache_file, path, name)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    vocab = read_vocabulary_from_llama(path, name)
    if cache_file is not None:
        _write_cache(cache_file, vocab)
    return vocab


def _attr_to_type(attr: int) -> int:
    """llama.cpp's attribute flags back to the GGUF token type code."""
    for flag, code in (
        (L.LLAMA_TOKEN_ATTR_BYTE, BYTE),
        (L.LLAMA_TOKEN_ATTR_CONTROL, CONTROL),
        (L.LLAMA_TOKEN_ATTR_USER_DEFINED, USER_DEFINED),
        (L.LLAMA_TOKEN_ATTR_UNUSED, UNUSED),
        (L.LLAMA_TOKEN_ATTR_UNKNOWN, UNKNOWN),
        (L.LLAMA_TOKEN_ATTR_NORMAL, NORMAL),
    ):
        if attr & flag:
            return code
    return 0


def read_vocabulary_from_llama(path: Path, name: str) -> Vocabulary:
    """Read every token's bytes with llama.cpp (no weights loaded)."""
    with LlamaModel(path, vocab_only=True) as model:
        tokenizer_model = model.meta("tokenizer.ggml.model") or "unknown"
        if tokenizer_model not in SUPPORTED_TOKENIZERS:
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_TOKENIZERS.items())
            raise UnsupportedTokenizerError(
                f"{path.name}: tokenizer model '{tokenizer_model}' is not supported; "
                f"lvr-local reads exact token bytes for: {supported}"
            )
        vocab = model.vocab
        n = L.llama_vocab_n_tokens(vocab)
        pieces, attrs, ends = _read_pieces(vocab, n)
        undecodable = _drop_undecodable(pieces)
        add_space = model.meta("tokenizer.ggml.add_space_prefix")
        bos = L.llama_vocab_bos(vocab)
        eos = L.llama_vocab_eos(vocab)
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Vocabulary(
            name=name,
            path=path,
            tokenizer_model=tokenizer_model,
            tokenizer_pre=model.meta("tokenizer.ggml.pre"),
            token_type=np.array([_attr_to_type(a) for a in attrs], dtype=np.int8),
            offsets=offsets,
            blob=b"".join(pieces),
            is_end=np.array(ends, dtype=bool),
            bos_id=bos if bos >= 0 else None,
            eos_id=eos if eos >= 0 else None,
            add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
            add_space_prefix=(
                add_space == "true" if add_space is not None else tokenizer_model == "llama"
            ),
            chat_template=model.chat_template(),
            n_undecodable=len(undecodable),
        )


UNK_BYTE_MARK = b"[UNK_BYTE_0x"


def _drop_undecodable(pieces: list[bytes]) -> list[int]:
    """Tokens llama.cpp cannot render as bytes lose their bytes (they become like control
    tokens: never emitted). Some byte-level BPE vocabularies (Command-R: 1,403 tokens) hold
    raw characters outside the GPT-2 byte map; llama.cpp renders each as
    '[UNK_BYTE_0x...]', text the model never meant."""
    bad = [i for i, p in enumerate(pieces) if UNK_BYTE_MARK in p]
    for i in bad:
        pieces[i] = b""
    return bad


def _read_pieces(vocab: object, n: int) -> tuple[list[bytes], list[int], list[bool]]:
    """Every token's non-special rendering. The buffer grows on a negative return:
    llama-cpp-python's own helpers stop at 32 bytes, and hundreds of real tokens are longer."""
    to_piece, get_attr, is_eog = (
        L.llama_token_to_piece,
        L.llama_vocab_get_attr,
        L.llama_vocab_is_eog,
    )
    size = 256
    buf = ctypes.create_string_buffer(size)
    pieces: list[bytes] = []
    attrs: list[int] = []
    ends: list[bool] = []
    for token in range(n):
        k = to_piece(vocab, token, buf, size, 0, False)
        if k < 0:
            size = max(2 * size, -k)
            buf = ctypes.create_string_buffer(size)
            k = to_piece(vocab, token, buf, size, 0, False)
        pieces.append(ctypes.string_at(buf, k))
        attrs.append(get_attr(vocab, token))
        ends.append(is_eog(vocab, token))
    return pieces, attrs, ends


def _cache_file(path: Path) -> Path | None:
    try:
        st = path.stat()
    except OSError:
        return None  # LlamaModel reports the missing file with a clear message
    key = f"{CACHE_FORMAT}|{L.__version__}|{path}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir("vocab") / f"{path.stem}-{digest}.npz"


_META_FIELDS = (
    "tokenizer_model",
    "tokenizer_pre",
    "bos_id",
    "eos_id",
    "add_bos",
    "add_space_prefix",
    "chat_template",
    "n_undecodable",
)


def _write_cache(cache_file: Path, vocab: Vocabulary) -> None:
    meta = {k: getattr(vocab, k) for k in _META_FIELDS}
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        np.savez(
            tmp,
            token_type=vocab.token_type,
            offsets=vocab.offsets,
            blob=np.frombuffer(vocab.blob, dtype=np.uint8),
            is_end=vocab.is_end,
            meta=np.array(json.dumps(meta)),
        )
        os.replace(tmp, cache_file)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs speed


def _read_cache(cache_file: Path, path: Path, name: str) -> Vocabulary:
    with np.load(cache_file, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return Vocabulary(
            name=name,
            path=path,
            token_type=data["token_type"],
            offsets=data["offsets"],
            blob=data["blob"].tobytes(),
            is_end=data["is_end"],
            **meta,
        )
