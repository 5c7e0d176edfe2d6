"""The byte-level phase after a mid-token prompt and its hand-over, against brute force.

Two synthetic models (exact, prefix-dependent distributions) run as an ensemble behind
the same member protocol as llama.cpp. A raw prompt ending mid-token puts them on bytes;
"." is a token of its own in both vocabularies, so once it is forced no token straddles
the position and the ensemble hands over to the chosen sub-vocabulary. At every step,
each member's next-piece distribution must equal the brute-force ratio of sums over all
tokenizations (docs/algorithm.md §2, §6), to 1e-9.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from synthetic_lm import END, SyntheticLM, cover_prob, exact_paths, text_prob

from lvr_local.core.lm import TokenPrefix
from lvr_local.core.reduction import EngineOptions
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.decoding.ensemble import Ensemble
from lvr_local.decoding.members import Member
from lvr_local.decoding.scheduling import CoreScheduler

TOKENS_C: list[bytes | None] = [
    b"a", b"b", b"ab", b"ba", b"aab", b"bab", b" ", b" a", b" ab", b" b", b".", b"", None,
]  # fmt: skip
TOKENS_D: list[bytes | None] = [
    b"a", b"b", b"ba", b"abb", b"bb", b" ", b" b", b" ab", b" ba", b".", b"", None,
]  # fmt: skip
PROMPT = b"ab ba"  # both models hold back " ba": its last token may go on past "a"
EXACT = EngineOptions(prune=0.0, max_branches=0, precision="float64")


class SyntheticBackend:
    """A SyntheticLM behind the ensemble's member protocol: a prompt of tokens that every
    prefix follows, and a greedy longest-match tokenizer."""

    def __init__(self, lm: SyntheticLM) -> None:
        self.lm = lm
        self.prompt: TokenPrefix = ()
        self.n_threads = 1

    @property
    def n_vocab(self) -> int:
        return self.lm.n_vocab

    def set_threads(self, n_threads: int) -> None:
        self.n_threads = n_threads

    def set_prompt(self, tokens: Sequence[int]) -> None:
        self.prompt = tuple(tokens)

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        return self.lm.next_logits([self.prompt + tuple(p) for p in prefixes])

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        pass

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        strings = self.lm.vocab.all_token_bytes
        tokens, pos = [], 0
        while pos < len(text):
            best = max(
                (v for v, b in enumerate(strings) if b and text.startswith(b, pos)),
                key=lambda v: len(strings[v] or b""),
            )
            tokens.append(best)
            pos += len(strings[best] or b"")
        return tokens


def make_members() -> list[Member]:
    members = []
    for name, tokens, seed in (("c", TOKENS_C, 3), ("d", TOKENS_D, 4)):
        vocab = Vocabulary.from_token_bytes(name, tokens, (len(tokens) - 2,))
        backend = SyntheticBackend(SyntheticLM(vocab, seed=seed, scale=1.0, end_bias=-1.0))
        members.append(Member(name=name, vocab=vocab, backend=backend))
    return members


def check_byte_step(ensemble: Ensemble, members: list[Member], x: bytes) -> None:
    """q(b | x) over bytes = P(x b ...) / P(x ...), and q(END | x) = P(x END) / P(x ...)."""
    logq = ensemble.distributions()
    sub = ensemble.phase_sub
    for i, m in enumerate(members):
        lm, head = m.backend.lm, m.backend.prompt  # type: ignore[attr-defined]
        denominator = text_prob(lm, x, start=head)
        for piece, spelled in enumerate(sub.pieces):
            want = text_prob(lm, x + spelled, start=head) / denominator
            assert abs(np.exp(logq[i, piece]) - want) < 1e-9, (m.name, x, spelled)
        want_end = text_prob(lm, x, ended=True, start=head) / denominator
        assert abs(np.exp(logq[i, sub.end_id]) - want_end) < 1e-9


def check_piece_step(
    ensemble: Ensemble, members: list[Member], x: bytes, u: list[bytes | int]
) -> None:
    """After the hand-over at x: q(s | u) = C(x, u s) / C(x, u), where C sums, over the
    token paths spelling exactly x, P(path) times the relative cover of u after it."""
    logq = ensemble.distributions()
    sub = ensemble.phase_sub
    pieces = set(sub.pieces)
    for i, m in enumerate(members):
        lm, head = m.backend.lm, m.backend.prompt  # type: ignore[attr-defined]
        paths = exact_paths(lm, x, start=head)

        def cover(seq: list[bytes | int], lm: SyntheticLM = lm, paths: list = paths) -> float:
            return sum(p * cover_prob(lm, pieces, seq, start=w) for w, p in paths)

        denominator = cover(u)
        for piece in range(sub.size):
            s: bytes | int = END if piece == sub.end_id else sub.pieces[piece]
            want = cover([*u, s]) / denominator
            assert abs(np.exp(logq[i, piece]) - want) < 1e-9, (m.name, u, s)


@pytest.mark.parametrize("sub_vocab", ["mcv", "maxlen:2"])
def test_mid_token_prompt_then_hand_over_is_exact(sub_vocab: str) -> None:
    members = make_members()
    ensemble = Ensemble(
        members, sub_vocab=sub_vocab, options=EXACT, scheduler=CoreScheduler(concurrent=False)
    )
    ensemble.start_raw(PROMPT)
    assert ensemble.phase_sub.kind == "bytes"  # the tail " ba" was forced over bytes
    tails = {}
    for m in members:
        head = m.backend.prompt  # type: ignore[attr-defined]
        tails[m.name] = PROMPT[len(b"".join(m.vocab.token_bytes(t) or b"" for t in head)) :]
    assert tails == {"c": b" ba", "d": b" ba"}
    x = b" ba"
    check_byte_step(ensemble, members, x)
    event = ensemble.force(ensemble.piece_id(b"."))  # type: ignore[arg-type]
    assert event.byte_level
    x += b"."
    assert ensemble.phase_sub is ensemble.sub  # synchronised: handed over
    for m in members:  # no token straddles x: all its mass sits on exact spellings
        lm, head = m.backend.lm, m.backend.prompt  # type: ignore[attr-defined]
        exact = sum(p for _, p in exact_paths(lm, x, start=head))
        assert abs(exact - text_prob(lm, x, start=head)) < 1e-12
    u: list[bytes | int] = []
    for _ in range(3):
        check_piece_step(ensemble, members, x, u)
        logp = ensemble.combined(ensemble.distributions())
        logp[ensemble.end_id] = -np.inf
        event = ensemble.force(int(np.argmax(logp)))
        assert not event.byte_level
        u.append(event.text)
    check_piece_step(ensemble, members, x, u)
    ensemble.close()
