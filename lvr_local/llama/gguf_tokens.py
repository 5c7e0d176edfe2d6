"""Token bytes decoded straight from a GGUF's token strings, without llama.cpp.

This is the independent second source that checks `vocabulary.py` (which asks
llama.cpp): the GPT-2 byte-to-unicode table for byte-level BPE, SentencePiece's rules
(U+2581 is a space, BYTE tokens are written <0xNN>) for `llama` and `gemma4`.
It uses the `gguf` package's reader, which is slow on big vocabularies (seconds), so the
runtime never calls it; `lvr vocab --verify` and the test suite do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from lvr_local.core.vocabulary import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocabulary,
)
from lvr_local.errors import ModelFileError

SPM_SPACE = "\u2581"
SPM_STYLE = ("llama", "gemma4")


@cache
def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the
    other 68 are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


@dataclass(frozen=True)
class GgufTokens:
    tokenizer_model: str
    strings: list[str]
    token_type: np.ndarray
    tokens: list[bytes | None]  # None: no bytes (control, unknown, unused) or undecodable
    undecodable: list[int]  # normal tokens with characters outside the byte map


def read_gguf_tokens(path: Path | str) -> GgufTokens:
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ModelFileError(f"gguf cannot read {path}: {e}") from e
    model = _field(reader, "tokenizer.ggml.model")
    strings = _field(reader, "tokenizer.ggml.tokens")
    if model is None or strings is None:
        raise ModelFileError(f"{path} has no tokenizer metadata")
    types = _field(reader, "tokenizer.ggml.token_type")
    token_type = np.array(types if types is not None else [NORMAL] * len(strings), dtype=np.int8)
    tokens, undecodable = decode_token_strings(model, strings, token_type)
    return GgufTokens(model, strings, token_type, tokens, undecodable)


def decode_token_strings(
    model: str, strings: list[str], token_type: np.ndarray
) -> tuple[list[bytes | None], list[int]]:
    table = gpt2_unicode_to_byte()
    tokens: list[bytes | None] = []
    undecodable: list[int] = []
    for i, (text, kind) in enumerate(zip(strings, token_type.tolist(), strict=True)):
        if kind in (CONTROL, UNKNOWN, UNUSED):
            tokens.append(None)
        elif kind == USER_DEFINED:
            tokens.append(text.encode("utf-8"))
        elif kind == BYTE:
            tokens.append(bytes([int(text[3:5], 16)]))
        elif model in SPM_STYLE:
            tokens.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
        else:
            try:
                tokens.append(bytes(table[ch] for ch in text))
            except KeyError:
                tokens.append(None)
                undecodable.append(i)
    return tokens, undecodable


def _field(reader: GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    return None if field is None else field.contents()


@dataclass(frozen=True)
class VerifyReport:
    """How llama.cpp's bytes (the runtime's) compare with the GGUF strings, token by token."""

    n_tokens: int
    agree: int
    end_with_text: list[int]  # END per llama.cpp, written as text in the GGUF
    undecodable: list[int]  # outside the GPT-2 byte map: no bytes on either side
    mismatches: list[int]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_vocabulary(vocab: Vocabulary, gguf: GgufTokens | None = None) -> VerifyReport:
    """Every token must agree, or fall under a named exception: end-of-generation tokens
    (END, whatever their text) and characters no byte map can decode."""
    gguf = gguf or read_gguf_tokens(vocab.path)
    if len(gguf.tokens) != vocab.n_tokens:
        raise ModelFileError(
            f"{vocab.path}: GGUF lists {len(gguf.tokens)} tokens, llama.cpp {vocab.n_tokens}"
        )
    undecodable = set(gguf.undecodable)
    end_with_text, exempt, mismatches = [], [], []
    for i, (ours, theirs) in enumerate(zip(vocab.all_token_bytes, gguf.tokens, strict=True)):
        if i in undecodable:
            (exempt if ours is None else mismatches).append(i)
        elif ours == theirs:
            continue
        elif vocab.is_end[i] and ours is None:
            end_with_text.append(i)
        else:
            mismatches.append(i)
    agree = vocab.n_tokens - len(end_with_text) - len(exempt) - len(mismatches)
    return VerifyReport(vocab.n_tokens, agree, end_with_text, exempt, mismatches)
