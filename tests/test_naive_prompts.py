"""The naive restriction baseline (docs/algorithm.md §7) runs on every raw prompt the
lossless method runs on: it is the paper's comparison row. It has no byte-level phase,
so it reads the whole prompt as each model's tokenizer splits it, ending mid-word or not;
the real bundled models decode it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

SETTINGS = RunSettings(n_ctx=512, method="naive", temperature=0.0, max_pieces=8)
PROMPTS = [b"a.b", b"def fibo", b"https://exam", b"x", b"The cat sat on the"]


@pytest.fixture(scope="module")
def both(bundled_paths: dict[str, Path]) -> Iterator[Runner]:
    specs = [ModelSpec(name=n, source=str(p)) for n, p in bundled_paths.items()]
    with Runner(specs, SETTINGS) as runner:
        yield runner.load()


@pytest.mark.parametrize("prompt", PROMPTS, ids=[p.decode() for p in PROMPTS])
def test_naive_runs_on_every_raw_prompt_from_the_whole_prompt_s_tokens(
    both: Runner, prompt: bytes
) -> None:
    """`lvr generate --method naive --raw "a.b"` failed: the prompt's tail was forced
    with byte-level piece ids into states over the MCV (each id naming another piece)."""
    run = both.complete(prompt)
    list(run)
    assert run.stats.stop_reason in ("max_pieces", "end"), run.record()
    assert run.stats.pieces >= 1
    for backend in both.backends:
        tokens = backend.tokenize(prompt, True, False)
        # the model's own split of the whole prompt, after a start token where the
        # tokenizer adds none to raw text (SmolLM2)
        assert backend.prompt[-len(tokens) :] == tokens
        assert len(backend.prompt) - len(tokens) in (0, 1)


def test_naive_with_one_model_is_its_own_greedy_continuation(smollm2_path: Path) -> None:
    """One model over its own vocabulary: the restriction drops nothing but control
    tokens, so greedy naive decoding must write what the model itself writes greedily
    after its own tokens of the prompt ("def fibo" used to become garbage)."""
    spec = ModelSpec(name="smol", source=str(smollm2_path))
    with Runner([spec], SETTINGS) as runner:
        runner.load()
        run = runner.complete(b"def fibo")
        list(run)
        backend, vocab = runner.backends[0], runner.members[0].vocab
        backend.set_prompt(backend.prompt)
        spelled = np.array([bool(vocab.token_bytes(t)) for t in range(vocab.n_tokens)])
        path: tuple[int, ...] = ()
        expected = b""
        for _ in range(run.stats.pieces):
            logits = np.asarray(backend.next_logits([path])[0], dtype=np.float64)
            token = int(np.argmax(np.where(spelled, logits, -np.inf)))
            expected += vocab.token_bytes(token) or b""
            path = (*path, token)
    assert run.data == expected, (run.data, expected)
