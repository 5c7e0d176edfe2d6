"""Repetition control over pieces, as llama.cpp and Ollama define it over tokens.

Small models loop: once a line has been written, writing it again is the likeliest
continuation. The usual remedies penalise what was already written, and users know
them by their llama.cpp / Ollama names and numbers, so they are reproduced here with
llama.cpp's exact formulas (src/llama-sampler.cpp, `llama_sampler_penalties_apply` and
`llama_sampler_dry_apply`), applied to the ensemble's combined distribution over the
common pieces instead of one model's tokens:

- **repeat_penalty** over the last `repeat_last_n` pieces: a piece seen there has its
  score multiplied by the penalty when it is <= 0, divided by it when > 0.
- **frequency_penalty** and **presence_penalty**: subtract `count * frequency +
  presence` from the score of a piece seen `count` > 0 times in the same window.
- **DRY** ("don't repeat yourself"): a piece that would extend a repeated sequence of
  length n >= `dry_allowed_length` loses `dry_multiplier * dry_base ** (n -
  dry_allowed_length)`; the scan covers the last `dry_penalty_last_n` pieces and stops
  at a *sequence breaker* (a newline, a colon...), so formatting can repeat freely.
  Over bytes its lengths are scaled to bytes (`over_bytes`: four bytes a token).

The scores here are the combined log-probabilities (all <= 0), so repeat_penalty always
multiplies: this is the case llama.cpp's own sampler tests exercise (they feed log
probabilities as logits). A window of -1 means the whole reply. The window holds the
pieces generated so far, not the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from lvr_local.core.subvocab import SubVocabulary
from lvr_local.core.vocabulary import Vocabulary

# llama.cpp truncates breakers to 40 bytes and their tails to 20 tokens; pow() overflow
# in float is avoided by capping the exponent at log(FLT_MAX) / log(base).
MAX_BREAKER_BYTES = 40
MAX_BREAKER_TAIL = 20
FLOAT_MAX_LOG = 88.7228391


@dataclass(frozen=True)
class RepetitionParams:
    """llama.cpp's parameters, with llama.cpp's defaults (every penalty off)."""

    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")

    @property
    def penalties_on(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def dry_on(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_base >= 1.0 and self.dry_penalty_last_n != 0

    @property
    def on(self) -> bool:
        return self.penalties_on or self.dry_on


def window(history: Sequence[int], last_n: int) -> Sequence[int]:
    """The last `last_n` pieces (-1: all of them)."""
    return history if last_n < 0 else history[max(0, len(history) - last_n) :]


def apply_penalties(scores: np.ndarray, history: Sequence[int], p: RepetitionParams) -> None:
    """repeat, frequency and presence penalties, in place (llama.cpp's `penalties`)."""
    if not p.penalties_on or not len(history):
        return
    seen, count = np.unique(np.asarray(window(history, p.repeat_last_n)), return_counts=True)
    x = scores[seen]
    x = np.where(x <= 0, x * p.repeat_penalty, x / p.repeat_penalty)
    scores[seen] = x - (count * p.frequency_penalty + p.presence_penalty)


def repeat_lengths(tokens: np.ndarray, limit: int) -> np.ndarray:
    """For each position i but the last, the length of the longest common suffix of
    tokens[:i+1] and tokens (capped at `limit`): how far the text before position i+1
    repeats the end of the text. llama.cpp computes the same with a Z-algorithm."""
    n = len(tokens)
    lengths = np.zeros(n - 1, dtype=np.int64)
    alive = np.arange(n - 1)
    for depth in range(min(limit, n - 1)):
        ok = alive >= depth
        alive = alive[ok]
        alive = alive[tokens[alive - depth] == tokens[n - 1 - depth]]
        if not len(alive):
            break
        lengths[alive] = depth + 1
    return lengths


@dataclass(frozen=True)
class Breakers:
    """Sequence breakers over one sub-vocabulary: for each head piece, the tails (piece
    sequences after it) that complete a breaker; an empty tail means the head alone is
    one (llama.cpp's `get_overlapping_token_sequences`, over pieces)."""

    tails: dict[int, tuple[tuple[int, ...], ...]]

    @classmethod
    def build(cls, breakers: Sequence[str], sub: SubVocabulary) -> Breakers:
        return cls(_tails(sub.pieces, breakers, lambda data: greedy_pieces(data, sub)))

    def single(self, piece: int) -> bool:
        return () in self.tails.get(piece, ())

    def limit(self, tokens: Sequence[int]) -> int:
        """How many pieces at the end follow the last breaker (all of them if none):
        no repetition is counted across a breaker."""
        n = len(tokens)
        for i in range(n):  # i pieces from the end
            heads = self.tails.get(tokens[n - 1 - i])
            if heads is None:
                continue
            longest = -1
            for tail in heads:
                k = len(tail)
                if longest < k <= i and all(tail[j] == tokens[n - i + j] for j in range(k)):
                    longest = k
            if longest >= 0:
                return i - longest
        return n


Split = Callable[[bytes], list[int] | None]  # greedy split into ids; None: no split


def _tails(
    strings: Sequence[bytes | None], breakers: Sequence[str], split: Split
) -> dict[int, tuple[tuple[int, ...], ...]]:
    """For each id whose bytes can head a breaker, the tails that complete it (the ids
    are pieces or a model's tokens, `split` the greedy split into them). Only strings
    holding the breaker's first byte can overlap it, so each breaker is one filter of
    the strings before the exact checks."""
    tails: dict[int, list[tuple[int, ...]]] = {}
    for text in breakers:
        breaker = text.encode("utf-8")[:MAX_BREAKER_BYTES]
        if not breaker:
            continue
        lead = breaker[:1]
        for i in [i for i, b in enumerate(strings) if b and lead in b]:
            for tail in _overlaps(strings[i] or b"", breaker, split):
                found = tails.setdefault(i, [])
                if tail not in found:
                    found.append(tail)
    return {k: tuple(v) for k, v in tails.items()}


def _overlaps(piece: bytes, breaker: bytes, split: Split) -> list[tuple[int, ...]]:
    """The tails that make `piece` the head of `breaker`: () when the piece contains it;
    the greedy split of the rest when the piece ends with a prefix of it (none when the
    rest cannot be split)."""
    if breaker in piece:
        return [()]
    out = []
    for k in range(min(len(piece), len(breaker) - 1), 0, -1):
        if piece.endswith(breaker[:k]):
            rest = split(breaker[k:])
            if rest is not None:
                out.append(tuple(rest[:MAX_BREAKER_TAIL]))
    return out


def greedy_pieces(data: bytes, sub: SubVocabulary) -> list[int]:
    """Greedy longest-prefix split of `data` over the pieces (the decomposition rule)."""
    out, pos, longest = [], 0, int(sub.lengths.max())
    while pos < len(data):
        for size in range(min(longest, len(data) - pos), 0, -1):
            found = sub.piece_id(data[pos : pos + size])
            if found is not None:
                out.append(found)
                pos += size
                break
        else:
            pos += 1  # a byte no piece spells cannot occur in generated text
    return out


def apply_dry(
    scores: np.ndarray, history: Sequence[int], p: RepetitionParams, breakers: Breakers
) -> None:
    """DRY, in place (llama.cpp's `dry`)."""
    tokens = list(window(history, p.dry_penalty_last_n))
    if not p.dry_on or len(tokens) <= p.dry_allowed_length:
        return
    limit = breakers.limit(tokens)
    if limit < p.dry_allowed_length:
        return
    lengths = repeat_lengths(np.asarray(tokens), limit)
    longest: dict[int, int] = {}
    for i in np.flatnonzero(lengths >= p.dry_allowed_length).tolist():
        nxt = tokens[i + 1]  # would extend the repeat that ends at position i
        longest[nxt] = max(longest.get(nxt, 0), int(lengths[i]))
    max_exp = int(FLOAT_MAX_LOG / math.log(p.dry_base)) if p.dry_base > 1.000001 else 0
    for piece, n in longest.items():
        if breakers.single(piece):
            continue
        exponent = n - p.dry_allowed_length
        if max_exp > 0:
            exponent = min(exponent, max_exp)
        scores[piece] -= p.dry_multiplier * p.dry_base**exponent


@lru_cache(maxsize=8)
def breakers_for(breakers: tuple[str, ...], sub: SubVocabulary) -> Breakers:
    """The breakers over `sub`, built once per sub-vocabulary (a pass over its pieces)."""
    return Breakers.build(breakers, sub)


class RepetitionControl:
    """The pieces written so far (as bytes, so that they keep their meaning when the
    ensemble moves from the byte-level phase to the common vocabulary) and the
    penalties they bring on the next piece's scores."""

    def __init__(self, params: RepetitionParams) -> None:
        self.params = params
        self.history: list[bytes] = []

    def accept(self, piece: bytes) -> None:
        if piece:
            self.history.append(piece)

    def apply(self, logp: np.ndarray, sub: SubVocabulary) -> np.ndarray:
        """Penalised scores (a copy); `logp` itself when every penalty is off."""
        if not self.params.on or not self.history:
            return logp
        ids = [sub.piece_id(b) for b in self.history]
        history = [i for i in ids if i is not None]
        scores = np.array(logp, dtype=np.float64)
        apply_penalties(scores, history, self.params)
        if self.params.dry_on:
            breakers = breakers_for(self.params.dry_sequence_breakers, sub)
            dry = over_bytes(self.params) if sub.kind == "bytes" else self.params
            apply_dry(scores, history, dry, breakers)
        return scores


# Over bytes (the default ensemble) a piece is a byte, and English runs at about four
# bytes per token for both bundled tokenizers (2,439 bytes of lvr_local/data/english.txt
# are ~530 SmolLM2 tokens). DRY's lengths are meant in tokens: an allowed repeat of two
# bytes would penalise "th" -> "e" in every "the" (measured: a chat reply that ends at
# 381 bytes with the scaled lengths ran to a 600-byte budget with the raw ones).
BYTES_PER_TOKEN = 4


def over_bytes(p: RepetitionParams) -> RepetitionParams:
    """DRY's token lengths as byte lengths: the allowed repeat and the window scaled by
    BYTES_PER_TOKEN, the base's growth spread over as many bytes, so that a repeat of k
    tokens' worth of bytes costs what k repeated tokens cost."""
    return replace(
        p,
        dry_allowed_length=p.dry_allowed_length * BYTES_PER_TOKEN,
        dry_base=p.dry_base ** (1.0 / BYTES_PER_TOKEN),
        dry_penalty_last_n=p.dry_penalty_last_n * BYTES_PER_TOKEN
        if p.dry_penalty_last_n > 0
        else p.dry_penalty_last_n,
    )


class TokenRepetition:
    """llama.cpp's penalties on one model's own tokens along one tokenization branch:
    with sample_on = "tokens" (docs/algorithm.md §7.5) each scored node gets what the
    model's own sampler would apply after that node's tokens, so that DRY's lengths are
    tokens, as its defaults mean, whatever the sub-vocabulary. The history is the
    prompt's tokens (`context`: llama.cpp's samplers take the prompt into their window
    too, so a reply that copies the user's line is a repeat) and then the node's own."""

    def __init__(
        self, params: RepetitionParams, breakers: Breakers, context: Sequence[int] = ()
    ) -> None:
        self.params = params
        self.breakers = breakers
        self.context = list(context)

    def apply(self, logits: np.ndarray, prefix: Sequence[int]) -> np.ndarray:
        """Penalised logits after the prompt and `prefix` (a float64 copy); `logits`
        itself when nothing applies."""
        history = self.context + list(prefix)
        if not self.params.on or not history:
            return logits
        scores = np.array(logits, dtype=np.float64)
        apply_penalties(scores, history, self.params)
        if self.params.dry_on:
            apply_dry(scores, history, self.params, self.breakers)
        return scores


def token_breakers(breakers: Sequence[str], vocab: Vocabulary) -> Breakers:
    """DRY's sequence breakers over a model's own token ids (llama.cpp's
    `get_overlapping_token_sequences`, over tokens): `Breakers.build` with the tokens in
    the place of the pieces, a tail's pieces each the first token that spells them."""
    strings = vocab.all_token_bytes
    first_token: dict[bytes, int] = {}
    for token, b in enumerate(strings):
        if b:
            first_token.setdefault(b, token)
    return Breakers(_tails(strings, breakers, lambda data: _greedy_tokens(data, first_token)))


def _greedy_tokens(data: bytes, first_token: dict[bytes, int]) -> list[int] | None:
    """Greedy longest-prefix split of `data` into tokens; None when a byte has none."""
    out, pos = [], 0
    while pos < len(data):
        size = next(
            (n for n in range(len(data) - pos, 0, -1) if data[pos : pos + n] in first_token), 0
        )
        if not size:
            return None
        out.append(first_token[data[pos : pos + size]])
        pos += size
    return out
