"""Exact numbers where users meet them (issue: scores that do not move with batching,
no possible text made impossible, mid-word prompts conditioned right).

The oracle (lvr_local/benchmarks/oracle.py) shares nothing with lvr-local's backend:
plain `llama_cpp.Llama`, its KV memory cleared before every tokenization path, tokens
evaluated one at a time, every tokenization of the text enumerated."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from brute_force import brute_force_log_q
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_lm import SyntheticLM, text_prob, vocab_a

from lvr_local.benchmarks.oracle import oracle_score
from lvr_local.cli import cli
from lvr_local.core import reduction, subvocab
from lvr_local.core.decompose import build_tables
from lvr_local.core.reduction import EngineOptions, ImpossiblePieceError, ReducedState
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.decoding.prompting import prepare_raw
from lvr_local.llama.backend import LlamaBackend
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

SETTINGS = RunSettings(n_ctx=1024)


CASES = [  # (model, prompt, text): mid-token, newline, non-ASCII, empty prompt without BOS
    ("smollm2", b"The ca", b"t sat"),
    ("smollm2", b"Hi\n", b"Yes"),
    ("smollm2", b"", " café".encode()),
    ("gemma3", b"Le ca", "fé".encode()),
    ("gemma3", "東京".encode(), "都".encode()),
    ("gemma3", b"x = 1\n", b"y"),
]


@pytest.fixture(scope="module")
def runners(smollm2_path: Path, gemma_path: Path) -> Iterator[dict[str, Runner]]:
    out = {
        name: Runner([ModelSpec(name, str(path))], SETTINGS).load()
        for name, path in (("smollm2", smollm2_path), ("gemma3", gemma_path))
    }
    yield out
    for r in out.values():
        r.close()


@pytest.mark.parametrize(("model", "prompt", "text"), CASES)
def test_score_agrees_with_an_independent_oracle(
    runners: dict[str, Runner], model: str, prompt: bytes, text: bytes
) -> None:
    runner = runners[model]
    got = runner.score(text, prompt).run()["models"][model]["logprob"]
    expected = oracle_score(runner, text, prompt)
    assert abs(got - expected) < 1e-6, (got, expected)
    # The rest of the gap is the float32 exp and pruning: without them, none is left.
    exact = replace(SETTINGS, precision="float64", text_prune=0.0)
    got = runner.score(text, prompt, exact).run()["models"][model]["logprob"]
    assert abs(got - expected) < 1e-9, (got, expected)


# ----- the same numbers however the work is done -------------------------------------


def test_scores_are_bit_identical_across_pruning_threads_and_cache_state(
    runners: dict[str, Runner],
) -> None:
    runner = runners["smollm2"]
    text, prompt = b" The optional argument mu, if given", b"Docs:"

    def score(**changes: object) -> float:
        runner.settings = replace(SETTINGS, **changes)
        return runner.score(text, prompt).run()["models"]["smollm2"]["logprob"]

    reference = score()
    assert score() == reference  # warm: the prompt's cells are reused
    assert score(n_threads=2) == reference
    assert score(prune=0.0) == reference and score(prune=1e-12) == reference
    # text_prune 0 keeps branches of share below 1e-12 that 1e-12 drops: real, tiny mass.
    assert abs(score(text_prune=0.0) - score(text_prune=1e-12)) < 1e-9
    fast = score(numerics="fast")
    assert abs(fast - reference) < 0.5  # the batched path: near, not the same numbers
    runner.settings = SETTINGS


# ----- no possible text made impossible --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="abc", min_size=1, max_size=9),
    prune=st.sampled_from([0.0, 1e-6, 1e-4, 1e-3, 1e-2]),
    cap=st.integers(min_value=2, max_value=16),
    seed=st.integers(min_value=0, max_value=3),
)
def test_known_text_never_scores_minus_infinity(
    text: str, prune: float, cap: int, seed: int
) -> None:
    """Every text over the synthetic alphabet has positive probability; whatever the
    threshold and the cap, scoring it stays finite (and without pruning it is exact)."""
    data = text.encode()
    vocab = vocab_a()
    lm = SyntheticLM(vocab, seed=seed)
    tables = build_tables(vocab, subvocab.byte_level())
    options = EngineOptions(prune=prune, text_prune=prune, max_branches=cap, precision="float64")
    state = ReducedState(lm, tables, options)
    pieces = np.array([tables.sub.index[bytes([b])] for b in data], dtype=np.int64)
    total = 0.0
    for i, piece in enumerate(pieces.tolist()):
        total += float(state.next_piece_logprobs()[piece])
        state.advance(piece, pieces[i + 1 :])
    assert math.isfinite(total)
    if prune == 0.0 and cap >= 16 and len(data) <= 4:  # nothing pruned: the exact value
        assert abs(total - math.log(text_prob(lm, data))) < 1e-9


def generate_along(state: ReducedState, pieces: list[int]) -> None:
    """Advance as generation does: no text known ahead, pruning by share alone."""
    for piece in pieces:
        state.next_piece_logprobs()
        state.advance(piece)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="abc", min_size=1, max_size=reduction.DORMANT_WINDOW),
    prune=st.sampled_from([1e-4, 1e-2, 0.1, 0.3]),
    cap=st.integers(min_value=2, max_value=16),
    seed=st.integers(min_value=0, max_value=3),
)
def test_generation_revives_pruned_branches_instead_of_losing_a_possible_text(
    text: str, prune: float, cap: int, seed: int
) -> None:
    """Generation prunes by share (it cannot know the text ahead). A piece the kept
    branches cannot spell revives the pruned ones that can, so no text of positive
    probability becomes impossible, and Q stays a lower bound of the exact cover."""
    data = text.encode()
    lm = SyntheticLM(vocab_a(), seed=seed)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    state = ReducedState(lm, tables, EngineOptions(prune=prune, max_branches=cap))
    generate_along(state, [tables.sub.index[bytes([b])] for b in data])
    assert math.exp(state.log_Q) <= text_prob(lm, data) * (1 + 1e-6)  # float32 rows


def test_without_dormant_records_generation_loses_possible_texts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check above can fail: keep no pruned node, and some of the same texts become
    impossible; keep them, and those texts are followed through revived branches."""
    lm = SyntheticLM(vocab_a(), seed=1)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    options = EngineOptions(prune=0.3, max_branches=2)
    texts = ["".join(t) for n in range(2, 6) for t in itertools.product("abc", repeat=n)]
    lost, revived = [], 0
    for text in texts:
        pieces = [tables.sub.index[bytes([b])] for b in text.encode()]
        monkeypatch.setattr(reduction, "DORMANT_PER_ADVANCE", 0)
        try:
            generate_along(ReducedState(lm, tables, options), pieces)
        except ImpossiblePieceError:
            lost.append(text)
        monkeypatch.undo()
        state = ReducedState(lm, tables, options)
        generate_along(state, pieces)  # never raises
        revived += state.revived
    assert lost and revived >= len(lost)


