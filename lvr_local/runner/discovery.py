"""Every GGUF model on this machine that another tool put there, with its header summary.

`find_models()` lists the stores (stores.py), folds the names that reach the same file
(an Ollama blob under two tags, a hard link, a symlink) into one entry, and describes
each file from its header (llama/gguf_summary.py): architecture, parameters,
quantization, tokenizer, role. Headers are read once: summaries, and the errors of files
that are not GGUF, are cached on disk by path, size and modification time, so a second
listing reads no model file at all. A split model is one entry whose size is its parts'
total.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvr_local.decoding.roles import role_from_metadata
from lvr_local.errors import ModelFileError
from lvr_local.llama.gguf_summary import GGUFSummary, summarize_gguf
from lvr_local.paths import cache_dir
from lvr_local.runner.stores import STORES, StoredModel, stored_models

CACHE_FORMAT = 2  # 2: summaries carry split_count


@dataclass
class FoundModel:
    """One file and every name that reaches it (the first is the one shown)."""

    names: list[str]
    store: str
    path: Path
    size: int = 0
    summary: GGUFSummary | None = None
    problem: str | None = None

    @property
    def role(self) -> str | None:
        s = self.summary
        return role_from_metadata(s.has_chat_template, s.finetune, s.name) if s else None

    def as_record(self) -> dict[str, Any]:
        header = self.summary.as_record() if self.summary else {}
        if header:
            header["model_name"] = header.pop("name")  # general.name, not the store's
        return {
            **header,
            "name": self.names[0],
            "also": self.names[1:],
            "store": self.store,
            "path": str(self.path),
            "size": self.size,
            "role": self.role,
            "problem": self.problem,
        }


class SummaryCache:
    """Header summaries on disk, keyed by resolved path, size and mtime."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if data.get("format") == CACHE_FORMAT and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or a damaged one: rebuilt

    def summary(
        self, path: Path, size: int, mtime_ns: int, read: Path | None = None
    ) -> tuple[GGUFSummary | None, str | None]:
        """The file's summary, or why it has none; read from the header (of `read`, the
        name a split model's first part has among its parts) on a miss."""
        key = str(path)
        entry = self.entries.get(key)
        if entry and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
            try:
                if entry.get("summary") is not None:
                    return GGUFSummary.from_record(entry["summary"]), None
                return None, str(entry["error"])
            except (TypeError, KeyError):
                pass  # an entry of another shape: read again
        try:
            summary, error = summarize_gguf(read or path), None
        except ModelFileError as e:
            summary, error = None, str(e)
        self.entries[key] = {
            "size": size,
            "mtime_ns": mtime_ns,
            "summary": summary.as_record() if summary else None,
            "error": error,
        }
        self.changed = True
        return summary, error

    def save(self) -> None:
        """Written to a temporary name and renamed: a crash leaves the old cache whole."""
        if not self.changed:
            return
        partial = self.file.with_suffix(".partial")
        try:
            partial.write_text(json.dumps({"format": CACHE_FORMAT, "files": self.entries}))
            partial.replace(self.file)
        except OSError:
            partial.unlink(missing_ok=True)  # a cache that cannot be written: next time


def find_models(stores: tuple[str, ...] = STORES) -> list[FoundModel]:
    """Every model of the stores, one entry per file, each summarized from its header."""
    cache = SummaryCache(cache_dir("discovery") / "summaries.json")
    by_file: dict[tuple[int, int], FoundModel] = {}
    found: list[FoundModel] = []
    for entry in stored_models(stores):
        model = _found(entry, cache, by_file)
        if model is not None:
            found.append(model)
    cache.save()
    return found


def _found(
    entry: StoredModel, cache: SummaryCache, by_file: dict[tuple[int, int], FoundModel]
) -> FoundModel | None:
    """A new entry, or None when the name reaches a file already listed (added to it)."""
    if entry.problem:
        return FoundModel([entry.name], entry.store, entry.path, problem=entry.problem)
    try:
        st = entry.path.stat()
        real = entry.path.resolve()
        size = sum(p.stat().st_size for p in entry.parts) if entry.parts else st.st_size
    except OSError as e:
        problem = f"cannot read {entry.path}: {e.strerror or e}"
        return FoundModel([entry.name], entry.store, entry.path, problem=problem)
    identity = (st.st_dev, st.st_ino)
    if identity in by_file:
        by_file[identity].names.append(entry.name)
        return None
    read = entry.path if entry.parts else None  # a split model's parts are found by name
    summary, error = cache.summary(real, size, st.st_mtime_ns, read)
    model = FoundModel([entry.name], entry.store, read or real, size, summary, error)
    by_file[identity] = model
    return model
