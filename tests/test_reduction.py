"""The reduced model is lossless: checked against brute force on an exact synthetic model."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from synthetic_lm import (
    END,
    SyntheticLM,
    cover_prob,
    greedy_token_text,
    text_prob,
    vocab_a,
    vocab_b,
)

from lvr_local.core import reduction, subvocab
from lvr_local.core.decompose import DecompositionTables, build_tables
from lvr_local.core.lm import ModelMemoryFull, TokenPrefix
from lvr_local.core.naive import NaiveState
from lvr_local.core.node_scoring import CUT_FLOOR
from lvr_local.core.reduction import EngineOptions, ImpossiblePieceError, PieceModel, ReducedState
from lvr_local.core.repetition import RepetitionParams, TokenRepetition, token_breakers
from lvr_local.core.sampling import SamplingParams
from lvr_local.core.subvocab import ALL_BYTES, SubVocabulary
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError

EXACT = EngineOptions(max_branches=0, prune=0.0, precision="float64")
SUBS: dict[str, Callable[[], SubVocabulary]] = {
    "bytes": subvocab.byte_level,
    "maxlen2": lambda: subvocab.max_length([vocab_a()], 2),
    "explicit": lambda: subvocab.explicit([b"ab", b"bab", b"cab", b"ca"]),
    "mcv": lambda: subvocab.common([vocab_a(), vocab_b()]),
    # Every token of A is a piece: the scorer takes its "identity" path.
    "own": lambda: SubVocabulary.from_pieces("own", vocab_a().byte_strings | set(ALL_BYTES)),
}


def make(sub_name: str, seed: int = 0, **options: object) -> tuple[SyntheticLM, ReducedState]:
    vocab = vocab_a()
    lm = SyntheticLM(vocab, seed=seed)
    tables = build_tables(vocab, SUBS[sub_name]())
    options.setdefault("prune", 0.0)
    options.setdefault("max_branches", 0)
    options.setdefault("precision", "float64")
    return lm, ReducedState(lm, tables, EngineOptions(**options))  # type: ignore[arg-type]


def feed(state: PieceModel, pieces: list[int]) -> float:
    """Advance through `pieces`, checking each q; return the sum of log q."""
    total = 0.0
    for piece in pieces:
        logq = state.next_piece_logprobs()
        assert not np.isnan(logq).any()
        assert abs(np.logaddexp.reduce(logq)) < 1e-12  # q sums to 1
        total += float(logq[piece])
        state.advance(piece)
    return total


def sample_texts(lm: SyntheticLM, n: int, rng: np.random.Generator) -> list[bytes]:
    """Half drawn from the model itself, half random strings (often improbable)."""
    texts = []
    for i in range(n):
        if i % 2:
            texts.append(bytes(rng.choice(list(b"abc"), rng.integers(1, 8)).tolist()))
            continue
        prefix, text = (), b""
        while len(text) < rng.integers(1, 9):
            v = int(rng.choice(lm.n_vocab, p=lm.probs(prefix)))
            if lm.vocab.is_end[v]:
                break
            text += lm.vocab.token_bytes(v) or b""
            prefix = (*prefix, v)
        texts.append(text or b"a")
    return texts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_give_the_exact_marginal_probability_of_a_text(seed: int) -> None:
    lm = SyntheticLM(vocab_a(), seed=seed)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    for text in sample_texts(lm, 30, np.random.default_rng(seed)):
        state = ReducedState(lm, tables, EXACT)
        log_q = feed(state, list(text))
        expected = text_prob(lm, text)
        assert abs(math.exp(log_q) - expected) < 1e-9
        assert abs(math.exp(state.log_Q) - expected) < 1e-9
        log_end = float(state.next_piece_logprobs()[tables.sub.end_id])
        assert abs(math.exp(log_q + log_end) - text_prob(lm, text, ended=True)) < 1e-9


@pytest.mark.parametrize("sub_name", list(SUBS))
def test_q_of_any_piece_sequence_matches_the_relative_cover(sub_name: str) -> None:
    rng = np.random.default_rng(7)
    for seed in range(3):
        lm, state = make(sub_name, seed)
        sub = state.tables.sub
        pieces = set(sub.pieces)
        for _ in range(6):
            lm, state = make(sub_name, seed)
            spelled: list[bytes | int] = []
            for _ in range(5):
                logq = state.next_piece_logprobs()
                assert abs(np.logaddexp.reduce(logq)) < 1e-12
                piece = int(rng.choice(sub.size, p=np.exp(logq) / np.exp(logq).sum()))
                state.advance(piece)
                spelled.append(END if piece == sub.end_id else sub.pieces[piece])
                expected = cover_prob(lm, pieces, spelled)
                assert abs(math.exp(state.log_Q) - expected) < 1e-9
                if piece == sub.end_id:
                    break


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper quantile of chi-square with `df` degrees of freedom by the Wilson-Hilferty
    approximation (accurate to ~1% for df >= 3); z = 3.0902 is the normal 0.999 quantile."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def homogeneity_chi2(x: Counter, y: Counter) -> tuple[float, int]:
    """Two equal-sized samples; outcomes seen fewer than 10 times in all are pooled."""
    rare_x = rare_y = 0
    stat, bins = 0.0, 0
    for key in set(x) | set(y):
        if x[key] + y[key] < 10:
            rare_x, rare_y = rare_x + x[key], rare_y + y[key]
            continue
        stat += (x[key] - y[key]) ** 2 / (x[key] + y[key])
        bins += 1
    if rare_x + rare_y:
        stat += (rare_x - rare_y) ** 2 / (rare_x + rare_y)
        bins += 1
    return stat, bins - 1


def draw_tokens(lm: SyntheticLM, n: int, max_bytes: int, rng: np.random.Generator) -> Counter:
    """Texts from the original model: (first max_bytes bytes, ended before them)."""
    out: Counter = Counter()
    for _ in range(n):
        prefix, text = (), b""
        while len(text) < max_bytes:
            cum = np.cumsum(lm.probs(prefix))
            v = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)
            if lm.vocab.is_end[v]:
                break
            text += lm.vocab.token_bytes(v) or b""
            prefix = (*prefix, v)
        out[(text[:max_bytes], len(text) < max_bytes)] += 1
    return out


def draw_pieces(
    new_state: Callable[[], PieceModel],
    sub: SubVocabulary,
    n: int,
    max_bytes: int,
    rng: np.random.Generator,
) -> Counter:
    """Texts from a piece model; q(. | u) is memoised per u (it depends on u only)."""
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def cumulative(u: tuple[int, ...]) -> np.ndarray:
        if u not in memo:
            state = new_state()
            for piece in u:
                state.advance(piece)
            memo[u] = np.cumsum(np.exp(state.next_piece_logprobs()))
        return memo[u]

    out: Counter = Counter()
    for _ in range(n):
        u: tuple[int, ...] = ()
        text = b""
        while len(text) < max_bytes:
            cum = cumulative(u)
            piece = min(
                int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1
            )
            if piece == sub.end_id:
                break
            text += sub.pieces[piece]
            u = (*u, piece)
        out[(text[:max_bytes], len(text) < max_bytes)] += 1
    return out


@pytest.mark.parametrize("sub_name", ["bytes", "mcv", "own"])
def test_sampling_pieces_gives_the_text_distribution_of_the_model(sub_name: str) -> None:
    n, max_bytes = 20_000, 4
    lm = SyntheticLM(vocab_a(), seed=3, end_bias=0.5)
    tables = build_tables(lm.vocab, SUBS[sub_name]())
    tokens = draw_tokens(lm, n, max_bytes, np.random.default_rng(11))
    pieces = draw_pieces(
        lambda: ReducedState(lm, tables, EXACT), tables.sub, n, max_bytes, np.random.default_rng(12)
    )
    stat, df = homogeneity_chi2(tokens, pieces)
    assert df >= 10
    assert stat < chi2_critical(df), (stat, df)
    if sub_name == "own":
        return  # every token is a piece: the naive restriction loses nothing here
    # The same test has the power to reject the naive restriction.
    naive = draw_pieces(
        lambda: NaiveState(lm, tables), tables.sub, n, max_bytes, np.random.default_rng(12)
    )
    stat, df = homogeneity_chi2(tokens, naive)
    assert stat > chi2_critical(df)


def test_naive_restriction_is_not_lossless() -> None:
    lm = SyntheticLM(vocab_a(), seed=0)
    tables = build_tables(lm.vocab, SUBS["mcv"]())
    errors = []
    for text in sample_texts(lm, 20, np.random.default_rng(5)):
        pieces = [tables.sub.index[p] for p in _spell_with_tokens_of(tables, text)]
        exact = cover_prob(lm, set(tables.sub.pieces), [tables.sub.pieces[p] for p in pieces])
        naive = NaiveState(lm, tables)
        try:
            log_q = feed(naive, pieces)
        except ImpossiblePieceError:
            log_q = -math.inf
        errors.append(abs(math.exp(log_q) - exact))
        reduced = ReducedState(lm, tables, EXACT)
        assert abs(math.exp(feed(reduced, pieces)) - exact) < 1e-9
    assert max(errors) > 1e-2


def _spell_with_tokens_of(tables: DecompositionTables, text: bytes) -> list[bytes]:
    """A piece sequence spelling `text` whose every piece is one token of the model (so
    that the naive baseline can follow it)."""
    from synthetic_lm import greedy_split

    exact = {
        tables.sub.pieces[p]
        for p in np.unique(tables.first_piece[tables.n_pieces == 1])
        if p < tables.sub.end_id
    }
    return greedy_split(text, exact)


def test_pruning_reports_a_bound_on_the_error() -> None:
    lm = SyntheticLM(vocab_a(), seed=4)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    pruned_somewhere = False
    for text in sample_texts(lm, 30, np.random.default_rng(9)):
        state = ReducedState(
            lm, tables, EngineOptions(max_branches=0, prune=0.05, precision="float64")
        )
        for byte in text:
            state.next_piece_logprobs()
            try:
                state.advance(byte)
            except ImpossiblePieceError:
                break  # everything that could spell it was pruned
            exact = text_prob(lm, text[: len(state.pieces)])
            kept = math.exp(state.log_Q)
            assert kept <= exact + 1e-12
            assert exact - kept <= math.exp(state.log_pruned) + 1e-12
        pruned_somewhere |= state.log_pruned > -math.inf
    assert pruned_somewhere


def test_pruning_keeps_fewer_nodes() -> None:
    text = b"abababcab"
    counts = {}
    for prune in (0.0, 0.05):
        _, state = make("bytes", seed=1, prune=prune)
        counts[prune] = 0
        for byte in text:
            state.next_piece_logprobs()
            state.advance(byte)
            counts[prune] += len(state.nodes())
    assert counts[0.05] < counts[0.0]


@pytest.mark.parametrize("sub_name", ["bytes", "mcv", "own"])
def test_top_1_follows_the_greedy_token_path(sub_name: str) -> None:
    for seed in range(5):
        lm, state = make(sub_name, seed, token_top_k=1)
        text, ended = b"", False
        while len(text) < 10:
            logq = state.next_piece_logprobs()
            piece = int(np.argmax(logq))
            assert logq[piece] == pytest.approx(0.0, abs=1e-12)  # one token, one node
            state.advance(piece)
            assert len(state.nodes()) <= 1
            if piece == state.tables.sub.end_id:
                ended = True
                break
            text += state.tables.sub.pieces[piece]
        greedy, greedy_ended = greedy_token_text(lm, 10)
        assert text[: len(greedy)] == greedy[: len(text)]
        assert ended == greedy_ended


def test_top_k_mass_is_reported_as_pruned() -> None:
    lm, state = make("bytes", seed=2, token_top_k=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = np.exp(state.next_piece_logprobs()[:256])
        state.advance(int(rng.choice(256, p=q / q.sum())))
    assert state.log_pruned > -math.inf
    exact = text_prob(lm, bytes(state.pieces))
    assert math.exp(state.log_Q) <= exact + 1e-12
    assert exact - math.exp(state.log_Q) <= math.exp(state.log_pruned) + 1e-12


def test_an_impossible_piece_gives_minus_inf_and_a_clear_error() -> None:
    lm, state = make("bytes", seed=0)
    feed(state, list(b"ab"))
    logq = state.next_piece_logprobs()
    assert logq[ord("z")] == -np.inf and not np.isnan(logq).any()
    before = (state.log_Q, list(state.pieces), len(state.nodes()))
    with pytest.raises(ImpossiblePieceError):
        state.advance(ord("z"))
    assert (state.log_Q, list(state.pieces), len(state.nodes())) == before
    feed(state, list(b"c"))
    assert abs(math.exp(state.log_Q) - text_prob(lm, b"abc")) < 1e-9
    with pytest.raises(LvrError):
        state.advance(10_000)


def test_a_forced_piece_of_tiny_probability_is_exact_in_log_space() -> None:
    """Every spelling of "c" gets a logit 200 below the rest: the float32 exp flushes it
    to 0 in q, but advancing computes log Q from the token log-probabilities."""
    lm = SyntheticLM(vocab_a(), seed=0)
    base = lm.logits
    starts_with_c = np.array([(b or b"").startswith(b"c") for b in lm.vocab.all_token_bytes])
    lm.logits = lambda prefix: np.where(starts_with_c, base(prefix) - 200, base(prefix)).astype(
        np.float32
    )
    tables = build_tables(lm.vocab, subvocab.byte_level())
    state = ReducedState(lm, tables, EXACT)
    assert not np.isnan(state.next_piece_logprobs()).any()
    for byte in b"cab":
        state.advance(byte)
        assert not np.isnan(state.next_piece_logprobs()).any()
    assert abs(state.log_Q - math.log(text_prob(lm, b"cab"))) < 1e-6


def test_end_finishes_the_state() -> None:
    lm, state = make("mcv", seed=0)
    end = state.tables.sub.end_id
    feed(state, [state.tables.sub.index[b"ab"], end])
    assert state.finished
    expected = cover_prob(lm, set(state.tables.sub.pieces), [b"ab", END])
    assert abs(math.exp(state.log_Q) - expected) < 1e-9
    with pytest.raises(LvrError):
        state.next_piece_logprobs()


def test_one_batched_call_per_step_and_releases() -> None:
    lm, state = make("bytes", seed=5)
    text = b"abcabab"
    for byte in text:
        calls_before = len(lm.calls)
        state.next_piece_logprobs()
        assert len(lm.calls) - calls_before <= 1
        state.advance(byte)
    asked = [p for call in lm.calls for p in call]
    assert len(asked) == len(set(asked))  # no prefix scored twice
    assert any(len(call) > 1 for call in lm.calls)  # several nodes share one call
    released: set = set()
    for kind, prefixes in lm.events:  # a released prefix is never asked again
        if kind == "call":
            assert not released & set(prefixes)
        else:
            released |= set(prefixes)
    state.close()
    assert set(lm.released) == set(asked)
    assert len(lm.released) == len(set(lm.released))


@pytest.mark.parametrize("sub_name", ["bytes", "own"])
@pytest.mark.parametrize("control_logit", [5_000.0, 650.0, -700.0])
def test_control_tokens_get_no_mass_even_when_they_dominate(
    sub_name: str, control_logit: float
) -> None:
    vocab = vocab_a()
    lm = SyntheticLM(vocab, seed=0)
    control = int(np.flatnonzero(~lm.valid)[0])
    base = lm.logits
    lm.logits = lambda prefix: _with_logit(base(prefix), control, control_logit)
    tables = build_tables(vocab, SUBS[sub_name]())
    state = ReducedState(lm, tables, EXACT)
    spelled = [b"a", b"b", b"c", b"a"]
    log_q = feed(state, [tables.sub.index[p] for p in spelled])
    assert abs(math.exp(log_q) - cover_prob(lm, set(tables.sub.pieces), spelled)) < 1e-9


@pytest.mark.parametrize("sub_name", ["bytes", "mcv", "own"])
def test_float32_exp_stays_within_1e_7_of_exact(sub_name: str) -> None:
    rng = np.random.default_rng(1)
    for seed in range(4):
        _, exact = make(sub_name, seed)
        _, fast = make(sub_name, seed, precision="float32")
        for _ in range(6):
            q_exact, q_fast = exact.next_piece_logprobs(), fast.next_piece_logprobs()
            finite = q_exact > -np.inf
            assert np.array_equal(finite, q_fast > -np.inf)
            assert np.abs(q_fast[finite] - q_exact[finite]).max() < 1e-6
            p = np.exp(q_exact)
            piece = int(rng.choice(len(p), p=p / p.sum()))
            if piece == exact.tables.sub.end_id:
                break
            exact.advance(piece)
            fast.advance(piece)
            assert abs(fast.log_Q - exact.log_Q) < 1e-6


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("shift", [0.0, 100.0, -50.0, 650.0, -650.0, -2_000.0])
def test_logits_far_from_zero(precision: str, shift: float) -> None:
    """Large or very negative logits take the scorer's rescaled exp; q stays right."""
    lm = SyntheticLM(vocab_a(), seed=3)
    base = lm.logits
    lm.logits = lambda prefix: (base(prefix) + np.float32(shift)).astype(np.float32)
    tables = build_tables(lm.vocab, SUBS["mcv"]())
    logq = ReducedState(lm, tables, EngineOptions(max_branches=0, prune=0.0, precision=precision))
    got = logq.next_piece_logprobs()
    sub = tables.sub
    spelled = [*sub.pieces, END]
    with np.errstate(divide="ignore"):
        expected = np.log([cover_prob(lm, set(sub.pieces), [p]) for p in spelled])
    assert np.array_equal(got == -np.inf, expected == -np.inf)
    finite = expected > -np.inf
    tol = 1e-6 if precision == "float32" else 1e-9
    assert np.abs(got[finite] - expected[finite]).max() < tol


