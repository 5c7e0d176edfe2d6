"""The generation loop's hold-back: pieces that might begin a stop string or a turn
separator wait until the text rules it out, and neither is ever shown."""

from __future__ import annotations

from lvr_local.decoding.ensemble import PieceEvent
from lvr_local.decoding.generation import Holdback


def piece(text: bytes) -> PieceEvent:
    return PieceEvent(0, 0, text, 0.0, (0.0,), (1.0,), (1.0,), 0, (0.0,), False)


def feed(hold: Holdback, texts: list[bytes]) -> tuple[list[bytes], str | None]:
    shown: list[bytes] = []
    for t in texts:
        reason = hold.add(piece(t))
        if reason is not None:
            shown += [e.text for e in hold.release(final=True)]
            return shown, reason
        shown += [e.text for e in hold.release()]
    return shown, None


def test_a_turn_separator_across_pieces_is_never_shown() -> None:
    hold = Holdback([], [b"\nUser:"])
    shown, reason = feed(hold, [b"Paris", b".", b"\n", b"User", b":", b" more"])
    assert reason == "end" and shown == [b"Paris", b"."]
    assert hold.released == len(b"Paris.")


def test_held_pieces_are_released_once_the_text_rules_the_string_out() -> None:
    hold = Holdback([b"STOP"], [b"\nUser:"])
    assert hold.add(piece(b"a\n")) is None
    assert list(hold.release()) == []  # "\n" may begin "\nUser:"
    assert hold.add(piece(b"Us")) is None
    assert [e.text for e in hold.release()] == []
    assert hold.add(piece(b"ed")) is None  # "\nUsed": not a separator after all
    assert [e.text for e in hold.release()] == [b"a\n", b"Us", b"ed"]
    shown, reason = feed(hold, [b" ST", b"OP", b"!"])
    assert reason == "stop" and shown == [b" "]  # " ST" straddles the cut: its head stays
    assert hold.released == len(b"a\nUsed ")


def test_everything_is_released_at_the_end() -> None:
    hold = Holdback([b"xyz"], [])
    shown, _ = feed(hold, [b"ab", b"x"])
    assert shown == [b"ab"]
    assert [e.text for e in hold.release(final=True)] == [b"x"]
