"""Reading a vocabulary from a GGUF file with llama.cpp, cached on disk (docs/algorithm.md §9).

The runtime source of truth is llama.cpp itself (a `vocab_only` load and
`llama_token_to_piece`, special tokens not rendered): that is what the model's text is
made of when llama.cpp detokenizes. `gguf_tokens.py` decodes the same bytes independently
from the GGUF token strings; the test suite checks that the two agree.

Reading 262,144 pieces through ctypes takes most of a second, so the derived arrays are
cached on disk, keyed by the file's identity (path, size, modification time).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
from pathlib import Path

import llama_cpp as L
import numpy as np

from lvr_local.core.vocabulary import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocabulary,
)
from lvr_local.errors import ModelFileError, UnsupportedTokenizerError
from lvr_local.llama.native import LlamaModel
from lvr_local.paths import cache_dir

# Tokenizer models whose per-token bytes are exact (checked token by token in the tests).
SUPPORTED_TOKENIZERS = {
    "gpt2": "byte-level BPE",
    "llama": "SentencePiece",
    "gemma4": "Gemma 4 BPE",
}

CACHE_FORMAT = 3


def load_vocabulary(path: Path | str, name: str | None = None) -> Vocabulary:
    """The vocabulary of a GGUF file, from the disk cache when the file is unchanged."""
    given = Path(path).expanduser()
    try:
        path = given.resolve()
    except (OSError, RuntimeError) as e:  # Python 3.11 raises RuntimeError on a link loop
        raise ModelFileError(f"cannot open the model file {path}: {_resolve_error(e)}") from e
    name = name or path.stem
    cache_file = _cache_file(path)
    if cache_file is not None and cache_file.exists():
        try:
            return _read_cache(cache_file, path, name)
        except Exception:  # any damage (truncated, not a zip, wrong arrays): a miss
            pass  # rebuilt below, and replaced atomically
    # llama.cpp reads the name given: the first part of a split model behind a link (the
    # Hugging Face cache's) finds its other parts by that name, not by its target's
    vocab = read_vocabulary_from_llama(given, name)
    if cache_file is not None:
        _write_cache(cache_file, vocab)
    return vocab


def _resolve_error(error: Exception) -> str:
    if isinstance(error, RuntimeError) or getattr(error, "errno", None) == errno.ELOOP:
        return "its symbolic links form a loop"
    return str(getattr(error, "strerror", None) or error)


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
            model_name=model.meta("general.name"),
            finetune=model.meta("general.finetune"),
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
    "model_name",
    "finetune",
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
        os.replace(tmp, cache_file)  # readers see the old entry or the new, never half
    except (OSError, ValueError):
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs speed


def check_cache_entry(cache_file: Path) -> str:
    """What is wrong with one vocabulary cache entry ("" when it reads back whole): for
    `lvr doctor`. A run never trips on a damaged entry (it rebuilds it)."""
    if ".tmp" in cache_file.suffixes:
        return "left over from an interrupted write"
    try:
        _read_cache(cache_file, cache_file, cache_file.stem)
    except Exception as e:  # whatever numpy or the checks raise: damaged
        return f"damaged ({type(e).__name__}: {e})"
    return ""


def _read_cache(cache_file: Path, path: Path, name: str) -> Vocabulary:
    """The cached vocabulary; raises (anything) when the entry is damaged."""
    with np.load(cache_file, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        n = len(data["token_type"])
        offsets, blob = data["offsets"], data["blob"]
        if len(offsets) != n + 1 or len(data["is_end"]) != n or offsets[-1] != len(blob):
            raise ValueError(f"{cache_file}: inconsistent arrays")
        if set(meta) != set(_META_FIELDS):
            raise ValueError(f"{cache_file}: unexpected metadata")
        return Vocabulary(
            name=name,
            path=path,
            token_type=data["token_type"],
            offsets=data["offsets"],
            blob=data["blob"].tobytes(),
            is_end=data["is_end"],
            **meta,
        )