def _with_logit(x: np.ndarray, token: int, value: float) -> np.ndarray:
    x = x.copy()
    x[token] = value
    return x


def test_node_cap_keeps_the_largest_shares_and_counts_what_it_drops() -> None:
    text = b"abab" * 3
    _, exact = make("bytes", seed=4)
    _, capped = make("bytes", seed=4, max_branches=2)
    for byte in text:
        piece = exact.tables.sub.index[bytes([byte])]
        exact.next_piece_logprobs()
        capped.next_piece_logprobs()
        exact.advance(piece)
        capped.advance(piece)
        assert len(capped.nodes()) <= 2
    # Kept mass never exceeds the truth, and the truth is within the reported pruned mass.
    assert math.exp(capped.log_Q) <= math.exp(exact.log_Q) + 1e-12
    assert math.exp(exact.log_Q) - math.exp(capped.log_Q) <= math.exp(capped.log_pruned) + 1e-12
    assert capped.log_pruned > float("-inf")


class SmallMemoryLM(SyntheticLM):
    """A SyntheticLM that, like llama.cpp with a small KV cache, holds at most `slots`
    alive prefixes: asked for more, it raises ModelMemoryFull and keeps nothing new."""

    def __init__(self, vocab: Vocabulary, slots: int, seed: int) -> None:
        super().__init__(vocab, seed=seed)
        self.slots = slots
        self.alive: set[TokenPrefix] = set()
        self.refusals = 0

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        wanted = self.alive | {tuple(p) for p in prefixes}
        if len(wanted) > self.slots:
            self.refusals += 1
            raise ModelMemoryFull(f"{len(wanted)} prefixes do not fit in {self.slots}")
        self.alive = wanted
        return super().next_logits(prefixes)

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        self.alive -= {tuple(p) for p in prefixes}
        super().release(prefixes)


