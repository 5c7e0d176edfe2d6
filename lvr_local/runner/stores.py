"""The GGUF files other local-model tools keep on disk, by the names those tools use.

- Ollama: $OLLAMA_MODELS, else ~/.ollama/models. A model tag is a JSON manifest at
  manifests/HOST/NAMESPACE/MODEL/TAG whose layer of mediaType
  `application/vnd.ollama.image.model` names the GGUF blob by digest
  (blobs/sha256-HEX). Named here `ollama:MODEL:TAG` (the `library` namespace of
  registry.ollama.ai), `ollama:NAMESPACE/MODEL:TAG`, or `ollama:HOST/NAMESPACE/MODEL:TAG`.
- The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
  ~/.cache/huggingface/hub. A download is models--ORG--REPO/snapshots/REVISION/FILE,
  a symlink into the repository's blobs/. Named `hf:ORG/REPO/FILE.gguf`; of several
  revisions, the one refs/main names comes first.
- LM Studio: ~/.lmstudio/models/PUBLISHER/MODEL/*.gguf, and the older
  ~/.cache/lm-studio/models. Named `lmstudio:PUBLISHER/MODEL/FILE.gguf`.
- GPT4All: the desktop app's download path, by default (its settings page)
  ~/.local/share/nomic.ai/GPT4All on Linux, ~/Library/Application Support/nomic.ai/GPT4All
  on macOS, %LOCALAPPDATA%/nomic.ai/GPT4All on Windows; and ~/.cache/gpt4all, where its
  Python package downloads. Model files lie flat in the folder. Named `gpt4all:FILE.gguf`.
- Jan: its data folder (its documentation: ~/.config/Jan/data, or under
  $XDG_CONFIG_HOME, on Linux; ~/Library/Application Support/Jan/data on macOS;
  %APPDATA%/Jan/data on Windows) holds llamacpp/models/ID/model.gguf, ID being the
  model's id, which may contain slashes; releases before that kept ~/jan/models/ID/*.gguf.
  Named `jan:ID` (`jan:ID/FILE.gguf` for a folder without a model.gguf).

A model split into parts (NAME-00001-of-00003.gguf) is one entry, named and reached by
its first part (llama.cpp loads the others from it), with every part in `parts`.

Nothing here reads a model file or touches the network: a listing is manifests, links
and directory entries. A broken entry (a damaged manifest, a missing blob, a dangling
link) is listed with its problem rather than dropped, so a listing is never silent
about what it skipped.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lvr_local.errors import ModelFileError
from lvr_local.llama.gguf_summary import SPLIT_NAME

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
STORES = ("ollama", "hf", "lmstudio", "gpt4all", "jan")
PREFIXES = tuple(f"{store}:" for store in STORES)


@dataclass(frozen=True)
class StoredModel:
    """One name a store gives a GGUF file; `problem` says why it cannot be used."""

    store: str
    name: str  # with its prefix: "ollama:llama3.2:1b"
    path: Path
    problem: str | None = None
    parts: tuple[Path, ...] = ()  # of a split model, every part (the first is `path`)


def is_store_name(source: str) -> bool:
    return source.startswith(PREFIXES)


# ----------------------------------------------------------------- where the stores are


def ollama_root() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def hf_root() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def lmstudio_roots() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def gpt4all_roots() -> list[Path]:
    home = Path.home()
    if sys.platform == "darwin":
        app = home / "Library" / "Application Support"
    elif sys.platform == "win32":
        app = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    else:
        app = home / ".local" / "share"
    return [app / "nomic.ai" / "GPT4All", home / ".cache" / "gpt4all"]


def jan_roots() -> list[Path]:
    """The current layout's models folder, then the older one."""
    home = Path.home()
    if sys.platform == "darwin":
        data = home / "Library" / "Application Support" / "Jan" / "data"
    elif sys.platform == "win32":
        data = Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming") / "Jan" / "data"
    else:
        config = os.environ.get("XDG_CONFIG_HOME")
        data = (Path(config) if config else home / ".config") / "Jan" / "data"
    return [data / "llamacpp" / "models", home / "jan" / "models"]


def store_roots() -> dict[str, list[Path]]:
    """The folders each store is looked for in."""
    return {
        "ollama": [ollama_root()],
        "hf": [hf_root()],
        "lmstudio": lmstudio_roots(),
        "gpt4all": gpt4all_roots(),
        "jan": jan_roots(),
    }


