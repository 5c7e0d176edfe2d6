"""Core sharing: whether the members of a generation decode at once, and on how many
threads each.

llama.cpp's worker threads spin while they wait, so members may only decode at once
when their threads fit the physical cores. Models this small scale poorly over threads
(`lvr bench`: SmolLM2 143 -> 152 tokens/s from 1 to 2 threads), so on 2 cores one
thread each at once beats two each in turn by 1.26x. Prompts are evaluated one model at
a time on all cores, where a long batch does use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lvr_local.decoding.members import Member
from lvr_local.machine import physical_cores

T = TypeVar("T")
R = TypeVar("R")


class CoreScheduler:
    """Sets members' thread counts and runs their steps, at once or in turn.

    `concurrent`: None decides for each generation (at once when the threads fit the
    cores), True or False forces it. `cores` counts the physical cores (tests pass
    their own)."""

    def __init__(
        self, concurrent: bool | None = None, cores: Callable[[], int] = physical_cores
    ) -> None:
        self._choice = concurrent
        self._cores = cores
        self._pool: ThreadPoolExecutor | None = None
        self.concurrent = False

    def all_cores(self, members: Sequence[Member]) -> None:
        """Before a prompt: every member that has no configured thread count gets all
        cores (prompts are evaluated one model after the other)."""
        _set_auto_threads(members, self._cores())

    def share(self, live: Sequence[Member]) -> None:
        """Choose how this generation's members decode and give them their threads."""
        cores = self._cores()
        together = self._choice is not False and len(live) > 1
        _set_auto_threads(live, max(1, cores // len(live)) if together else cores)
        if self._choice is None:
            together = together and sum(m.backend.n_threads for m in live) <= cores
        if together and self._pool is None:
            self._pool = ThreadPoolExecutor(thread_name_prefix="lvr-member")
        self.concurrent = together

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items: in the pool when the members decode at once."""
        if self.concurrent and self._pool is not None and len(items) > 1:
            return list(self._pool.map(fn, items))
        return [fn(item) for item in items]

    def map_decoding(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        members: Sequence[Member],
        decodes: Sequence[bool],
    ) -> list[R]:
        """fn over items, where `decodes` marks the items whose fn runs a forward pass of
        the matching member. When members decode at once but only one of them decodes
        this step (over bytes their tokens end at different bytes), that one gets every
        core for it, and the others' numpy-only work runs after it in this thread; when
        none decodes, all of it runs in this thread."""
        decoding = [i for i, d in enumerate(decodes) if d]
        if not decoding:  # numpy only: handing it to the pool costs more than it saves
            return [fn(item) for item in items]
        if not self.concurrent or len(decoding) != 1 or not members[decoding[0]].auto_threads:
            return self.map(fn, items)
        lone = decoding[0]
        backend, shared = members[lone].backend, members[lone].backend.n_threads
        backend.set_threads(self._cores())
        try:
            first = fn(items[lone])
        finally:
            backend.set_threads(shared)
        return [first if i == lone else fn(item) for i, item in enumerate(items)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _set_auto_threads(members: Sequence[Member], n_threads: int) -> None:
    for m in members:
        if m.auto_threads and m.backend.n_threads != n_threads:
            m.backend.set_threads(n_threads)
