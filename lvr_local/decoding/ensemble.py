"""Ensemble stepping: N reduced models in lock-step over one sub-vocabulary
(docs/algorithm.md §7).

Each step every member gives its next-piece distribution q_i(. | u), the combination
rule mixes them, a chooser picks one piece, and every member advances by it. One member
alone is plain lossless reduction of that model. The *method* says how a member's
token distribution becomes a piece distribution: `lossless` (the reduction) or `naive`
(the restriction baseline); the *rule* says how members are combined.

In a conversation each member reads its native format (roles.py): a chat member its
chat template, a base member a plain transcript. END then comes from the members that
can end a turn (combine.py). The `bayes` rule's weights are the members' posterior
probabilities (posterior.py), updated with every piece the ensemble advances by.

A raw prompt that ends mid-token runs on bytes first (byte_phase.py); how the members
share the cores is scheduling.py's; the generation loop with budgets and stops is
generation.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lvr_local.core.chat import Message
from lvr_local.core.combine import (
    RULES,
    Mixing,
    NoPieceError,
    combine,
    deferred,
    dominant_model,
    mixing_weights,
)
from lvr_local.core.decompose import DecompositionTables, decomposition_tables
from lvr_local.core.lm import TokenPrefix
from lvr_local.core.naive import NaiveState
from lvr_local.core.posterior import Posterior
from lvr_local.core.reduction import EngineOptions, ImpossiblePieceError, PieceModel, ReducedState
from lvr_local.core.repetition import Breakers, RepetitionParams, TokenRepetition, token_breakers
from lvr_local.core.sampling import SamplingParams
from lvr_local.core.subvocab import SubVocabulary, parse_spec
from lvr_local.decoding.byte_phase import BytePhase
from lvr_local.decoding.members import Member
from lvr_local.decoding.prompting import PreparedPrompt, prepare_chat, prepare_raw
from lvr_local.decoding.roles import TURN_SEPARATORS, format_transcript
from lvr_local.decoding.scheduling import CoreScheduler
from lvr_local.errors import LvrError
from lvr_local.llama.chat_template import chat_parts

METHODS = ("lossless", "naive")


@dataclass(frozen=True)
class PieceEvent:
    """One generated (or forced) piece, for every front end."""

    index: int
    piece: int
    text: bytes
    logprob: float  # under the combined distribution
    member_logprobs: tuple[float, ...]  # each member's log q_i of this piece
    weights: tuple[float, ...]  # the members' configured weights
    mix_weights: tuple[float, ...]  # the weights the rule used here (bayes: the posterior)
    dominant: int  # the member whose weighted probability of it was largest
    pruned_fraction: tuple[float, ...]  # each member's share of Q dropped by this step
    byte_level: bool  # emitted during the byte-level phase after a mid-token prompt
    # The most likely pieces of the combined distribution, (bytes, logprob), most likely
    # first; END spells b"". Empty unless the step was asked for them (top_n).
    alternatives: tuple[tuple[bytes, float], ...] = ()
    # Members that left the generation at this piece: none of their tokenizations can
    # spell it (a byte their vocabulary lacks, or every way pruned). Never silent.
    left: tuple[int, ...] = ()
    # Members whose alive branches could not spell this piece and who follow it through
    # branches pruned a few pieces ago, brought back (docs/algorithm.md §4). Their
    # member_logprobs is then what the revived branches give it.
    revived: tuple[int, ...] = ()

    @property
    def prob(self) -> float:
        return float(np.exp(self.logprob))

    @property
    def member_probs(self) -> tuple[float, ...]:
        return tuple(float(np.exp(x)) for x in self.member_logprobs)


class Ensemble:
    """Decodes with several members over one sub-vocabulary. Not thread-safe."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        sub_vocab: str = "auto",
        method: str = "lossless",
        mixing: Mixing | None = None,
        options: EngineOptions | None = None,
        scheduler: CoreScheduler | None = None,
    ) -> None:
        if not members:
            raise LvrError("an ensemble needs at least one model")
        self.mixing = mixing or Mixing()
        _check_choice("method", method, METHODS)
        _check_choice("combination rule", self.mixing.rule, RULES)
        self.members = list(members)
        self.method = method
        self.options = options or EngineOptions()
        self.scheduler = scheduler or CoreScheduler()
        self.sub = parse_spec(sub_vocab, [m.vocab for m in self.members], method)
        self.tables = [decomposition_tables(m.vocab, self.sub) for m in self.members]
        self._byte_phase = BytePhase(self.members)
        self._states: list[PieceModel | None] = []
        self._live: list[bool] = []
        self._known = b""
        self._can_end: list[bool] = []
        self._posterior: Posterior | None = None
        self._step_weights: np.ndarray | None = None  # the rule's weights at the last step
        self._phase_sub = self.sub
        self.turn_separators: tuple[bytes, ...] = ()  # reply text that ends the turn
        # Sampled generation: llama.cpp's sampler on each member's own tokens (§7.5),
        # set per run before start_raw/start_chat (None: the members as they are).
        self.token_sampling: SamplingParams | None = None
        self.token_repetition: RepetitionParams | None = None  # its penalties, likewise
        self._token_breakers: dict[tuple[int, tuple[str, ...]], Breakers] = {}
        self._prompt_tokens: dict[int, tuple[int, ...]] = {}  # per member, this generation

    # ----------------------------------------------------------------- set-up

    @property
    def concurrent(self) -> bool:
        """Whether this generation's members decode at once."""
        return self.scheduler.concurrent

    @property
    def rule(self) -> str:
        return self.mixing.rule

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    def set_weights(self, weights: Sequence[float]) -> None:
        """One weight per member, checked by the runner (runner/config.py, check_weights):
        NaN would silently act as 0, an infinity as everything."""
        for m, w in zip(self.members, weights, strict=True):
            m.weight = float(w)

    def start_raw(self, text: bytes, known: bytes = b"") -> None:
        """Condition every enabled member on a raw prompt (may end mid-token). `known`:
        text known to follow the prompt (a scored text), for pruning the forced tail."""
        self._known = known
        self._start(lambda m: self._raw_prompt(m, text), chat=False)

    def start_chat(self, messages: Sequence[Message]) -> None:
        """Condition every enabled member on a conversation in its own format: a chat
        member with its chat template, a base member as a plain transcript (with an
        example exchange when no chat member takes part: it carries the turn alone)."""
        self._known = b""
        led = any(m.enabled and m.leads for m in self.members)
        self._start(lambda m: self._chat_prompt(m, messages, example=not led), chat=True)

    def _raw_prompt(self, member: Member, text: bytes) -> PreparedPrompt:
        """The lossless method holds a tail back for the byte-level phase. The naive
        baseline has none: it reads the whole prompt as its tokenizer splits it, except
        over bytes, where its own states take the tail byte by byte."""
        hold_back = self.method == "lossless" or self.sub.kind == "bytes"
        return prepare_raw(member.backend, member.vocab, text, hold_back=hold_back)

    def _chat_prompt(
        self, member: Member, messages: Sequence[Message], example: bool
    ) -> PreparedPrompt:
        """A chat member's template; a base member's transcript, with the example
        exchange when no chat member takes part (roles.py, EXAMPLE)."""
        if not member.leads:
            text = format_transcript(messages, example=example)
            return self._raw_prompt(member, text.encode("utf-8"))
        parts = chat_parts(member.chat_template, messages, model=member.name)
        return prepare_chat(member.backend, parts)

    def _start(self, prepare: Callable[[Member], PreparedPrompt], *, chat: bool) -> None:
        self._close_states()
        self._live = [m.enabled for m in self.members]
        if not any(self._live):
            raise LvrError("every model is disabled")
        # In a conversation only chat members signal the end of a turn; a base member
        # ends it by starting the next one in its transcript.
        self._can_end = [not chat or m.leads for m in self.members]
        live = [i for i, ok in enumerate(self._live) if ok]
        base = not all(self._can_end[i] for i in live)
        self.turn_separators = tuple(s.encode("utf-8") for s in TURN_SEPARATORS) if base else ()
        self._posterior = None
        self._step_weights = None
        if self.rule == "bayes":
            prior = [m.weight if i in live else 0.0 for i, m in enumerate(self.members)]
            self._posterior = Posterior(prior, self.mixing.switch_rate)
        prompts = {i: prepare(m) for i, m in enumerate(self.members) if self._live[i]}
        on_bytes = self.method == "lossless" and any(p.tail for p in prompts.values())
        self._phase_sub = self._byte_phase.sub if on_bytes else self.sub
        tables = self._byte_phase.tables if on_bytes else self.tables
        self._states = [None] * len(self.members)
        self.scheduler.all_cores(self.members)
        self._prompt_tokens = {i: tuple(p.tokens) for i, p in prompts.items()}
        for i, prompt in prompts.items():
            self.members[i].backend.set_prompt(prompt.tokens)
            self._states[i] = self._new_state(i, tables[i])
        for i, prompt in prompts.items():
            self._byte_phase.force_tail(self.members[i], self._state(i), prompt.tail, self._known)
        self.scheduler.share([m for m, ok in zip(self.members, self._live, strict=True) if ok])
        self._maybe_leave_byte_phase()

    def _new_state(
        self,
        i: int,
        tables: DecompositionTables,
        start: list[tuple[TokenPrefix, float]] | None = None,
    ) -> PieceModel:
        """Member i's piece model over `tables`, from the prompt or from handed-over nodes.
        `fresh_prune` is the byte level's (docs/algorithm.md §7.4): an ensemble over
        another sub-vocabulary, its byte-level phase included, prunes by `prune` alone."""
        model = self.members[i].backend
        if self.method == "naive":
            return NaiveState(model, tables)
        options = replace(self.options, token_sampling=self.token_sampling)
        if self.sub.kind != "bytes":
            options = replace(options, fresh_prune=None)
        start = start or [((), 0.0)]
        return ReducedState(model, tables, options, start=start, repetition=self._repetition(i))

    def _repetition(self, i: int) -> TokenRepetition | None:
        """Member i's sampler penalties on its own tokens, when the run samples there;
        its sequence breakers are built once per member (a pass over its vocabulary)."""
        params = self.token_repetition
        if self.token_sampling is None or params is None or not params.on:
            return None
        key = (i, params.dry_sequence_breakers)
        if key not in self._token_breakers:
            vocab = self.members[i].vocab
            self._token_breakers[key] = token_breakers(params.dry_sequence_breakers, vocab)
        context = self._prompt_tokens.get(i, ())
        return TokenRepetition(params, self._token_breakers[key], context)

    def _maybe_leave_byte_phase(self) -> None:
        """Switch from bytes to the chosen sub-vocabulary once every member is
        synchronised (docs/algorithm.md §6)."""
        if self._phase_sub is self.sub or not BytePhase.synchronised(self._states):
            return
        self._states = BytePhase.hand_over(
            self._states, lambda i, start: self._new_state(i, self.tables[i], start)
        )
        self._phase_sub = self.sub

    def _state(self, i: int) -> PieceModel:
        state = self._states[i]
        if state is None:
            raise LvrError(f"model '{self.members[i].name}' is not part of this generation")
        return state

    # ----------------------------------------------------------------- stepping

    def distributions(self, prefetch: bool = False) -> np.ndarray:
        """(n_members, n_symbols) log q_i(. | u); members may decode at once. A member
        that has left this generation gets a row of -inf. `prefetch` (generation): where
        one member decodes alone, the others score their likeliest next fresh node beside
        it (`_prefetches`)."""
        if not self._states:
            raise LvrError("no prompt: call start_raw or start_chat first")
        live = [i for i, ok in enumerate(self._live) if ok]
        states = [self._state(i) for i in live]
        decodes = [s.needs_model for s in states]
        ahead = self._prefetches(states, decodes) if prefetch else [None] * len(states)
        rows = self.scheduler.map_decoding(
            _next_distribution,
            list(zip(states, ahead, strict=True)),
            [self.members[i] for i in live],
            [d or a is not None for d, a in zip(decodes, ahead, strict=True)],
        )
        logq = np.full((len(self.members), self._phase_sub.size), -np.inf)
        logq[live] = rows
        return logq

    def _prefetches(
        self, states: Sequence[PieceModel], decodes: Sequence[bool]
    ) -> list[TokenPrefix | None]:
        """Over bytes, members' tokens end at different bytes, so a step often has one
        member decoding while the others' cores wait. Each waiting member then scores
        the fresh node its likeliest waiting token will make (ReducedState.prefetch),
        so that its own later pass is answered from the cache: two passes at once
        instead of one after the other. A guess the text rules out is released unused.
        Only over bytes (docs/algorithm.md §7.4) and when the members decode at once."""
        none: list[TokenPrefix | None] = [None] * len(states)
        if not self.concurrent or sum(decodes) != 1 or self.sub.kind != "bytes":
            return none
        return [
            s.likely_next_prefix() if not d and isinstance(s, ReducedState) else None
            for s, d in zip(states, decodes, strict=True)
        ]

    def mix_weights(self, logq: np.ndarray | None = None) -> np.ndarray:
        """The weights the rule uses for the next piece, one per member (0 for a member
        out of this generation): the posterior under bayes, else the configured weights
        normalised (product exponents calibrated unless asked not to). Given the step's
        rows `logq`, base members first defer to the surest chat member (Mixing.defer;
        core/combine.py, `deferred`)."""
        if self.rule == "bayes" and self._posterior is not None:
            return self._posterior.weights
        live = [m.weight if ok else 0.0 for m, ok in zip(self.members, self._live, strict=True)]
        if logq is not None:
            leads = [ok and m.leads for m, ok in zip(self.members, self._live, strict=True)]
            live = deferred(live, logq, leads, self.mixing.defer)
        return mixing_weights(live, self.mixing)

    def step_weights(self) -> np.ndarray:
        """For front ends that show them: the weights the rule used at the last step
        (base members' deferral included), or the posterior now under bayes; before
        any step, `mix_weights()`."""
        last = self._step_weights
        return last if last is not None and self.rule != "bayes" else self.mix_weights()

    def combined(self, logq: np.ndarray) -> np.ndarray:
        """The ensemble's next-piece log-distribution from the members' rows `logq`
        (one per member): the rule over the members taking part with nonzero weight,
        END from those that can end a turn (core/combine.py, `combine`). Where their
        supports do not meet, the chat members take the step alone (§7.6)."""
        w = self.mix_weights(logq)
        active = [i for i in range(len(self.members)) if self._live[i] and w[i] != 0]
        if not active:
            raise LvrError("every model is disabled, has weight 0, or cannot follow the text")
        try:
            logp = combine(logq[active], w[active], self.rule, [self._can_end[i] for i in active])
        except NoPieceError:
            w, logp = self._leads_alone(logq, w, active)
        self._step_weights = w
        return logp

    def _leads_alone(
        self, logq: np.ndarray, w: np.ndarray, active: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The step when the members' supports do not meet: the chat members' rule
        alone, the base members' weights 0 for it. A base member's kept branches then
        come back or it leaves the reply, as for any piece it cannot spell (§4). With no
        base member taking part there is nobody to set aside: the error stands."""
        leads = [i for i in active if self.members[i].leads]
        if not leads or len(leads) == len(active):
            raise NoPieceError()
        alone = np.zeros_like(w)
        alone[leads] = mixing_weights(w[leads], self.mixing)
        return alone, combine(logq[leads], alone[leads], self.rule)

    def step(
        self, choose: Callable[[np.ndarray], int], index: int = 0, top_n: int = 0
    ) -> PieceEvent:
        """One piece: combine, choose, advance every member. With top_n > 0 the event
        also lists the top_n most likely pieces (an API's top logprobs)."""
        logq = self.distributions(prefetch=True)
        logp = self.combined(logq)
        alternatives = top_pieces(self._phase_sub, logp, top_n)
        event = self._advance(choose(logp), logq, logp, index)
        return replace(event, alternatives=alternatives) if alternatives else event

    def force(self, piece: int, index: int = 0, ahead: Sequence[int] | None = None) -> PieceEvent:
        """Advance by a given piece (scoring a text), reporting its probabilities.
        `ahead`: the pieces known to follow (the rest of the text), so that pruning keeps
        the branches that can spell them (docs/algorithm.md §4)."""
        logq = self.distributions()
        return self._advance(piece, logq, self.combined(logq), index, ahead)

    def _advance(
        self,
        piece: int,
        logq: np.ndarray,
        logp: np.ndarray,
        index: int,
        ahead: Sequence[int] | None = None,
    ) -> PieceEvent:
        sub = self._phase_sub
        member_logq, pruned, left, revived = self._advance_members(piece, logq[:, piece], ahead)
        if logp[piece] == -np.inf:  # a forced piece only revived branches could spell
            if not any(self._live):
                raise LvrError(
                    f"piece {index} of the text, {sub.piece_bytes(piece)!r}, has probability "
                    "0 under every model: no model can spell the text there"
                )
            logq = logq.copy()
            logq[:, piece] = member_logq
            logp = self.combined(logq)
        mix = self.step_weights()  # those `logp` was combined with (bayes: not yet updated)
        if self._posterior is not None:
            self._posterior.update(member_logq)
        event = PieceEvent(
            index=index,
            piece=piece,
            text=sub.piece_bytes(piece),
            logprob=float(logp[piece]),
            member_logprobs=tuple(float(x) for x in member_logq),
            weights=tuple(self.weights),
            mix_weights=tuple(float(x) for x in mix),
            dominant=dominant_model(logq, mix, piece),
            pruned_fraction=tuple(pruned),
            byte_level=sub is not self.sub,
            left=tuple(left),
            revived=tuple(revived),
        )
        if piece != sub.end_id:
            self._maybe_leave_byte_phase()
        return event

    def _advance_members(
        self, piece: int, member_logq: np.ndarray, ahead: Sequence[int] | None
    ) -> tuple[np.ndarray, list[float], list[int], list[int]]:
        """Advance every live member by `piece`. One whose alive branches give it no
        probability tries its recently pruned ones (the state revives them); one that
        still cannot spell it leaves this generation. Returns each member's log q of the
        piece (for a revived one, what its revived branches give), the share each
        pruned, and who left and who revived."""
        member_logq = member_logq.copy()
        pruned = [0.0] * len(self.members)
        left: list[int] = []
        revived: list[int] = []
        for i, state in enumerate(self._states):
            if state is None or not self._live[i]:
                continue
            log_q_before = state.log_Q
            try:
                state.advance(piece, ahead)
            except ImpossiblePieceError:
                self._live[i] = False  # it cannot spell this text: it leaves this generation
                left.append(i)
                continue
            if member_logq[i] == -np.inf:
                member_logq[i] = state.log_Q - log_q_before
                revived.append(i)
            pruned[i] = state.last_pruned_fraction
        return member_logq, pruned, left, revived

    def pruned_mass(self) -> list[float]:
        """Each member's probability mass dropped by pruning (or token top-K) so far."""
        return [float(np.exp(s.log_pruned)) if s else 0.0 for s in self._states]

    @property
    def live(self) -> list[bool]:
        """Which members still follow this generation (enabled, and able to spell it)."""
        return list(self._live)

    @property
    def phase_sub(self) -> SubVocabulary:
        """The sub-vocabulary of the next piece: bytes during the byte-level phase."""
        return self._phase_sub

    @property
    def end_id(self) -> int:
        return self._phase_sub.end_id

    def piece_id(self, piece: bytes) -> int | None:
        return self._phase_sub.piece_id(piece)

    # ----------------------------------------------------------------- teardown

    def _close_states(self) -> None:
        for state in self._states:
            if state is not None:
                state.close()
        self._states = []

    def close(self) -> None:
        """Release every branch (the members' models stay loaded: their owner frees them)."""
        self._close_states()
        self.scheduler.close()


def _next_distribution(item: tuple[PieceModel, TokenPrefix | None]) -> np.ndarray:
    """A member's next-piece distribution, after prefetching `ahead` when given."""
    state, ahead = item
    if ahead is not None and isinstance(state, ReducedState):
        state.prefetch(ahead)
    return state.next_piece_logprobs()


def top_pieces(sub: SubVocabulary, logp: np.ndarray, n: int) -> tuple[tuple[bytes, float], ...]:
    """The n most likely pieces of `logp` with their log-probabilities, most likely first
    (impossible pieces left out). A partial sort: O(size) whatever n."""
    n = min(n, len(logp))
    if n <= 0:
        return ()
    top = np.argpartition(logp, -n)[-n:]
    top = top[np.argsort(-logp[top], kind="stable")]
    return tuple((sub.piece_bytes(int(i)), float(logp[i])) for i in top if logp[i] > -np.inf)


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise LvrError(f"unknown {what} '{value}': expected one of {', '.join(allowed)}")
