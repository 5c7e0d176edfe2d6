"""Ensemble decoding and exact scoring on the real bundled models and real llama.cpp."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from brute_force import brute_force_log_q

from lvr_local.core.chat import Message
from lvr_local.core.combine import Mixing, combine, mixing_weights
from lvr_local.core.reduction import EngineOptions
from lvr_local.core.sampling import Sampler, SamplingParams
from lvr_local.decoding.ensemble import Ensemble
from lvr_local.decoding.generation import Budget, RunStats, generate
from lvr_local.decoding.members import Member
from lvr_local.decoding.prompting import prepare_raw
from lvr_local.decoding.scheduling import CoreScheduler
from lvr_local.decoding.scoring import Scoring
from lvr_local.llama.backend import LlamaBackend
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.loading import load_member
from lvr_local.runner.settings import RunSettings

pytestmark = pytest.mark.slow
EXACT = EngineOptions(max_branches=0, prune=1e-12, precision="float64")
GREEDY = Sampler(SamplingParams(0.0, 0, 1.0, 0.0, None))


def _member(path: Path, name: str, weight: float = 1.0) -> tuple[Member, LlamaBackend]:
    return load_member(ModelSpec(name=name, source=str(path), weight=weight), RunSettings())


def pieces(ensemble: Ensemble, max_pieces: int, stop: tuple[str, ...] = ()) -> list:
    """A greedy generation's events."""
    return list(generate(ensemble, GREEDY.choose, Budget(max_pieces, None, stop), RunStats()))


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Iterator[Member]:
    member, backend = _member(smollm2_path, "smollm2")
    yield member
    backend.close()


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[Member]:
    member, backend = _member(gemma_path, "gemma3")
    assert member.role == "base"  # no chat template, no fine-tune: read from the GGUF
    yield member
    backend.close()


@pytest.mark.parametrize(
    ("prompt", "mid_token"),
    [(b"The cat", False), (b"The ca", True), (b"", False)],
)
def test_score_equals_brute_force_sum_over_tokenizations(
    smol: Member, prompt: bytes, mid_token: bool
) -> None:
    text = b"t sat" if mid_token else b" sat"
    smol.backend.set_exact(True)  # type: ignore[attr-defined]  # the same numbers both ways
    ensemble = Ensemble(
        [smol], sub_vocab="bytes", options=EXACT, scheduler=CoreScheduler(concurrent=False)
    )
    try:
        result = Scoring(ensemble, text, prompt).run()
    finally:
        ensemble.close()
    prepared = prepare_raw(smol.backend, smol.vocab, prompt)
    # The last token (or more, back to a word boundary) is held back and forced.
    assert prompt.endswith(prepared.tail) and bool(prepared.tail) == bool(prompt)
    smol.backend.set_prompt(prepared.tokens)
    expected = brute_force_log_q(smol.backend, smol.vocab, prepared.tail + text)
    if prepared.tail:
        expected -= brute_force_log_q(smol.backend, smol.vocab, prepared.tail)
    got = result["models"]["smollm2"]["logprob"]
    assert abs(got - expected) < 1e-4, (got, expected)
    assert result["models"]["smollm2"]["pruned_mass"] < 1e-6


def test_gemma_byte_level_matches_brute_force(gemma: Member) -> None:
    gemma.backend.set_exact(True)  # type: ignore[attr-defined]  # the same numbers both ways
    ensemble = Ensemble(
        [gemma], sub_vocab="bytes", options=EXACT, scheduler=CoreScheduler(concurrent=False)
    )
    try:
        result = Scoring(ensemble, b" cat", b"The").run()
    finally:
        ensemble.close()
    prepared = prepare_raw(gemma.backend, gemma.vocab, b"The")
    gemma.backend.set_prompt(prepared.tokens)
    expected = brute_force_log_q(gemma.backend, gemma.vocab, prepared.tail + b" cat")
    if prepared.tail:
        expected -= brute_force_log_q(gemma.backend, gemma.vocab, prepared.tail)
    assert abs(result["models"]["gemma3"]["logprob"] - expected) < 1e-4


