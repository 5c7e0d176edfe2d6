"""What this machine offers the models: its physical CPU cores and its free memory."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores usable by this process (more threads than that slow llama.cpp down)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def available_memory() -> int | None:
    """Bytes this machine can give without swapping: /proc/meminfo's MemAvailable (free
    memory plus the page cache it can drop). None where there is no /proc (macOS)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