def test_gemma_scores_a_sentence_its_pruning_used_to_make_impossible(
    runners: dict[str, Runner],
) -> None:
    """After " mu" most of Gemma's mass goes on to " much", " must"...: share pruning
    dropped the branch that ends the word, and "," became impossible."""
    runner = runners["gemma3"]
    text = b" The optional argument mu, if given"
    for changes in ({}, {"prune": 1e-2, "text_prune": 1e-2}, {"max_branches": 2}):
        runner.settings = replace(SETTINGS, **changes)
        result = runner.score(text).run()["models"]["gemma3"]
        assert math.isfinite(result["logprob"]), changes
    runner.settings = SETTINGS


def test_generation_revives_the_branch_gemma_pruned_instead_of_leaving(
    runners: dict[str, Runner],
) -> None:
    """The same sentence followed as generation follows it (no text known ahead, the
    default pruning by share): at "," Gemma's kept branches all continue the word, and
    the pruned one that ends it comes back instead of Gemma leaving the run."""
    runner = runners["gemma3"]
    ensemble = runner.ensemble_for(replace(SETTINGS, sub_vocab="bytes"))
    text = b" The optional argument mu, if given"
    ensemble.start_raw(text[:4])
    events = [
        ensemble.force(ensemble.piece_id(bytes([b])), j)  # type: ignore[arg-type]
        for j, b in enumerate(text[4:])
    ]
    assert not any(e.left for e in events)
    assert [bytes(text[4 : 4 + e.index + 1]) for e in events if e.revived] == [
        b" The optional argument mu,"[4:]
    ]
    assert all(math.isfinite(e.member_logprobs[0]) for e in events)
    ensemble.close()


# ----- mid-word prompts ----------------------------------------------------------------


def whole_string_log_q(
    backend: LlamaBackend, vocab: Vocabulary, start: list[int], text: bytes
) -> float:
    """log Q(text) from `start`, over every tokenization of the whole string; paths below
    1e-9 of the best found so far are not followed (they cannot move the sum by 0.05)."""
    backend.set_prompt(start)
    return brute_force_log_q(backend, vocab, text, min_share=1e-9)


MID_WORD = [  # (prompt, text): a URL, a code identifier, a CJK word, a word after punctuation
    (b"https://www.wikip", b"edia"),
    (b"def fibo", b"nacci"),
    ("東京".encode(), "都".encode()),
    (b"Hello,wor", b"ld"),
]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_mid_word_prompts_are_conditioned_on_every_tokenization(
    runners: dict[str, Runner], model: str
) -> None:
    runner = runners[model]
    member = runner.members[0]
    start = prepare_raw(member.backend, member.vocab, b"").tokens
    for prompt, text in MID_WORD:
        got = runner.score(text, prompt).run()["models"][model]["logprob"]
        backend = runner.backends[0]
        backend.set_exact(False)
        whole = whole_string_log_q(backend, member.vocab, start, prompt + text)
        head = whole_string_log_q(backend, member.vocab, start, prompt)
        assert abs(got - (whole - head)) < 0.05, (model, prompt, got, whole - head)


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_a_url_prompt_continues_the_likely_word(model: str) -> None:
    result = CliRunner().invoke(
        cli, ["generate", "https://www.wikip", "--raw", "-m", model, "--max-bytes", "4"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n").endswith("edia"), result.output
