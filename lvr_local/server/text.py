"""The text a reply may send so far: whole UTF-8 characters.

A piece's bytes may end inside a character (a byte-level piece, or a token that splits
one). A stream holds those bytes back until the character is complete, and at the end
sends what is left, a cut character as U+FFFD. Stop strings and turn separators need no
care here: the generation loop (decoding/generation.py, `Holdback`) yields no piece
that might begin one until the text rules it out, and cuts the text where one begins.
"""

from __future__ import annotations

import codecs


class StreamText:
    """Feed piece bytes with `add`, end with `finish`; both return the text now safe to
    send (possibly empty)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.data = b""

    def add(self, piece: bytes) -> str:
        self.data += piece
        return self._decoder.decode(piece)

    def finish(self) -> str:
        """The rest: the bytes of a character left incomplete, as U+FFFD."""
        return self._decoder.decode(b"", final=True)
