"""The reduced model: one language model seen through a sub-vocabulary (docs/algorithm.md §2-3).

A `ReducedState` follows a growing piece sequence u. It keeps the *aligned nodes*: token
prefixes w whose pieces are exactly u[:j], with log P(w). A node at the newest boundary
(j = len(u)) is *fresh*: once the model has scored it, every token sends its probability
to its first piece (node_scoring.py). An older node is *pending*: it keeps only the few
tokens whose pieces still match u[j:] and go further, and sends their probability to
their next piece. The nodes' contributions sum to Q(u s) for every piece s, whence
q(s | u) = Q(u s) / Q(u).

Control tokens (no bytes, not END) never receive mass: each next-token distribution is
conditioned on the tokens that have bytes or are END. A piece sequence cannot express a
chat marker in mid-text, so this is the only reading of the model it can follow.

Pruning compares each node's *share* of Q(u) (docs/algorithm.md §4); all dropped probability
(pruned nodes and, with top-K, cut tokens) is summed in `log_pruned`. The kept nodes are
a subset of the exact cover, so `log_Q` is a lower bound and
0 <= Q(u) - exp(log_Q) <= exp(log_pruned).

Pruned branches are not forgotten at once: the nodes dropped in the last
`DORMANT_WINDOW` advances stay as *dormant* records (a token prefix and its log mass; a
pending node's few waiting tokens). When a piece comes that no alive node can spell (an
ensemble chose it because another member likes it), the dormant nodes are replayed along
the pieces that followed them and those that can spell it come back (docs/algorithm.md
§4), instead of the model leaving the generation.

A model's memory bounds the branches too: when it cannot hold the fresh nodes to be
scored beside the alive ones (`ModelMemoryFull`: a degenerate text such as "1, 1, 1, ..."
keeps many tokenizations alive, each with its own long KV history), the state keeps the
larger half of its nodes by share, counts the rest in `log_pruned` like any pruning, and
asks again (`_shed_branches`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lvr_local.core.decompose import DecompositionTables
from lvr_local.core.lm import ModelMemoryFull, NextTokenModel, TokenPrefix
from lvr_local.core.logspace import (
    grouped_logsumexp,
    log1mexp,
    logsumexp,
    logsumexp_array,
)
from lvr_local.core.node_scoring import PRECISIONS, NodeScorer, Scored
from lvr_local.core.repetition import TokenRepetition
from lvr_local.core.sampling import SamplingParams
from lvr_local.errors import InternalError, LvrError

NEG_INF = float("-inf")
DEFAULT_PRUNE = 1e-4
# Known text (scoring, forced prompt tails): a branch of tiny share now can carry much of
# the text later (measured: 1e-4 lost 0.9 nats on 100 bytes of English, 1e-8 0.003).
DEFAULT_TEXT_PRUNE = 1e-8
# Generation: a fresh node (a forward pass) must carry this share of Q(u) to be kept.
DEFAULT_FRESH_PRUNE = 1e-2
DEFAULT_MAX_BRANCHES = 16
# How many advances back a pruned branch can still be revived, and how many pruned nodes
# of one advance are kept for it (the largest shares).
DORMANT_WINDOW = 8
DORMANT_PER_ADVANCE = 16
# A waiting token is scored ahead of time (`prefetch`) only when it carries at least
# this share of Q(u): a wrong guess costs a forward pass.
PREFETCH_MIN_SHARE = 0.5


class ImpossiblePieceError(LvrError):
    """The model gives this piece no probability after the current pieces (every way of
    spelling it was pruned, cut by top-K, or does not exist). The state is unchanged."""


class PieceModel(Protocol):
    """What an ensemble drives: the reduced engine and the naive baseline alike.

    `synchronised`: no token straddles the current position (docs/algorithm.md §6).
    `log_pruned`: log of all probability mass dropped so far; `last_pruned_fraction`:
    the share of Q(u) the last advance dropped (docs/algorithm.md §4)."""

    pieces: list[int]
    log_Q: float
    log_pruned: float
    last_pruned_fraction: float
    finished: bool

    @property
    def synchronised(self) -> bool: ...

    def hand_over(self) -> list[tuple[TokenPrefix, float]]: ...

    @property
    def needs_model(self) -> bool: ...

    def next_piece_logprobs(self) -> np.ndarray: ...

    def advance(self, piece: int, ahead: Sequence[int] | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """`prune`: drop nodes whose share of Q(u) is below this fraction. 0 keeps every node,
    which is exact but can keep exponentially many tokenizations alive (each byte-fallback
    duplicate of a token doubles them). The default 1e-4 serves generation: it cut
    forward-pass rows per byte 3.1-3.5x against 1e-6. It bounds the error of the next
    piece's distribution, not of a known text's probability (docs/algorithm.md §4).
    `text_prune`: the same threshold when the text ahead is known (scoring, forced prompt
    tails), over the mass that can still spell it (docs/algorithm.md §4).
    `token_top_k`: K-LVR (docs/algorithm.md §5), keep only the K most likely tokens of
    each scored node (None or 0: all tokens). `precision`: of the full-vocabulary exp,
    "float32" (~1e-7 relative, the default) or "float64" (see node_scoring.py).
    `max_branches`: keep at most this many alive nodes (tokenization branches), the
    largest shares (None or 0: no cap);
    what it drops is counted in the pruned mass like what `prune` drops.
    `fresh_prune`: in generation, the threshold for a *fresh* node, the one kind that
    costs a forward pass (None: `prune`); the ensemble sets it over bytes only
    (`Ensemble._new_state`). Over bytes a token ends at nearly every byte
    of some tokenization, and most of those fresh nodes carry a tiny share; a higher
    threshold for them alone halves the forward passes while pending nodes, which cost
    only numpy, keep `prune` (docs/algorithm.md §7.4).
    `token_sampling`: in sampled generation, llama.cpp's sampler (top-k, top-p, min-p,
    temperature) applied to each scored node's own tokens, the reduced model then being
    that sampler's (node_scoring.py; docs/algorithm.md §7.5). None: the model as it is."""

    prune: float = DEFAULT_PRUNE
    text_prune: float = DEFAULT_TEXT_PRUNE
    token_top_k: int | None = None
    precision: str = "float32"
    max_branches: int | None = DEFAULT_MAX_BRANCHES
    fresh_prune: float | None = None
    token_sampling: SamplingParams | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune < 1.0:
            raise LvrError(f"prune must be in [0, 1), got {self.prune}")
        if not 0.0 <= self.text_prune < 1.0:
            raise LvrError(f"text_prune must be in [0, 1), got {self.text_prune}")
        if self.fresh_prune is not None and not 0.0 <= self.fresh_prune < 1.0:
            raise LvrError(f"fresh_prune must be in [0, 1), got {self.fresh_prune}")
        if self.token_top_k is not None and self.token_top_k < 0:
            raise LvrError(f"token_top_k must be >= 0 (0 = off), got {self.token_top_k}")
        if self.max_branches is not None and self.max_branches < 0:
            raise LvrError(f"max_branches must be >= 0 (0 = no cap), got {self.max_branches}")
        if self.precision not in PRECISIONS:
            raise LvrError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(eq=False)
