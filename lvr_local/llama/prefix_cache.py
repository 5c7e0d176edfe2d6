"""The prefix cache: a trie of token prefixes mapped onto llama.cpp sequences.

Words used below:
- node: one token prefix after the prompt, in a trie whose root is the prompt itself.
  A node may hold the logits row computed after it; rows are kept only while the node
  is *alive* (requested and not yet released), the root's row for the prompt's lifetime.
- sequence: a llama.cpp sequence id. `_paths[s]` mirrors what its KV cells hold beyond
  the prompt: `_paths[s][i]` is the cell at depth i + 1 (position n_prompt + i).
  Every sequence holds the whole prompt.
- cell: one evaluated token in the KV cache. `llama_memory_seq_cp` shares cells, it does
  not duplicate them, so two sequences copied from each other hold the *same* Cell
  objects up to the copy point; that identity is what the cell count relies on.

The cache decides, the memory (a llama.cpp context) obeys: `plan` issues the sequence
copies and trims at once and returns the tokens to decode; the backend decodes them and
`commit`s them. One sequence, `home`, is never evicted: it keeps the prompt and the
latest path between calls so that the next prompt can reuse them.

Append-only mode (the backend's exact numerics): freed cells are never reused. Before a
sequence lets go of cells, a reserved *pin* sequence takes them over, so llama.cpp
places every new token after all cells in use, and each sequence's cells stay in
position order, whatever was branched, released or evicted before. That order is what
makes a row equal a fresh evaluation bit for bit (llama.cpp's CPU flash attention adds
a token's cells up in buffer order). When the cells run out, the backend clears the
whole memory and starts again from the prompt (`forget_cells`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import numpy as np

from lvr_local.core.lm import TokenPrefix
from lvr_local.errors import LvrError

RECENT_RELEASED = 64  # released prefixes remembered, to find their children without a walk
SWEEP_MIN = 4096  # new nodes between two sweeps of the trie, at least


class KvMemory(Protocol):
    """The sequence edits the cache needs (positions [p0, p1), p1 < 0: to the end)."""

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool: ...


class Node:
    """One token prefix. Identity matters: nodes are compared with `is`."""

    __slots__ = ("alive", "children", "depth", "parent", "row", "token")

    def __init__(self, token: int, parent: Node | None) -> None:
        self.token = token
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: dict[int, Node] = {}
        self.row: np.ndarray | None = None
        self.alive = False


class Cell:
    """One evaluated token in the KV cache, shared by the sequences copied from its owner."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node


@dataclass(slots=True)
class Step:
    """Decode `node.token` on sequence `seq`; keep its logits row when `want_row`."""

    node: Node
    seq: int
    want_row: bool


