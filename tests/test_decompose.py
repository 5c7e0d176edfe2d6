"""Decomposition tables: greedy longest-prefix splits, on synthetic and real vocabularies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_lm import greedy_split, vocab_a, vocab_b

from lvr_local.core import subvocab
from lvr_local.core.decompose import DecompositionTables, build_tables, decomposition_tables
from lvr_local.core.subvocab import SubVocabulary
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError
from lvr_local.llama.vocab_reader import load_vocabulary


def synthetic_subs() -> dict[str, SubVocabulary]:
    a, b = vocab_a(), vocab_b()
    return {
        "bytes": subvocab.byte_level(),
        "maxlen2": subvocab.max_length([a], 2),
        "explicit": subvocab.explicit([b"ab", b"bab", b"cab", b"ca"]),
        "mcv": subvocab.common([a, b]),
    }


def check_tables(vocab: Vocabulary, tables: DecompositionTables, sample: int | None) -> None:
    """Pieces concatenate to each token's bytes, END is [END], control tokens are empty,
    CSR groups agree with the per-token sequences, and (on `sample` tokens, all when None)
    the split is the greedy longest-prefix one."""
    sub = tables.sub
    has = vocab.has_bytes
    assert (tables.n_pieces[~has & ~vocab.is_end] == 0).all()
    assert (tables.first_piece[~has & ~vocab.is_end] == -1).all()
    assert (tables.n_pieces[vocab.is_end] == 1).all()
    assert (tables.first_piece[vocab.is_end] == sub.end_id).all()
    assert (tables.seq >= 0).all() and (tables.seq <= sub.end_id).all()

    tokens = np.flatnonzero(has)
    counts = tables.n_pieces[tokens]
    pos = np.repeat(tables.seq_start[tokens] - np.cumsum(counts) + counts, counts)
    seq = tables.seq[pos + np.arange(counts.sum())]
    assert (seq < sub.end_id).all()
    spelled = b"".join([sub.pieces[p] for p in seq.tolist()])
    assert spelled == b"".join(vocab.token_bytes(t) or b"" for t in tokens.tolist())
    piece_lengths = sub.lengths[seq]
    per_token = np.add.reduceat(piece_lengths, np.cumsum(counts) - counts)
    assert (per_token == vocab.lengths[tokens]).all()

    for piece in range(sub.size):
        assert (tables.n_pieces[tables.singles(piece)] == 1).all()
        assert (tables.first_piece[tables.singles(piece)] == piece).all()
        assert (tables.n_pieces[tables.multis(piece)] >= 2).all()
        assert (tables.first_piece[tables.multis(piece)] == piece).all()
    assert len(tables.single_tokens) + len(tables.multi_tokens) == (tables.n_pieces > 0).sum()

    rng = np.random.default_rng(0)
    check = tokens if sample is None else rng.choice(tokens, min(sample, len(tokens)), False)
    pieces = frozenset(sub.pieces)
    longest = int(sub.lengths.max())
    for t in check.tolist():
        expected = greedy_split(vocab.token_bytes(t) or b"", pieces, longest)
        assert [sub.pieces[p] for p in tables.pieces_of(t).tolist()] == expected, t


@pytest.mark.parametrize("name", ["bytes", "maxlen2", "explicit", "mcv"])
def test_every_token_splits_greedily_over_each_synthetic_sub_vocabulary(name: str) -> None:
    vocab = vocab_a()
    check_tables(vocab, build_tables(vocab, synthetic_subs()[name]), sample=None)


def test_hash_collisions_do_not_change_the_split() -> None:
    """With hash base 1 the rolling hash is a byte sum: collisions everywhere."""
    vocab = vocab_a()
    for sub in synthetic_subs().values():
        assert_same_tables(build_tables(vocab, sub), build_tables(vocab, sub, hash_base=1))


def assert_same_tables(x: DecompositionTables, y: DecompositionTables) -> None:
    for name in (
        "first_piece",
        "n_pieces",
        "seq_start",
        "seq",
        "single_ptr",
        "single_tokens",
        "multi_ptr",
        "multi_tokens",
    ):
        assert np.array_equal(getattr(x, name), getattr(y, name)), name


def test_missing_single_byte_is_a_clear_error() -> None:
    vocab = Vocabulary.from_token_bytes("v", [b"ab", b"z"], ())
    sub = SubVocabulary.from_pieces("tiny", [b"a", b"b"])
    with pytest.raises(LvrError, match="7a"):
        build_tables(vocab, sub)


def test_tables_are_cached_by_content() -> None:
    vocab = vocab_a()
    first = decomposition_tables(vocab, subvocab.byte_level())
    assert decomposition_tables(vocab_a(), subvocab.byte_level()) is first
    assert decomposition_tables(vocab, subvocab.max_length([vocab], 2)) is not first


# ---------------------------------------------------------------------------------------
# The bundled models' real vocabularies


@pytest.fixture(scope="module")
def real_vocabs(smollm2_path: Path, gemma_path: Path) -> list[Vocabulary]:
    return [load_vocabulary(smollm2_path), load_vocabulary(gemma_path)]


@pytest.mark.slow
def test_real_vocabularies_over_the_common_vocabulary(real_vocabs: list[Vocabulary]) -> None:
    sub = subvocab.common(real_vocabs)
    for vocab in real_vocabs:
        check_tables(vocab, build_tables(vocab, sub), sample=20_000)


@pytest.mark.slow
def test_real_vocabulary_over_bytes_and_with_collisions(real_vocabs: list[Vocabulary]) -> None:
    smol = real_vocabs[0]
    check_tables(smol, build_tables(smol, subvocab.byte_level()), sample=2_000)
    sub = subvocab.common(real_vocabs)
    assert_same_tables(build_tables(smol, sub), build_tables(smol, sub, hash_base=1))