def stored_models(stores: tuple[str, ...] = STORES) -> list[StoredModel]:
    """Every name of every store, in store order, then by name; a split model once."""
    found: list[StoredModel] = []
    if "ollama" in stores:
        found += sorted(ollama_models(ollama_root()), key=lambda m: m.name)
    if "hf" in stores:
        found += fold_splits(sorted(hf_models(hf_root()), key=lambda m: m.name))
    if "lmstudio" in stores:
        seen: set[str] = set()
        for root in lmstudio_roots():  # the same name in both folders: the newer one
            for m in fold_splits(sorted(lmstudio_models(root), key=lambda m: m.name)):
                if m.name not in seen:
                    seen.add(m.name)
                    found.append(m)
    for store, listing in (("gpt4all", gpt4all_models), ("jan", jan_models)):
        if store in stores:
            found += _first_of_each_name([listing(root) for root in store_roots()[store]])
    return found


def _first_of_each_name(listings: list[Iterator[StoredModel]]) -> list[StoredModel]:
    """Several folders of one store: a name found in two is the first folder's."""
    seen: set[str] = set()
    found = []
    for listing in listings:
        for m in fold_splits(sorted(listing, key=lambda m: m.name)):
            if m.name not in seen:
                seen.add(m.name)
                found.append(m)
    return found


def fold_splits(entries: list[StoredModel]) -> list[StoredModel]:
    """The parts of each split model folded into one entry, where its first part was (or
    its lowest part, with the problem, when the first is missing)."""
    sets: dict[tuple[Path, str, int], list[StoredModel]] = {}
    folded: list[StoredModel | tuple[Path, str, int]] = []
    for entry in entries:
        match = SPLIT_NAME.match(entry.path.name)
        if match is None or int(match["count"]) < 2:
            folded.append(entry)
            continue
        key = (entry.path.parent, match["prefix"], int(match["count"]))
        if key not in sets:
            sets[key] = []
            folded.append(key)
        sets[key].append(entry)
    return [m if isinstance(m, StoredModel) else _split_entry(m, sets[m]) for m in folded]


def _split_entry(key: tuple[Path, str, int], members: list[StoredModel]) -> StoredModel:
    folder, prefix, count = key
    parts = tuple(folder / f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))
    present = {m.path.name: m for m in members}
    first = present.get(parts[0].name) or min(members, key=lambda m: m.path.name)
    missing = [p.name for p in parts if p.name not in present or not p.exists()]
    problem = first.problem or next((m.problem for m in members if m.problem), None)
    if missing and not problem:
        problem = f"split model in {count} parts: {', '.join(missing)} missing"
    return StoredModel(first.store, first.name, first.path, problem, parts)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.is_dir())
    except OSError:
        return []


# ----------------------------------------------------------------- Ollama


def ollama_models(root: Path) -> Iterator[StoredModel]:
    """One entry per manifest (tag): manifests/HOST/NAMESPACE/MODEL/TAG."""
    for host in _subdirs(root / "manifests"):
        for namespace in _subdirs(host):
            for model in _subdirs(namespace):
                for tag in _files(model):
                    name = ollama_name(host.name, namespace.name, model.name, tag.name)
                    yield _ollama_entry(root, name, tag)


def ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    if host != OLLAMA_REGISTRY:
        return f"ollama:{host}/{namespace}/{model}:{tag}"
    if namespace != "library":
        return f"ollama:{namespace}/{model}:{tag}"
    return f"ollama:{model}:{tag}"


def _ollama_manifest(root: Path, name: str) -> Path:
    """Where the manifest of `ollama:NAME` lies (tag `latest` when none is given)."""
    rest = name.removeprefix("ollama:")
    model, _, tag = rest.rpartition(":") if ":" in rest.rpartition("/")[2] else (rest, "", "")
    parts, tag = model.split("/"), tag or "latest"
    if len(parts) > 3 or any(part in ("", ".", "..") for part in [*parts, tag]):
        raise ModelFileError(
            f"'{name}' is not an Ollama model name (expected ollama:MODEL[:TAG], "
            "ollama:NAMESPACE/MODEL[:TAG] or ollama:HOST/NAMESPACE/MODEL[:TAG])"
        )
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return root.joinpath("manifests", *parts, tag)


