"""Where lvr-local keeps its files: one user directory that LVR_HOME can move."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import platformdirs

from lvr_local.errors import LvrError

APP_NAME = "lvr-local"


def user_dir() -> Path:
    """The user directory: $LVR_HOME, or the platform's application directory
    (~/.config/lvr-local on Linux, ~/Library/Application Support/lvr-local on macOS)."""
    env = os.environ.get("LVR_HOME")
    path = Path(env).expanduser() if env else Path(platformdirs.user_config_dir(APP_NAME))
    return _ensure_dir(path, "the user directory (set LVR_HOME to move it)")


def cache_dir(kind: str) -> Path:
    """A sub-directory of the user directory for derived data that can be rebuilt."""
    return _ensure_dir(user_dir() / "cache" / kind, "a cache directory")


def log_file() -> Path:
    """llama.cpp's log of this run (shown on the terminal only with --verbose)."""
    return user_dir() / "llama.log"


def error_log() -> Path:
    """Where the CLI appends the traceback of an internal error (a bug of lvr-local)."""
    return user_dir() / "errors.log"


def _ensure_dir(path: Path, what: str) -> Path:
    """`path`, created if need be. One that cannot be written (a read-only filesystem or
    folder) is still used: what is cached there is read, and a warning, once per run,
    says that nothing new will be saved. Only a path that cannot be a folder at all (a
    file is in the way) is an error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if not path.is_dir() and e.errno not in READ_ONLY_ERRORS:
            raise LvrError(f"cannot create {what} {path}: {e.strerror or e}") from e
        _warn_read_only(path)
        return path
    if not os.access(path, os.W_OK):
        _warn_read_only(path)
    return path


READ_ONLY_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM}
_warned: list[Path] = []


def _warn_read_only(path: Path) -> None:
    if _warned:
        return
    _warned.append(path)
    sys.stderr.write(
        f"warning: {path} is read-only: lvr-local reads what is cached there "
        "and saves nothing new (set LVR_HOME to move its files)\n"
    )
