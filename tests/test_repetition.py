"""Repetition control against llama.cpp: the cases of its own sampler tests
(tests/test-sampling.cpp, `test_penalties` and `test_dry`), whose expected values follow
from its formulas by hand, plus the piece-level parts (breakers over pieces, the
history kept as bytes)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from lvr_local.core.repetition import (
    BYTES_PER_TOKEN,
    Breakers,
    RepetitionControl,
    RepetitionParams,
    apply_dry,
    apply_penalties,
    repeat_lengths,
)
from lvr_local.core.subvocab import SubVocabulary, byte_level, explicit

OFF = RepetitionParams()
NO_BREAKERS = Breakers({})


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def penalised(probs: list[float], history: list[int], **params: float) -> np.ndarray:
    """llama.cpp's test: logits = log(probs), the penalties sampler, then softmax."""
    scores = np.log(np.array(probs))
    p = replace(OFF, repeat_last_n=len(history), **params)
    apply_penalties(scores, history, p)
    return softmax(scores)


def dried(
    probs: list[float],
    history: list[int],
    breakers: dict[int, tuple[tuple[int, ...], ...]] | None = None,
    **params: float,
) -> np.ndarray:
    scores = np.log(np.array(probs))
    apply_dry(scores, history, replace(OFF, **params), Breakers(breakers or {}))
    return softmax(scores)


FLAT5 = [0.2] * 5


@pytest.mark.parametrize(
    ("history", "params", "expected"),
    [
        ([0], {"repeat_penalty": 50.0}, [0, 0.25, 0.25, 0.25, 0.25]),
        ([0, 1, 2], {"repeat_penalty": 50.0}, [0, 0, 0, 0.5, 0.5]),
        ([0, 1, 2, 0, 0], {"repeat_penalty": 50.0}, [0, 0, 0, 0.5, 0.5]),
        (
            [0],
            {"frequency_penalty": 5.0, "presence_penalty": 5.0},
            [0.000011, 0.249997, 0.249997, 0.249997, 0.249997],
        ),
        (
            [0, 1, 2],
            {"frequency_penalty": 5.0, "presence_penalty": 5.0},
            [0.000023, 0.000023, 0.000023, 0.499966, 0.499966],
        ),
        (
            [0, 1, 2, 0, 0],
            {"frequency_penalty": 5.0, "presence_penalty": 5.0},
            [0.000000, 0.000023, 0.000023, 0.499977, 0.499977],
        ),
    ],
)
def test_penalties_match_llama_cpp(history: list[int], params: dict, expected: list[float]) -> None:
    assert np.allclose(penalised(FLAT5, history, **params), expected, atol=1e-6)


def test_penalties_by_hand() -> None:
    # log 0.5 * 2 for the repeated piece; a positive score would be divided instead.
    scores = np.log(np.array([0.5, 0.25, 0.25]))
    apply_penalties(scores, [0, 0, 2], replace(OFF, repeat_penalty=2.0, repeat_last_n=2))
    assert scores[0] == pytest.approx(2 * math.log(0.5))  # in the window once
    assert scores[1] == pytest.approx(math.log(0.25))  # never seen
    assert scores[2] == pytest.approx(2 * math.log(0.25))
    positive = np.array([1.0, -1.0])
    apply_penalties(positive, [0, 1], replace(OFF, repeat_penalty=2.0))
    assert positive.tolist() == [0.5, -2.0]
    # Only the last repeat_last_n pieces count: piece 0 left the window.
    counted = np.zeros(3)
    apply_penalties(counted, [0, 1, 1], replace(OFF, frequency_penalty=1.0, repeat_last_n=2))
    assert counted.tolist() == [0.0, -2.0, 0.0]


@pytest.mark.parametrize(
    ("probs", "history", "expected", "params", "breakers"),
    [
        (
            [0.25] * 4,
            [0, 1],
            [0.25] * 4,
            {"dry_multiplier": 1.0, "dry_base": 1.1, "dry_allowed_length": 2},
            None,
        ),
        (
            [0.25] * 4,
            [0, 1, 2, 0, 1],
            [0.296923, 0.296923, 0.109232, 0.296923],
            {"dry_multiplier": 1.0, "dry_base": 1.1, "dry_allowed_length": 2},
            None,
        ),
        (
            FLAT5,
            [0, 1, 3, 4, 0, 1],
            FLAT5,
            {"dry_multiplier": 1.0, "dry_base": 1.1, "dry_allowed_length": 2},
            {3: ((),)},
        ),
        (
            FLAT5,
            [0, 1, 2, 0, 1],
            [0.241818, 0.241818, 0.032727, 0.241818, 0.241818],
            {"dry_multiplier": 2.0, "dry_base": 1.1, "dry_allowed_length": 2},
            None,
        ),
        (
            FLAT5,
            [0, 1, 2, 3, 4, 0, 1],
            FLAT5,
            {"dry_multiplier": 1.0, "dry_base": 1.1, "dry_allowed_length": 4},
            None,
        ),
    ],
)
def test_dry_matches_llama_cpp(
    probs: list[float], history: list[int], expected: list[float], params: dict, breakers: dict
) -> None:
    got = dried(probs, history, breakers, dry_penalty_last_n=len(history), **params)
    assert np.allclose(got, expected, atol=1e-6)


