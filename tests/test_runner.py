"""The runner every front end uses, on a real bundled model: loading with progress,
settings that rebuild the ensemble only when they shape it, runs as streams that stop
on request and end in a record."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lvr_local.core.chat import Message
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

SETTINGS = RunSettings(n_ctx=1024, max_pieces=40)


@pytest.fixture(scope="module")
def runner(smollm2_path: Path) -> Iterator[Runner]:
    steps: list[tuple[str, int, int]] = []
    spec = ModelSpec(name="smol", source=str(smollm2_path))
    with Runner([spec], SETTINGS) as r:
        r.load(lambda label, done, total: steps.append((label, done, total)))
        assert [done for _, done, _ in steps] == [0, 1, 2] and steps[-1][0] == "ready"
        yield r


def test_a_run_streams_chunks_and_ends_in_a_record(runner: Runner) -> None:
    run = runner.chat([Message("user", "Name three colours.")])
    chunks = list(run)
    assert chunks and "".join(c.text for c in chunks) == run.text
    assert run.data.decode("utf-8") == run.text
    record = run.record()
    assert record["pieces"] == run.stats.pieces >= len(chunks)
    assert record["method"] == "lossless" and record["combine"] == "product"  # chat's rule
    assert record["stop_reason"] in ("end", "max_pieces")
    assert record["models"][0]["forward_passes"] > 0


def test_stop_from_another_thread_ends_after_the_current_piece(runner: Runner) -> None:
    stop = threading.Event()
    run = runner.complete(b"Once upon a time", stop=stop)
    seen = 0
    for _ in run:
        seen += 1
        if seen == 3:
            threading.Thread(target=stop.set).start()
            threading.Event().wait(0.05)
    assert run.stats.stop_reason == "stopped" and seen == 3
    figures = run.figures()
    # The mid-word prompt's first pieces may need no forward pass (pending tokens).
    assert figures.pieces == 3 and figures.members[0].forward_passes >= 1


def test_only_settings_that_shape_the_ensemble_rebuild_it(runner: Runner) -> None:
    first = runner.ensemble
    runner.settings = replace(SETTINGS, temperature=0.7, top_p=0.9, max_pieces=5)
    assert runner.ensemble is first
    runner.settings = replace(SETTINGS, combine="max")  # each run sets the rule
    assert runner.ensemble is first
    run = runner.complete(b"Hi", replace(SETTINGS, combine="max", max_pieces=2))
    list(run)
    assert first.rule == "max" and run.record()["combine"] == "max"
    runner.settings = replace(SETTINGS, sub_vocab="bytes")
    rebuilt = runner.ensemble
    assert rebuilt is not first and rebuilt.sub.kind == "bytes"
    runner.settings = SETTINGS


def test_scoring_is_a_stream_of_bytes_then_a_record(runner: Runner) -> None:
    scoring = runner.score(b" sat", b"The cat")
    events = list(scoring)
    assert [e.text for e in events] == [b" ", b"s", b"a", b"t"]
    record = scoring.record()
    assert record["n_bytes"] == 4
    assert abs(record["models"]["smol"]["logprob"] - sum(e.logprob for e in events)) < 1e-9


def test_sampling_on_tokens_follows_the_models_own_sampler_over_bytes(runner: Runner) -> None:
    """sample_on = "tokens" (docs/algorithm.md §7.5): llama.cpp's chain acts on the
    model's tokens at every tokenization branch. With top-k 1 each branch keeps one
    token, so over bytes every byte of the reply is (up to the 1e-4 floor) certain and
    the text is greedy decoding over the model's own tokens; with the chain on the
    pieces, top-k 1 over bytes is greedy over bytes, and the byte distribution the
    draw sees is the model's own, far from certain at places."""
    prompt = [Message("user", "Name three colours.")]
    chain = replace(SETTINGS, sub_vocab="bytes", temperature=0.8, top_k=1, seed=3, max_pieces=60)
    on_tokens = runner.chat(prompt, replace(chain, sample_on="tokens"))
    events = [c.event for c in on_tokens]
    assert len(events) >= 20 and min(e.prob for e in events) > 0.999
    greedy = runner.chat(prompt, replace(SETTINGS, sub_vocab="mcv", temperature=0.0))
    list(greedy)
    assert greedy.text.startswith(on_tokens.text) or on_tokens.text.startswith(greedy.text)
    on_pieces = [c.event for c in runner.chat(prompt, replace(chain, sample_on="pieces"))]
    assert min(e.prob for e in on_pieces) < 0.99