def _ollama_entry(root: Path, name: str, manifest: Path) -> StoredModel:
    """The blob a manifest names as its model layer, or what is wrong with it."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        digests = [layer["digest"] for layer in layers if layer["mediaType"] == OLLAMA_MODEL_LAYER]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        problem = f"damaged manifest {manifest} ({type(e).__name__}: {e})"
        return StoredModel("ollama", name, manifest, problem)
    if not digests:
        return StoredModel("ollama", name, manifest, f"manifest {manifest} has no model layer")
    digest = str(digests[0])
    algorithm, _, hex_digest = digest.partition(":")
    blob = root / "blobs" / f"{algorithm}-{hex_digest}"
    if not hex_digest or not blob.is_file():
        problem = f"its model blob {digest} is missing from {root / 'blobs'}"
        return StoredModel("ollama", name, blob, problem)
    return StoredModel("ollama", name, blob)


# ----------------------------------------------------------------- Hugging Face


def hf_models(root: Path) -> Iterator[StoredModel]:
    """Every .gguf of every cached model repository; a file in several revisions once."""
    for repo in _subdirs(root):
        if not repo.name.startswith("models--"):
            continue
        org_repo = repo.name.removeprefix("models--").replace("--", "/")
        seen: set[str] = set()
        for snapshot in _hf_revisions(repo):
            for link in sorted(snapshot.rglob("*.gguf")):
                relative = link.relative_to(snapshot).as_posix()
                if relative in seen:
                    continue
                seen.add(relative)
                name = f"hf:{org_repo}/{relative}"
                problem = None if link.exists() else f"dangling link {link} (blob missing)"
                yield StoredModel("hf", name, link, problem)


def _hf_revisions(repo: Path) -> list[Path]:
    """The snapshots of a repository, the one refs/main names first."""
    snapshots = _subdirs(repo / "snapshots")
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    return sorted(snapshots, key=lambda s: s.name != main)


# ----------------------------------------------------------------- LM Studio


def lmstudio_models(root: Path) -> Iterator[StoredModel]:
    """PUBLISHER/MODEL/FILE.gguf under one LM Studio models folder."""
    for publisher in _subdirs(root):
        for model in _subdirs(publisher):
            for file in _files(model):
                if file.suffix.lower() != ".gguf":
                    continue
                name = f"lmstudio:{publisher.name}/{model.name}/{file.name}"
                problem = None if file.exists() else f"dangling link {file}"
                yield StoredModel("lmstudio", name, file, problem)


# ----------------------------------------------------------------- GPT4All


def gpt4all_models(root: Path) -> Iterator[StoredModel]:
    """FILE.gguf directly in a GPT4All models folder."""
    for file in _files(root):
        if file.suffix.lower() == ".gguf":
            problem = None if file.exists() else f"dangling link {file}"
            yield StoredModel("gpt4all", f"gpt4all:{file.name}", file, problem)


# ----------------------------------------------------------------- Jan


def jan_models(root: Path) -> Iterator[StoredModel]:
    """Each folder under a Jan models folder that holds GGUF files: `jan:ID` for its
    model.gguf (the current layout, beside model.yml; another .gguf there, such as a
    vision projector, is not the model), `jan:ID/FILE.gguf` for each file otherwise."""
    for folder, _, names in sorted(os.walk(root)):
        ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
        if not ggufs or Path(folder) == root:
            continue
        model_id = Path(folder).relative_to(root).as_posix()
        picked = (
            [("model.gguf", f"jan:{model_id}")]
            if "model.gguf" in ggufs
            else [(n, f"jan:{model_id}/{n}") for n in ggufs]
        )
        for file_name, name in picked:
            file = Path(folder) / file_name
            problem = None if file.exists() else f"dangling link {file}"
            yield StoredModel("jan", name, file, problem)


# ----------------------------------------------------------------- names to files


def resolve_stored(source: str) -> Path:
    """The GGUF file a store name names. A name that matches nothing lists the closest
    names found and how to get the model; one that matches several files lists them."""
    store = source.partition(":")[0]
    if store == "ollama":
        root = ollama_root()
        manifest = _ollama_manifest(root, source)
        if manifest.is_file():
            return _usable(_ollama_entry(root, source, manifest))
        entries = list(ollama_models(root))
    else:
        entries = stored_models((store,))
        exact = [m for m in entries if m.name == source]
        if exact:
            return _usable(exact[0])
        below = [m for m in entries if m.name.startswith(source.rstrip("/") + "/")]
        if len(below) == 1:
            return _usable(below[0])
        if below:
            names = ", ".join(m.name for m in below)
            raise ModelFileError(f"{source} holds {len(below)} GGUF files; name one: {names}")
    raise ModelFileError(_not_found(source, store, [m.name for m in entries]))


def _usable(entry: StoredModel) -> Path:
    if entry.problem:
        raise ModelFileError(f"{entry.name}: {entry.problem}")
    return entry.path


GET_HINTS = {
    "ollama": "pull it with: ollama pull {name}",
    "hf": "download it with: hf download {repo} --include '*.gguf'",
    "lmstudio": "download it with: lms get {repo}",
    "gpt4all": "download it in GPT4All (Models, Add Model)",
    "jan": "download it in Jan's Hub",
}


def _not_found(source: str, store: str, names: list[str]) -> str:
    rest = source.partition(":")[2]
    repo = "/".join(rest.split("/")[:2])
    message = f"no model {source} on this machine"
    message += " (looked in " + ", ".join(str(r) for r in store_roots()[store]) + ")"
    close = difflib.get_close_matches(source, names, n=5, cutoff=0.5)
    if close:
        message += "; closest: " + ", ".join(close)
    hint = GET_HINTS[store].format(name=rest, repo=repo)
    return f"{message}; {hint}"
