"""code: raw completions of short Python function headers, as a user would try them.

Members whose tokenizers cut indentation differently used to drag each other off the
prompt's 4-space grid and into blank indented lines (docs/algorithm.md §7.3). Each
completion is checked for lines indented off the grid and for a line written three
times in a row; `python -m lvr_local.benchmarks code` prints both for each member alone and each
ensemble, and tests/test_text_ensemble.py asserts them for the default ensemble.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lvr_local.benchmarks.common import BUNDLED, system_configs
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

HEADERS = (
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n"
    '    def pop(self):\n        """Remove and return the top item, or None if empty."""\n',
    'def fizzbuzz(n: int) -> list[str]:\n    """Return the FizzBuzz strings for 1..n."""\n',
    "def count_words(text: str) -> dict[str, int]:\n"
    '    """Count how often each word occurs in text."""\n',
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    'def flatten(items: list) -> list:\n    """Flatten a list of nested lists into one list."""\n',
    "def read_config(path: str) -> dict[str, str]:\n"
    '    """Read key=value lines from a file into a dict, skipping comments."""\n',
    "def binary_search(values: list[int], target: int) -> int:\n"
    '    """Return the index of target in the sorted list values, or -1."""\n',
)
# Where a completion of one function is over (the next top-level statement); the budget
# keeps a loop short.
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
MAX_BYTES = 400


@dataclass(frozen=True)
class Completion:
    header: str
    text: str
    stop_reason: str

    @property
    def off_grid(self) -> list[str]:
        """Lines indented by a number of spaces that is not a multiple of 4."""
        lines = self.text.split("\n")
        return [line for line in lines if line.strip() and (len(line) - len(line.lstrip(" "))) % 4]

    @property
    def thrice(self) -> list[str]:
        """A loop's signature: the same non-blank line, or the same two lines, written
        three times in a row (blank lines aside)."""
        lines = [line for line in self.text.split("\n") if line.strip()]
        found = []
        for period in (1, 2):
            for i in range(len(lines) - 3 * period + 1):
                block = lines[i : i + period]
                if (
                    lines[i + period : i + 2 * period]
                    == block
                    == lines[i + 2 * period : i + 3 * period]
                ):
                    found.append("\n".join(block))
        return found


def complete_headers(runner: Runner, settings: RunSettings) -> list[Completion]:
    """The raw completion of every header under `settings` (greedy by default)."""
    settings = replace(settings, stop=STOPS, max_bytes=MAX_BYTES)
    out = []
    for header in HEADERS:
        run = runner.complete(header.encode("utf-8"), settings)
        for _ in run:
            pass
        out.append(Completion(header, run.text, run.stats.stop_reason))
    return out


def code(argv: Sequence[str] = ()) -> None:
    """Each bundled model alone and each ensemble (--systems SUB:RULE,...; default the
    default ensemble and the MCV under mean and bayes) on HEADERS: completions with a
    line off the 4-space grid, and with a line written three times in a row."""
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks code")
    parser.add_argument("--systems", default="auto:product,auto:mean,mcv:mean,mcv:bayes")
    parser.add_argument("--show", action="store_true", help="print every completion")
    args = parser.parse_args(argv)
    runner = Runner(BUNDLED, RunSettings()).load()
    configs = system_configs(runner, args.systems, alone=True)
    print(f"{len(HEADERS)} function headers, raw greedy completion, at most {MAX_BYTES} bytes:")
    for label, enabled, changed in configs:
        runner.set_enabled(enabled)
        done = complete_headers(runner, replace(runner.settings, **changed))
        off = sum(bool(c.off_grid) for c in done)
        thrice = sum(bool(c.thrice) for c in done)
        budget = sum(c.stop_reason.startswith("max") for c in done)
        print(
            f"  {label:<22} off the 4-space grid {off}/{len(done)}, a line written three "
            f"times in a row {thrice}/{len(done)}, ran to the budget {budget}/{len(done)}",
            flush=True,
        )
        for c in done if args.show else ():
            print(f"    {c.header.splitlines()[-2].strip()!r} -> {c.text!r}")
    runner.close()