class PrefixCache:
    """Which prefixes are evaluated, where their KV cells live, and their logits rows."""

    def __init__(self, memory: KvMemory, n_seq_max: int, pin: int | None = None) -> None:
        """`n_seq_max` sequence ids 0.. for prefixes; `pin`, another id, for append-only
        mode (None: that mode is unavailable)."""
        self._memory = memory
        self.n_seq_max = n_seq_max
        self.pin = pin
        self.append_only = False
        self.n_prompt = 0
        self.root = Node(-1, None)
        self.home = 0
        self._paths: dict[int, list[Cell]] = {}
        self._last_used: dict[int, int] = {}
        self._tick = 0
        self._alive: dict[TokenPrefix, Node] = {}
        self._recent: OrderedDict[TokenPrefix, Node] = OrderedDict()
        self._new_nodes = 0
        self._sweep_after = SWEEP_MIN
        self.copies = 0
        self.evictions = 0

    # ----- the prompt -------------------------------------------------------------

    def best_sequence(self, old_prompt: Sequence[int], tokens: Sequence[int]) -> tuple[int, int]:
        """The sequence whose cells share the longest prefix with `tokens`, and that length."""
        best_seq, best_len = self.home, 0
        for seq, path in self._paths.items():
            content = [*old_prompt, *(cell.node.token for cell in path)]
            n = _common_prefix_len(content, tokens)
            if n > best_len:
                best_seq, best_len = seq, n
        return best_seq, best_len

    def begin_prompt(self, seq: int, keep: int) -> int:
        """Keep the first `keep` positions of `seq` as the new home; free everything else.
        A new prompt invalidates the trie (prefixes are relative to the prompt). Returns
        the positions kept: 0 when llama.cpp cannot cut this sequence (recurrent state)."""
        for other in list(self._paths):
            if other != seq:
                self._free(other)
        self._pin_cells(seq, keep)
        if not self._memory.seq_rm(seq, keep, -1):
            self._memory.seq_rm(seq, -1, -1)
            keep = 0
        self._paths = {seq: []}
        self.home = seq
        self.n_prompt = keep
        self.root = Node(-1, None)
        self._alive.clear()
        self._recent.clear()
        self._touch(seq)
        return keep

    def forget_cells(self, seq: int) -> None:
        """The memory was cleared: no sequence holds any cell, and `seq` is the home of
        a prompt about to be evaluated again. Nodes keep their rows."""
        self._paths = {seq: []}
        self.home = seq
        self.n_prompt = 0
        self._touch(seq)

    def finish_prompt(self, n_prompt: int, row: np.ndarray) -> None:
        """The prompt's tokens are all in the home sequence; `row` follows its last token."""
        self.n_prompt = n_prompt
        self.root.row = row

    # ----- finding and releasing prefixes ---------------------------------------------

    def request(self, prefix: TokenPrefix) -> Node:
        """The node of `prefix` (created if new), alive until released."""
        node = self._find(prefix)
        node.alive = True
        self._alive[prefix] = node
        self._recent.pop(prefix, None)
        return node

    def release(self, prefixes: Iterable[TokenPrefix]) -> None:
        """Forget these prefixes' rows and free the sequences no alive node needs."""
        for prefix in prefixes:
            node = self._alive.pop(prefix, None)
            if node is None:
                continue
            node.alive = False
            if node is not self.root:
                node.row = None
            self._recent[prefix] = node
            if len(self._recent) > RECENT_RELEASED:
                self._recent.popitem(last=False)
        self._free_dead_sequences()
        if self._new_nodes > self._sweep_after:
            self._sweep()

    def _find(self, prefix: TokenPrefix) -> Node:
        node = self._known(prefix)
        if node is not None:
            return node
        parent = self._known(prefix[:-1])
        if parent is None:  # rare: an unknown path, walk it from the root
            return self._descend(self.root, prefix)
        return self._descend(parent, prefix[-1:])

    def _known(self, prefix: TokenPrefix) -> Node | None:
        if not prefix:
            return self.root
        node = self._alive.get(prefix)
        return node if node is not None else self._recent.get(prefix)

    def _descend(self, node: Node, tokens: Iterable[int]) -> Node:
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = Node(token, node)
                self._new_nodes += 1
            node = child
        return node

    # ----- planning one decode --------------------------------------------------------

    def plan(self, missing: Sequence[Node]) -> tuple[list[Step], list[Node]]:
        """Steps for one batched decode that evaluates as many `missing` nodes as it can.

        Each node builds on its deepest ancestor that has KV cells: on the sequence whose
        tip it is (no copy), or on one whose cells beyond it nobody needs (trimmed), or on
        a copy (cells shared). The sequence edits happen now. Nodes that build on a node
        of this same round, or that found no sequence, come back to be planned again.
        """
        steps: list[Step] = []
        deferred: list[Node] = []
        planned: dict[Node, Step] = {}
        claimed: set[int] = set()
        out_of_sequences = False
        for node in missing:
            if node in planned:  # already on the way to another node of this round
                planned[node].want_row = True
                continue
            found = None if out_of_sequences else self._anchor(node, planned)
            if found is None:
                deferred.append(node)
                continue
            anchor, holders, chain = found
            seq = self._take_sequence(anchor, holders, node, claimed)
            if seq is None:  # the others would not find one either: next round
                out_of_sequences = True
                deferred.append(node)
                continue
            self._add_steps(steps, planned, claimed, chain, seq)
        if not steps and deferred:  # no sequence to spare: sacrifice the cells of one
            target = deferred.pop(0)
            anchor, holders, chain = self._anchor(target, planned) or _unreachable()
            if self._alive_beyond(holders[0], anchor.depth, target):
                self.evictions += 1
            self._trim(holders[0], anchor.depth)
            self._add_steps(steps, planned, claimed, chain, holders[0])
        return steps, deferred

    def _add_steps(
        self,
        steps: list[Step],
        planned: dict[Node, Step],
        claimed: set[int],
        chain: list[Node],
        seq: int,
    ) -> None:
        claimed.add(seq)
        for n in chain:
            planned[n] = Step(n, seq, want_row=n is chain[-1])
            steps.append(planned[n])

    def _anchor(
        self, node: Node, planned: dict[Node, Step]
    ) -> tuple[Node, list[int], list[Node]] | None:
        """(deepest ancestor with KV cells, the sequences holding it, the nodes from there
        to `node`), or None when that path crosses a node planned in this round."""
        chain = [node]
        ancestor = node.parent
        while ancestor is not None:
            if ancestor in planned:
                return None
            holders = self._holders(ancestor)
            if holders:
                chain.reverse()
                return ancestor, holders, chain
            chain.append(ancestor)
            ancestor = ancestor.parent
        return _unreachable()

    def _take_sequence(
        self, anchor: Node, holders: list[int], target: Node, claimed: set[int]
    ) -> int | None:
        """A sequence that holds exactly `anchor`'s path, ready to be extended, or None."""
        free_holders = [s for s in holders if s not in claimed]
        for seq in free_holders:  # the anchor is its tip: extend in place
            if len(self._paths[seq]) == anchor.depth:
                self._touch(seq)
                return seq
        for seq in free_holders:  # nothing alive beyond the anchor: trim in place
            if not self._alive_beyond(seq, anchor.depth, target):
                self._trim(seq, anchor.depth)
                return seq
        if len(self._paths) < self.n_seq_max:
            dst = min(set(range(self.n_seq_max)) - self._paths.keys())
            self._copy(holders[0], dst, anchor.depth)
            return dst
        return self._evict_for(anchor, holders, claimed)

    def _evict_for(self, anchor: Node, holders: list[int], claimed: set[int]) -> int | None:
        """Reuse the least recently used sequence (never home, never one of this round)."""
        victims = [s for s in self._paths if s not in claimed and s != self.home]
        if not victims:
            return None
        victim = min(victims, key=self._last_used.__getitem__)
        self.evictions += 1
        sources = [s for s in holders if s != victim]
        if not sources:  # the victim is the only holder: cut it back to the anchor
            self._trim(victim, anchor.depth)
            return victim
        self._free(victim)
        self._copy(sources[0], victim, anchor.depth)
        return victim

    # ----- after a decode ---------------------------------------------------------

    def commit(self, steps: Iterable[Step]) -> None:
        """These steps were decoded: their cells now exist."""
        for step in steps:
            path = self._paths[step.seq]
            assert len(path) == step.node.depth - 1, "cache out of step with llama.cpp"
            path.append(Cell(step.node))
            self._touch(step.seq)

    def reclaim(self, busy: set[int]) -> bool:
        """Free some KV cells (llama.cpp found no slot): first the dead tails of the
        sequences, then the least recently used sequence outside `busy`. False when
        nothing is left to free."""
        trimmed = False
        for seq in list(self._paths):
            if seq in busy:
                continue
            keep = self._deepest_alive(seq)
            if keep < len(self._paths[seq]):
                self._trim(seq, keep)
                trimmed = True
        if trimmed:
            return True
        victims = [s for s in self._paths if s not in busy and s != self.home]
        if not victims:
            return False
        self._free(min(victims, key=self._last_used.__getitem__))
        self.evictions += 1
        return True

    # ----- what the cache holds -----------------------------------------------------

    @property
    def n_sequences(self) -> int:
        return len(self._paths)

    def sequence_lengths(self) -> dict[int, int]:
        """Positions each sequence in use should hold in llama.cpp: [0, length)."""
        return {seq: self.n_prompt + len(path) for seq, path in self._paths.items()}

    def cells_used(self) -> int:
        """KV cells in use: the prompt plus the distinct cells of all sequences.

        Paths share a cell only together with all the cells before it, so the union is
        the sum of the lengths minus, for each path, its longest shared prefix with an
        earlier one (found by bisection on cell identity)."""
        paths = list(self._paths.values())
        total = self.n_prompt
        for i, path in enumerate(paths):
            shared = max((_shared_len(path, other) for other in paths[:i]), default=0)
            total += len(path) - shared
        return total

    def _holders(self, node: Node) -> list[int]:
        return [s for s in self._paths if self._holds(s, node)]

    def _holds(self, seq: int, node: Node) -> bool:
        path = self._paths[seq]
        d = node.depth
        return d == 0 or (d <= len(path) and path[d - 1].node is node)

    def _alive_beyond(self, seq: int, depth: int, ignore: Node | None = None) -> bool:
        """Does `seq` hold an alive node deeper than `depth` (other than `ignore`)? Scans
        the shorter of the sequence's tail and the list of alive nodes."""
        tail = self._paths[seq][depth:]
        if len(tail) <= len(self._alive):
            return any(c.node.alive and c.node is not ignore for c in tail)
        return any(
            n.depth > depth and n is not ignore and self._holds(seq, n)
            for n in self._alive.values()
        )

    def _deepest_alive(self, seq: int) -> int:
        path = self._paths[seq]
        return next((d for d in range(len(path), 0, -1) if path[d - 1].node.alive), 0)

    # ----- sequence edits (mirrored in llama.cpp at once) -------------------------------

    def _pin_cells(self, seq: int, p0: int) -> None:
        """Append-only mode: the pin sequence takes over `seq`'s cells from position p0
        on, so that removing them from `seq` frees nothing for llama.cpp to reuse."""
        if self.append_only and self.pin is not None:
            self._memory.seq_cp(seq, self.pin, p0, -1)

    def _trim(self, seq: int, depth: int) -> None:
        self._pin_cells(seq, self.n_prompt + depth)
        if not self._memory.seq_rm(seq, self.n_prompt + depth, -1):
            raise LvrError(
                "llama.cpp cannot cut back this model's cache (a recurrent or windowed "
                "state?): branching prefixes is not supported for it"
            )
        del self._paths[seq][depth:]
        self._touch(seq)

    def _copy(self, src: int, dst: int, depth: int) -> None:
        self._memory.seq_cp(src, dst, 0, self.n_prompt + depth)
        self._paths[dst] = self._paths[src][:depth]
        self.copies += 1
        self._touch(src)
        self._touch(dst)

    def _free(self, seq: int) -> None:
        self._pin_cells(seq, 0)
        self._memory.seq_rm(seq, -1, -1)
        del self._paths[seq]
        self._last_used.pop(seq, None)

    def _touch(self, seq: int) -> None:
        self._tick += 1
        self._last_used[seq] = self._tick

    def _free_dead_sequences(self) -> None:
        """Free the sequences that hold no alive node; keep at least the latest one (the
        prompt must stay somewhere), and move `home` to a sequence that is kept."""
        if not self._paths:
            return
        live = [s for s in self._paths if self._alive_beyond(s, 0)]
        keep = live or [max(self._paths, key=self._last_used.__getitem__)]
        if self.home not in keep:
            self.home = max(keep, key=self._last_used.__getitem__)
        for seq in list(self._paths):
            if seq not in keep:
                self._free(seq)

    def _sweep(self) -> None:
        """Drop trie nodes that nothing can reach any more: not alive, not in a cell,
        not remembered, and without such descendants. Amortised: runs after many new nodes."""
        keep: set[Node] = {self.root}
        for path in self._paths.values():
            keep.update(cell.node for cell in path)
        for node in [*self._alive.values(), *self._recent.values()]:
            while node is not None and node not in keep:
                keep.add(node)
                node = node.parent
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.children = {t: c for t, c in node.children.items() if c in keep}
            stack.extend(node.children.values())
        self._new_nodes = 0
        self._sweep_after = max(SWEEP_MIN, 2 * len(keep))


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _shared_len(a: list[Cell], b: list[Cell]) -> int:
    """Length of the common prefix of two paths, by cell identity (bisection is valid:
    two paths that share a cell share every cell before it)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] is b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _unreachable() -> NoReturn:
    raise AssertionError("every sequence holds the prompt: the root always has a holder")
