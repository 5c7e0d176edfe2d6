"""Loading the models of a run: each one's vocabulary and its llama.cpp backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lvr_local.decoding.members import Member
from lvr_local.decoding.roles import detect_role
from lvr_local.llama.backend import LlamaBackend
from lvr_local.llama.gguf_check import check_gguf
from lvr_local.llama.isolated import IsolatedBackend, ModelBackend
from lvr_local.llama.rpc import parse_endpoint
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.memory_check import MemoryPlan, check_memory, plan_memory
from lvr_local.runner.settings import RunSettings

# Sequences per llama.cpp context: room for the tokenization branches the engine keeps
# alive (fewer forces evictions and re-evaluation); cells are shared, so this is cheap.
N_SEQ_MAX = 64

# (what is happening, steps done, steps in all): for progress bars and log lines.
ProgressCallback = Callable[[str, int, int], None]


def load_member(
    spec: ModelSpec, settings: RunSettings, *, n_threads: int | None = None
) -> tuple[Member, ModelBackend]:
    """One model of models.toml: vocabulary from the cache, weights into llama.cpp.
    Thread count: `n_threads`, else the settings', else shared out by the scheduler.
    Returns the member and its backend (the caller owns it and must close it)."""
    path = spec.resolve_path()
    vocab = load_vocabulary(path, name=spec.name)
    threads = n_threads or settings.n_threads or None
    backend = _backend(spec, settings, path, threads)
    template = spec.chat_template or vocab.chat_template
    member = Member(
        name=spec.name,
        vocab=vocab,
        backend=backend,
        weight=spec.weight,
        chat_template=template,
        role=spec.role or detect_role(vocab, template),
        enabled=spec.enabled,
        auto_threads=threads is None,
    )
    return member, backend


def _backend(
    spec: ModelSpec, settings: RunSettings, path: Path, threads: int | None
) -> ModelBackend:
    """The model's llama.cpp backend: in this process, or, when its layers go to RPC
    servers, in a child process (isolated.py: llama.cpp's RPC client aborts on a dead
    server). An RPC member offloads every layer unless n_gpu_layers says how many."""
    n_ctx = spec.n_ctx or settings.n_ctx
    layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else settings.n_gpu_layers
    servers = spec.rpc_servers(settings)
    extra_buffers = spec.extra_buffers or settings.extra_buffers
    if servers:
        endpoints = [parse_endpoint(e) for e in servers]
        return IsolatedBackend(
            path,
            endpoints=endpoints,
            n_ctx=n_ctx,
            n_gpu_layers=layers or -1,
            n_threads=threads,
            n_seq_max=N_SEQ_MAX,
            extra_buffers=extra_buffers,
        )
    return LlamaBackend(
        path,
        n_ctx=n_ctx,
        n_gpu_layers=layers,
        n_threads=threads,
        n_seq_max=N_SEQ_MAX,
        extra_buffers=extra_buffers,
    )


def memory_plan(specs: Sequence[ModelSpec], settings: RunSettings) -> MemoryPlan:
    """What the models need in memory, with the contexts load_member creates."""
    paths = [spec.resolve_path() for spec in specs]
    for path in paths:
        check_gguf(path)  # a clear message for a bad file before its header is summed
    return plan_memory(specs, settings, paths, N_SEQ_MAX)


def load_members(
    specs: Sequence[ModelSpec], settings: RunSettings, progress: ProgressCallback, total: int
) -> tuple[list[Member], list[ModelBackend]]:
    """Load every model, reporting before each; on any failure free what was loaded.
    Models that cannot fit in memory together are refused before the first is loaded."""
    check_memory(memory_plan(specs, settings))
    members: list[Member] = []
    backends: list[ModelBackend] = []
    try:
        for done, spec in enumerate(specs):
            progress(f"loading {spec.name}", done, total)
            member, backend = load_member(spec, settings)
            members.append(member)
            backends.append(backend)
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return members, backends
