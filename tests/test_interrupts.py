"""Ctrl-C (SIGINT) and SIGTERM at random points of a run: during start-up, model
loading, prompt evaluation and generation. Whenever it comes, the command stops
promptly with exit status 130 (SIGINT) or 143 (SIGTERM), without a traceback or an
"Exception ignored" from a ctypes callback, and keeps what it produced: the text
streamed so far, or with --json a strict JSON record whose stop reason is "interrupted".

Each case waits for a readiness marker on the command's own output (not a fixed sleep),
then for a random extra delay, so that the tests hold on a loaded machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_tally import tally

pytestmark = pytest.mark.slow  # every case loads a real model

LOADING = b"loading smollm2-135m ..."
LOADED = b"building the sub-vocabulary ..."
DEADLINE_S = 120.0  # generous for a loaded machine, but bounded


class Command:
    """A running `lvr` whose stdout and stderr are collected as they come."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lvr_local", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        self.out, self.err = bytearray(), bytearray()
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(pipe: object, into: bytearray) -> None:
        while chunk := pipe.read1(4096):  # type: ignore[attr-defined]
            into += chunk

    def wait_for(self, ready: object) -> None:
        """Until `ready()` holds (or the command ended)."""
        deadline = time.monotonic() + DEADLINE_S
        while not ready() and self.proc.poll() is None:  # type: ignore[operator]
            assert time.monotonic() < deadline, f"no readiness marker: {bytes(self.err)!r}"
            time.sleep(0.02)

    def signal_and_wait(self, signum: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout=DEADLINE_S)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    return json.loads(text, parse_constant=refuse)


def _args(phase: str, as_json: bool) -> list[str]:
    prompt = "word " * 1500 if phase == "prompt" else "Tell me a long story about the sea."
    mode = ["--raw"] if phase == "prompt" else []
    return [
        "generate",
        prompt,
        *mode,
        "-m",
        "smollm2-135m",
        "--max-pieces",
        "100000",
        "--temperature",
        "0.8",
        *(["--json"] if as_json else []),
    ]


def _ready(command: Command, phase: str, as_json: bool) -> object:
    """The marker after which the phase is under way."""
    if phase == "start-up":
        return lambda: True
    if phase == "loading":
        return lambda: LOADING in command.err
    if phase == "prompt":
        return lambda: LOADED in command.err and command.err.endswith(b" s\n")
    if as_json:  # no text streams: wait until the prompt has been evaluated for a while
        return lambda: LOADED in command.err and command.err.endswith(b" s\n")
    return lambda: len(command.out) >= 8


# The quick phases twice (different random delays), the slow ones once: 12 cases.
PHASES = ["start-up", "start-up", "loading", "loading", "prompt", "generation"]
CASES = [
    (phase, signum, seed)
    for seed, phase in enumerate(PHASES)
    for signum in (signal.SIGINT, signal.SIGTERM)
]


@pytest.mark.parametrize(
    ("phase", "signum", "seed"),
    CASES,
    ids=[f"{p}-{signal.Signals(s).name}-{n}" for p, s, n in CASES],
)
def test_an_interrupt_anywhere_stops_cleanly(
    phase: str, signum: int, seed: int, isolated_home: Path
) -> None:
    rng = random.Random(seed * 7 + signum)
    as_json = rng.random() < 0.5
    command = Command(_args(phase, as_json))
    command.wait_for(_ready(command, phase, as_json))
    extra = {"start-up": (0.15, 0.6), "generation": (0.0, 0.5) if not as_json else (1.0, 2.0)}
    time.sleep(rng.uniform(*extra.get(phase, (0.0, 0.2))))
    code = command.signal_and_wait(signum)
    err = bytes(command.err).decode(errors="replace")
    out = bytes(command.out).decode(errors="replace")
    held = code == 128 + signum and "Traceback" not in err and "Exception ignored" not in err
    if held and as_json and (phase != "start-up" or out.strip()):
        record = _strict(out)  # before the command line is read there is no record yet
        held = record["stop_reason"] == "interrupted"
    if held and phase == "generation" and not as_json:
        held = len(out.strip()) >= 8  # the text streamed so far is kept
    tally(f"interrupts {phase}", held)
    assert held, (code, as_json, out[-500:], err[-2000:])
