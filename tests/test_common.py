"""The maximal common vocabulary of real tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvr_local.core.subvocab import (
    byte_level,
    common,
    common_report,
    max_length,
    parse_spec,
    used_bytes,
)
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError
from lvr_local.llama.vocab_reader import load_vocabulary


def test_the_bundled_pair_shares_its_common_strings_plus_every_used_byte(
    smollm2_path: Path, gemma_path: Path
) -> None:
    smol, gemma = load_vocabulary(smollm2_path), load_vocabulary(gemma_path)
    sub = common([smol, gemma])
    assert 45_000 < len(sub.pieces) < 47_500  # about 46k
    shared = smol.byte_strings & gemma.byte_strings
    singles = {bytes([b]) for b in used_bytes([smol, gemma])}
    assert set(sub.pieces) == shared | singles
    assert sub.missing_bytes(smol) == [] and sub.missing_bytes(gemma) == []
    report = common_report([smol, gemma])
    assert report["n_pieces"] == len(sub.pieces)
    assert report["single_bytes_added"] == len(singles - shared) > 0
    smol_report = report["models"][0]
    assert smol_report["tokens_that_are_pieces"] == sum(
        1 for b in smol.all_token_bytes if b is not None and b in shared
    )


def test_qwen2_and_falcon_share_about_52k_pieces_in_either_order(sdist_vocab_dir: Path) -> None:
    qwen = load_vocabulary(sdist_vocab_dir / "ggml-vocab-qwen2.gguf")
    falcon = load_vocabulary(sdist_vocab_dir / "ggml-vocab-falcon.gguf")
    n = len(common([qwen, falcon]).pieces)
    assert 50_000 < n < 54_000  # about 52k
    assert common([qwen, falcon]).pieces == common([falcon, qwen]).pieces


def test_small_sub_vocabularies_list_their_pieces_in_a_fixed_order() -> None:
    v = Vocabulary.from_token_bytes("t", [b"a", b"ab", b"abc", None, b"\xff"], end_ids=(3,))
    # The model's tokens in token order, then the single bytes it lacks, sorted.
    assert [p for p in common([v]).pieces] == [b"a", b"ab", b"abc", b"\xff", b"b", b"c"]
    assert common([v]).end_id == 6 and common([v]).size == 7
    assert len(byte_level().pieces) == 256
    two = max_length([v], 2)
    assert b"ab" in two.index and b"abc" not in two.index and len(two.pieces) == 257
    assert parse_spec("maxlen:2", [v]).pieces == two.pieces
    w = Vocabulary.from_token_bytes("u", [b"a", b"bc", None], end_ids=(2,))
    assert parse_spec("auto", [v]).pieces == common([v]).pieces  # one model: its own
    assert parse_spec("auto", [v, w]).kind == "bytes"  # an ensemble: bytes
    assert parse_spec("auto", [v, w], "naive").pieces == common([v, w]).pieces
    with pytest.raises(LvrError, match="unknown sub-vocabulary"):
        parse_spec("words", [v])
