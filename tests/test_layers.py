"""The package's shape: layers that import only downward, a numpy-only core, short
functions. These guard the structure a newcomer reads the code by."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold() -> None:
    """pyproject.toml's import-linter contracts: front ends > runner > decoding >
    llama.cpp adapters > numpy core, and the core free of llama.cpp, click and textual."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_importing_the_reduction_loads_no_llama_cpp_click_or_textual() -> None:
    code = (
        "import sys, lvr_local.core.reduction, lvr_local.core.naive, lvr_local.core.combine; "
        "print(sorted(m for m in ('llama_cpp', 'click', 'textual', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_function_is_longer_than_60_lines() -> None:
    long = []
    for folder in ("lvr_local", "tui"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not long, long
