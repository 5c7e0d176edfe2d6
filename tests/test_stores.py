"""Models other tools downloaded: stores laid out as Ollama, the Hugging Face hub cache,
LM Studio, GPT4All and Jan lay them out, built at test time from the bundled GGUF files (hard links)
under a temporary HOME with the tools' environment variables moved."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import gguf as gguf_py
import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.errors import ModelFileError
from lvr_local.llama.gguf_check import read_header
from lvr_local.llama.gguf_summary import summarize_gguf
from lvr_local.runner import discovery
from lvr_local.runner.discovery import find_models
from lvr_local.runner.sources import resolve_source

HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME: every store starts empty, wherever the environment pointed."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HF_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def link(source: Path, target: Path) -> Path:
    """A hard link (a copy across file systems): the stores hold the real bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def ollama_model(root: Path, name: str, tag: str, gguf: Path) -> Path:
    """A tag as `ollama pull` leaves it: a manifest naming a sha256 blob."""
    hex_digest = sha256(gguf)
    blob = root / "blobs" / f"sha256-{hex_digest}"
    if not blob.exists():
        link(gguf, blob)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{hex_digest}"},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob


def hf_model(cache: Path, repo: str, files: dict[str, Path | None]) -> Path:
    """A repository as huggingface_hub caches it: snapshot symlinks into blobs/. A file
    given as None is a dangling link (its blob gone)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    for name, gguf in files.items():
        key = sha256(gguf) if gguf else "f" * 64
        if gguf:
            link(gguf, folder / "blobs" / key)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / key)
    return folder


def test_ollama_store(home: Path, bundled_paths: dict[str, Path]) -> None:
    root = home / ".ollama" / "models"
    smol = ollama_model(root, "smollm2", "135m", bundled_paths["smollm2"])
    gemma = ollama_model(root, "gemma3", "270m", bundled_paths["gemma3"])
    ollama_model(root, "gemma3", "latest", bundled_paths["gemma3"])  # the same blob again
    broken = root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"layers": [')  # a damaged manifest
    gone = root / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    gone.parent.mkdir(parents=True)
    gone.write_text(
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": "sha256:" + "a" * 64,
                    }
                ]
            }
        )
    )

    code, out = run("models", "--found", "--json")
    assert code == 0, out
    records = {r["name"]: r for r in json.loads(out)["models"]}
    assert records["ollama:gemma3:270m"]["also"] == ["ollama:gemma3:latest"]
    assert "ollama:gemma3:latest" not in records  # one entry per file
    assert records["ollama:gemma3:270m"]["architecture"] == "gemma3"
    assert records["ollama:gemma3:270m"]["quantization"] == "Q4_K_M"
    assert records["ollama:gemma3:270m"]["role"] == "base"
    assert records["ollama:smollm2:135m"]["quantization"] == "Q4_1"
    assert records["ollama:smollm2:135m"]["role"] == "chat"
    assert records["ollama:smollm2:135m"]["n_vocab"] == 49_152
    assert "damaged manifest" in records["ollama:broken:latest"]["problem"]
    assert "missing" in records["ollama:gone:latest"]["problem"]

    assert resolve_source("ollama:gemma3") == gemma  # tag `latest` when none is given
    assert resolve_source("ollama:smollm2:135m") == smol
    with pytest.raises(ModelFileError, match=r"closest: ollama:smollm2:135m.*ollama pull"):
        resolve_source("ollama:smollm2:1b")
    with pytest.raises(ModelFileError, match="damaged manifest"):
        resolve_source("ollama:broken")
    for bad in ("ollama:../../etc:passwd", "ollama:", "ollama:a//b"):
        with pytest.raises(ModelFileError, match="not an Ollama model name"):
            resolve_source(bad)


def test_ollama_models_moved_by_the_environment(
    home: Path, tmp_path: Path, bundled_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = tmp_path / "elsewhere"
    blob = ollama_model(moved, "smollm2", "latest", bundled_paths["smollm2"])
    assert find_models() == []
    monkeypatch.setenv("OLLAMA_MODELS", str(moved))
    assert [m.path for m in find_models()] == [blob]


def test_hugging_face_cache(
    home: Path, tmp_path: Path, bundled_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = home / ".cache" / "huggingface" / "hub"
    hf_model(cache, HF_REPO, {"smollm2-q4_1.gguf": bundled_paths["smollm2"]})
    hf_model(
        cache,
        "google/gemma-3-270m-GGUF",
        {
            "gemma-3-270m-Q4_K_M.gguf": bundled_paths["gemma3"],
            "gemma-3-270m-Q8_0.gguf": None,  # an interrupted download: a dangling link
        },
    )
    found = {m.names[0]: m for m in find_models()}
    smol = found[f"hf:{HF_REPO}/smollm2-q4_1.gguf"]
    assert smol.summary is not None and smol.summary.tokenizer_model == "gpt2"
    assert "dangling link" in (
        found["hf:google/gemma-3-270m-GGUF/gemma-3-270m-Q8_0.gguf"].problem or ""
    )

    assert resolve_source(f"hf:{HF_REPO}").name == "smollm2-q4_1.gguf"
    assert resolve_source(f"hf:{HF_REPO}").resolve() == smol.path
    with pytest.raises(ModelFileError, match=r"holds 2 GGUF files; name one: .*Q4_K_M\.gguf"):
        resolve_source("hf:google/gemma-3-270m-GGUF")
    with pytest.raises(ModelFileError, match="dangling"):
        resolve_source("hf:google/gemma-3-270m-GGUF/gemma-3-270m-Q8_0.gguf")
    with pytest.raises(ModelFileError, match="hf download google/gemma-3-1b-GGUF"):
        resolve_source("hf:google/gemma-3-1b-GGUF")

    moved = tmp_path / "hf-home"
    shutil.move(cache.parent, moved)
    assert find_models() == []
    monkeypatch.setenv("HF_HOME", str(moved))
    assert f"hf:{HF_REPO}/smollm2-q4_1.gguf" in {m.names[0] for m in find_models()}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing-here"))  # wins over HF_HOME
    assert find_models() == []


def test_lm_studio_folders_and_a_file_that_is_not_gguf(
    home: Path, bundled_paths: dict[str, Path]
) -> None:
    new = home / ".lmstudio" / "models" / "lmstudio-community"
    link(bundled_paths["smollm2"], new / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-Q4_1.gguf")
    fake = new / "Fake-GGUF" / "fake.gguf"
    fake.parent.mkdir(parents=True)
    fake.write_text("this is a README, not a model\n")
    empty = new / "Empty-GGUF" / "empty.gguf"  # a download that never started
    empty.parent.mkdir(parents=True)
    empty.touch()
    old = home / ".cache" / "lm-studio" / "models" / "google"
    link(bundled_paths["gemma3"], old / "gemma-3-270m" / "gemma-3-270m-Q4_K_M.gguf")

    code, out = run("models", "--found")
    assert code == 0, out
    assert "lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-Q4_1.gguf" in out
    assert "lmstudio:google/gemma-3-270m/gemma-3-270m-Q4_K_M.gguf" in out
    assert "lmstudio:lmstudio-community/Fake-GGUF/fake.gguf: " in out and "not a GGUF" in out
    assert "lmstudio:lmstudio-community/Empty-GGUF/empty.gguf: " in out
    assert "2 models, 2 unusable" in out
    path = resolve_source("lmstudio:google/gemma-3-270m")
    assert path.samefile(bundled_paths["gemma3"])
    with pytest.raises(ModelFileError, match="lms get google/gemma-3-1b"):
        resolve_source("lmstudio:google/gemma-3-1b")


def test_store_names_run_through_the_cli(home: Path, bundled_paths: dict[str, Path]) -> None:
    """-m and a models.toml source take store names; the run is the same as by path."""
    ollama_model(home / ".ollama" / "models", "smollm2", "latest", bundled_paths["smollm2"])
    hf_model(
        home / ".cache" / "huggingface" / "hub",
        "google/gemma-3-270m-GGUF",
        {"gemma-3-270m-Q4_K_M.gguf": bundled_paths["gemma3"]},
    )
    texts = []
    for models in (
        ("ollama:smollm2", "hf:google/gemma-3-270m-GGUF"),
        (str(bundled_paths["smollm2"]), str(bundled_paths["gemma3"])),
    ):
        flags = [arg for model in models for arg in ("-m", model)]
        code, out = run(
            "generate", *flags, "--raw", "--greedy", "--max-pieces", "6", "--json", "The sky is"
        )
        assert code == 0, out
        texts.append(json.loads(out[out.index("{") :])["text"])
    assert texts[0] == texts[1] and texts[0]

    config = home / "models.toml"
    config.write_text('[[model]]\nname = "smol"\nsource = "ollama:smollm2:latest"\n')
    code, out = run("--config", str(config), "models", "--json")
    assert code == 0, out
    assert json.loads(out)["models"][0]["status"] == "found"
    code, out = run("vocab", "ollama:nothing")
    assert code == 1 and out.startswith("Error: no model ollama:nothing") and "ollama pull" in out


def test_a_large_store_lists_from_its_cache(
    home: Path,
    bundled_paths: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """500 distinct files (the bundled header, the tensor data left sparse): the first
    listing reads 500 headers, the second none. Times are printed, not asserted."""
    source = bundled_paths["smollm2"]
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = bytes(buf[: read_header(buf).data_start])
    root = home / ".lmstudio" / "models"
    for i in range(500):
        path = root / f"publisher{i // 50}" / f"model{i}" / f"model{i}-Q4_1.gguf"
        path.parent.mkdir(parents=True)
        with path.open("wb") as f:
            f.write(header)
            f.truncate(source.stat().st_size)
    started = time.perf_counter()
    first = find_models()
    first_s = time.perf_counter() - started

    def no_header_reads(path: Path) -> None:
        raise AssertionError(f"header read again: {path}")

    monkeypatch.setattr(discovery, "summarize_gguf", no_header_reads)
    started = time.perf_counter()
    second = find_models()
    second_s = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n500-entry store: first listing {first_s:.2f} s, second {second_s:.2f} s")
    assert len(first) == 500 and all(m.summary is not None for m in first)
    assert [m.as_record() for m in second] == [m.as_record() for m in first]

    touched = first[7].path  # a changed file (size, mtime) is read again
    with touched.open("ab") as f:
        f.write(b"\0" * 32)
    reads: list[Path] = []
    monkeypatch.setattr(discovery, "summarize_gguf", lambda p: reads.append(p) or summarize_gguf(p))
    find_models()
    assert reads == [touched]


def write_split(source: Path, target: Path, max_tensors: int) -> list[Path]:
    """The model split as llama.cpp's gguf-split and gguf-py split it: parts named
    TARGET-0000i-of-0000n.gguf, each with split.no, split.count and its own tensors."""
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf_py.GGUFReader(source)
    arch = reader.fields[gguf_py.Keys.General.ARCHITECTURE].contents()
    writer = gguf_py.GGUFWriter(target, arch, split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name == gguf_py.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf_py.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file(target)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return sorted(target.parent.glob(f"{target.stem}-*-of-*.gguf"))


def test_a_split_model_is_one_model(
    home: Path, tmp_path: Path, bundled_paths: dict[str, Path]
) -> None:
    """SmolLM2 in three parts, in the HF cache and in LM Studio: listed once, by its first
    part, with the size and parameters of the whole; it loads and runs as the whole."""
    parts = write_split(bundled_paths["smollm2"], tmp_path / "split" / "smol.gguf", 100)
    assert [p.name[-20:] for p in parts] == [f"-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    repo = "someone/SmolLM2-split-GGUF"
    hf_model(home / ".cache" / "huggingface" / "hub", repo, {p.name: p for p in parts})
    studio = home / ".lmstudio" / "models" / "someone" / "SmolLM2-split"
    for part in parts[:2]:  # the third part never arrived
        link(part, studio / part.name)

    found = {m.names[0]: m for m in find_models()}
    assert len(found) == 2, list(found)
    whole = found[f"hf:{repo}/smol-00001-of-00003.gguf"]
    assert whole.size == sum(p.stat().st_size for p in parts)
    unsplit = summarize_gguf(bundled_paths["smollm2"])
    assert whole.summary is not None and whole.summary.split_count == 3
    assert whole.summary.parameters == unsplit.parameters
    assert whole.summary.weights_bytes == unsplit.weights_bytes
    broken = found["lmstudio:someone/SmolLM2-split/smol-00001-of-00003.gguf"]
    assert broken.problem == "split model in 3 parts: smol-00003-of-00003.gguf missing"

    assert resolve_source(f"hf:{repo}").name == "smol-00001-of-00003.gguf"  # the link
    with pytest.raises(ModelFileError, match=r"00003-of-00003\.gguf missing"):
        resolve_source("lmstudio:someone/SmolLM2-split")
    with pytest.raises(ModelFileError, match=r"part 2 of a model split in 3: name its first"):
        summarize_gguf(parts[1])

    texts = []
    for model in (f"hf:{repo}", str(bundled_paths["smollm2"])):
        code, out = run(
            "generate",
            "-m",
            model,
            "--raw",
            "--greedy",
            "--max-pieces",
            "4",
            "--json",
            "The sky is",
        )
        assert code == 0, out
        texts.append(json.loads(out[out.index("{") :])["text"])
    assert texts[0] == texts[1] and texts[0]


LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the folders laid out are Linux's"
)


@LINUX_ONLY
def test_gpt4all_folders(home: Path, bundled_paths: dict[str, Path]) -> None:
    """The desktop app's default download path, flat, beside its own files; and the Python
    package's download folder."""
    app = home / ".local" / "share" / "nomic.ai" / "GPT4All"
    link(bundled_paths["smollm2"], app / "SmolLM2-135M-Instruct.Q4_1.gguf")
    (app / "localdocs_v2.db").write_bytes(b"SQLite format 3\0")  # not a model: not listed
    package = home / ".cache" / "gpt4all"
    link(bundled_paths["gemma3"], package / "gemma-3-270m-Q4_K_M.gguf")

    code, out = run("models", "--found", "--json")
    assert code == 0, out
    listing = json.loads(out)
    assert listing["stores"]["gpt4all"] == [str(app), str(package)]
    records = {r["name"]: r for r in listing["models"]}
    assert set(records) == {
        "gpt4all:SmolLM2-135M-Instruct.Q4_1.gguf",
        "gpt4all:gemma-3-270m-Q4_K_M.gguf",
    }
    assert records["gpt4all:SmolLM2-135M-Instruct.Q4_1.gguf"]["role"] == "chat"
    assert records["gpt4all:gemma-3-270m-Q4_K_M.gguf"]["architecture"] == "gemma3"
    path = resolve_source("gpt4all:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.samefile(bundled_paths["smollm2"])
    with pytest.raises(ModelFileError, match=r"closest: gpt4all:SmolLM2.*download it in GPT4All"):
        resolve_source("gpt4all:SmolLM2-135M-Instruct.Q8_0.gguf")


@LINUX_ONLY
def test_jan_data_folder_and_its_older_layout(
    home: Path, tmp_path: Path, bundled_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jan's data folder: llamacpp/models/ID/{model.yml, model.gguf}, the id with a slash,
    a vision projector beside one model; and ~/jan/models/ID/FILE.gguf of older releases."""
    models = home / ".config" / "Jan" / "data" / "llamacpp" / "models"
    for model_id, gguf in (
        ("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", bundled_paths["smollm2"]),
        ("google/gemma-3-270m-Q4_K_M", bundled_paths["gemma3"]),
    ):
        folder = models / model_id
        link(gguf, folder / "model.gguf")
        (folder / "model.yml").write_text(
            f"model_path: llamacpp/models/{model_id}/model.gguf\nname: {model_id}\n"
            f"size_bytes: {gguf.stat().st_size}\n"
        )
    (models / "google" / "gemma-3-270m-Q4_K_M" / "mmproj.gguf").write_text("not the model")
    old = home / "jan" / "models" / "smollm2-135m"
    link(bundled_paths["smollm2"], old / "smollm2-135m.Q4_1.gguf")
    (old / "model.json").write_text('{"id": "smollm2-135m"}')

    found = find_models()
    smol = "jan:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
    assert [m.names for m in found] == [
        # the same file (a hard link) in the older folder: one entry, two names
        [smol, "jan:smollm2-135m/smollm2-135m.Q4_1.gguf"],
        ["jan:google/gemma-3-270m-Q4_K_M"],
    ]
    assert all(m.summary is not None for m in found)
    assert resolve_source("jan:google/gemma-3-270m-Q4_K_M").samefile(bundled_paths["gemma3"])
    assert resolve_source("jan:smollm2-135m").samefile(bundled_paths["smollm2"])
    with pytest.raises(ModelFileError, match="download it in Jan's Hub"):
        resolve_source("jan:google/gemma-3-1b")

    moved = tmp_path / "config"
    shutil.move(home / ".config", moved)
    assert {m.names[0] for m in find_models()} == {"jan:smollm2-135m/smollm2-135m.Q4_1.gguf"}
    monkeypatch.setenv("XDG_CONFIG_HOME", str(moved))
    assert sum(len(m.names) for m in find_models()) == 3
