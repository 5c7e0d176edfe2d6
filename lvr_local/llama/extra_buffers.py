"""Whether llama.cpp's extra buffer types are safe on this machine, found out by trying.

At load, llama.cpp repacks a model's weights into "extra" buffer types where the CPU has
kernels for them: AMX on Intel Xeons that have it, CPU_REPACK (interleaved Q4_0, Q4_K,
IQ4_NL blocks for AVX2 and AVX-512) elsewhere. They make prompt processing faster, and on
some machines they fault: on AMX Xeons (virtualised Sapphire and Granite Rapids among
them) the first *batched* matrix multiply dies with SIGSEGV, killing the process with no
message (llama.cpp#20824). A one-token decode survives, so the crash looks random.

A fault cannot be caught in Python, so the question is asked in a child process: load the
model with the extra buffers, decode a batch of tokens and then one token, check the
logits are finite. The child's fate is the verdict: it exits cleanly (safe), dies of a
fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT), hangs past a time limit or returns
non-finite logits (unsafe: load without them). A child that cannot run at all (an
import error, a file it cannot read) or is stopped from outside (SIGKILL from the OOM
killer) says nothing about the kernels: the verdict is "off" for this run, with the
reason, and is not kept, so the next run asks again.

A verdict holds for one model file, one CPU and one llama.cpp build: it is kept in the
user directory's cache together with the CPU's model name and flags, the llama-cpp-python
version and the identity (size, modification time) of its libraries, and a change of
any of them makes every kept verdict stale. The probe costs a second or two per model,
once per machine and build.

`extra_buffers = "auto" | "on" | "off"` (run settings, models.toml per model, the
`--extra-buffers` flag) overrides the verdict: "on" and "off" never probe.

Testing the unsafe path on a machine whose kernels work: with $LVR_TEST_PROBE_FAULT set
(test-only; never set it otherwise) the probe child harms itself instead of decoding:
"signal" sends itself a real SIGSEGV after loading, "kill" a SIGKILL (as the OOM killer
would: no verdict), "hang" sleeps past any time limit, "error" raises before loading, as
a broken import would.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp as L

from lvr_local.errors import LvrError
from lvr_local.paths import cache_dir

SETTINGS = ("auto", "on", "off")
PROBE_TIMEOUT_S = 120.0
FAULT_ENV = "LVR_TEST_PROBE_FAULT"  # test-only: see the module docstring
PROBE_BATCH = 32  # tokens of the batched decode (the one that faults on AMX machines)
PLAIN_BUFFERS = ("CPU", "CPU_Mapped")  # not extra: the weights as they are in the file
# The signals a faulting kernel dies of (GGML_ABORT raises SIGABRT).
FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


@dataclass(frozen=True)
class Verdict:
    """The probe's answer for one model. `safe`: load it with extra buffers. `reason`:
    why, in words for `lvr settings` and `lvr doctor`. `buffer_types`: the extra buffer
    types its weights got in the probe. `kept`: whether it may be cached (the probe
    could run); `cached`: whether it came from the cache."""

    safe: bool
    reason: str
    buffer_types: tuple[str, ...] = ()
    kept: bool = True
    cached: bool = False


def decide(setting: str, path: Path, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether to load `path` with extra buffers under `setting`, and why."""
    if setting not in SETTINGS:
        raise LvrError(f"extra_buffers must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting == "on", f"extra_buffers = {setting}"
    found = verdict(path, timeout)
    return found.safe, f"auto: {found.reason}"


def verdict(path: Path, timeout: float = PROBE_TIMEOUT_S) -> Verdict:
    """The kept verdict for `path` on this machine and build, else a fresh probe's."""
    kept = cached_verdict(path)
    if kept is not None:
        return kept
    found = run_probe(path, timeout)
    if found.kept:
        _store(path, found)
    return found


# ----------------------------------------------------------------- what a verdict is for


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo), sorted; empty where unknown."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return sorted(set(line.partition(":")[2].split()))
    return []


def cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return []


def _file_identity(path: Path) -> str:
    """Path, size and modification time: a rebuilt or reinstalled file differs."""
    try:
        st = path.stat()
    except OSError:
        return f"{path} (missing)"
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def machine_key() -> dict[str, Any]:
    """What every verdict depends on besides the model: CPU, llama.cpp version, build."""
    lib = Path(L.__file__).parent / "lib"
    libraries = sorted(p for p in lib.glob("*") if p.is_file() and not p.is_symlink())
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "llama_cpp": L.__version__,
        "libraries": [_file_identity(p) for p in libraries],
    }


# ----------------------------------------------------------------- the cache


def verdict_file() -> Path:
    return cache_dir("extra-buffers") / "verdicts.json"


