"""The server's parts that need no model: a request's options become run settings under
the settings' own checks, unsupported options are refused by name, and a stream never
sends the beginning of a stop string nor half a character."""

from __future__ import annotations

import numpy as np
import pytest

from lvr_local.core.subvocab import byte_level
from lvr_local.decoding.ensemble import top_pieces
from lvr_local.runner.settings import RunSettings
from lvr_local.server.errors import ApiError
from lvr_local.server.plan import ENSEMBLE_ID, plan_request
from lvr_local.server.schemas import ChatCompletionRequest, CompletionRequest
from lvr_local.server.text import StreamText

BASE = RunSettings(max_pieces=8, temperature=0.0)
MEMBERS = ("smollm2-135m", "gemma3-270m")
HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HELLO, **fields})


def refused(request: ChatCompletionRequest | CompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as caught:
        plan_request(request, BASE, MEMBERS)
    return caught.value


def test_openai_names_become_run_settings() -> None:
    plan = plan_request(
        chat(
            max_tokens=5,
            temperature=0.7,
            top_p=0.9,
            seed=3,
            stop="\n",
            combine="mean",
            sample_on="pieces",
            defer=2.0,
        ),
        BASE,
        MEMBERS,
    )
    s = plan.settings
    assert s.defer == 2.0 != BASE.defer
    assert (s.max_pieces, s.temperature, s.top_p, s.seed, s.stop) == (5, 0.7, 0.9, 3, ("\n",))
    assert s.sample_on == "pieces" != BASE.sample_on
    assert s.combine == "mean" and s.sub_vocab == BASE.sub_vocab
    assert plan.model == ENSEMBLE_ID and plan.enabled == (True, True) and plan.weights is None
    newer = plan_request(chat(max_completion_tokens=7), BASE, MEMBERS)
    assert newer.settings.max_pieces == 7
    assert plan_request(chat(), BASE, MEMBERS).settings == BASE  # nothing given: the defaults


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": 101.0}, "temperature", "from 0 to 100"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
        ({"sub_vocab": "words"}, "sub_vocab", "mcv, bytes, maxlen:K"),
        ({"sample_on": "bytes"}, "sample_on", "one of tokens, pieces"),
        ({"defer": -1.0}, "defer", "from 0 to 16"),
        ({"seed": -1}, "seed", "0 to 2**63"),
        ({"n": 2}, "n", "must be 1"),
        ({"logit_bias": {"42": 1.0}}, "logit_bias", "no common token ids"),
        ({"top_logprobs": 3}, "top_logprobs", "needs 'logprobs'"),
        ({"weights": [1.0]}, "weights", "1 'weights' values for 2 models"),
        ({"weights": {"llama": 1.0}}, "weights", "'llama', not a member"),
        ({"model": "gpt-4"}, "model", "does not exist"),
    ],
)
def test_a_bad_option_is_refused_naming_its_field(fields: dict, param: str, words: str) -> None:
    error = refused(chat(**fields))
    assert error.param == param and words in error.message
    assert error.status == (404 if param == "model" else 400)


def test_penalties_are_the_run_settings_of_the_same_names() -> None:
    plan = plan_request(chat(presence_penalty=0.5, frequency_penalty=-1.0), BASE, MEMBERS)
    assert plan.settings.presence_penalty == 0.5 and plan.settings.frequency_penalty == -1.0
    assert plan_request(chat(), BASE, MEMBERS).settings.presence_penalty == BASE.presence_penalty


def test_members_and_weights() -> None:
    alone = plan_request(chat(model="gemma3-270m"), BASE, MEMBERS)
    assert alone.enabled == (False, True) and alone.model == "gemma3-270m"
    by_name = plan_request(chat(weights={"gemma3-270m": 2.0}), BASE, MEMBERS)
    assert by_name.weights == (None, 2.0)  # a member left out keeps its own weight
    assert plan_request(chat(weights=[0.5, 1]), BASE, MEMBERS).weights == (0.5, 1.0)


def test_completion_options() -> None:
    plan = plan_request(CompletionRequest(prompt="def fibo", echo=True, logprobs=3), BASE, MEMBERS)
    assert plan.logprobs and plan.top_n == 3
    assert not plan_request(CompletionRequest(prompt="x"), BASE, MEMBERS).logprobs
    assert refused(CompletionRequest(prompt=["a", "b"])).param == "prompt"
    assert refused(CompletionRequest(prompt="a", suffix="b")).param == "suffix"
    assert refused(CompletionRequest(prompt="a", best_of=2)).param == "best_of"


def test_stream_text_sends_whole_characters() -> None:
    text = StreamText()
    euro = "€".encode()
    assert text.add(euro[:1]) == "" and text.add(euro[1:] + b"x") == "€x"
    assert text.add(euro[:2]) == "" and text.finish() == "\ufffd"  # a cut character shows


def test_top_pieces_are_the_most_likely_in_order() -> None:
    sub = byte_level()
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(sub.size)))
    logp[5] = -np.inf
    top = top_pieces(sub, logp, 4)
    expected = np.argsort(-logp)[:4]
    assert [p for p, _ in top] == [sub.piece_bytes(int(i)) for i in expected]
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top_pieces(sub, logp, 0) == ()
    assert len(top_pieces(sub, np.full(sub.size, -np.inf), 3)) == 0  # impossible: left out


def test_lvr_serve_refuses_a_bad_flag_before_loading_anything() -> None:
    from click.testing import CliRunner

    from lvr_local.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--temperature", "-1"])
    assert result.exit_code == 1
    assert "Error: command line: 'temperature' must be a number from 0 to 100" in result.output
    result = CliRunner().invoke(cli, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "--port" in result.output
