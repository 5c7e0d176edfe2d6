"""An exact toy language model over overlapping tokens, and brute-force probabilities.

Its next-token distribution is a seeded random function of the whole token prefix, so a
text has many tokenizations with unrelated probabilities. Control tokens get logits too:
like the engine, the brute force conditions on tokens that have bytes or are END.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from lvr_local.core.lm import TokenPrefix
from lvr_local.core.vocabulary import Vocabulary

END = -1  # how brute-force piece lists spell END (engine ids are tables.sub.end_id)

TOKENS_A: list[bytes | None] = [
    b"a", b"b", b"c", b"ab", b"ba", b"bb", b"aa", b"abc", b"aba", b"abb", b"bab",
    b"ca", b"cab", b"bca", b"abab", b"ab", None, b"", b"",
]  # fmt: skip
END_IDS_A = (17, 18)

TOKENS_B: list[bytes | None] = [
    b"a", b"b", b"c", b"ab", b"bc", b"abc", b"ca", b"bab", b"cc", b"aab", b"babc", None, b"",
]  # fmt: skip
END_IDS_B = (12,)


def vocab_a() -> Vocabulary:
    return Vocabulary.from_token_bytes("synthetic-a", TOKENS_A, END_IDS_A)


def vocab_b() -> Vocabulary:
    return Vocabulary.from_token_bytes("synthetic-b", TOKENS_B, END_IDS_B)


class SyntheticLM:
    """A NextTokenModel with exact, prefix-dependent distributions; records its calls."""

    def __init__(
        self, vocab: Vocabulary, seed: int = 0, scale: float = 1.5, end_bias: float = -0.5
    ) -> None:
        self.vocab = vocab
        self.seed = seed
        self.scale = scale
        self.end_bias = end_bias
        self.valid = vocab.has_bytes | vocab.is_end
        self.calls: list[list[TokenPrefix]] = []
        self.released: list[TokenPrefix] = []
        self.events: list[tuple[str, list[TokenPrefix]]] = []  # calls and releases, in order
        self.logits = cache(self._logits)
        self.probs = cache(self._probs)

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_tokens

    def _logits(self, prefix: TokenPrefix) -> np.ndarray:
        rng = np.random.default_rng([self.seed, len(prefix), *prefix])
        x = rng.normal(size=self.n_vocab) * self.scale
        x[self.vocab.is_end] += self.end_bias
        x[~self.valid] += 2.0  # control tokens are tempting; the engine must ignore them
        return x.astype(np.float32)

    def _probs(self, prefix: TokenPrefix) -> np.ndarray:
        """p(. | prefix) conditioned on tokens with bytes or END (control tokens get 0)."""
        x = np.where(self.valid, self.logits(prefix).astype(np.float64), -np.inf)
        e = np.exp(x - x.max())
        return e / e.sum()

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        self.calls.append(list(prefixes))
        self.events.append(("call", list(prefixes)))
        return [self.logits(tuple(p)) for p in prefixes]

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        self.released.extend(prefixes)
        self.events.append(("release", list(prefixes)))


# ---------------------------------------------------------------------------------------
# Brute force


def text_prob(lm: SyntheticLM, text: bytes, ended: bool = False, start: TokenPrefix = ()) -> float:
    """P(the generated text starts with `text`), summed over all tokenizations; with
    `ended`, P(the text is exactly `text`, then END). Generation follows `start`."""
    vocab = lm.vocab

    def rest_prob(prefix: TokenPrefix, pos: int) -> float:
        if pos == len(text) and not ended:
            return 1.0
        p = lm.probs(prefix)
        rest = text[pos:]
        total = 0.0
        for v in np.flatnonzero(p > 0).tolist():
            if vocab.is_end[v]:
                total += p[v] if ended and not rest else 0.0
                continue
            b = vocab.token_bytes(v) or b""
            if rest.startswith(b) and (ended or len(b) < len(rest)):
                total += p[v] * rest_prob((*prefix, v), pos + len(b))
            elif not ended and b.startswith(rest):
                total += p[v]
        return total

    return rest_prob(tuple(start), 0)


def greedy_split(
    data: bytes, pieces: frozenset[bytes] | set[bytes], longest: int | None = None
) -> list[bytes]:
    """Greedy longest-prefix match, written independently of the engine's tables."""
    out = []
    pos = 0
    longest = longest or max(len(p) for p in pieces)
    while pos < len(data):
        size = next(
            n for n in range(min(longest, len(data) - pos), 0, -1) if data[pos : pos + n] in pieces
        )
        out.append(data[pos : pos + size])
        pos += size
    return out


def cover_prob(
    lm: SyntheticLM, pieces: set[bytes], u: Sequence[bytes | int], start: TokenPrefix = ()
) -> float:
    """Q(u) by brute force: the sum of P(w) over the relative cover of u
    (docs/algorithm.md §2), for a generation that follows `start`. `u` lists piece
    bytes, with END for the end piece."""
    vocab = lm.vocab
    split = [
        [END] if vocab.is_end[v] else greedy_split(vocab.token_bytes(v) or b"", pieces)
        for v in range(vocab.n_tokens)
    ]
    target = list(u)

    def rest_prob(prefix: TokenPrefix, j: int) -> float:
        p = lm.probs(prefix)
        rest = target[j:]
        total = 0.0
        for v in np.flatnonzero(p > 0).tolist():
            d = split[v]
            if not d:
                continue  # a control token: never generated
            if d[: len(rest)] == rest:
                total += p[v]
            elif rest[: len(d)] == d:
                total += p[v] * rest_prob((*prefix, v), j + len(d))
        return total

    return 1.0 if not target else rest_prob(tuple(start), 0)


def greedy_token_text(lm: SyntheticLM, max_bytes: int) -> tuple[bytes, bool]:
    """The bytes of the model's greedy token path, up to END or `max_bytes`."""
    prefix: TokenPrefix = ()
    text = b""
    while len(text) < max_bytes:
        v = int(np.argmax(lm.probs(prefix)))
        if lm.vocab.is_end[v]:
            return text, True
        text += lm.vocab.token_bytes(v) or b""
        prefix = (*prefix, v)
    return text, False


def exact_paths(
    lm: SyntheticLM, text: bytes, start: TokenPrefix = ()
) -> list[tuple[TokenPrefix, float]]:
    """Every token path after `start` that spells exactly `text`, with its probability."""
    vocab = lm.vocab
    found: list[tuple[TokenPrefix, float]] = []

    def walk(prefix: TokenPrefix, pos: int, p_path: float) -> None:
        if pos == len(text):
            found.append((prefix, p_path))
            return
        p = lm.probs(prefix)
        for v in range(vocab.n_tokens):
            b = vocab.token_bytes(v)
            if b and p[v] > 0 and text.startswith(b, pos):
                walk((*prefix, v), pos + len(b), p_path * p[v])

    walk(tuple(start), 0, 1.0)
    return found