def test_a_full_model_memory_sheds_the_smallest_branches_and_counts_them() -> None:
    """When the model cannot hold the fresh nodes to score, the state keeps the larger
    half of its branches by share, releases the others, and asks again: the generation
    goes on, the kept mass stays a lower bound within the reported pruned mass, and
    q stays a distribution. With one branch left and still no room, the error stands."""
    text = b"abab" * 3
    lm = SmallMemoryLM(vocab_a(), slots=3, seed=4)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    state = ReducedState(lm, tables, EXACT)
    for byte in text:
        logq = state.next_piece_logprobs()
        assert abs(np.logaddexp.reduce(logq)) < 1e-9
        state.advance(byte)
        exact = text_prob(lm, text[: len(state.pieces)])
        assert math.exp(state.log_Q) <= exact + 1e-12
        assert exact - math.exp(state.log_Q) <= math.exp(state.log_pruned) + 1e-12
    assert lm.refusals > 0 and state.log_pruned > -math.inf
    assert len(lm.alive) <= lm.slots

    tiny = SmallMemoryLM(vocab_a(), slots=0, seed=4)
    with pytest.raises(ModelMemoryFull):
        ReducedState(tiny, tables, EXACT).next_piece_logprobs()


@pytest.mark.parametrize("follow", [True, False])
def test_a_prefetched_prefix_is_adopted_or_released(
    follow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ReducedState.prefetch (the ensemble's pairing of lone decodes over bytes): the
    guessed prefix is a waiting token's completion; when the text spells that token out,
    the fresh node it becomes is the guess (a hit, not released); when the text leaves
    it, the guess is released. Either way q is unchanged: the guess is only asked early."""
    monkeypatch.setattr(reduction, "PREFETCH_MIN_SHARE", 1e-12)
    lm = SyntheticLM(vocab_a(), seed=3)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    state = ReducedState(lm, tables, EXACT)
    twin = ReducedState(SyntheticLM(vocab_a(), seed=3), tables, EXACT)  # never prefetches
    for s in (state, twin):
        s.next_piece_logprobs()
        s.advance(ord("a"))
        s.next_piece_logprobs()
    prefix = state.likely_next_prefix()
    assert prefix is not None and prefix[:-1] == ()  # a token waiting since the root
    rest = (lm.vocab.token_bytes(prefix[-1]) or b"")[1:]  # its bytes after the "a"
    state.prefetch(prefix)
    assert state.prefetches == 1 and lm.calls[-1] == [prefix]
    if follow:
        text = rest
    else:
        logq = state.next_piece_logprobs()
        other = next(b for b in range(256) if b != rest[0] and logq[b] > -np.inf)
        text = bytes([other])
    for byte in text:
        np.testing.assert_allclose(state.next_piece_logprobs(), twin.next_piece_logprobs())
        state.advance(byte)
        twin.advance(byte)
    np.testing.assert_allclose(state.next_piece_logprobs(), twin.next_piece_logprobs())
    assert state.prefetch_hits == (1 if follow else 0)
    assert (prefix in lm.released) is not follow


def llama_cpp_chain(p: np.ndarray, params: SamplingParams) -> np.ndarray:
    """llama.cpp's sampler as a distribution, written out independently: top-k, top-p
    and min-p on p (sorted, most likely first), then the temperature on what is left."""
    order = sorted(np.flatnonzero(p > 0).tolist(), key=lambda v: -p[v])
    if params.top_k > 0:
        order = order[: params.top_k]
    kept = p[order] / p[order].sum()
    n, total = 0, 0.0
    while n < len(order) and (n == 0 or total < params.top_p):
        total += kept[n]
        n += 1
    n = min(n, sum(1 for q in kept if q >= params.min_p * kept[0]))
    out = np.zeros(len(p))
    out[order[:n]] = p[order[:n]] ** (1.0 / params.temperature)
    return out / out.sum()


class SampledLM:
    """The synthetic model as the engine samples it on its tokens (penalties after the
    prefix's own tokens, then llama.cpp's chain, mixed with the penalised model at weight
    `floor`): what `text_prob` enumerates."""

    def __init__(
        self, lm: SyntheticLM, params: SamplingParams, penalties: TokenRepetition | None = None
    ) -> None:
        self.vocab = lm.vocab
        self.lm, self.params, self.penalties = lm, params, penalties

    def probs(self, prefix: TokenPrefix) -> np.ndarray:
        x = self.lm.logits(prefix).astype(np.float64)
        if self.penalties is not None:
            x = self.penalties.apply(x, prefix)
        x = np.where(self.lm.valid, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        return (1 - CUT_FLOOR) * llama_cpp_chain(p, self.params) + CUT_FLOOR * p


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=0.5, top_k=0, top_p=0.8, min_p=0.2),
    ],
)
def test_sampling_on_tokens_is_reduced_exactly(params: SamplingParams) -> None:
    """With the sampler on each node's tokens (§7.5), the byte-level state gives the
    text distribution of llama.cpp's sampler over the model's tokens: every
    tokenization counts, each step truncated and tempered as the sampler would."""
    lm = SyntheticLM(vocab_a(), seed=4, end_bias=0.5)
    sampled = SampledLM(lm, params)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    options = EngineOptions(max_branches=0, prune=0.0, precision="float64", token_sampling=params)
    plain_differs = cut_only = False
    for text in sample_texts(lm, 30, np.random.default_rng(5)):
        expected = text_prob(sampled, text)  # type: ignore[arg-type]
        state = ReducedState(lm, tables, options)
        log_q = feed(state, list(text))
        assert abs(math.exp(log_q) - expected) < 1e-9
        log_end = float(state.next_piece_logprobs()[tables.sub.end_id])
        ended = text_prob(sampled, text, ended=True)  # type: ignore[arg-type]
        assert abs(math.exp(log_q + log_end) - ended) < 1e-9
        plain_differs |= abs(expected - text_prob(lm, text)) > 1e-3
        cut_only |= 0 < expected < 1e-3 * text_prob(lm, text)
    assert plain_differs  # the sampler changed the distribution: the test has power
    if params.top_k or params.top_p < 1:
        assert cut_only  # some text lives on only through the floor


def test_the_samplers_penalties_follow_each_branchs_own_tokens() -> None:
    """With repetition penalties on the tokens (§7.5), every tokenization branch is
    penalised for the repeats in the prompt's tokens and its own token sequence: the
    byte-level state still gives the exact text distribution of that sampler."""
    lm = SyntheticLM(vocab_a(), seed=6, end_bias=0.5)
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95, min_p=0.02)
    repetition = RepetitionParams(repeat_penalty=1.5, dry_multiplier=0.8, dry_allowed_length=1)
    penalties = TokenRepetition(repetition, token_breakers(("c",), lm.vocab), context=(3, 0))
    assert penalties.breakers.single(2) and penalties.breakers.single(7)  # "c", "abc"
    sampled = SampledLM(lm, params, penalties)
    tables = build_tables(lm.vocab, subvocab.byte_level())
    options = EngineOptions(max_branches=0, prune=0.0, precision="float64", token_sampling=params)
    penalised = False
    for text in [b"ababab", b"aaaa", b"abcab", b"babab", b"bbbb"]:
        state = ReducedState(lm, tables, options, repetition=penalties)
        log_q = feed(state, list(text))
        expected = text_prob(sampled, text)  # type: ignore[arg-type]
        assert abs(math.exp(log_q) - expected) < 1e-9
        unpenalised = text_prob(SampledLM(lm, params), text)  # type: ignore[arg-type]
        penalised |= abs(expected - unpenalised) > 1e-3
    assert penalised
