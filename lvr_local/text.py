"""Text from the user as UTF-8, strictly: a bad byte is an error that says where.

Python hands over undecodable bytes of argv, a terminal or stdin as lone surrogates
("surrogateescape"), which only fail later, deep inside, as a UnicodeEncodeError
traceback. Every front end passes user text through here first.
"""

from __future__ import annotations

from lvr_local.errors import LvrError


def utf8_bytes(text: str, what: str) -> bytes:
    """`text` encoded as UTF-8, or an LvrError naming the first byte that is not UTF-8."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        at = len(text[: e.start].encode("utf-8"))
        raise LvrError(f"{what} is not UTF-8 at byte {at}") from None


def utf8_text(data: bytes, what: str) -> str:
    """`data` decoded as UTF-8, or an LvrError naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LvrError(f"{what} is not UTF-8 at byte {e.start}") from None
