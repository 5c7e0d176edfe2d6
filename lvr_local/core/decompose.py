"""Decomposition tables: every token of a model split into sub-vocabulary pieces.

The rule is greedy longest-prefix match over the pieces (docs/algorithm.md §1). It looks at a
token's bytes only, so two models split a shared string the same way. END tokens become
[END]. Control tokens (no bytes) get no decomposition: the engine never gives them mass
(see reduction.py).

The split is computed for all tokens at once with numpy. Each round takes one piece off
the front of every unfinished token, trying piece lengths from longest to shortest; a
substring is looked up in the piece set by a rolling hash (polynomial modulo 2^64, so
any substring hash is two array lookups). Equal strings always hash equal, so a miss is
a true miss; a hit is checked byte by byte afterwards, and the rare token whose split met
a hash collision is split again in plain Python. The result is exact.

Tables (piece ids are the sub-vocabulary's; END is `sub.end_id`):
- `first_piece[v]`, `n_pieces[v]`, and each token's piece sequence in CSR form
  (`seq[seq_start[v] : seq_start[v] + n_pieces[v]]`);
- tokens whose decomposition is exactly [s], grouped by s (`single_ptr`, `single_tokens`);
- tokens of two pieces or more, grouped by their first piece (`multi_ptr`,
  `multi_tokens`). A node of the engine waiting inside such tokens keeps just that
  small token set and filters it piece by piece, which is the trie walk.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lvr_local.core.subvocab import SubVocabulary
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError

# An odd 64-bit multiplier (the golden-ratio constant): odd means invertible mod 2^64.
HASH_BASE = 0x9E3779B97F4A7C15
NO_PIECE = -1


@dataclass(frozen=True, eq=False)
class DecompositionTables:
    """How one model's tokens split into the pieces of one sub-vocabulary."""

    sub: SubVocabulary
    n_vocab: int
    first_piece: np.ndarray  # int32 (n_vocab,): first piece, END id for END, -1 control
    n_pieces: np.ndarray  # int32 (n_vocab,): 0 for control tokens, 1 for END
    seq_start: np.ndarray  # int64 (n_vocab,): where the token's pieces start in `seq`
    seq: np.ndarray  # int32: all piece sequences, token after token
    single_ptr: np.ndarray  # int64 (sub.size + 1,)
    single_tokens: np.ndarray  # int32: tokens with d(v) = [s], grouped by s
    multi_ptr: np.ndarray  # int64 (sub.size + 1,)
    multi_tokens: np.ndarray  # int32: tokens with >= 2 pieces, grouped by first piece

    @property
    def n_symbols(self) -> int:
        """Pieces plus END."""
        return self.sub.size

    def pieces_of(self, token: int) -> np.ndarray:
        """The piece ids of one token (empty for a control token)."""
        start = self.seq_start[token]
        return self.seq[start : start + self.n_pieces[token]]

    def singles(self, piece: int) -> np.ndarray:
        """Tokens whose whole decomposition is this one piece."""
        return self.single_tokens[self.single_ptr[piece] : self.single_ptr[piece + 1]]

    def multis(self, piece: int) -> np.ndarray:
        """Tokens of two pieces or more whose first piece is this one."""
        return self.multi_tokens[self.multi_ptr[piece] : self.multi_ptr[piece + 1]]

    def piece_at(self, tokens: np.ndarray, depth: int) -> np.ndarray:
        """The piece at position `depth` of each token (caller ensures depth < n_pieces)."""
        return self.seq[self.seq_start[tokens] + depth]

    def agree(self, tokens: np.ndarray, depth: int, ahead: np.ndarray) -> np.ndarray:
        """Whether each token's pieces from position `depth` on agree with the pieces
        `ahead` as far as both go (a token may end before `ahead` does, or go past its
        end): the tokens that can still spell a known text. Caller ensures depth <
        n_pieces."""
        remaining = self.n_pieces[tokens].astype(np.int64) - depth
        ok = np.ones(len(tokens), dtype=bool)
        start = self.seq_start[tokens] + depth
        for j in range(min(int(remaining.max(initial=0)), len(ahead))):
            inside = remaining > j
            if not inside.any():
                break
            ok[inside] &= self.seq[start[inside] + j] == ahead[j]
        return ok


# ---------------------------------------------------------------------------------------
# Cached access


_cache: OrderedDict[tuple[str, str], DecompositionTables] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 8
_digests: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def decomposition_tables(vocab: Vocabulary, sub: SubVocabulary) -> DecompositionTables:
    """The tables for (vocab, sub), built once per content and kept in memory."""
    key = (_vocab_digest(vocab), _sub_digest(sub))
    with _cache_lock:
        tables = _cache.get(key)
        if tables is not None:
            _cache.move_to_end(key)
            return tables
    tables = build_tables(vocab, sub)
    with _cache_lock:
        _cache[key] = tables
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return tables


