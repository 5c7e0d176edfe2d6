"""How much memory llama.cpp will take for a model, from its GGUF header, before loading.

The parts, as llama.cpp allocates them for the contexts lvr-local creates (native.py:
one unified KV cache of n_ctx cells, full-size sliding-window caches, f16 keys and
values, flash attention on the CPU, n_ubatch = n_batch = 512):

- weights: the tensor data, mapped from the file ("CPU_Mapped model buffer size").
- KV cache: n_ctx (padded to 256) cells x every layer's key and value elements x 2
  bytes. Gemma 3's sliding-window layers take as many cells as the others, because
  native.py asks for `swa_full` (branches trim back past the window).
- output buffer: one row of logits (n_vocab floats) per sequence.
- compute buffer: the graph's scratch space for a 512-token ubatch; the logits of the
  ubatch dominate (n_vocab x 512 floats), plus the activations.

Calibrated against llama.log (llama-cpp-python 0.3.36, CPU): the KV and output buffers
match to the byte; the compute estimate is above the logged size by 1.9 MiB (SmolLM2,
98.3 MiB logged) and 1.5 to 2.7 MiB (Gemma 3 270M, 514.5 to 515.8 MiB logged), at
n_ctx 512, 4096 and 16384. Not counted: the repacked copies llama.cpp makes of some
quantized tensors for faster CPU kernels ("CPU_REPACK", 12.7 MiB for Gemma 3 270M).

Layers offloaded to a GPU or to RPC servers (n_gpu_layers) take their share of the
weights and of the KV cache to the device, split by layer count, and a compute buffer
there too: the device's part is that share plus the compute buffer, the host's the rest
plus the output buffer. When some layers stay on the host, the host keeps a compute
buffer of its own, counted in full on both sides (an upper estimate: llama.cpp sizes
each for the part of the graph it runs). Where the offloaded part lands (a GPU, RPC
servers, or this machine's RAM when the build has no GPU) is runner/memory_check.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from lvr_local.llama.gguf_summary import GGUFSummary

KV_BYTES = 2  # f16 keys and values: llama.cpp's default cache type
LOGIT_BYTES = 4  # float32
N_UBATCH = 512  # backend.py's n_batch, which native.py also makes n_ubatch
CTX_PAD = 256  # llama.cpp pads n_ctx to a multiple of this


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one model takes, and the share of its layers offloaded (0 to 1)."""

    weights: int
    kv_cache: int
    output: int  # one row of logits per sequence: always on the host
    compute: int  # the graph's scratch space for one ubatch
    offload_share: float = 0.0

    @property
    def buffers(self) -> int:
        return self.output + self.compute

    @property
    def total(self) -> int:
        """All of it on this machine: no offload, or none that llama.cpp can do."""
        return self.weights + self.kv_cache + self.buffers

    @property
    def offloaded_layers(self) -> int:
        """The offloaded layers' weights and KV cache, split by layer count."""
        return int(self.offload_share * (self.weights + self.kv_cache))

    @property
    def offloaded(self) -> int:
        """On the offload device(s): the layers' share of weights and KV cache, and a
        compute buffer."""
        if self.offload_share <= 0:
            return 0
        return self.offloaded_layers + self.compute

    @property
    def host(self) -> int:
        """On this machine when the offload happens: the layers kept here, the output
        buffer, and a compute buffer unless every layer is offloaded."""
        kept = self.weights + self.kv_cache - self.offloaded_layers
        return kept + self.output + (self.compute if self.offload_share < 1 else 0)


def padded_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def estimate_memory(
    summary: GGUFSummary, *, n_ctx: int, n_seq_max: int, n_gpu_layers: int = 0
) -> MemoryNeed:
    """What llama.cpp will allocate for this model with these context sizes.
    n_gpu_layers: -1 all layers offloaded, 0 none."""
    kv_cache = padded_ctx(n_ctx) * summary.kv_width * KV_BYTES
    output = summary.n_vocab * LOGIT_BYTES * n_seq_max
    compute = N_UBATCH * LOGIT_BYTES * (summary.n_vocab + summary.n_embd + summary.n_ff)
    layers = summary.n_layer or 1
    share = 1.0 if n_gpu_layers < 0 else min(n_gpu_layers, layers) / layers
    return MemoryNeed(
        weights=summary.weights_bytes,
        kv_cache=kv_cache,
        output=output,
        compute=compute,
        offload_share=share,
    )