class FreshNode:
    """d(prefix) is all of u; scored once by the model. Once u grows, the node lives on
    only as the origin of pending nodes, and its full-vocabulary data is dropped."""

    prefix: TokenPrefix
    log_p: float
    scored: Scored | None = None
    asked: bool = False  # the model has scored this prefix (so it must be released)

    @property
    def log_share(self) -> float:
        return self.log_p + (self.scored.log_kept if self.scored else 0.0)


@dataclass(eq=False)
class PendingNode:
    """The node `origin` (scored when it was fresh, at `boundary`) waiting inside tokens:
    `tokens` are those whose pieces begin with u[boundary:] (`depth` pieces) and go
    further, with their log p(v | prefix) and their next piece (the one at `depth`)."""

    origin: FreshNode
    boundary: int
    depth: int
    tokens: np.ndarray
    token_logp: np.ndarray
    next_piece: np.ndarray
    log_share: float = field(init=False)

    def __post_init__(self) -> None:
        self.log_share = self.log_p + logsumexp_array(self.token_logp)

    @property
    def prefix(self) -> TokenPrefix:
        return self.origin.prefix

    @property
    def log_p(self) -> float:
        return self.origin.log_p


@dataclass(frozen=True)
class NodeView:
    """A read-only summary of one aligned node, for reports and tests."""

    prefix: TokenPrefix
    boundary: int
    log_p: float
    log_share: float
    pending: bool


