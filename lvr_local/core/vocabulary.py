"""A model's vocabulary as exact bytes: what every token id spells (docs/algorithm.md §1, §9).

This is data only. It is read from a GGUF by the llama.cpp adapter (`vocab_reader.py`,
through llama.cpp's own detokenizer) or built in memory for synthetic test models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

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
    model_name: str | None = None  # GGUF general.name, e.g. "SmolLM2 135M Instruct"
    finetune: str | None = None  # GGUF general.finetune: set when the weights were fine-tuned

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
            "model_name": self.model_name,
            "finetune": self.finetune,
        }