def _read_cache() -> dict[str, Any]:
    """The kept verdicts if they were made for this machine and build, else none."""
    try:
        data = json.loads(verdict_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: probe again
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return {}
    models = data.get("models")
    return models if isinstance(models, dict) else {}


def cached_verdict(path: Path) -> Verdict | None:
    """The kept verdict for `path`, or None (never probed here, or stale)."""
    entry = _read_cache().get(_file_identity(Path(path)))
    try:
        return Verdict(
            safe=bool(entry["safe"]),
            reason=str(entry["reason"]),
            buffer_types=tuple(entry["buffer_types"]),
            cached=True,
        )
    except (KeyError, TypeError):
        return None


def _store(path: Path, found: Verdict) -> None:
    """Add `found` to the kept verdicts, atomically (a crash leaves the old file)."""
    models = _read_cache()
    entry = asdict(found)
    del entry["kept"], entry["cached"]
    models[_file_identity(Path(path))] = entry
    target = verdict_file()
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # a cache that cannot be written: probe again later
        temporary.write_text(json.dumps({"machine": machine_key(), "models": models}, indent=1))
        os.replace(temporary, target)


# ----------------------------------------------------------------- the probe, parent side


def run_probe(path: Path, timeout: float = PROBE_TIMEOUT_S) -> Verdict:
    """Load and decode `path` with extra buffers in a child process; its fate is the
    verdict. Never hangs (the child is killed at `timeout`), never raises."""
    command = [sys.executable, "-m", "lvr_local.llama.extra_buffers", str(path)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        types = _reported_types(e.stdout)
        return Verdict(
            False, f"the probe decode{_with(types)} hung (killed after {timeout:g} s)", types
        )
    except OSError as e:
        return Verdict(False, f"the probe could not start ({e}): loading without", kept=False)
    types = _reported_types(done.stdout)
    status = done.returncode
    if status < 0 or status > 128:  # killed by a signal (> 128: through a shell)
        number = -status if status < 0 else status - 128
        name = _signal_name(number)
        if number not in FAULTS:  # stopped from outside (the OOM killer, a kill): no verdict
            return Verdict(False, f"the probe was stopped by {name}: loading without", kept=False)
        return Verdict(False, f"the probe decode{_with(types)} died of {name}", types)
    if status != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return Verdict(False, f"the probe could not run ({last}): loading without", kept=False)
    if '"finite": false' in done.stdout:
        return Verdict(False, f"the probe decode{_with(types)} gave bad logits", types)
    if not types:
        return Verdict(True, "this model gets no extra buffer type here (nothing to repack)")
    return Verdict(True, f"the probe decode with {', '.join(types)} passed", types)


def _with(types: tuple[str, ...]) -> str:
    return f" with {', '.join(types)}" if types else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _reported_types(stdout: str | bytes | None) -> tuple[str, ...]:
    """The extra buffer types the child reported after loading (before the decode)."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    for line in (stdout or "").splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return tuple(json.loads(line)["extra_buffers"])
    return ()


# ----------------------------------------------------------------- the probe, child side


def _probe_child(path: str) -> None:
    """Load with extra buffers, report them, decode PROBE_BATCH tokens at once, then one
    more, and report whether the logits are finite. Runs in its own process."""
    import numpy as np

    from lvr_local.llama.native import LlamaBatch, LlamaContext, LlamaModel
    from lvr_local.machine import physical_cores

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it kills us
    fault = os.environ.get(FAULT_ENV, "")
    if fault == "error":
        raise ImportError(f"{FAULT_ENV}=error: a stand-in for a broken import")
    model = LlamaModel(Path(path), extra_buffers=True)
    extra = [t for t in model.buffer_types if t not in PLAIN_BUFFERS]  # no GPU layers here
    print(json.dumps({"extra_buffers": extra}), flush=True)
    if fault in ("signal", "kill"):
        os.kill(os.getpid(), signal.SIGSEGV if fault == "signal" else signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    ctx = LlamaContext(
        model, n_ctx=256, n_batch=64, n_seq_max=1, n_threads=physical_cores(), n_ubatch=64
    )
    n_vocab = L.llama_vocab_n_tokens(model.vocab)
    batch = LlamaBatch(PROBE_BATCH)
    tokens = [(100 + 37 * i) % n_vocab for i in range(PROBE_BATCH)]
    batch.fill(tokens, list(range(PROBE_BATCH)), [0] * PROBE_BATCH, [True] * PROBE_BATCH)
    rows = []
    if ctx.decode(batch) == 0:
        rows = [ctx.logits_row(i, n_vocab) for i in (0, PROBE_BATCH - 1)]
        batch.fill([tokens[0]], [PROBE_BATCH], [0], [True])
        if ctx.decode(batch) == 0:
            rows.append(ctx.logits_row(0, n_vocab))
    finite = len(rows) == 3 and all(bool(np.isfinite(r).all()) for r in rows)
    print(json.dumps({"finite": finite}), flush=True)


if __name__ == "__main__":
    _probe_child(sys.argv[1])
