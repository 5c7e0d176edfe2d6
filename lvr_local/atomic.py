"""Files replaced whole or not at all: a saved conversation, an evaluation's run.json.

Writing a file in place destroys the old content first: a full disk, a kill or a power
cut in the middle leaves neither the old file nor the new one, only the bytes that made
it. `write_atomic` writes the new content to a temporary file in the same folder,
flushes it to the disk (fsync), renames it over the old name (a rename within one
filesystem is atomic) and flushes the folder, so that the rename itself survives a power
cut. Whatever fails, the path holds either the old content or the new one, and the
temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (str is written as UTF-8), all at once. Raises the
    OSError that stopped it; `path` is then as it was."""
    content = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0o666 less the umask, like any new file (mkstemp would make it private).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode_of(path))
    try:
        try:
            _write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _sync_folder(path.parent)


def _mode_of(path: Path) -> int:
    """An existing file keeps its permissions; a new one gets the default."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


def _sync_folder(folder: Path) -> None:
    """Make the rename durable. Some filesystems cannot fsync a folder: the file is in
    place all the same, so that is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
