"""Ensemble decoding: N reduced models in lock-step over one sub-vocabulary (ALGORITHM.md §4).

Each step every member gives its next-piece distribution q_i(. | u), the rule combines
them, the sampler picks one piece, and every member advances by it. One member alone is
plain lossless reduction of that model.

A raw prompt that ends mid-token is fed to each member as tokens plus a forced byte tail
(prompting.py). While any member still has tokens straddling the prompt's end, the
ensemble runs on single bytes, where a straddling token is exact; once every member's
mass sits on token boundaries ("synchronised") it switches to the chosen sub-vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lvr_local.backend import LlamaBackend, physical_cores
from lvr_local.chat import Message, format_chat
from lvr_local.combine import combine, dominant_model
from lvr_local.config import COMBINE_RULES, Defaults, ModelSpec
from lvr_local.decompose import DecompositionTables, decomposition_tables
from lvr_local.errors import LvrError
from lvr_local.naive import NaiveState
from lvr_local.prompting import PreparedPrompt, prepare_chat, prepare_raw
from lvr_local.reduction import EngineOptions, ImpossiblePieceError, ReducedState
from lvr_local.sampling import Sampler
from lvr_local.subvocab import byte_level, parse_spec
from lvr_local.vocabulary import Vocabulary, load_vocabulary

PieceState = ReducedState | NaiveState
# Sequences per llama.cpp context: room for the tokenization branches the engine keeps
# alive (fewer forces evictions and re-evaluation); cells are shared, so this is cheap.
N_SEQ_MAX = 64


@dataclass(eq=False)
class Member:
    """One model of the ensemble: its vocabulary, its llama.cpp backend, its weight."""

    name: str
    vocab: Vocabulary
    backend: LlamaBackend
    weight: float = 1.0
    chat_template: str | None = None
    enabled: bool = True  # the TUI's on/off switch; takes effect at the next prompt
    auto_threads: bool = False  # no thread count configured: the ensemble shares cores out

    def close(self) -> None:
        self.backend.close()


def load_member(spec: ModelSpec, defaults: Defaults, *, n_threads: int | None = None) -> Member:
    """Load one model of models.toml (vocabulary from the cache, weights into llama.cpp)."""
    path = spec.resolve_path()
    vocab = load_vocabulary(path, name=spec.name)
    threads = n_threads or defaults.n_threads or None
    backend = LlamaBackend(
        path,
        n_ctx=spec.n_ctx,
        n_gpu_layers=spec.n_gpu_layers,
        n_threads=threads,
        n_seq_max=N_SEQ_MAX,
    )
    return Member(
        name=spec.name,
        vocab=vocab,
        backend=backend,
        weight=spec.weight,
        chat_template=spec.chat_template or vocab.chat_template,
        enabled=spec.enabled,
        auto_threads=threads is None,
    )


@dataclass(frozen=True)
class PieceEvent:
    """One generated (or forced) piece, for the CLI and the TUI."""

    index: int
    piece: int
    text: bytes
    logprob: float  # under the combined distribution
    member_logprobs: tuple[float, ...]  # each member's log q_i of this piece
    weights: tuple[float, ...]
    dominant: int  # the member whose weighted probability of it was largest
    pruned: tuple[float, ...]  # each member's share of Q dropped by this step
    byte_level: bool  # emitted during the byte-level phase after a mid-token prompt

    @property
    def prob(self) -> float:
        return float(np.exp(self.logprob))

    @property
    def member_probs(self) -> tuple[float, ...]:
        return tuple(float(np.exp(x)) for x in self.member_logprobs)


@dataclass
class RunStats:
    pieces: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stop_reason: str = ""


class Ensemble:
    """Decodes with several members over one sub-vocabulary. Not thread-safe."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        sub_vocab: str = "mcv",
        rule: str = "mean",
        options: EngineOptions | None = None,
        concurrent: bool | None = None,
    ) -> None:
        if not members:
            raise LvrError("an ensemble needs at least one model")
        if rule not in COMBINE_RULES:
            raise LvrError(
                f"unknown combination rule '{rule}': expected one of {', '.join(COMBINE_RULES)}"
            )
        self.members = list(members)
        self.rule = rule
        self.options = options or EngineOptions()
        self.sub = parse_spec(sub_vocab, [m.vocab for m in self.members])
        self.tables = [decomposition_tables(m.vocab, self.sub) for m in self.members]
        self._byte_sub = byte_level()
        self._byte_tables: list[DecompositionTables] | None = None
        self._states: list[PieceState | None] = []
        self._live: list[bool] = []
        self._phase_sub = self.sub
        self._concurrent_choice = concurrent  # None: decided for each prompt
        self._pool: ThreadPoolExecutor | None = None
        self._concurrent = False

    # ----------------------------------------------------------------- set-up

    @property
    def concurrent(self) -> bool:
        """Whether this generation's members decode at once (see _share_cores)."""
        return self._concurrent

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    def set_weights(self, weights: Sequence[float]) -> None:
        if len(weights) != len(self.members):
            raise LvrError(f"expected {len(self.members)} weights, got {len(weights)}")
        for m, w in zip(self.members, weights, strict=True):
            m.weight = float(w)

    def start_raw(self, text: bytes) -> None:
        """Condition every enabled member on a raw prompt (may end mid-token)."""
        self._start(lambda m: prepare_raw(m.backend, m.vocab, text))

    def start_chat(self, messages: Sequence[Message]) -> None:
        """Condition every enabled member on a conversation, each with its own template."""
        self._start(
            lambda m: prepare_chat(m.backend, format_chat(m.chat_template, messages, model=m.name))
        )

    def _start(self, prepare: Callable[[Member], PreparedPrompt]) -> None:
        self._close_states()
        self._live = [m.enabled for m in self.members]
        if not any(self._live):
            raise LvrError("every model is disabled")
        prompts = {i: prepare(m) for i, m in enumerate(self.members) if self._live[i]}
        byte_phase = self.rule != "naive" and any(p.tail for p in prompts.values())
        self._phase_sub = self._byte_sub if byte_phase else self.sub
        tables = self._byte_level_tables() if byte_phase else self.tables
        self._states = [None] * len(self.members)
        # Prompts and their forced tails: one model after the other, each on all cores.
        self._set_auto_threads(physical_cores())
        for i, prompt in prompts.items():
            self.members[i].backend.set_prompt(prompt.tokens)
            self._states[i] = self._new_state(self.members[i], tables[i])
        for i, prompt in prompts.items():
            self._force_tail(self.members[i], self._states[i], prompt.tail)
        self._share_cores()
        self._maybe_leave_byte_phase()

    def _set_auto_threads(self, n_threads: int) -> None:
        for m in self.members:
            if m.auto_threads and m.backend.n_threads != n_threads:
                m.backend.set_threads(n_threads)

    def _share_cores(self) -> None:
        """Choose how this generation's members decode: at once, sharing the cores, or
        in turn with all of them. At once needs a core per thread: llama.cpp's threads
        spin while they wait, so oversubscribed cores slow every decode down. Members
        without a configured thread count get an equal share of the cores. On 2 cores
        one thread each at once beats two each in turn by 1.26x: tiny models scale
        poorly over threads (`lvr bench`)."""
        live = [m for m, ok in zip(self.members, self._live, strict=True) if ok]
        cores = physical_cores()
        together = self._concurrent_choice is not False and len(live) > 1
        self._set_auto_threads(max(1, cores // len(live)) if together else cores)
        if self._concurrent_choice is None:
            together = together and sum(m.backend.n_threads for m in live) <= cores
        if together and self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.members))
        self._concurrent = together

    def _new_state(self, member: Member, tables: DecompositionTables) -> PieceState:
        if self.rule == "naive":
            return NaiveState(member.backend, tables)
        return ReducedState(member.backend, tables, self.options)

    def _byte_level_tables(self) -> list[DecompositionTables]:
        if self._byte_tables is None:
            self._byte_tables = [
                decomposition_tables(m.vocab, self._byte_sub) for m in self.members
            ]
        return self._byte_tables

    def _force_tail(self, member: Member, state: PieceState | None, tail: bytes) -> None:
        assert state is not None
        for value in tail:
            try:
                state.advance(self._phase_sub.index[bytes([value])])
            except ImpossiblePieceError as e:
                raise LvrError(
                    f"model '{member.name}' cannot spell the end of the prompt "
                    f"(byte 0x{value:02x}): {e}"
                ) from e

    def _maybe_leave_byte_phase(self) -> None:
        """Switch from bytes to the chosen sub-vocabulary once no member has a token
        straddling the current position: all their mass sits on token boundaries, where
        the sub-vocabulary's decomposition of what follows is exact."""
        if self._phase_sub is self.sub:
            return
        live = [s for s in self._states if s is not None]
        if not all(isinstance(s, ReducedState) and s.synchronised for s in live):
            return
        for i, state in enumerate(self._states):
            if isinstance(state, ReducedState):
                m = self.members[i]
                self._states[i] = ReducedState(
                    m.backend, self.tables[i], self.options, start=state.hand_over()
                )
        self._phase_sub = self.sub

    # ----------------------------------------------------------------- stepping

    def distributions(self) -> np.ndarray:
        """(n_members, n_symbols) log q_i(. | u); members decode concurrently. A member
        that has left this generation gets a row of -inf."""
        if not self._states:
            raise LvrError("no prompt: call start_raw or start_chat first")
        live = [i for i, ok in enumerate(self._live) if ok]
        states = [s for i in live if (s := self._states[i]) is not None]
        if self._concurrent and self._pool is not None and len(states) > 1:
            rows = list(self._pool.map(lambda s: s.next_piece_logprobs(), states))
        else:
            rows = [s.next_piece_logprobs() for s in states]
        logq = np.full((len(self.members), self._phase_sub.size), -np.inf)
        logq[live] = rows
        return logq

    def combined(self, logq: np.ndarray) -> np.ndarray:
        active = [i for i, m in enumerate(self.members) if self._live[i] and m.weight != 0]
        if not active:
            raise LvrError("every model is disabled, has weight 0, or cannot follow the text")
        rule = "mean" if self.rule == "naive" else self.rule
        return combine(logq[active], [self.members[i].weight for i in active], rule)

    def step(self, choose: Callable[[np.ndarray], int], index: int = 0) -> PieceEvent:
        """One piece: combine, choose, advance every member."""
        logq = self.distributions()
        logp = self.combined(logq)
        piece = choose(logp)
        return self._advance(piece, logq, logp, index)

    def force(self, piece: int, index: int = 0) -> PieceEvent:
        """Advance by a given piece (scoring a text), reporting its probabilities."""
        logq = self.distributions()
        return self._advance(piece, logq, self.combined(logq), index)

    def _advance(self, piece: int, logq: np.ndarray, logp: np.ndarray, index: int) -> PieceEvent:
        sub = self._phase_sub
        if logp[piece] == -np.inf:
            raise LvrError(f"piece {sub.piece_bytes(piece)!r} is impossible for the ensemble")
        pruned = [0.0] * len(self.members)
        for i, state in enumerate(self._states):
            if state is None or not self._live[i]:
                continue
            if logq[i, piece] == -np.inf:
                self._live[i] = False  # it cannot spell this text: it leaves this generation
                continue
            state.advance(piece)
            pruned[i] = getattr(state, "last_pruned_fraction", 0.0)
        event = PieceEvent(
            index=index,
            piece=piece,
            text=sub.piece_bytes(piece),
            logprob=float(logp[piece]),
            member_logprobs=tuple(float(x) for x in logq[:, piece]),
            weights=tuple(self.weights),
            dominant=dominant_model(logq, self.weights, piece),
            pruned=tuple(pruned),
            byte_level=sub is not self.sub,
        )
        if piece != sub.end_id:
            self._maybe_leave_byte_phase()
        return event

    def pruned_mass(self) -> list[float]:
        """Each member's probability mass dropped by pruning (or top-K) so far."""
        return [
            float(np.exp(getattr(s, "log_pruned", -np.inf))) if s else 0.0 for s in self._states
        ]

    @property
    def end_id(self) -> int:
        return self._phase_sub.end_id

    def piece_id(self, piece: bytes) -> int | None:
        return self._phase_sub.piece_id(piece)

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        sampler: Sampler,
        *,
        max_pieces: int = 256,
        max_bytes: int | None = None,
        stop: Sequence[str] = (),
        stats: RunStats | None = None,
    ) -> Iterator[PieceEvent]:
        """Yield pieces until END, a stop string, or a budget. A stop string is not
        yielded: the text is cut where it begins."""
        stats = stats if stats is not None else RunStats()
        stops = [s.encode("utf-8") for s in stop if s]
        text = b""
        t0 = time.perf_counter()
        try:
            for index in range(max_pieces):
                event = self.step(sampler.choose, index)
                stats.pieces += 1
                if event.piece == self.end_id and not event.text:
                    stats.stop_reason = "end"
                    return
                hit = _find_stop(text, event.text, stops)
                if hit is not None:
                    stats.stop_reason = "stop"
                    stats.bytes = hit
                    return
                text += event.text
                stats.bytes = len(text)
                yield event
                if max_bytes is not None and len(text) >= max_bytes:
                    stats.stop_reason = "max_bytes"
                    return
            stats.stop_reason = "max_pieces"
        finally:
            stats.seconds = time.perf_counter() - t0

    # ----------------------------------------------------------------- teardown

    def _close_states(self) -> None:
        for state in self._states:
            if state is not None:
                state.close()
        self._states = []

    def close(self) -> None:
        self._close_states()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _find_stop(before: bytes, new: bytes, stops: list[bytes]) -> int | None:
    """Length of the text kept when a stop string appears in before + new, else None."""
    if not stops:
        return None
    window_start = max(0, len(before) - max(len(s) for s in stops))
    joined = before + new
    found = [joined.find(s, window_start) for s in stops]
    hits = [f for f in found if f >= 0]
    return min(hits) if hits else None