@dataclass
class Dormant:
    """The nodes one advance pruned, kept to be revived: fresh ones at boundary `length`
    (never scored: a prefix and a log mass) and pending ones whose tokens reach it."""

    length: int
    fresh: list[FreshNode]
    pending: list[PendingNode]


class ReducedState:
    """One model's reduced next-piece distribution along a piece sequence it is fed."""

    def __init__(
        self,
        model: NextTokenModel,
        tables: DecompositionTables,
        options: EngineOptions | None = None,
        scorer: NodeScorer | None = None,
        start: Sequence[tuple[TokenPrefix, float]] = (((), 0.0),),
        repetition: TokenRepetition | None = None,
    ) -> None:
        """`start`: the aligned nodes (token prefix, log P) to begin from: the prompt
        itself by default, or the nodes handed over by another state (`hand_over`).
        `repetition`: with `options.token_sampling`, the sampler's penalties on each
        scored node's tokens, from its token prefix (docs/algorithm.md §7.5)."""
        if not start:
            raise LvrError("a reduced state needs at least one start node")
        if model.n_vocab != tables.n_vocab:
            raise LvrError(f"model has {model.n_vocab} tokens but its tables have {tables.n_vocab}")
        self.model = model
        self.tables = tables
        self.options = options or EngineOptions()
        self.scorer = scorer or NodeScorer(
            tables, self.options.token_top_k, self.options.precision, self.options.token_sampling
        )
        self.repetition = repetition if self.options.token_sampling is not None else None
        self.pieces: list[int] = []
        self.log_Q = logsumexp([lp for _, lp in start])  # log Q(u), from the nodes kept alive
        self.log_pruned = NEG_INF  # log of all probability mass dropped so far
        self.last_pruned_fraction = 0.0  # share of Q(u) dropped by the last advance
        self.revived = 0  # advances that needed pruned branches back
        self.finished = False
        self._fresh: list[FreshNode] = [FreshNode(prefix, log_p) for prefix, log_p in start]
        self._pending: list[PendingNode] = []
        self._to_release: list[TokenPrefix] = []
        self._dormant: list[Dormant] = []
        self._logq: np.ndarray | None = None
        self._prefetched: set[TokenPrefix] = set()  # asked ahead of time, not yet fresh
        self.prefetches = 0
        self.prefetch_hits = 0  # prefetched prefixes that became fresh nodes

    # ----------------------------------------------------------------- public interface

    @property
    def synchronised(self) -> bool:
        """No token straddles the current position: every alive node is aligned with
        all of u, so what follows does not depend on how u was split into pieces."""
        return not self._pending

    def hand_over(self) -> list[tuple[TokenPrefix, float]]:
        """The aligned nodes, for a new state over another sub-vocabulary to start from.
        Only when synchronised; this state is left empty and releases nothing of them."""
        if not self.synchronised:
            raise InternalError("a state can only be handed over when synchronised")
        self._drop_prefetched()
        self._flush_releases()
        nodes = [(f.prefix, f.log_p) for f in self._fresh]
        self._fresh, self._dormant = [], []
        return nodes

    @property
    def needs_model(self) -> bool:
        """Whether the next distribution costs a forward pass (a fresh node not yet
        scored): the ensemble gives the cores to the members that decode."""
        return self._logq is None and any(f.scored is None for f in self._fresh)

    def likely_next_prefix(self) -> TokenPrefix | None:
        """The prefix of the fresh node that the most likely waiting token makes once its
        bytes are all written, when that token carries at least PREFETCH_MIN_SHARE of
        Q(u); None otherwise, or while a fresh node still needs the model. Over bytes a
        member decodes where its tokens end, and another member's tokens end elsewhere:
        scoring this prefix ahead, beside the other's decode, pairs the two passes."""
        if self.finished or not self._pending or self.needs_model:
            return None
        best = max(self._pending, key=lambda p: p.log_share)
        i = int(np.argmax(best.token_logp))
        if best.log_p + float(best.token_logp[i]) - self.log_Q < math.log(PREFETCH_MIN_SHARE):
            return None
        prefix = (*best.prefix, int(best.tokens[i]))
        return None if prefix in self._prefetched else prefix

    def prefetch(self, prefix: TokenPrefix) -> None:
        """Have the model score `prefix` now; it keeps the row while the prefix is alive,
        so the fresh node it becomes is answered without a forward pass. Released as
        soon as the text rules it out (`_settle_prefetched`). Never required: a model
        without room simply does not prefetch."""
        try:
            self.model.next_logits([prefix])
        except ModelMemoryFull:
            self._to_release.append(prefix)
            return
        self._prefetched.add(prefix)
        self.prefetches += 1

    def _settle_prefetched(self) -> None:
        """After an advance: a prefetched prefix that became a fresh node is that node's
        now; one whose token is no longer waiting will never be asked for: release it."""
        if not self._prefetched:
            return
        fresh = {f.prefix for f in self._fresh}
        for prefix in list(self._prefetched):
            if prefix in fresh:
                self.prefetch_hits += 1
            elif any(
                p.prefix == prefix[:-1] and bool(np.any(p.tokens == prefix[-1]))
                for p in self._pending
            ):
                continue  # still waiting for its last bytes
            else:
                self._to_release.append(prefix)
            self._prefetched.discard(prefix)

    def _drop_prefetched(self) -> None:
        self._to_release += list(self._prefetched)
        self._prefetched.clear()

    @property
    def sub_size(self) -> int:
        return self.tables.n_symbols

    def nodes(self) -> list[NodeView]:
        k = len(self.pieces)
        return [NodeView(f.prefix, k, f.log_p, f.log_share, False) for f in self._fresh] + [
            NodeView(p.prefix, p.boundary, p.log_p, p.log_share, True) for p in self._pending
        ]

    def next_piece_logprobs(self) -> np.ndarray:
        """log q(s | u) for every piece s (END last); -inf for impossible pieces. The
        array is read-only and shared until the next advance."""
        self._check_open()
        if self._logq is None:
            self._score_fresh_nodes()
            self._logq = self._combine()
            self._logq.flags.writeable = False
        return self._logq

    def advance(self, piece: int, ahead: Sequence[int] | None = None) -> None:
        """Append `piece` to u. When no alive node can produce it, the dormant (recently
        pruned) nodes that can are revived; raises ImpossiblePieceError, leaving the alive
        nodes unchanged, when none can either.

        `ahead`: when the text is known (scoring, a forced prompt tail), the pieces that
        follow this one. Pruning then serves that text (docs/algorithm.md §4): shares are
        of the mass that can still spell it (`text_prune`, then the cap on alive
        branches), so the branches that can are not crowded out by ones that will die.
        Nodes that cannot spell it stay: they cost no forward pass and die by themselves,
        and each q stays the model's exact conditional."""
        self._check_open()
        piece = operator.index(piece)
        if not 0 <= piece < self.sub_size:
            raise LvrError(f"piece id {piece} is outside the sub-vocabulary 0..{self.sub_size - 1}")
        self._score_fresh_nodes()
        k = len(self.pieces)
        fresh, pending = self._successors(self._fresh, self._pending, piece, k)
        reviving = not fresh and not pending and bool(self._dormant)
        revived: list[FreshNode] = []
        if reviving:
            fresh, pending, revived = self._revive(piece)
        total = logsumexp([n.log_share for n in fresh] + [n.log_share for n in pending])
        if total == NEG_INF:
            self._retire(set(revived))  # the replay's nodes: of no use now
            self._flush_releases()
            name = "END" if piece == self.tables.sub.end_id else repr(self.tables.sub.pieces[piece])
            raise ImpossiblePieceError(f"piece {name} has probability 0 here")
        if ahead is None:
            kept = self._prune_by_share(fresh, pending, total)
            self._remember(k + 1, fresh, pending, kept)
        else:
            kept = self._prune_for_text(fresh, pending, np.asarray(ahead, np.int64))
        log_kept = logsumexp([n.log_share for n in kept[0]] + [n.log_share for n in kept[1]])
        self._commit(piece, *kept, log_kept, total)
        if reviving:
            self.revived += 1
            alive = self._alive_origins()
            self._retire({n for n in revived if n not in alive})

    def _prune_by_share(
        self, fresh: list[FreshNode], pending: list[PendingNode], total: float
    ) -> tuple[list[FreshNode], list[PendingNode]]:
        """Drop nodes whose share of Q is below the threshold (`fresh_prune` for fresh
        nodes, which cost a forward pass; `prune` for pending ones), then all but the
        largest `max_branches` shares."""
        options = self.options
        floor = _log_floor(total, options.prune)
        fresh_floor = (
            floor if options.fresh_prune is None else _log_floor(total, options.fresh_prune)
        )
        cap = options.max_branches
        if cap and len(fresh) + len(pending) > cap:
            # Alternative tokenizations that split early keep their relative share for
            # ever, so without a cap their number (and forward passes) grows with the text.
            shares = [n.log_share for n in fresh] + [n.log_share for n in pending]
            floor = max(floor, sorted(shares, reverse=True)[cap - 1])
            fresh_floor = max(fresh_floor, floor)
        if floor == NEG_INF and fresh_floor == NEG_INF:
            return fresh, pending
        kept_fresh = [n for n in fresh if n.log_share >= fresh_floor]
        kept_pending = [n for n in pending if n.log_share >= floor]
        if not kept_fresh and not kept_pending:  # many small fresh nodes: keep the largest
            kept_fresh = [max(fresh, key=lambda n: n.log_share)]
        return kept_fresh, kept_pending

    def _prune_for_text(
        self, fresh: list[FreshNode], pending: list[PendingNode], ahead: np.ndarray
    ) -> tuple[list[FreshNode], list[PendingNode]]:
        """Keep every node that cannot spell the text ahead (free, exact) and, of those
        that can, the ones whose mass that can is at least `text_prune` of the total,
        at most `max_branches`. The largest always stays: support is never lost."""
        values = [f.log_share for f in fresh] + [self._spelling_mass(p, ahead) for p in pending]
        able = [v for v in values if v > NEG_INF]
        cap = self.options.max_branches
        floor = sorted(able, reverse=True)[cap - 1] if cap and len(able) > cap else NEG_INF
        if self.options.text_prune > 0.0 and able:
            floor = max(floor, logsumexp(able) + math.log(self.options.text_prune))
        keep = [v == NEG_INF or v >= floor for v in values]
        return (
            [n for n, k in zip(fresh, keep[: len(fresh)], strict=True) if k],
            [n for n, k in zip(pending, keep[len(fresh) :], strict=True) if k],
        )

    def _spelling_mass(self, node: PendingNode, ahead: np.ndarray) -> float:
        """log of the mass of the node's tokens that can still spell `ahead`."""
        ok = self.tables.agree(node.tokens, node.depth, ahead)
        if not ok.any():
            return NEG_INF
        return node.log_p + logsumexp_array(node.token_logp[ok])

    # ----------------------------------------------------------------- dormant nodes

    def _remember(
        self,
        length: int,
        fresh: list[FreshNode],
        pending: list[PendingNode],
        kept: tuple[list[FreshNode], list[PendingNode]],
    ) -> None:
        """Keep the largest nodes this advance pruned as dormant records, and forget the
        records older than the window."""
        alive = {*kept[0], *kept[1]}  # nodes compare by identity
        dropped = [n for n in [*fresh, *pending] if n not in alive]
        dropped.sort(key=lambda n: n.log_share, reverse=True)
        dropped = dropped[:DORMANT_PER_ADVANCE]
        self._dormant = [d for d in self._dormant if d.length > length - DORMANT_WINDOW]
        if not dropped:
            return
        self._dormant.append(
            Dormant(
                length,
                [n for n in dropped if isinstance(n, FreshNode)],
                [n for n in dropped if isinstance(n, PendingNode)],
            )
        )

    def _revive(self, piece: int) -> tuple[list[FreshNode], list[PendingNode], list[FreshNode]]:
        """The successors of `piece` grown from the dormant records: replayed, oldest
        first, along the pieces that followed their pruning (a model call per piece for
        the fresh nodes on the way; pending ones that cannot spell the rest die). Returns
        them and the nodes scored for it."""
        target = [*self.pieces, piece]
        records = sorted(self._dormant, key=lambda d: d.length)
        self._dormant = []
        fresh: list[FreshNode] = []
        pending: list[PendingNode] = []
        scored: list[FreshNode] = []
        for k in range(records[0].length, len(target)):
            for record in records:
                if record.length == k:
                    fresh, pending = fresh + record.fresh, pending + record.pending
            todo = [f for f in fresh if f.scored is None]
            self._score(todo)
            scored += todo
            fresh, pending = self._successors(fresh, pending, target[k], k)
            if k + 1 < len(target):  # drop only what cannot spell the rest
                ahead = np.asarray(target[k + 1 :], np.int64)
                pending = [p for p in pending if self._spelling_mass(p, ahead) > NEG_INF]
        return fresh, pending, scored

    def close(self) -> None:
        """Tell the model that no alive node will be extended any more."""
        self._retire(self._alive_origins())
        self._drop_prefetched()
        self._fresh, self._pending, self._dormant = [], [], []
        self._flush_releases()

    # ----------------------------------------------------------------- scoring

    def _score_fresh_nodes(self) -> None:
        """Score every unscored fresh node in ONE model call, then free dropped prefixes
        (after the call, so that the backend can still extend them). When the model's
        memory cannot hold them all, shed branches until it can."""
        while True:
            try:
                self._score([f for f in self._fresh if f.scored is None])
                break
            except ModelMemoryFull:
                if self._prefetched:  # guesses go first
                    self._drop_prefetched()
                    self._flush_releases()
                elif not self._shed_branches():
                    raise
        self._flush_releases()

    def _shed_branches(self) -> bool:
        """Keep the larger half of the alive nodes by share and release the rest (their
        mass counts as pruned; q is renormalised over the kept nodes, as after any
        pruning). False when a single node is left: then nothing can be shed."""
        nodes: list[FreshNode | PendingNode] = [*self._fresh, *self._pending]
        if len(nodes) < 2:
            return False
        nodes.sort(key=lambda n: n.log_share, reverse=True)
        kept = nodes[: len(nodes) // 2]
        total = logsumexp([n.log_share for n in nodes])
        log_kept = logsumexp([n.log_share for n in kept])
        self._add_pruned(total + log1mexp(log_kept - total))
        self.log_Q += log_kept - total
        before = self._alive_origins()
        # Fresh nodes asked for in the failed call are alive in the model though not
        # scored: release every dropped one.
        self._to_release += [n.prefix for n in self._fresh if n not in kept]
        self._fresh = [n for n in self._fresh if n in kept]
        self._pending = [n for n in self._pending if n in kept]
        self._retire(before - self._alive_origins())
        self._flush_releases()
        return True

    def _score(self, todo: list[FreshNode]) -> None:
        if not todo:
            return
        rows = self.model.next_logits([f.prefix for f in todo])
        if len(rows) != len(todo):
            raise InternalError(f"model returned {len(rows)} rows for {len(todo)} prefixes")
        for node, row in zip(todo, rows, strict=True):
            if self.repetition is not None:
                row = self.repetition.apply(row, node.prefix)
            node.scored = self.scorer.score(row)
            node.asked = True
            if node.scored.log_kept < 0.0:  # top-K cut: that mass is gone for good
                self._add_pruned(node.log_p + log1mexp(node.scored.log_kept))

    def _combine(self) -> np.ndarray:
        """q(. | u): the nodes' contributions, each weighted by its share of Q(u)."""
        total = logsumexp([f.log_share for f in self._fresh] + [p.log_share for p in self._pending])
        if total == NEG_INF:
            return np.full(self.sub_size, NEG_INF)  # every continuation was cut
        logq = None
        for f in self._fresh:
            assert f.scored is not None
            own = f.scored.piece_logq  # owned by this node, used once: updated in place
            if f.log_share != total:
                own += f.log_share - total
            logq = own if logq is None else np.logaddexp(logq, own, out=logq)
        if logq is None:
            logq = np.full(self.sub_size, NEG_INF)
        if self._pending:
            pieces, log_mass = self._pending_masses()
            logq[pieces] = np.logaddexp(logq[pieces], log_mass - total)
        return logq

    def _pending_masses(self) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-mass per next piece over all pending nodes."""
        nxt = np.concatenate([p.next_piece for p in self._pending])
        vals = np.concatenate([p.log_p + p.token_logp for p in self._pending])
        return grouped_logsumexp(nxt, vals)  # ~100k tokens wait after a byte-level root

    # ----------------------------------------------------------------- advancing

    def _successors(
        self, fresh_now: list[FreshNode], pending_now: list[PendingNode], piece: int, k: int
    ) -> tuple[list[FreshNode], list[PendingNode]]:
        """The nodes after appending `piece` at position k to those given (scored): new
        fresh nodes (tokens completed exactly) and pending nodes whose tokens still match
        and go further."""
        tables = self.tables
        singles, multis = tables.singles(piece), tables.multis(piece)
        fresh: list[FreshNode] = []
        pending: list[PendingNode] = []
        for f in fresh_now:
            assert f.scored is not None
            fresh += _extend(f.prefix, f.log_p, singles, f.scored.token_logp(singles))
            if len(multis):
                logp = f.scored.token_logp(multis)
                live = logp > NEG_INF
                if live.any():
                    waiting = multis[live]
                    nxt = tables.piece_at(waiting, 1)
                    pending.append(PendingNode(f, k, 1, waiting, logp[live], nxt))
        for p in pending_now:
            match = p.next_piece == piece
            if not match.any():
                continue
            tokens, logp = p.tokens[match], p.token_logp[match]
            done = tables.n_pieces[tokens] == p.depth + 1
            fresh += _extend(p.prefix, p.log_p, tokens[done], logp[done])
            if not done.all():
                go_on = ~done
                waiting, depth = tokens[go_on], p.depth + 1
                nxt = tables.piece_at(waiting, depth)
                pending.append(PendingNode(p.origin, p.boundary, depth, waiting, logp[go_on], nxt))
        return fresh, pending

    def _commit(
        self,
        piece: int,
        fresh: list[FreshNode],
        pending: list[PendingNode],
        log_kept: float,
        log_total: float,
    ) -> None:
        before = self._alive_origins()
        for old in self._fresh:
            old.scored = None  # pending successors kept what they need
        self.pieces.append(piece)
        self.last_pruned_fraction = -math.expm1(log_kept - log_total)
        if log_kept < log_total:
            self._add_pruned(log_total + log1mexp(log_kept - log_total))
        self.log_Q = log_kept
        self._logq = None
        if piece == self.tables.sub.end_id:
            self.finished = True  # nothing follows END: no node is scored again
            fresh, pending = [], []
        self._fresh, self._pending = fresh, pending
        self._retire(before - self._alive_origins())
        self._settle_prefetched()
        if self.finished:
            self._flush_releases()

    # ----------------------------------------------------------------- bookkeeping

    def _add_pruned(self, log_mass: float) -> None:
        self.log_pruned = logsumexp([self.log_pruned, log_mass])

    def _alive_origins(self) -> set[FreshNode]:
        """The scored-or-not fresh nodes whose prefix some alive node still stands on
        (compared by identity: hashing long prefixes would cost O(length))."""
        return set(self._fresh) | {p.origin for p in self._pending}

    def _retire(self, origins: set[FreshNode]) -> None:
        """Queue for release the prefixes of these nodes that the model has scored."""
        self._to_release += [n.prefix for n in origins if n.asked]

    def _flush_releases(self) -> None:
        if self._to_release:
            self.model.release(self._to_release)
            self._to_release = []

    def _check_open(self) -> None:
        if self.finished:
            raise LvrError("END was emitted: this reduced state cannot continue")


def _extend(
    prefix: TokenPrefix, log_p: float, tokens: np.ndarray, logp: np.ndarray
) -> list[FreshNode]:
    """New fresh nodes prefix + (v,) for the tokens of nonzero probability."""
    return [
        FreshNode((*prefix, v), log_p + lp)
        for v, lp in zip(tokens.tolist(), logp.tolist(), strict=True)
        if lp > NEG_INF
    ]


def _log_floor(log_total: float, fraction: float) -> float:
    """log(fraction * total); -inf (keep everything) for a fraction of 0."""
    return log_total + math.log(fraction) if fraction > 0.0 else NEG_INF
