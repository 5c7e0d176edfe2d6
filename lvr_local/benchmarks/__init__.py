"""Benchmarks that decisions rest on: `python -m lvr_local.benchmarks NAME`, one module each.

engine: (a) cold build time of Gemma's decomposition tables over the common vocabulary
of the bundled pair; (b) the reduction engine's own work per piece (everything but the
forward pass), fed by a fake model that returns precomputed peaked logits.

backend: greedy decoding speed of the prefix-cached llama.cpp backend (one alive prefix,
the engine's common case) against plain llama-cpp-python, for both bundled models.

ensemble: `lvr bench` (lvr_local/bench.py) for the bundled pair: native speeds, ensembles
over the common vocabulary and bytes.

precision: `lvr score` against an independent float64 oracle (oracle.py), per
`precision` and with text pruning off.

prune: what the pruning threshold costs (forward-pass rows per byte) and changes.

scoring: scoring speed on the exact numeric path against the fast one.

chat: each bundled model alone and the ensemble under each rule on chat prompts, and
bits/byte per rule.

code: raw completions of Python function headers: lines off the 4-space grid and lines
written three times, per member alone and per ensemble.

serve: pieces/s through `lvr serve` against the runner directly, and the time to first
piece of a second chat turn against the first (the prefix cache across requests).

rpc: pieces/s with SmolLM2's layers on a localhost `lvr rpc-server` against fully local,
and the RPC bytes per piece.

extra-buffers: prompt processing and decoding speed with llama.cpp's extra buffer types
(AMX, CPU_REPACK) and without.

Every benchmark measures its alternatives side by side in one run and prints ratios.
"""

import llama_cpp  # noqa: F401  (before numpy: the other order segfaulted on a CUDA machine)
