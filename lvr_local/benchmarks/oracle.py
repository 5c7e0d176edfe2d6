"""The independent oracle of lvr score: plain llama-cpp-python, sharing nothing with
lvr-local's backend. For each tokenization path its KV memory is cleared and the tokens
are evaluated one at a time; every tokenization of the text is enumerated, and
everything after llama.cpp's logits is float64. Used by tests/test_exactness.py and the
`precision` benchmark; feasible for texts of a few bytes only."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import llama_cpp
import numpy as np

from lvr_local.core.vocabulary import Vocabulary
from lvr_local.decoding.prompting import prepare_raw
from lvr_local.runner.run import Runner


class Oracle:
    """log P(rest | head) summed over every tokenization of `rest`, with plain llama-cpp-
    python: for each token path, an empty KV memory and one token per decode."""

    def __init__(self, path: Path, vocab: Vocabulary) -> None:
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=1, flash_attn=True, verbose=False
        )
        self.vocab = vocab
        self.valid = vocab.has_bytes | vocab.is_end
        self.by_bytes: dict[bytes, list[int]] = {}
        for token, b in enumerate(vocab.all_token_bytes):
            if b is not None:
                self.by_bytes.setdefault(b, []).append(token)
        self.logprobs = cache(self._logprobs)

    def _logprobs(self, tokens: tuple[int, ...]) -> np.ndarray:
        """Next-token log-probabilities after `tokens`, over tokens with bytes or END."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self.llm.reset()
        for token in tokens:
            self.llm.eval([token])
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).astype(np.float64)
        x = np.where(self.valid, logits, -np.inf)
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    def log_q(self, head: list[int], text: bytes) -> float:
        """log of P(the continuation after `head` starts with `text`)."""
        terms: list[float] = []

        def walk(path: tuple[int, ...], pos: int, log_p: float) -> None:
            logp = self.logprobs(tuple(head) + path)
            rest = text[pos:]
            for token, b in enumerate(self.vocab.all_token_bytes):
                if b and b.startswith(rest) and logp[token] > -np.inf:
                    terms.append(log_p + logp[token])
            for n in range(1, len(rest)):
                for token in self.by_bytes.get(rest[:n], []):
                    walk((*path, token), pos + n, log_p + logp[token])

        walk((), 0, 0.0)
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    def close(self) -> None:
        self.llm.close()


def oracle_score(runner: Runner, text: bytes, prompt: bytes = b"") -> float:
    """What `runner.score(text, prompt)` should give for its one model, by the oracle:
    the same start and head (prepare_raw), a mid-token tail conditioned on."""
    member = runner.members[0]
    prepared = prepare_raw(member.backend, member.vocab, prompt)
    oracle = Oracle(runner.backends[0].path, member.vocab)
    try:
        expected = oracle.log_q(prepared.tokens, prepared.tail + text)
        if prepared.tail:
            expected -= oracle.log_q(prepared.tokens, prepared.tail)
    finally:
        oracle.close()
    return expected
