"""Small real filesystems for the tests that need a full or a read-only disk: a tmpfs
mounted for the test (the tests run as root), skipped, saying why, where it cannot be."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "256k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (the tests run as root); skipped, saying
    why, where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write into `folder` until its filesystem is full."""
    with (folder / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def make_read_only(folder: Path) -> None:
    """Remount the tmpfs on `folder` read-only, keeping what was written to it."""
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
