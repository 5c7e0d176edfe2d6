"""Compiling llama.cpp's RPC backend alone, for a llama-cpp-python built without it.

ggml can load a backend as a module, and the RPC backend is two C++ files
(ggml/src/ggml-rpc) that need only ggml's base library. So instead of rebuilding all of
llama.cpp with -DGGML_RPC=on (minutes), `lvr rpc-build` compiles those two files from
the installed version's source distribution, against the installed libggml-base, in
seconds. The module must come from the same llama-cpp-python version as the library it
is loaded into (ggml's structures are not a stable ABI), hence the version in its name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import llama_cpp as L

from lvr_local.errors import LvrError
from lvr_local.llama.rpc import REBUILD_HINT


def download_sdist(directory: Path) -> Path:
    """The installed llama-cpp-python version's source archive, downloaded with pip into
    `directory` unless it is already there."""
    name = f"llama_cpp_python-{L.__version__}.tar.gz"
    archive = directory / name
    if archive.is_file():
        return archive
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:"]
    command += ["--no-deps", f"llama-cpp-python=={L.__version__}", "-d", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not archive.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LvrError(f"could not download the llama-cpp-python {L.__version__} sources: {tail}")
    return archive


def _extract(archive: Path, dest: Path) -> Path:
    """ggml's headers and the RPC sources, out of the archive; returns ggml/'s path."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _, _, rel = member.name.partition("/vendor/llama.cpp/ggml/")
            top_header = rel.startswith("src/") and rel.count("/") == 1 and rel.endswith(".h")
            if rel.startswith(("include/", "src/ggml-rpc/")) or top_header:
                members.append(member)
        if not members:
            raise LvrError(f"{archive} holds no vendor/llama.cpp/ggml sources")
        tar.extractall(dest, members=members, filter="data")
    return next(dest.glob("*/vendor/llama.cpp/ggml"))


def _compile_command(ggml: Path, out: Path) -> list[str]:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise LvrError(f"no C++ compiler found (set CXX); or rebuild with: {REBUILD_HINT}")
    lib = Path(L.__file__).parent / "lib"
    link = ["-dynamiclib"] if sys.platform == "darwin" else ["-shared"]
    rpc_dir = ggml / "src" / "ggml-rpc"  # ggml-rpc.cpp, transport.cpp; Apple's RDMA left out
    sources = [str(p) for p in sorted(rpc_dir.glob("*.cpp")) if "apple" not in p.name]
    flags = ["-std=c++17", "-O2", "-fPIC", "-DNDEBUG", "-DGGML_BACKEND_DL", "-DGGML_SHARED"]
    flags += ["-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED"]
    includes = [f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
    libs = [f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}"]
    return [compiler, *flags, *includes, *sources, *link, *libs, "-o", str(out)]


def build_rpc_module(out: Path, *, sdist: Path | None = None, downloads: Path) -> float:
    """Compile the RPC backend module to `out` (written whole or not at all); `sdist`:
    the source archive, else downloaded into `downloads`. Returns the compile seconds."""
    if sys.platform == "win32":
        raise LvrError(f"building the RPC module is not supported on Windows: {REBUILD_HINT}")
    archive = sdist or download_sdist(downloads)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.part")  # renamed whole, in place
    with tempfile.TemporaryDirectory(prefix="lvr-rpc-build-") as work:
        ggml = _extract(archive, Path(work))
        start = time.perf_counter()
        done = subprocess.run(_compile_command(ggml, partial), capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or ["no output"]
        raise LvrError(f"compiling the RPC module failed: {errors[0]}")
    os.replace(partial, out)
    return seconds
