"""When llama.cpp still faults or aborts: the Python stack in llama.log, and a line on
stderr that names the file.

A fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT from a GGML_ABORT) kills the
process in C, where no Python handler runs: the user would see the shell's
"Segmentation fault" and nothing else. `install()` turns on `faulthandler`, which writes
the Python stack of every thread at that moment (which command, which model call) after
llama.cpp's own last log lines in llama.log.

faulthandler writes to one file descriptor only, so that descriptor is a pipe to a tiny
watcher process (`/bin/sh`, started once per command): it waits, blocked, for the first
byte; when one comes it appends the stack to llama.log and prints one line on stderr
naming the file. When the command ends normally the pipe closes and the watcher exits
without a word. It ignores Ctrl-C and SIGTERM, which are the command's to handle. Where
there is no /bin/sh (Windows) the stack goes to llama.log directly, with no stderr line.

Only the command line installs it; a library user keeps Python's defaults.
"""

from __future__ import annotations

import contextlib
import faulthandler
import shutil
import subprocess
from typing import IO

from lvr_local.errors import LvrError
from lvr_local.paths import log_file

# $1: llama.log. Blocks on the first line; at EOF (a normal exit) says nothing.
_WATCHER = (
    "trap '' INT TERM; "
    'if IFS= read -r first; then { printf "%s\\n" "$first"; cat; } >> "$1"; '
    "printf \"lvr: crashed (fatal signal); llama.cpp's last log lines and the Python stack "
    'are in %s\\n" "$1" >&2; fi'
)
_keep: list[object] = []  # the watcher and the pipe's write end, for the process's life


def install() -> None:
    """Send a fatal signal's Python stack to llama.log, with a line on stderr naming it.
    Never fails the command: without a user directory it does nothing."""
    try:
        path = log_file()
    except LvrError:
        return
    shell = shutil.which("sh")
    with contextlib.suppress(OSError):
        out = path.open("ab") if shell is None else _start_watcher(shell, str(path))
        faulthandler.enable(file=out, all_threads=True)


def _start_watcher(shell: str, path: str) -> IO[bytes]:
    """The watcher process; returns the write end of its stdin (not inherited by the
    command's own children, so the watcher sees the end of the pipe when it ends)."""
    watcher = subprocess.Popen(
        [shell, "-c", _WATCHER, "lvr-crash-watcher", path],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    _keep.append(watcher)
    assert watcher.stdin is not None
    return watcher.stdin
