"""The devices this llama.cpp build can offload layers to, and their free memory.

Asked of llama.cpp's own device registry (ggml_backend_dev_count, _get, _type, _name,
_description, _memory), the list llama_model_load_from_file offloads n_gpu_layers to
when no devices are named. llama-cpp-python binds none of these functions, but libllama
links libggml-base and exposes its symbols, so they are called through ctypes on it
(`device_handles`, which rpc.py's server uses too). No other tool (nvidia-smi and the
like) is asked: what counts is what this build of llama.cpp sees.

A build without a GPU backend (the CPU wheel) lists the CPU device alone. A discrete GPU
(type GPU) has its own memory, which the offloaded layers take; an integrated GPU (type
IGPU) uses this machine's RAM, so layers offloaded to it count as RAM.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as L

from lvr_local.llama.native import ensure_backend

# enum ggml_backend_dev_type
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}


@dataclass(frozen=True)
class Device:
    """One llama.cpp device: its name ("CUDA0"), description, type and memory in bytes."""

    name: str
    description: str
    kind: str  # DEVICE_TYPES' name
    free: int
    total: int


def device_handles() -> list[tuple[int, str]]:
    """(handle, type) of every device llama.cpp registered, in its order: the handles
    llama.cpp's own calls take (rpc.py's server offers some of them)."""
    ensure_backend()
    lib = L.llama_cpp._lib
    count, get, kind = (
        lib.ggml_backend_dev_count,
        lib.ggml_backend_dev_get,
        lib.ggml_backend_dev_type,
    )
    count.argtypes, count.restype = [], ctypes.c_size_t
    get.argtypes, get.restype = [ctypes.c_size_t], ctypes.c_void_p
    kind.argtypes, kind.restype = [ctypes.c_void_p], ctypes.c_int
    handles = [get(i) for i in range(count())]
    return [(h, DEVICE_TYPES.get(kind(h), "UNKNOWN")) for h in handles]


def devices() -> list[Device]:
    """Every device llama.cpp registered, in its order."""
    handles = device_handles()
    lib = L.llama_cpp._lib
    name, description = lib.ggml_backend_dev_name, lib.ggml_backend_dev_description
    memory = lib.ggml_backend_dev_memory
    for text in (name, description):
        text.argtypes, text.restype = [ctypes.c_void_p], ctypes.c_char_p
    size_p = ctypes.POINTER(ctypes.c_size_t)
    memory.argtypes, memory.restype = [ctypes.c_void_p, size_p, size_p], None
    found = []
    for dev, kind in handles:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                name=(name(dev) or b"").decode("utf-8", errors="replace"),
                description=(description(dev) or b"").decode("utf-8", errors="replace"),
                kind=kind,
                free=free.value,
                total=total.value,
            )
        )
    return found


def gpu_devices() -> list[Device]:
    """The devices with memory of their own that n_gpu_layers offloads to (none on a
    CPU-only build)."""
    return [d for d in devices() if d.kind == "GPU"]