def _vocab_digest(vocab: Vocabulary) -> str:
    digest = _digests.get(vocab)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        for part in (vocab.offsets, vocab.is_end, vocab.has_bytes):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(vocab.blob)
        digest = _digests[vocab] = h.hexdigest()
    return digest


def _sub_digest(sub: SubVocabulary) -> str:
    digest = _digests.get(sub)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        h.update(sub.lengths.tobytes())
        h.update(b"".join(sub.pieces))
        digest = _digests[sub] = h.hexdigest()
    return digest


# ---------------------------------------------------------------------------------------
# Building


def build_tables(
    vocab: Vocabulary, sub: SubVocabulary, *, hash_base: int = HASH_BASE
) -> DecompositionTables:
    """Split every token of `vocab` greedily over `sub` (no cache). `hash_base` exists for
    tests: a poor base forces hash collisions, which must not change the result."""
    if not sub.pieces:
        raise LvrError("the sub-vocabulary has no pieces")
    split = _greedy_split(vocab, sub, hash_base)
    tok, piece = _with_end_tokens(vocab, sub, *split)
    return _assemble(vocab.n_tokens, sub, tok, piece)


def _greedy_split(
    vocab: Vocabulary, sub: SubVocabulary, hash_base: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token, piece) for every piece of every token with bytes, in split order."""
    blob = np.frombuffer(vocab.blob, dtype=np.uint8)
    hashes = _RollingHash(blob, hash_base)
    lookup = _PieceLookup(sub, hash_base)
    tokens = np.flatnonzero(vocab.has_bytes)
    starts = vocab.offsets[tokens]
    ends = vocab.offsets[tokens + 1]

    nothing = np.zeros(0, dtype=np.int64)
    out_tok, out_piece, out_pos, out_len = [nothing], [nothing], [nothing], [nothing]
    while len(tokens):
        piece, length = _longest_pieces(starts, ends - starts, hashes, lookup)
        if (piece < 0).any():
            raise _missing_bytes_error(vocab, sub)
        out_tok.append(tokens)
        out_piece.append(piece)
        out_pos.append(starts)
        out_len.append(length)
        starts = starts + length
        left = starts < ends
        tokens, starts, ends = tokens[left], starts[left], ends[left]

    tok = np.concatenate(out_tok)
    piece = np.concatenate(out_piece)
    bad = _failed_checks(blob, sub, piece, np.concatenate(out_pos), np.concatenate(out_len))
    bad_tokens = np.unique(tok[bad])
    if len(bad_tokens):
        keep = ~np.isin(tok, bad_tokens)
        redo_tok, redo_piece = _python_split(vocab, sub, bad_tokens)
        tok = np.concatenate([tok[keep], redo_tok])
        piece = np.concatenate([piece[keep], redo_piece])
    return tok, piece


def _longest_pieces(
    starts: np.ndarray, remaining: np.ndarray, hashes: _RollingHash, lookup: _PieceLookup
) -> tuple[np.ndarray, np.ndarray]:
    """For each position, the longest piece that the bytes there begin with (-1: none)."""
    piece = np.full(len(starts), NO_PIECE, dtype=np.int64)
    length = np.zeros(len(starts), dtype=np.int64)
    todo = np.arange(len(starts))
    longest = int(remaining.max())
    for size in lookup.lengths_desc:
        if size > longest:
            continue
        cand = todo[remaining[todo] >= size]
        if not len(cand):
            continue
        found = lookup.find(hashes.of(starts[cand], size), size)
        hit = found >= 0
        piece[cand[hit]] = found[hit]
        length[cand[hit]] = size
        todo = todo[piece[todo] < 0]
        if not len(todo):
            break
    return piece, length


class _RollingHash:
    """Hash of any substring of `data` in O(1): prefix sums of byte * B^t (mod 2^64),
    rescaled by B^-start so that equal strings hash equal wherever they are."""

    def __init__(self, data: np.ndarray, base: int) -> None:
        n = len(data)
        inverse = pow(base, -1, 1 << 64)
        self.powers = _powers(base, n + 1)
        self.inverse_powers = _powers(inverse, n + 1)
        self.prefix = np.zeros(n + 1, dtype=np.uint64)
        # +1 so that a zero byte still changes the hash.
        np.cumsum((data.astype(np.uint64) + 1) * self.powers[:n], out=self.prefix[1:])

    def of(self, starts: np.ndarray, size: int) -> np.ndarray:
        return (self.prefix[starts + size] - self.prefix[starts]) * self.inverse_powers[starts]


def _powers(base: int, n: int) -> np.ndarray:
    powers = np.full(n, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, out=powers)  # wraps modulo 2^64, which is the point


class _PieceLookup:
    """The pieces' hashes, sorted, per piece length."""

    def __init__(self, sub: SubVocabulary, base: int) -> None:
        lengths = sub.lengths
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.frombuffer(b"".join(sub.pieces), dtype=np.uint8)
        hashes = _RollingHash(blob, base)
        self.by_length: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for size in np.unique(lengths).tolist():
            ids = np.flatnonzero(lengths == size)
            keys = hashes.of(offsets[ids], size)
            order = np.argsort(keys, kind="stable")
            self.by_length[size] = (keys[order], ids[order])
        self.lengths_desc = sorted(self.by_length, reverse=True)

    def find(self, keys: np.ndarray, size: int) -> np.ndarray:
        """Piece id whose hash equals each key (-1 where none)."""
        sorted_keys, ids = self.by_length[size]
        at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return np.where(sorted_keys[at] == keys, ids[at], NO_PIECE)


