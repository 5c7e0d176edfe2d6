"""What a user gets from a conversation with the bundled pair (real models, real
llama.cpp): the README's first command ends by itself without repeating a line or the
request; a base member reads a transcript and ends its turn with the transcript's
separator; END comes from the chat member."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from lvr_local.benchmarks.chat import echoes, score_rules
from lvr_local.core.chat import Message
from lvr_local.runner.config import default_config_path, load_config
from lvr_local.runner.run import Runner

pytestmark = pytest.mark.slow

MAIN_PROMPT = "Write a haiku about the sea."  # README's first command


@pytest.fixture(scope="module")
def runner(bundled_paths: dict) -> Iterator[Runner]:
    """The shipped models.toml, as `lvr generate` reads it (the files from the shared
    test directory)."""
    config = load_config(default_config_path())
    files = (bundled_paths["smollm2"], bundled_paths["gemma3"])
    specs = [replace(s, source=str(f)) for s, f in zip(config.enabled_models, files, strict=True)]
    with Runner(specs, config.defaults) as r:
        yield r.load()


def repeated_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [line for i, line in enumerate(lines) if line in lines[:i]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_first_command_ends_by_itself_without_a_repeated_line(
    runner: Runner, seed: int
) -> None:
    assert [m.role for m in runner.members] == ["chat", "base"]
    runner.set_enabled([True, True])
    run = runner.chat([Message("user", MAIN_PROMPT)], replace(runner.settings, seed=seed))
    list(run)
    assert run.stats.stop_reason == "end", run.text
    assert run.text.strip() and not repeated_lines(run.text), run.text
    assert not echoes(MAIN_PROMPT, run.text), run.text  # no "I'll write a haiku about"
    record = run.record()
    assert record["settings"]["temperature"] > 0  # a conversation samples by default
    assert [m["role"] for m in record["models"]] == ["chat", "base"]


def test_a_base_model_alone_ends_its_turn_at_the_transcript_separator(runner: Runner) -> None:
    runner.set_enabled([False, True])  # Gemma 3 270M, the pretrained base model
    greedy = replace(runner.settings, temperature=0.0, max_pieces=64)
    try:
        run = runner.chat([Message("user", "What is the capital of France?")], greedy)
        list(run)
    finally:
        runner.set_enabled([True, True])
    assert run.stats.stop_reason == "end", run.text
    assert "Paris" in run.text and "User" not in run.text
    assert run.stats.bytes == len(run.text.encode("utf-8"))


@pytest.mark.parametrize("defer", [0.0, 1.0])
def test_end_comes_from_the_chat_member(runner: Runner, defer: float) -> None:
    """Under the mean, the ensemble's END is SmolLM2's own; every other piece is the
    weighted mean of the two members' distributions given no END, scaled by 1 - END,
    Gemma's weight deferring to SmolLM2's surest piece (docs/algorithm.md §7.6)."""
    settings = replace(runner.settings, combine="mean", defer=defer).for_mode("chat")
    ensemble = runner.ensemble_for(settings)
    ensemble.mixing = settings.mixing()
    ensemble.start_chat([Message("user", "Say hi.")])
    assert ensemble.turn_separators == (b"\nUser:", b"\nAssistant:")
    assert ensemble.phase_sub.kind == "bytes"  # the transcript's final space is forced
    logq = ensemble.distributions()
    p = ensemble.combined(logq)
    end = ensemble.end_id
    assert p[end] == pytest.approx(logq[0, end], abs=1e-9)
    q = np.exp(logq)
    w = np.array([1.0, (1.0 - q[0].max()) ** defer])
    given_not_end = q[:, :end] / (1 - q[:, end : end + 1])
    expected = (1 - q[0, end]) * (w @ given_not_end) / w.sum()
    assert np.allclose(np.exp(p[:end]), expected, atol=1e-9)
    assert ensemble.step_weights()[1] == pytest.approx(w[1] / w.sum())


def test_the_benchmark_scores_each_model_as_lvr_score_does(runner: Runner) -> None:
    """`python -m lvr_local.benchmarks chat` prints bits/byte per model and per rule from
    one pass; each model's must be `lvr score`'s (it once pruned as generation does and
    lost a byte of SmolLM2's: infinite bits/byte)."""
    text = b"The sea was calm, and the boats came home before the storm.\n"
    bpb = score_rules(runner, text)
    record = runner.score(text).run()
    for name, model in record["models"].items():
        assert bpb[name] == pytest.approx(model["bits_per_byte"], abs=1e-3)
    assert all(math.isfinite(v) for v in bpb.values()), bpb
    assert bpb["product"] <= max(bpb[m.name] for m in runner.members)  # Hölder (§7)