def test_ensemble_of_a_model_with_itself_is_that_model(smollm2_path: Path, smol: Member) -> None:
    twin, twin_backend = _member(smollm2_path, "twin")
    messages = [Message("user", "Name three colours.")]
    # One sub-vocabulary for both (`auto` would give the pair bytes, the single its own).
    single = Ensemble(
        [smol], sub_vocab="mcv", options=EXACT, scheduler=CoreScheduler(concurrent=False)
    )
    pair = Ensemble(
        [smol, twin], sub_vocab="mcv", options=EXACT, scheduler=CoreScheduler(concurrent=False)
    )
    try:
        pair.set_weights([0.5, 0.5])
        single.start_chat(messages)
        reference = [single.step(lambda lp: int(np.argmax(lp))) for _ in range(8)]
        single.close()
        pair.start_chat(messages)
        for expected in reference:
            logq = pair.distributions()
            combined = pair.combined(logq)
            event = pair.force(expected.piece)
            assert abs(event.logprob - expected.logprob) < 1e-6
            assert np.allclose(np.exp(logq[0]), np.exp(logq[1]), atol=1e-6)
            assert int(np.argmax(combined)) == expected.piece
    finally:
        pair.close()
        twin_backend.close()


def test_generation_events_and_stops(smol: Member, gemma: Member) -> None:
    ensemble = Ensemble([smol, gemma])
    ensemble.set_weights([1.0, 1.0])
    try:
        ensemble.start_chat([Message("user", "Count from one to ten in words.")])
        events = pieces(ensemble, 12)
        assert 0 < len(events) <= 12
        for e in events:
            assert len(e.member_probs) == 2 and 0 < e.prob <= 1
            assert e.dominant in (0, 1) and e.weights == (1.0, 1.0)
        text = b"".join(e.text for e in events)
        assert text
        # A stop string cuts the text where it begins.
        stop_at = text[: max(1, len(text) // 2)].decode("utf-8", errors="ignore")[-2:]
        if stop_at:
            ensemble.start_chat([Message("user", "Count from one to ten in words.")])
            cut = b"".join(e.text for e in pieces(ensemble, 12, (stop_at,)))
            assert stop_at.encode() not in cut and text.startswith(cut)
    finally:
        ensemble.close()


def test_a_stop_string_inside_a_piece_keeps_the_piece_s_head(smol: Member, gemma: Member) -> None:
    """A stop string that begins inside a multi-byte piece: the text is cut exactly where
    it begins, and the bytes of that piece before it are kept. The stop string is the
    greedy reply's own text from inside its first multi-byte piece to the end, so the
    test holds whatever the reply is. 32 pieces: the reply's first bytes are single-byte
    pieces while the members' tokenizations of the transcript's tail settle (the
    byte-level phase, docs/algorithm.md §6)."""
    ensemble = Ensemble([smol, gemma], sub_vocab="mcv")
    try:
        ensemble.start_chat([Message("user", "Name three colours.")])
        events = pieces(ensemble, 32)
        text = b"".join(e.text for e in events)
        starts = np.cumsum([0] + [len(e.text) for e in events[:-1]])
        inside = [  # (piece number, byte offset) of each place inside a multi-byte piece
            (i, int(start) + k)
            for i, (e, start) in enumerate(zip(events, starts, strict=True))
            for k in range(1, len(e.text))
            if _is_utf8(text[int(start) + k :])
        ]
        assert inside, text  # over the common vocabulary, words are pieces
        number, cut_at = inside[0]
        stop = text[cut_at:].decode()
        ensemble.start_chat([Message("user", "Name three colours.")])
        stats = RunStats()
        cut = list(generate(ensemble, GREEDY.choose, Budget(32, None, (stop,)), stats))
        kept = text.find(stop.encode())
        assert b"".join(c.text for c in cut) == text[:kept]
        assert stats.stop_reason == "stop" and stats.bytes == kept
        if kept == cut_at:  # the stop string's first occurrence is the one inside the piece
            assert len(cut) == number + 1 and events[number].text.startswith(cut[-1].text)
            assert 0 < len(cut[-1].text) < len(events[number].text)
    finally:
        ensemble.close()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_a_step_can_list_the_most_likely_pieces(smol: Member, gemma: Member) -> None:
    ensemble = Ensemble([smol, gemma])
    try:
        ensemble.start_chat([Message("user", "Count from one to ten in words.")])
        stats = RunStats()
        events = list(generate(ensemble, GREEDY.choose, Budget(4), stats, top_n=5))
        for e in events:
            texts, logprobs = zip(*e.alternatives, strict=True)
            assert len(texts) == 5 and list(logprobs) == sorted(logprobs, reverse=True)
            assert (texts[0], logprobs[0]) == (e.text, e.logprob)  # greedy took the top one
        assert all(e.alternatives == () for e in pieces(ensemble, 2))  # only when asked
    finally:
        ensemble.close()


def test_raw_prompt_mid_token_continues_the_word(smol: Member, gemma: Member) -> None:
    """A mid-word prompt starts with the byte-level phase (§6), over the MCV and in the
    default ensemble over bytes alike, and the word is continued."""
    for sub_vocab in ("mcv", "auto"):
        ensemble = Ensemble([smol, gemma], sub_vocab=sub_vocab)
        try:
            ensemble.start_raw(b"def fibo")
            events = pieces(ensemble, 6)
            text = b"".join(e.text for e in events)
            assert text.startswith(b"nacci"), (sub_vocab, text)
            assert events[0].byte_level  # the first pieces come from the byte-level phase
        finally:
            ensemble.close()


ENGLISH = (Path(__file__).parents[1] / "lvr_local" / "data" / "english.txt").read_bytes()


def rules_log_loss(ensemble: Ensemble, text: bytes) -> dict[str, float]:
    """Log-loss (nats) of `text` for each member and each rule with default (equal)
    weights, the rules combining the same rows; bayes's weights are updated by the
    ensemble itself (its own rule), from every forced byte."""
    ensemble.start_raw(b"")
    loss = dict.fromkeys(["smol", "gemma", "mean", "product", "bayes"], 0.0)
    for value in text:
        piece = ensemble.piece_id(bytes([value]))
        assert piece is not None
        logq = ensemble.distributions()
        loss["smol"] -= logq[0, piece]
        loss["gemma"] -= logq[1, piece]
        for rule in ("mean", "product"):
            loss[rule] -= combine(logq, mixing_weights([1, 1], Mixing(rule)), rule)[piece]
        loss["bayes"] -= ensemble.force(piece).logprob
    return loss


def test_every_rule_beats_both_models_on_english_and_naive_is_worse(
    smol: Member, gemma: Member
) -> None:
    text = ENGLISH
    assert len(text) > 2000
    # text_prune 1e-4 keeps the suite fast (the default 1e-8 costs ~6 rows per byte).
    lossless = Ensemble(
        [smol, gemma],
        sub_vocab="bytes",
        options=EngineOptions(text_prune=1e-4),
        mixing=Mixing("bayes"),
    )
    try:
        loss = rules_log_loss(lossless, text)
    finally:
        lossless.close()
    best = min(loss["smol"], loss["gemma"])
    assert loss["mean"] < best and loss["product"] < best
    # The regret bound, log N nats over the whole text; here it is tight (SmolLM2's
    # probability of the text is e^-150 of Gemma's), so allow float rounding.
    assert loss["bayes"] <= best + math.log(2) + 1e-6
    naive = Ensemble([smol, gemma], sub_vocab="bytes", method="naive")
    try:
        naive_result = Scoring(naive, text).run()
    finally:
        naive.close()
    assert -naive_result["ensemble"]["logprob"] > loss["mean"]
    bpb = {k: round(float(v) / (len(text) * math.log(2)), 4) for k, v in loss.items()}
    naive_bpb = round(naive_result["ensemble"]["bits_per_byte"], 4)
    print(f"\nbits/byte on {len(text)} bytes: {bpb}, naive {naive_bpb}")


@pytest.mark.parametrize(("cores", "threads", "at_once"), [(4, 2, True), (1, 1, False)])
def test_members_share_the_cores(
    smol: Member,
    gemma: Member,
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    threads: int,
    at_once: bool,
) -> None:
    real_cores = [m.backend.n_threads for m in (smol, gemma)]
    ensemble = Ensemble([smol, gemma], scheduler=CoreScheduler(cores=lambda: cores))
    try:
        ensemble.start_raw(b"The sea is")
        assert [m.backend.n_threads for m in (smol, gemma)] == [threads, threads]
        assert ensemble.concurrent is at_once
        events = pieces(ensemble, 3)
        assert len(events) == 3 and all(len(e.member_logprobs) == 2 for e in events)
        # A model alone gets every core, in turn with nobody.
        gemma.enabled = False
        ensemble.start_raw(b"The sea is")
        assert smol.backend.n_threads == cores and not ensemble.concurrent
    finally:
        gemma.enabled = True
        ensemble.close()
        for member, n in zip((smol, gemma), real_cores, strict=True):  # others use them too
            member.backend.set_threads(n)
