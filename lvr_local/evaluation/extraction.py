"""Reading an answer out of a generated text, and comparing it with the reference.

GSM8K's convention: the reference solution ends in `#### N`; a model's answer is the
number after its own `####` when it writes one, else after "the answer is", else the
last number it wrote (the usual fallbacks of evaluation harnesses). Numbers are
normalised before comparison: thousands separators, currency signs, a trailing period
and trailing zeros go, so "$1,234.50" and "1234.5" are the same answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"-?[$€£]?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)


def reference_answer(answer: str) -> str:
    """The reference's final answer: the text after its last "####", else all of it."""
    _, marker, tail = answer.rpartition("####")
    return (tail if marker else answer).strip()


def normalise_number(text: str) -> str | None:
    """A number as a canonical string ("1,234.50" -> "1234.5", "-$3" -> "-3"), or None
    when the text holds no number."""
    match = NUMBER.search(text)
    if match is None:
        return None
    raw = match.group(0)
    negative = raw.startswith("-")
    digits = re.sub(r"[^\d.]", "", raw)
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    if negative:
        value = -value
    value = value.normalize()
    if value == value.to_integral_value():
        value = value.quantize(Decimal(1))
    return format(value, "f")


def extract_number(output: str) -> str | None:
    """The answer a generated text gives, normalised (see the module docstring)."""
    _, marker, tail = output.rpartition("####")
    if marker and (number := normalise_number(tail)) is not None:
        return number
    parts = ANSWER_IS.split(output)
    if len(parts) > 1 and (number := normalise_number(parts[-1])) is not None:
        return number
    numbers = NUMBER.findall(output)
    return normalise_number(numbers[-1]) if numbers else None


def normalise_text(text: str) -> str:
    """Case, surrounding space and punctuation, and inner runs of space do not count."""
    return " ".join(text.strip().strip(".!?\"'").lower().split())


def extract_text(output: str) -> str:
    """A text answer: the first non-empty line of the output, normalised."""
    line = next((line for line in output.splitlines() if line.strip()), "")
    return normalise_text(line)


def extract(output: str, how: str) -> str | None:
    return extract_number(output) if how == "number" else extract_text(output)


def expected(reference: str, how: str) -> str | None:
    """The reference answer, normalised the way outputs are."""
    answer = reference_answer(reference)
    return normalise_number(answer) if how == "number" else normalise_text(answer)


def is_correct(output: str, reference: str, how: str) -> tuple[str | None, bool]:
    """(the extracted answer, whether it matches the reference's)."""
    got, want = extract(output, how), expected(reference, how)
    return got, got is not None and got == want
