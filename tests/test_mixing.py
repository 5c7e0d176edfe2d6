"""Combination rules with default weights, the end of a turn across roles, and the
Bayesian mixture: exact claims on synthetic models, where every probability is known.

- bayes is Bayesian model averaging: its probability of a text is exactly
  sum_i prior_i P_i(text), so its log-loss is at most the best member's + log N;
  fixed share pays at most -log(1 - rate) more per piece.
- A calibrated product (exponents summing to 1) loses, on every piece, at most the
  weighted mean of its members' losses (Hölder); the uncalibrated (1, 1) product does not.
- With members that cannot end a turn, END's probability is that of those that can.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from test_byte_phase import PROMPT, make_members

from lvr_local.core.combine import RULES, Mixing, combine, mixing_weights
from lvr_local.core.posterior import Posterior
from lvr_local.core.reduction import EngineOptions
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.decoding.ensemble import Ensemble
from lvr_local.decoding.roles import EXAMPLE, PREAMBLE, detect_role, format_transcript
from lvr_local.decoding.scheduling import CoreScheduler
from lvr_local.decoding.scoring import Scoring
from lvr_local.errors import LvrError
from lvr_local.llama.chat_template import Message

# The claims are about how the rules use the members' probabilities, whatever pruning
# did to those, so the default pruning keeps these tests fast.
OPTIONS = EngineOptions(precision="float64")
TEXT = b"ab ba. bab aab"


def scored(weights: list[float], mixing: Mixing, text: bytes = TEXT) -> dict:
    members = make_members()
    for m, w in zip(members, weights, strict=True):
        m.weight = w
    ensemble = Ensemble(
        members,
        sub_vocab="bytes",
        mixing=mixing,
        options=OPTIONS,
        scheduler=CoreScheduler(concurrent=False),
    )
    try:
        return Scoring(ensemble, text, PROMPT).run()
    finally:
        ensemble.close()


def member_logps(result: dict) -> np.ndarray:
    return np.array([r["logprob"] for r in result["models"].values()])


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 1.0], [0.2, 5.0]])
def test_bayes_is_exact_model_averaging_within_log_n_of_the_best(weights: list[float]) -> None:
    result = scored(weights, Mixing("bayes"))
    logps = member_logps(result)
    prior = np.array(weights) / sum(weights)
    averaged = float(np.log(np.sum(prior * np.exp(logps))))
    assert result["ensemble"]["logprob"] == pytest.approx(averaged, abs=1e-9)
    best = int(np.argmax(logps))
    assert -result["ensemble"]["logprob"] <= -logps[best] - math.log(prior[best]) + 1e-9
    # The final weights are the posterior: prior times each member's probability.
    posterior = prior * np.exp(logps - logps.max())
    got = [r["mix_weight"] for r in result["models"].values()]
    assert np.allclose(got, posterior / posterior.sum(), atol=1e-9)


def test_fixed_share_pays_at_most_its_rate_per_piece() -> None:
    rate = 0.1
    result = scored([1.0, 1.0], Mixing("bayes", switch_rate=rate))
    logps = member_logps(result)
    n = result["n_bytes"]
    bound = -logps.max() + math.log(2) - (n - 1) * math.log(1 - rate)
    assert -result["ensemble"]["logprob"] <= bound + 1e-9
    # Each weight keeps at least its share rate / N, so no member is ever written off.
    assert min(r["mix_weight"] for r in result["models"].values()) >= rate / 2 - 1e-12
    plain = scored([1.0, 1.0], Mixing("bayes"))
    assert result["ensemble"]["logprob"] != pytest.approx(plain["ensemble"]["logprob"])


def test_calibrated_product_is_never_worse_than_its_members_on_average() -> None:
    calibrated = scored([1.0, 1.0], Mixing("product"))
    mean_loss = -member_logps(calibrated).mean()
    assert -calibrated["ensemble"]["logprob"] <= mean_loss + 1e-9
    # Per piece too: Hölder bounds the normaliser of a geometric mean by 1.
    rows = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    product = combine(rows, mixing_weights([1, 1], Mixing("product")), "product")
    assert np.all(-product <= -rows.mean(axis=0) + 1e-12)
    sharp = scored([1.0, 1.0], Mixing("product", calibrate=False))
    assert sharp["ensemble"]["logprob"] < calibrated["ensemble"]["logprob"]


def test_every_rule_with_default_weights_leaves_a_model_with_itself_unchanged() -> None:
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    twice = np.vstack([row, row])
    for rule in RULES:
        w = mixing_weights([1.0, 1.0], Mixing(rule))
        assert np.allclose(combine(twice, w, rule), row, atol=1e-12), rule
    # Uncalibrated, (1, 1) squares it: temperature 0.5.
    sharp = combine(
        twice, mixing_weights([1.0, 1.0], Mixing("product", calibrate=False)), "product"
    )
    assert np.allclose(np.exp(sharp), np.exp(2 * row) / np.exp(2 * row).sum())


def test_weights_by_rule() -> None:
    assert mixing_weights([1, 1], Mixing("product")).tolist() == [0.5, 0.5]
    # Contrastive: the positive exponent becomes 1, the negative keeps its ratio to it.
    assert mixing_weights([2, -1], Mixing("product")).tolist() == [1.0, -0.5]
    assert mixing_weights([2, -1], Mixing("product", calibrate=False)).tolist() == [2, -1]
    assert mixing_weights([3, 1], Mixing("mean")).tolist() == [0.75, 0.25]
    with pytest.raises(LvrError, match="non-negative"):
        Posterior([1.0, -1.0])


def test_end_comes_from_the_members_that_can_end_a_turn() -> None:
    # Pieces x, y, END. A chat row that ends half the time, a base row that never ends.
    chat = [0.3, 0.2, 0.5]
    base = [0.1, 0.9, 0.0]
    with np.errstate(divide="ignore"):
        logq = np.log(np.array([chat, base]))
    out = np.exp(combine(logq, [0.5, 0.5], "mean", can_end=[True, False]))
    assert out[2] == pytest.approx(0.5)  # the chat member's END, untouched by the base one
    # The rest: the members' distributions given no END, mixed, scaled by 1 - 0.5.
    given_not_end = 0.5 * np.array([0.6, 0.4]) + 0.5 * np.array([0.1, 0.9])
    assert np.allclose(out[:2], 0.5 * given_not_end)
    # Everyone can end (raw text, all chat members): the plain rule.
    plain = combine(logq, [0.5, 0.5], "mean", can_end=[True, True])
    assert np.allclose(np.exp(plain), 0.5 * np.array(chat) + 0.5 * np.array(base))
    # Under product, END is the chat members' product; the rest, the product given no END.
    out = np.exp(combine(logq, [0.5, 0.5], "product", can_end=[True, False]))
    assert out[2] == pytest.approx(0.5)
    geo = np.sqrt(np.array([0.6, 0.4]) * np.array([0.1, 0.9]))
    assert np.allclose(out[:2], 0.5 * geo / geo.sum())


def test_the_posterior_follows_every_piece_and_restarts_with_each_prompt() -> None:
    members = make_members()
    members[0].weight = 3.0
    ensemble = Ensemble(
        members,
        sub_vocab="mcv",
        mixing=Mixing("bayes"),
        options=OPTIONS,
        scheduler=CoreScheduler(concurrent=False),
    )
    try:
        ensemble.start_raw(PROMPT)  # mid-token: byte-level phase first
        assert np.allclose(ensemble.mix_weights(), [0.75, 0.25])
        log_w = np.log([0.75, 0.25])
        events = [ensemble.force(ensemble.piece_id(b"."))]  # type: ignore[arg-type]
        for _ in range(3):  # then over the common vocabulary, sampled greedily
            events.append(ensemble.step(lambda logp: int(np.argmax(logp[:-1]))))
        assert events[0].byte_level and not events[-1].byte_level
        for e in events:
            assert np.allclose(e.mix_weights, np.exp(log_w - np.logaddexp.reduce(log_w)))
            log_w = log_w + np.array(e.member_logprobs)
        assert np.allclose(ensemble.mix_weights(), np.exp(log_w - np.logaddexp.reduce(log_w)))
        ensemble.start_raw(PROMPT)
        assert np.allclose(ensemble.mix_weights(), [0.75, 0.25])
    finally:
        ensemble.close()


def test_roles_from_gguf_metadata() -> None:
    plain = Vocabulary.from_token_bytes("m", [b"a", b""], (1,))
    assert detect_role(plain) == "base"
    assert detect_role(replace(plain, model_name="Gemma 3 270m")) == "base"
    assert detect_role(replace(plain, model_name="gemma-3-270m-it")) == "chat"
    assert detect_role(replace(plain, model_name="Qwen2.5 0.5B Instruct")) == "chat"
    assert detect_role(replace(plain, model_name="Edit Model")) == "base"  # "it" in a word
    assert detect_role(replace(plain, finetune="8k-lc100k-mix1-ep2")) == "chat"
    assert detect_role(replace(plain, chat_template="{{ messages }}")) == "chat"
    assert detect_role(plain, chat_template="gemma") == "chat"  # configured in models.toml
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "Bye"),
    ]
    turns = "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant: "
    # who speaks and how (answer, not copy); the example only for a base model alone
    assert format_transcript(messages) == PREAMBLE + turns
    assert format_transcript(messages, example=True) == PREAMBLE + EXAMPLE + turns
    assert EXAMPLE.startswith("User: ") and EXAMPLE.count("\nAssistant: ") == 1
