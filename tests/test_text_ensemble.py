"""The default ensemble conditions every member on the text: the rule applied per byte.

Over the byte sub-vocabulary a text has one spelling, and each member's next-byte
distribution is the ratio of its brute-force sums over every tokenization of the text
(docs/algorithm.md §2, §7.4). So the ensemble's probability of every short text, END
included, must be the documented rule applied byte by byte to those ratios, whatever
the members' tokenizers make of the text. Checked here on two synthetic models whose
vocabularies cut the same text differently, on the generation path (no text ahead).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from synthetic_lm import text_prob
from test_byte_phase import PROMPT, make_members

from lvr_local.benchmarks.code import HEADERS, complete_headers
from lvr_local.core.combine import Mixing, NoPieceError
from lvr_local.core.reduction import EngineOptions
from lvr_local.decoding.ensemble import Ensemble
from lvr_local.decoding.scheduling import CoreScheduler
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

# Nothing pruned: the claim is exactness, pruning's own bound is tested elsewhere.
EXACT = EngineOptions(prune=0.0, fresh_prune=0.0, max_branches=0, precision="float64")
ALPHABET = b"ab ."


def brute_next(members, heads, tails, text: bytes) -> np.ndarray:
    """(members, len(ALPHABET) + 1): each member's brute-force q(b | prompt tail + text)
    for every byte of ALPHABET, then END."""
    rows = []
    for m, head, tail in zip(members, heads, tails, strict=True):
        lm = m.backend.lm
        before = text_prob(lm, tail + text, start=head)
        after = [text_prob(lm, tail + text + bytes([b]), start=head) for b in ALPHABET]
        end = text_prob(lm, tail + text, ended=True, start=head)
        rows.append(np.log(np.array([*after, end]) / before))
    return np.array(rows)


def documented_rule(
    logq: np.ndarray, weights: list[float], rule: str, defer: float = 0.0
) -> np.ndarray:
    """docs/algorithm.md §7, written out in probabilities: mean sum_i w_i q_i / sum w;
    product prod_i q_i^(w_i / sum w) renormalised; max max_i w_i q_i renormalised. With
    `defer`, §7.6 first: the second member (the base one) has its weight times
    (1 - the first member's largest probability) ** defer."""
    q, w = np.exp(logq), np.asarray(weights, dtype=np.float64)
    assert q[0].sum() == pytest.approx(1.0, abs=1e-12)  # the row holds every piece
    w = w * np.array([1.0, (1.0 - q[0].max()) ** defer])
    w = w / w.sum()
    if rule == "mean":
        p = w @ q
    elif rule == "product":
        p = np.prod(q ** w[:, None], axis=0)
    else:
        p = np.max(q * w[:, None], axis=0)
    return np.log(p / p.sum())


def prompt_split(member) -> tuple[tuple[int, ...], bytes]:
    """The prompt's head tokens as the backend evaluated them, and its held-back tail."""
    head = member.backend.prompt
    spelled = b"".join(member.vocab.token_bytes(v) or b"" for v in head)
    return head, PROMPT[len(spelled) :] if PROMPT.startswith(spelled) else PROMPT


@pytest.mark.parametrize(
    ("rule", "weights", "defer"),
    [
        ("mean", [1.0, 1.0], 0.0),
        ("mean", [3.0, 1.0], 0.0),
        ("product", [1.0, 1.0], 0.0),
        ("max", [1.0, 2.0], 0.0),
        ("product", [1.0, 1.0], 1.0),
        ("product", [1.0, 2.0], 3.0),
        ("mean", [1.0, 1.0], 1.0),
    ],
)
def test_every_short_text_has_the_probability_of_the_rule_applied_per_byte(
    rule: str, weights: list[float], defer: float
) -> None:
    """With defer > 0 the second member is a base model, deferring to the first."""
    members = make_members()
    for m, w in zip(members, weights, strict=True):
        m.weight = w
    members[1].role = "base" if defer else "chat"
    ensemble = Ensemble(
        members,
        sub_vocab="bytes",
        mixing=Mixing(rule, defer=defer),
        options=EXACT,
        scheduler=CoreScheduler(concurrent=False),
    )
    try:
        checked = sum(check_text(ensemble, text, weights, rule, defer) for text in short_texts())
    finally:
        ensemble.close()
    assert checked == sum(len(ALPHABET) ** n for n in range(4))


def short_texts() -> Iterator[bytes]:
    for length in range(4):
        yield from map(bytes, itertools.product(ALPHABET, repeat=length))


def check_text(
    ensemble: Ensemble, text: bytes, weights: list[float], rule: str, defer: float
) -> bool:
    """The ensemble's probability of `text` then END, forced byte by byte as generation
    sees it (no text ahead), against the documented rule over brute-force rows."""
    members = ensemble.members
    ensemble.start_raw(PROMPT)
    heads, tails = zip(*(prompt_split(m) for m in members), strict=True)
    engine_logp, brute_logp = 0.0, 0.0
    for i, value in enumerate(text):
        rows = brute_next(members, heads, tails, text[:i])
        brute = documented_rule(rows, weights, rule, defer)
        event = ensemble.force(ensemble.piece_id(bytes([value])), i)
        engine_logp += event.logprob
        brute_logp += brute[ALPHABET.index(value)]
    end = documented_rule(brute_next(members, heads, tails, text), weights, rule, defer)[-1]
    engine_end = ensemble.combined(ensemble.distributions())[ensemble.end_id]
    total, expected = engine_logp + engine_end, brute_logp + end
    assert math.isfinite(expected)
    assert total == pytest.approx(expected, abs=1e-9), text
    return True


@pytest.mark.parametrize("roles", [("chat", "base"), ("chat", "chat")])
def test_where_supports_do_not_meet_the_chat_member_takes_the_step(roles) -> None:
    """Under the product two members whose kept branches allow no piece in common leave
    nothing to choose (a real run met it with Gemma pruned down to one branch). The chat
    member then takes the step alone; with no base member to set aside it is an error."""
    members = make_members()
    for m, role in zip(members, roles, strict=True):
        m.role = role
    ensemble = Ensemble(members, sub_vocab="bytes", mixing=Mixing("product", defer=1.0))
    try:
        ensemble.start_raw(PROMPT)
        logq = ensemble.distributions()
        a, b = ensemble.piece_id(b"a"), ensemble.piece_id(b"b")
        logq[0], logq[1] = -np.inf, -np.inf
        logq[0, [a, b]] = np.log([0.6, 0.4])
        logq[1, ensemble.end_id] = 0.0  # the base member allows nothing the chat one does
        if roles[1] == "chat":
            with pytest.raises(NoPieceError, match="no piece is possible"):
                ensemble.combined(logq)
            return
        logp = ensemble.combined(logq)
        assert np.allclose(logp, logq[0])
        assert list(ensemble.step_weights()) == [1.0, 0.0]
    finally:
        ensemble.close()


def test_the_members_cut_the_checked_texts_differently() -> None:
    """The check above means something only where the vocabularies disagree: some
    text of the alphabet is a single token of one member and not of the other."""
    c, d = (set(filter(None, m.vocab.all_token_bytes)) for m in make_members())
    short = {t for t in c ^ d if len(t) > 1 and set(t) <= set(ALPHABET)}
    assert short, "the two synthetic vocabularies would spell every text alike"


# ---------------------------------------------------------------------------------------
# One real member: the generation path over bytes is `lvr score`'s number.

REAL_CASES = [  # (model, prompt, text): mid-word, a URL, code, CJK
    ("smollm2", b"The ca", b"t sat"),
    ("smollm2", b"see https://exa", b"mple.com"),
    ("gemma3", b"x = 1\n", b"y = x"),
    ("gemma3", "東京".encode(), "都".encode()),
]
NO_PRUNING = RunSettings(
    n_ctx=1024,
    sub_vocab="bytes",
    numerics="exact",
    prune=1e-12,
    fresh_prune=1e-12,
    text_prune=1e-12,
    max_branches=0,
)


@pytest.fixture(scope="module")
def members(smollm2_path: Path, gemma_path: Path) -> Iterator[dict[str, Runner]]:
    out = {
        name: Runner([ModelSpec(name, str(path))], NO_PRUNING).load()
        for name, path in (("smollm2", smollm2_path), ("gemma3", gemma_path))
    }
    yield out
    for r in out.values():
        r.close()


@pytest.mark.parametrize(("model", "prompt", "text"), REAL_CASES)
def test_one_member_generation_path_equals_lvr_score(
    members: dict[str, Runner], model: str, prompt: bytes, text: bytes
) -> None:
    """Forced byte by byte as generation advances (no text ahead), a member's
    log-probability of a text is what `lvr score` reports for it, to 1e-6 nats."""
    runner = members[model]
    scored = runner.score(text, prompt, NO_PRUNING).run()["models"][model]["logprob"]
    for backend in runner.backends:
        backend.set_exact(True)
    ensemble = runner.ensemble_for(NO_PRUNING)
    ensemble.start_raw(prompt)
    generated = 0.0
    for i, value in enumerate(text):
        generated += ensemble.force(ensemble.piece_id(bytes([value])), i).member_logprobs[0]
    assert math.isfinite(scored)
    assert generated == pytest.approx(scored, abs=1e-6)


# ---------------------------------------------------------------------------------------
# What a user reads: the default raw completion of function headers.


@pytest.fixture(scope="module")
def pair(smollm2_path: Path, gemma_path: Path) -> Iterator[Runner]:
    specs = [ModelSpec("smollm2", str(smollm2_path)), ModelSpec("gemma3", str(gemma_path))]
    with Runner(specs, RunSettings(n_ctx=2048)).load() as runner:
        yield runner


def test_default_raw_completion_keeps_the_prompts_indentation_and_never_loops(
    pair: Runner,
) -> None:
    """The bundled pair's tokenizers cut indentation differently (docs/algorithm.md §7.3):
    over the MCV the mean ensemble indented code at 7 or 9 spaces and wrote blank
    indented lines. The default ensemble (product over bytes, greedy) must keep every
    line of every completion on the 4-space grid, and write no line (or pair of lines)
    three times in a row."""
    assert pair.ensemble_for(pair.settings).sub.kind == "bytes"
    done = complete_headers(pair, pair.settings)
    assert len(done) == len(HEADERS)
    assert all(c.text.strip() for c in done), [c.text for c in done]
    assert [c.off_grid for c in done] == [[]] * len(done), [c.text for c in done]
    assert [c.thrice for c in done] == [[]] * len(done), [c.text for c in done]


def test_prefetching_pairs_forward_passes_without_changing_the_generation(
    smollm2_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one member decodes alone, the other scores its likeliest next fresh node
    beside it (Ensemble._prefetches). On llama.cpp's exact path a row does not depend on
    when or beside what it was computed, so the generation must be the same, piece for
    piece and log-probability for log-probability, with prefetching and without; the
    guesses must be used, and none may stay alive in the model after the run."""
    specs = [ModelSpec("smollm2", str(smollm2_path)), ModelSpec("gemma3", str(gemma_path))]
    settings = RunSettings(n_ctx=2048, n_threads=1, numerics="exact", max_pieces=120)
    prompt = b'def fizzbuzz(n):\n    """Return the FizzBuzz words for 1..n."""\n'
    with Runner(specs, settings, concurrent=True).load() as runner:

        def generation() -> list[tuple[bytes, float, tuple[float, ...]]]:
            run = runner.complete(prompt, settings)
            return [(c.event.text, c.event.logprob, c.event.member_logprobs) for c in run]

        with_prefetch = generation()
        states = [s for s in runner.ensemble._states if s is not None]
        prefetches = sum(s.prefetches for s in states)
        hits = sum(s.prefetch_hits for s in states)
        assert prefetches > 0 and hits > 0, (prefetches, hits)
        runner.ensemble.close()
        assert all(c["alive_sequences"] <= 1 for c in runner.counters()), runner.counters()
        monkeypatch.setattr(Ensemble, "_prefetches", lambda self, states, decodes: [None] * 2)
        without = generation()
    assert [e[0] for e in with_prefetch] == [e[0] for e in without]
    for a, b in zip(with_prefetch, without, strict=True):
        assert a[1] == pytest.approx(b[1], abs=1e-9)
        assert a[2] == pytest.approx(b[2], abs=1e-9)
