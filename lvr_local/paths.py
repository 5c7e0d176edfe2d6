"""Where lvr-local keeps its files: one user directory that LVR_HOME can move."""

from __future__ import annotations

import os
from pathlib import Path

import click

APP_NAME = "lvr-local"


def user_dir() -> Path:
    """The user directory: $LVR_HOME, or the platform's application directory."""
    env = os.environ.get("LVR_HOME")
    path = Path(env).expanduser() if env else Path(click.get_app_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """A sub-directory of the user directory for derived data that can be rebuilt."""
    path = user_dir() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
