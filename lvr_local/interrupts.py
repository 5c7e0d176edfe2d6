"""Ctrl-C and SIGTERM that stop a run promptly, anywhere, without a traceback.

Python turns SIGINT into KeyboardInterrupt at the next bytecode, wherever that is. Two
places swallow it: a ctypes callback (llama.cpp's log and progress callbacks print
"Exception ignored on calling ctypes callback function" and go on), and the start-up
imports, before any handler could turn it into a clean exit. So the command line
installs `install()`'s handler first thing. It records the signal and raises
`Interrupted` (a KeyboardInterrupt, so existing handlers still see it), except while
raising would be lost: during start-up, inside a callback frame, or in a `deferred()`
section around a C call. There the signal waits in `pending()`; the C call is asked to
stop (llama.cpp's load progress callback returns False), and `check()` raises it as soon
as control is back in Python. SIGTERM is treated like SIGINT, so that a terminated run
also keeps and prints what it produced; the exit status is 128 + the signal number.

Without `install()` (a library user, the TUI, the server) nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import ClassVar

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run was interrupted by `signum`; `status` is the exit status that says so."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


class _State:
    installed = False
    pending: int | None = None
    depth = 0  # > 0: inside a deferred section (start-up counts as one)
    callbacks: ClassVar[set[CodeType]] = set()


def install() -> None:
    """Handle SIGINT and SIGTERM from now on; start-up is deferred until `started()`."""
    if _State.installed:
        return
    _State.installed, _State.depth = True, 1
    for signum in HANDLED:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(signum, _handler)


def uninstall() -> None:
    """Give the signals back to Python's defaults, for a front end with its own handling
    (the TUI reads Ctrl-C as a key; the server's uvicorn shuts down on its own)."""
    if not _State.installed:
        return
    _State.installed, _State.depth, _State.pending = False, 0, None
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def started() -> None:
    """Start-up is over: a signal that came during it is raised now."""
    if _State.installed and _State.depth > 0:
        _State.depth -= 1
    check()


def register_callback(code: CodeType) -> None:
    """A function that C calls back: a signal arriving inside it waits for `check()`."""
    _State.callbacks.add(code)


def pending() -> int | None:
    """The signal received and not yet raised, if any."""
    return _State.pending


def check() -> None:
    """Raise the pending signal, if any, unless raising is deferred."""
    signum = _State.pending
    if signum is not None and _State.depth == 0:
        _State.pending = None
        raise Interrupted(signum)


def exit_status(error: BaseException) -> int:
    """The exit status for an interrupt: 130 for Ctrl-C, 143 for SIGTERM."""
    return error.status if isinstance(error, Interrupted) else 128 + signal.SIGINT


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section (a C call with callbacks) during which a signal only waits; it is
    raised when the section ends."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
    check()


def _in_callback(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code in _State.callbacks:
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    _State.pending = signum
    if _State.depth > 0 or _in_callback(frame):
        return
    _State.pending = None
    raise Interrupted(signum)
