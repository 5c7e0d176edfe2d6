"""Sub-vocabularies: the set of byte strings ("pieces") that reduced models emit.

A sub-vocabulary knows pieces and their ids, nothing about models' probabilities.
Piece ids are positions in `pieces`; END, the end of generation, is the extra id
`len(pieces)`. Pieces follow the token order of the largest vocabulary they were built
from (then the pieces it lacks, sorted): a model whose tokens are nearly all pieces then
reads its logits in order when it gathers them into piece order (node_scoring.py's
identity strategy), a stream instead of 262k random reads (0.39 -> ~0.14 ms a step).
Every sub-vocabulary contains the single bytes that occur in the tokens it serves, so
that every token can be decomposed into pieces (docs/algorithm.md §1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError

ALL_BYTES = tuple(bytes([b]) for b in range(256))


@dataclass(frozen=True, eq=False)
class SubVocabulary:
    """Pieces (distinct, non-empty byte strings) plus END."""

    kind: str
    pieces: tuple[bytes, ...]

    @classmethod
    def from_pieces(
        cls, kind: str, pieces: Iterable[bytes], layout: Sequence[Vocabulary] = ()
    ) -> SubVocabulary:
        """Pieces in the token order of the largest vocabulary of `layout`, then the
        others sorted (all sorted when `layout` is empty)."""
        distinct = set(pieces)
        if b"" in distinct:
            raise LvrError("a sub-vocabulary piece must not be empty")
        ordered: list[bytes] = []
        if layout:
            largest = max(layout, key=lambda v: v.n_tokens)
            # dict.fromkeys keeps each byte string's first token and the token order.
            ordered = [b for b in dict.fromkeys(largest.all_token_bytes) if b in distinct]
        rest = distinct.difference(ordered)
        return cls(kind=kind, pieces=(*ordered, *sorted(rest)))

    @property
    def end_id(self) -> int:
        return len(self.pieces)

    @property
    def size(self) -> int:
        """Number of symbols, END included."""
        return len(self.pieces) + 1

    @cached_property
    def index(self) -> dict[bytes, int]:
        return {p: i for i, p in enumerate(self.pieces)}

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.pieces), dtype=np.int64, count=len(self.pieces))

    def piece_id(self, piece: bytes) -> int | None:
        return self.index.get(piece)

    def piece_bytes(self, piece_id: int) -> bytes:
        """The bytes a piece spells; END spells nothing."""
        return b"" if piece_id == self.end_id else self.pieces[piece_id]

    def missing_bytes(self, vocab: Vocabulary) -> list[int]:
        """Single bytes in `vocab`'s tokens that are not pieces (must be none to decompose)."""
        return [b for b in used_bytes([vocab]) if bytes([b]) not in self.index]

    def coverage(self, vocab: Vocabulary) -> int:
        """How many of the model's tokens with bytes are themselves pieces."""
        index = self.index
        return sum(1 for b in vocab.all_token_bytes if b is not None and b in index)

    def describe(self) -> str:
        return f"{self.kind} ({len(self.pieces):,} pieces + END)"


def used_bytes(vocabs: Sequence[Vocabulary]) -> list[int]:
    """Every byte value occurring anywhere in the tokens of the given vocabularies."""
    seen = np.zeros(256, dtype=bool)
    for v in vocabs:
        # Only spans of tokens with bytes count; END and control tokens have none.
        mask = np.repeat(v.has_bytes, v.lengths)
        seen[np.frombuffer(v.blob, dtype=np.uint8)[mask]] = True
    return np.flatnonzero(seen).tolist()


def byte_level() -> SubVocabulary:
    """All 256 single bytes: a text has exactly one piece sequence."""
    return SubVocabulary.from_pieces("bytes", ALL_BYTES)


def max_length(vocabs: Sequence[Vocabulary], k: int) -> SubVocabulary:
    """Tokens of at most k bytes of the given models, plus all single bytes."""
    if k < 1:
        raise LvrError(f"maxlen:K needs K >= 1, got {k}")
    pieces = {b for v in vocabs for b in v.byte_strings if len(b) <= k}
    return SubVocabulary.from_pieces(f"maxlen:{k}", pieces | set(ALL_BYTES), vocabs)


def explicit(pieces: Iterable[bytes]) -> SubVocabulary:
    """A given list of pieces; single bytes are added so that every token decomposes."""
    return SubVocabulary.from_pieces("explicit", set(pieces) | set(ALL_BYTES))


def shared_strings(vocabs: Sequence[Vocabulary]) -> set[bytes]:
    """Byte strings that every model has as an ordinary token."""
    if not vocabs:
        raise LvrError("the common vocabulary needs at least one model")
    shared = set(vocabs[0].byte_strings)
    for v in vocabs[1:]:
        shared &= v.byte_strings
    return shared


def common(vocabs: Sequence[Vocabulary]) -> SubVocabulary:
    """The maximal common vocabulary (docs/algorithm.md §7): byte strings every model has as a
    token, plus every single byte occurring in any model's tokens."""
    singles = {bytes([b]) for b in used_bytes(vocabs)}
    return SubVocabulary.from_pieces("mcv", shared_strings(vocabs) | singles, vocabs)


def common_report(vocabs: Sequence[Vocabulary]) -> dict[str, object]:
    """What `lvr common` prints: size, per-model coverage, single bytes added, lengths."""
    sub = common(vocabs)
    shared = shared_strings(vocabs)
    added = sorted(p[0] for p in sub.pieces if len(p) == 1 and p not in shared)
    models = []
    for v in vocabs:
        with_bytes, are_pieces = int(v.has_bytes.sum()), sub.coverage(v)
        models.append(
            {
                "name": v.name,
                "n_tokens": v.n_tokens,
                "tokens_with_bytes": with_bytes,
                "tokens_that_are_pieces": are_pieces,
                "coverage": round(are_pieces / max(1, with_bytes), 4),
            }
        )
    return {
        "n_pieces": len(sub.pieces),
        "n_shared_token_strings": len(shared),
        "single_bytes_added": len(added),
        "single_bytes_added_hex": [f"{b:02x}" for b in added],
        "mean_piece_bytes": round(float(sub.lengths.mean()), 3),
        "models": models,
    }


def parse_spec(spec: str, vocabs: Sequence[Vocabulary], method: str = "lossless") -> SubVocabulary:
    """Parse a user's `--sub-vocab` value: auto | mcv | bytes | maxlen:K.

    `auto`, the default, in every mode: bytes for an ensemble, where a text has one
    spelling and every member is conditioned on the text itself (docs/algorithm.md
    §7.4); one model alone over its own vocabulary (the MCV of one), where its pieces
    are its tokens; and the MCV for the naive baseline (`method` "naive"), which is
    defined over the common vocabulary. This is the one place `auto` is resolved."""
    if spec == "auto":
        naive = method == "naive"
        return common(vocabs) if len(vocabs) == 1 or naive else byte_level()
    if spec == "mcv":
        return common(vocabs)
    if spec == "bytes":
        return byte_level()
    if spec.startswith("maxlen:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise LvrError(
                f"bad sub-vocabulary '{spec}': expected maxlen:K with K an integer"
            ) from None
        return max_length(vocabs, k)
    raise LvrError(f"unknown sub-vocabulary '{spec}': expected auto, mcv, bytes or maxlen:K")
