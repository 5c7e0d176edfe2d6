"""Will the models of a run fit in memory? Asked before anything is loaded.

A run whose models do not fit gets killed by the operating system halfway through
loading, with no message of ours (or fails in the GPU driver). So each member's need is
estimated from its GGUF header (llama/memory_estimate.py) at the n_ctx it will get and
placed where llama.cpp will put it:

- no offload (n_gpu_layers 0): all of it in this machine's RAM;
- offload to a GPU: the offloaded layers' part (their weights and KV cache, and a
  compute buffer) on the GPU devices llama.cpp sees (llama/devices.py), summed against
  their free memory; the rest in RAM;
- offload asked for where llama.cpp finds no GPU device: those layers stay on the CPU,
  so all of it in RAM (a build without GPU support then refuses the load itself,
  backend.py's check_gpu_request, with the rebuild command);
- offload to RPC servers: the offloaded part on the servers (each checks its own), the
  rest in RAM.

A run is refused when RAM or GPU memory falls short, with the numbers and what to change.
`place` and `check_memory` take the figures as given (no machine is asked), so they are
tested with made-up devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lvr_local.errors import LvrError
from lvr_local.llama.devices import Device, gpu_devices
from lvr_local.llama.gguf_summary import summarize_gguf
from lvr_local.llama.memory_estimate import MemoryNeed, estimate_memory
from lvr_local.machine import available_memory
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.settings import RunSettings

NO_OFFLOAD, GPU, RPC, NO_GPU = "none", "gpu", "rpc", "no-gpu"


@dataclass(frozen=True)
class MemberMemory:
    """One member's need and where its offloaded layers go (NO_OFFLOAD, GPU, RPC, or
    NO_GPU: asked for, but the build has no GPU device, so they stay here)."""

    name: str
    n_ctx: int
    need: MemoryNeed
    offload_to: str = NO_OFFLOAD

    @property
    def host(self) -> int:
        return self.need.host if self.offload_to in (GPU, RPC) else self.need.total

    @property
    def gpu(self) -> int:
        return self.need.offloaded if self.offload_to == GPU else 0

    @property
    def rpc(self) -> int:
        return self.need.offloaded if self.offload_to == RPC else 0


def place(name: str, n_ctx: int, need: MemoryNeed, *, rpc: bool, has_gpu: bool) -> MemberMemory:
    """Where llama.cpp puts the member's offloaded layers: the RPC servers when it has
    some (loading.py offloads to them alone), else the GPUs, else nowhere."""
    if need.offload_share <= 0:
        return MemberMemory(name, n_ctx, need, NO_OFFLOAD)
    if rpc:
        return MemberMemory(name, n_ctx, need, RPC)
    return MemberMemory(name, n_ctx, need, GPU if has_gpu else NO_GPU)


@dataclass(frozen=True)
class MemoryPlan:
    """Each member's need, this machine's available RAM (None: unknown) and its GPU
    devices."""

    members: tuple[MemberMemory, ...]
    available: int | None
    devices: tuple[Device, ...] = ()

    @property
    def host(self) -> int:
        return sum(m.host for m in self.members)

    @property
    def gpu(self) -> int:
        return sum(m.gpu for m in self.members)

    @property
    def rpc(self) -> int:
        return sum(m.rpc for m in self.members)

    @property
    def gpu_free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def fits_host(self) -> bool:
        return self.available is None or self.host <= self.available

    @property
    def fits_gpu(self) -> bool:
        return self.gpu <= self.gpu_free

    @property
    def fits(self) -> bool:
        return self.fits_host and self.fits_gpu

    @property
    def offload_without_gpu(self) -> bool:
        return any(m.offload_to == NO_GPU for m in self.members)


def plan_memory(
    specs: Sequence[ModelSpec], settings: RunSettings, paths: Sequence[Path], n_seq_max: int
) -> MemoryPlan:
    """The memory of each model (at its own n_ctx and offload) against what is free.
    `n_seq_max`: the sequences each context is created with (loading.py's)."""
    needs = []
    for spec, path in zip(specs, paths, strict=True):
        n_ctx = spec.n_ctx or settings.n_ctx
        layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else settings.n_gpu_layers
        rpc = bool(spec.rpc_servers(settings))
        if rpc and not layers:
            layers = -1  # an RPC member offloads every layer unless told otherwise
        need = estimate_memory(
            summarize_gguf(path),
            n_ctx=n_ctx,
            n_seq_max=min(n_seq_max, n_ctx - 1) + 1,  # as backend.py sizes it, with the pin
            n_gpu_layers=layers,
        )
        needs.append((spec.name, n_ctx, need, rpc))
    wants_gpu = any(need.offload_share > 0 and not rpc for _, _, need, rpc in needs)
    devices = tuple(gpu_devices()) if wants_gpu else ()
    members = tuple(
        place(name, n_ctx, need, rpc=rpc, has_gpu=bool(devices)) for name, n_ctx, need, rpc in needs
    )
    return MemoryPlan(members, available_memory(), devices)


def check_memory(plan: MemoryPlan) -> None:
    """Refuse, before loading, models that cannot fit; say by how much and what to do."""
    if not plan.fits_host:
        raise LvrError(_host_refusal(plan))
    if not plan.fits_gpu:
        raise LvrError(_gpu_refusal(plan))


def _host_refusal(plan: MemoryPlan) -> str:
    parts = "; ".join(
        f"{m.name} at n_ctx {m.n_ctx}: weights {gib(m.need.weights)}, KV cache "
        f"{gib(m.need.kv_cache)}, buffers {gib(m.need.buffers)}"
        + (f", {gib(m.need.offloaded)} of it offloaded" if m.offload_to in (GPU, RPC) else "")
        for m in plan.members
    )
    if plan.offload_without_gpu:
        offload = "offload layers to RPC servers (rpc): this llama.cpp build has no GPU device"
    elif plan.devices:
        offload = "offload more layers to the GPU (n_gpu_layers) or to RPC servers (rpc)"
    else:
        offload = "offload layers to a GPU (n_gpu_layers) or to RPC servers (rpc)"
    return (
        f"the models need {gib(plan.host)} of memory here ({parts}) but this machine has "
        f"{gib(plan.available or 0)} available: lower n_ctx (models.toml [defaults] or a "
        f"model's own n_ctx), run fewer models, or {offload}; `lvr pair` shows the estimate"
    )


def _gpu_refusal(plan: MemoryPlan) -> str:
    parts = "; ".join(
        f"{m.name} at n_ctx {m.n_ctx}: {m.need.offload_share:.0%} of its layers "
        f"({gib(m.need.offloaded_layers)} of weights and KV cache) and a compute buffer "
        f"of {gib(m.need.compute)}"
        for m in plan.members
        if m.offload_to == GPU
    )
    free = ", ".join(f"{d.name} ({d.description}) {gib(d.free)} free" for d in plan.devices)
    return (
        f"the offloaded layers need {gib(plan.gpu)} of GPU memory ({parts}) but the GPU "
        f"has {gib(plan.gpu_free)} free ({free}): offload fewer layers (n_gpu_layers, "
        "models.toml [defaults] or a model's own), lower n_ctx, run fewer models, or "
        "offload to RPC servers (rpc); `lvr pair` shows the estimate"
    )


def gib(n_bytes: int) -> str:
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:,.0f} MiB"
    return f"{n_bytes / 2**30:,.1f} GiB"