def _failed_checks(
    blob: np.ndarray, sub: SubVocabulary, piece: np.ndarray, pos: np.ndarray, length: np.ndarray
) -> np.ndarray:
    """Indices of split pieces whose bytes differ from the token bytes they stand for
    (only a hash collision can cause one)."""
    piece_blob = np.frombuffer(b"".join(sub.pieces), dtype=np.uint8)
    piece_offsets = np.zeros(len(sub.pieces) + 1, dtype=np.int64)
    np.cumsum(sub.lengths, out=piece_offsets[1:])
    owner = np.repeat(np.arange(len(piece)), length)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(length) - length, length)
    same = blob[pos[owner] + within] == piece_blob[piece_offsets[piece[owner]] + within]
    return np.unique(owner[~same])


def _python_split(
    vocab: Vocabulary, sub: SubVocabulary, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The same greedy rule, one token at a time (fallback after a hash collision)."""
    index, longest = sub.index, int(sub.lengths.max())
    out_tok: list[int] = []
    out_piece: list[int] = []
    for t in tokens.tolist():
        data = vocab.token_bytes(t) or b""
        pos = 0
        while pos < len(data):
            for size in range(min(longest, len(data) - pos), 0, -1):
                found = index.get(data[pos : pos + size])
                if found is not None:
                    out_tok.append(t)
                    out_piece.append(found)
                    pos += size
                    break
            else:
                raise _missing_bytes_error(vocab, sub)
    return np.array(out_tok, dtype=np.int64), np.array(out_piece, dtype=np.int64)


def _missing_bytes_error(vocab: Vocabulary, sub: SubVocabulary) -> LvrError:
    missing = " ".join(f"{b:02x}" for b in sub.missing_bytes(vocab))
    return LvrError(
        f"sub-vocabulary {sub.describe()} cannot decompose every token of {vocab.name}: "
        f"single bytes missing: {missing}"
    )


def _with_end_tokens(
    vocab: Vocabulary, sub: SubVocabulary, tok: np.ndarray, piece: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    ends = vocab.end_ids
    return (
        np.concatenate([tok, ends]),
        np.concatenate([piece, np.full(len(ends), sub.end_id, dtype=np.int64)]),
    )


def _assemble(
    n_vocab: int, sub: SubVocabulary, tok: np.ndarray, piece: np.ndarray
) -> DecompositionTables:
    """Per-token CSR from (token, piece) records listed in split order for each token."""
    order = np.argsort(tok, kind="stable")
    seq = piece[order].astype(np.int32)
    n_pieces = np.bincount(tok, minlength=n_vocab).astype(np.int32)
    seq_start = np.zeros(n_vocab, dtype=np.int64)
    np.cumsum(n_pieces[:-1], out=seq_start[1:])
    first_piece = np.full(n_vocab, NO_PIECE, dtype=np.int32)
    has = n_pieces > 0
    first_piece[has] = seq[seq_start[has]]
    single_ptr, single_tokens = _group_by_first(first_piece, n_pieces == 1, sub.size)
    multi_ptr, multi_tokens = _group_by_first(first_piece, n_pieces >= 2, sub.size)
    return DecompositionTables(
        sub=sub,
        n_vocab=n_vocab,
        first_piece=first_piece,
        n_pieces=n_pieces,
        seq_start=seq_start,
        seq=seq,
        single_ptr=single_ptr,
        single_tokens=single_tokens,
        multi_ptr=multi_ptr,
        multi_tokens=multi_tokens,
    )


def _group_by_first(
    first_piece: np.ndarray, mask: np.ndarray, n_symbols: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (ptr, tokens) of the masked tokens grouped by first piece, ids ascending."""
    tokens = np.flatnonzero(mask)
    keys = first_piece[tokens]
    tokens = tokens[np.argsort(keys, kind="stable")].astype(np.int32)
    ptr = np.zeros(n_symbols + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_symbols), out=ptr[1:])
    return ptr, tokens
