"""Will the models of a run fit in memory? Asked before anything is loaded.

A run whose models do not fit gets killed by the operating system halfway through
loading, with no message of ours. So each member's need is estimated from its GGUF
header (llama/memory_estimate.py) at the n_ctx it will get, the needs are summed, and
the run is refused when the sum exceeds the memory this machine has available, with the
numbers and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lvr_local.errors import LvrError
from lvr_local.llama.gguf_summary import summarize_gguf
from lvr_local.llama.memory_estimate import MemoryNeed, estimate_memory
from lvr_local.machine import available_memory
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.settings import RunSettings


@dataclass(frozen=True)
class MemberMemory:
    name: str
    n_ctx: int
    need: MemoryNeed


@dataclass(frozen=True)
class MemoryPlan:
    """Each member's need and this machine's available memory (None: unknown)."""

    members: tuple[MemberMemory, ...]
    available: int | None

    @property
    def host(self) -> int:
        return sum(m.need.host for m in self.members)

    @property
    def offloaded(self) -> int:
        return sum(m.need.offloaded for m in self.members)

    @property
    def fits(self) -> bool:
        return self.available is None or self.host <= self.available


def plan_memory(
    specs: Sequence[ModelSpec], settings: RunSettings, paths: Sequence[Path], n_seq_max: int
) -> MemoryPlan:
    """The memory of each model (at its own n_ctx and offload) against what is free.
    `n_seq_max`: the sequences each context is created with (loading.py's)."""
    members = []
    for spec, path in zip(specs, paths, strict=True):
        n_ctx = spec.n_ctx or settings.n_ctx
        layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else settings.n_gpu_layers
        if spec.rpc_servers(settings) and not layers:
            layers = -1  # an RPC member offloads every layer unless told otherwise
        need = estimate_memory(
            summarize_gguf(path),
            n_ctx=n_ctx,
            n_seq_max=min(n_seq_max, n_ctx - 1) + 1,  # as backend.py sizes it, with the pin
            n_gpu_layers=layers,
        )
        members.append(MemberMemory(spec.name, n_ctx, need))
    return MemoryPlan(tuple(members), available_memory())


def check_memory(plan: MemoryPlan) -> None:
    """Refuse, before loading, models that cannot fit; say by how much and what to do."""
    if plan.fits:
        return
    parts = "; ".join(
        f"{m.name} at n_ctx {m.n_ctx}: weights {gib(m.need.weights)}, KV cache "
        f"{gib(m.need.kv_cache)}, buffers {gib(m.need.buffers)}"
        for m in plan.members
    )
    raise LvrError(
        f"the models need {gib(plan.host)} of memory ({parts}) but this machine has "
        f"{gib(plan.available or 0)} available: lower n_ctx (models.toml [defaults] or a "
        "model's own n_ctx), run fewer models, offload layers to a GPU (n_gpu_layers) or "
        "to RPC servers (rpc); `lvr pair` shows the estimate"
    )


def gib(n_bytes: int) -> str:
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:,.0f} MiB"
    return f"{n_bytes / 2**30:,.1f} GiB"