def test_dry_penalty_grows_with_the_repeat_length() -> None:
    # "0 1 2 3 0 1 2": emitting 3 would repeat "0 1 2 3": length 3 -> 1 * 2**(3 - 2) = 2.
    scores = np.zeros(5)
    params = replace(OFF, dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2)
    apply_dry(scores, [0, 1, 2, 3, 0, 1, 2], params, Breakers({}))
    assert scores.tolist() == [0.0, 0.0, 0.0, -2.0, 0.0]
    # A breaker inside the repeat caps its length: after "4", only "1 2" counts (n = 2).
    scores = np.zeros(5)
    apply_dry(scores, [0, 1, 2, 3, 4, 1, 2], params, Breakers({4: ((),)}))
    assert scores.tolist() == [0.0, 0.0, 0.0, -1.0, 0.0]
    # A multi-piece breaker "4 0": its head, then its tail, resets the count.
    scores = np.zeros(5)
    apply_dry(scores, [1, 2, 3, 4, 0, 1, 2], params, Breakers({4: ((0,),)}))
    assert scores.tolist() == [0.0, 0.0, 0.0, -1.0, 0.0]


def test_repeat_lengths_are_the_longest_common_suffixes() -> None:
    tokens = np.array([0, 1, 2, 2, 1, 2, 9, 0, 1, 2])  # llama.cpp's comment's example
    assert repeat_lengths(tokens, 100).tolist() == [0, 0, 3, 1, 0, 2, 0, 0, 0]
    assert repeat_lengths(tokens, 2).tolist() == [0, 0, 2, 1, 0, 2, 0, 0, 0]


def test_breakers_over_pieces() -> None:
    sub = explicit([b"a", b"b", b":", b"\n", b"a\n", b"x", b"y", b"ab", b"<", b"/"])
    built = Breakers.build(["\n", "</x"], sub)
    newline, a_newline, lt = sub.index[b"\n"], sub.index[b"a\n"], sub.index[b"<"]
    assert built.single(newline) and built.single(a_newline)  # pieces containing it
    assert built.tails[lt] == ((sub.index[b"/"], sub.index[b"x"]),)  # "<" then "/" "x"
    assert not built.single(sub.index[b"a"])


def test_control_keeps_bytes_across_sub_vocabularies() -> None:
    bytes_sub = SubVocabulary.from_pieces("bytes", [b"a", b"b"])
    coarse = SubVocabulary.from_pieces("coarse", [b"a", b"b", b"ab"])
    control = RepetitionControl(replace(OFF, repeat_penalty=2.0))
    logp = np.log(np.array([0.25, 0.25, 0.25, 0.25]))  # pieces of `coarse`, then END
    assert control.apply(logp, coarse) is logp  # nothing written yet
    for piece in (b"a", b"b"):  # written during the byte-level phase
        control.accept(piece)
    out = control.apply(logp, coarse)
    a, b, ab = (coarse.index[p] for p in (b"a", b"b", b"ab"))
    assert out[a] == out[b] == pytest.approx(2 * math.log(0.25))
    assert out[ab] == logp[ab] and out[-1] == logp[-1]  # END is never penalised
    assert bytes_sub.index[b"a"] == a and bytes_sub.index[b"b"] != b  # ids differ, bytes agree
    assert RepetitionControl(OFF).apply(logp, coarse) is logp


def test_dry_over_bytes_counts_tokens_worth_of_bytes() -> None:
    """Over bytes DRY's lengths are token lengths scaled to bytes: a short repeat such as
    the "th" before the "e" of every "the" costs nothing, a repeated phrase of several
    tokens' worth of bytes costs what that many repeated tokens would."""
    sub = byte_level()
    params = replace(OFF, dry_multiplier=0.8)
    logp = np.full(sub.size, -np.log(sub.size))

    def penalty(written: bytes, next_byte: bytes) -> float:
        control = RepetitionControl(params)
        for value in written:
            control.accept(bytes([value]))
        return float(logp[sub.index[next_byte]] - control.apply(logp, sub)[sub.index[next_byte]])

    assert penalty(b"the sea, the", b" ") == 0.0  # "the" repeated: 3 bytes, under 8
    # "the waves of the se" (19 bytes) repeats: 11 bytes past the allowed 8.
    long_repeat = penalty(b"the waves of the sea. the waves of the se", b"a")
    per_token = params.dry_multiplier * params.dry_base ** ((19 - 8) / BYTES_PER_TOKEN)
    assert long_repeat == pytest.approx(per_token)
    unscaled = np.array(logp)
    apply_dry(unscaled, [sub.index[bytes([v])] for v in b"the sea, the"], params, NO_BREAKERS)
    assert unscaled[sub.index[b" "]] < logp[sub.index[b" "]]  # raw byte lengths would bite


def test_token_breakers_read_pieces_as_the_models_own_tokens() -> None:
    """DRY's breakers over a model's token ids (sample_on = "tokens"): a token that
    contains a breaker stops the scan alone; a token ending with the start of a longer
    breaker does so when the tokens after it finish it."""
    from lvr_local.core.repetition import token_breakers
    from lvr_local.core.vocabulary import Vocabulary

    strings = [b"a", b"b", b"x\n", b"\n", b"q:", b"ab", b"zz<", b"end>", b"<", None]
    vocab = Vocabulary.from_token_bytes("toy", strings, (9,))
    breakers = token_breakers(("\n", "<end>"), vocab)
    assert [t for t in range(len(strings)) if breakers.single(t)] == [2, 3]
    assert breakers.tails[6] == ((7,),)  # "zz<" then "end>" spells "<end>"
    assert breakers.limit([0, 6, 7, 0, 1]) == 2  # after the breaker: "a", "b"
    assert breakers.limit([0, 6, 0, 1]) == 4  # "zz<" then "a" is no breaker
