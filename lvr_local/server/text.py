"""The text a reply may send so far.

The generation loop notices a stop string only once it is complete, so the pieces that
spell its beginning were already yielded: a stream that sent them at once would show the
start of the stop string. A reply therefore holds back the bytes that could still begin
a stop string, and sends only whole UTF-8 characters; at the end it sends the rest, up to
where the run says the text ends.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StreamText:
    """Feed piece bytes with `add`, end with `finish`; both return the text now safe to
    send (possibly empty)."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = [s.encode("utf-8") for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.data = b""
        self.sent = 0  # bytes released so far

    def add(self, piece: bytes) -> str:
        self.data += piece
        return self._release(len(self.data) - self._could_begin_stop())

    def finish(self, end: int | None = None) -> str:
        """Release everything up to byte `end` (default: all that was added)."""
        end = len(self.data) if end is None else min(end, len(self.data))
        return self._release(max(end, self.sent), final=True)

    def _could_begin_stop(self) -> int:
        """Length of the longest end of the data that is a proper beginning of a stop."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self.data)), longest, -1):
                if self.data.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, upto: int, final: bool = False) -> str:
        chunk, self.sent = self.data[self.sent : max(upto, self.sent)], max(upto, self.sent)
        return self._decoder.decode(chunk, final=final)
