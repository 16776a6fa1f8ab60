"""ChunkedBody against a reference encoder: any split of the wire gives the same body, every
body byte as soon as it arrives; malformed framing is a ChunkedError in our words."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import pytest

from crabtrio.upstream.chunked import MAX_LINE, MAX_TRAILERS, ChunkedBody, ChunkedError

SECRET = b"sk-secret-123"


@dataclass
class Wire:
    """A chunked body as sent, and what a decoder must make of it."""

    data: bytes = b""
    body: bytes = b""
    end: int = 0  # where the chunked body ends (what follows is `trailing`)
    # the data spans on the wire: where each starts, and how many body bytes precede it
    _starts: list[int] = field(default_factory=list)
    _before: list[int] = field(default_factory=list)
    _lengths: list[int] = field(default_factory=list)

    def framing(self, part: bytes) -> None:
        self.data += part

    def chunk_data(self, part: bytes) -> None:
        self._starts.append(len(self.data))
        self._before.append(len(self.body))
        self._lengths.append(len(part))
        self.data += part
        self.body += part

    def body_in(self, prefix: int) -> int:
        """How many body bytes wire[:prefix] holds."""
        at = bisect.bisect_right(self._starts, prefix) - 1
        if at < 0:
            return 0
        return self._before[at] + min(prefix - self._starts[at], self._lengths[at])


def size_line(rng: random.Random, size: int) -> bytes:
    """A size line in any form the grammar allows: case, leading zeros, extensions, spaces."""
    digits = f"{size:x}"
    digits = "0" * rng.randint(0, 20 - len(digits)) + digits
    if rng.random() < 0.5:
        digits = digits.upper()
    line = digits.encode()
    for _ in range(rng.choice([0, 0, 1, 2])):
        line += rng.choice([b";name", b";name=value", b';q="a b;c"', b";" + SECRET])
    return line + rng.choice([b"", b"", b" ", b"\t", b" \t "]) + b"\r\n"


def random_wire(rng: random.Random) -> Wire:
    wire = Wire()
    for _ in range(rng.randint(0, 12)):
        size = rng.choice([rng.randint(1, 16), rng.randint(1, 2000), rng.randint(60_000, 200_000)])
        data = rng.randbytes(size)
        if rng.random() < 0.2:  # framing-like bytes inside the data must stay data
            data = b"0\r\n\r\n" + data
        wire.framing(size_line(rng, len(data)))
        wire.chunk_data(data)
        wire.framing(b"\r\n")
    wire.framing(size_line(rng, 0))
    for number in range(rng.choice([0, 0, 1, 3])):
        wire.framing(b"x-trailer-%d: %s\r\n" % (number, rng.randbytes(8).hex().encode()))
    wire.framing(b"\r\n")
    wire.end = len(wire.data)
    wire.framing(rng.choice([b"", b"H", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]))
    return wire


def random_cuts(rng: random.Random, length: int) -> list[int]:
    """Where reads end: runs of 1-3 byte reads, middling ones and whole-buffer ones."""
    cuts, at = [], 0
    while at < length:
        kind = rng.random()
        if kind < 0.4:
            at += rng.randint(1, 3)
        elif kind < 0.8:
            at += rng.randint(1, 300)
        else:
            at += rng.randint(1, 150_000)
        cuts.append(min(at, length))
    return cuts


def check_feeding(wire: Wire, cuts: list[int]) -> None:
    """Feed wire.data cut at `cuts`; after each read, check what came out and `done`."""
    decoder = ChunkedBody()
    parts: list[bytes] = []
    out, fed = 0, 0
    for cut in cuts:
        part = decoder.feed(wire.data[fed:cut])
        assert type(part) is bytes
        parts.append(part)
        out += len(part)
        fed = cut
        # every body byte is handed out by the read that brings it, none later
        assert out == wire.body_in(fed), f"after {fed} of {len(wire.data)} bytes"
        assert decoder.done == (fed >= wire.end)
    assert b"".join(parts) == wire.body
    assert decoder.trailing == wire.data[wire.end :]


@pytest.mark.parametrize("seed", range(60))
def test_any_split_of_a_random_body_decodes_to_it(seed: int) -> None:
    rng = random.Random(seed)
    wire = random_wire(rng)
    check_feeding(wire, random_cuts(rng, len(wire.data)))


@pytest.mark.parametrize("seed", range(10))
def test_a_small_body_fed_one_byte_at_a_time_decodes_to_it(seed: int) -> None:
    rng = random.Random(seed)
    wire = Wire()
    for _ in range(rng.randint(1, 5)):
        data = rng.randbytes(rng.randint(1, 40))
        wire.framing(size_line(rng, len(data)))
        wire.chunk_data(data)
        wire.framing(b"\r\n")
    wire.framing(size_line(rng, 0) + b"x-a: 1\r\nx-b: 2\r\n\r\n")
    wire.end = len(wire.data)
    wire.framing(b"after")
    check_feeding(wire, list(range(1, len(wire.data) + 1)))


def test_every_two_read_split_decodes_the_same() -> None:
    rng = random.Random(7)
    wire = Wire()
    for data in (b"hello", b"\r\n", b"x" * 17):
        wire.framing(size_line(rng, len(data)))
        wire.chunk_data(data)
        wire.framing(b"\r\n")
    wire.framing(b"0;done\r\nx-t: 1\r\n\r\n")
    wire.end = len(wire.data)
    wire.framing(b"XY")
    for cut in range(len(wire.data) + 1):
        check_feeding(wire, [cut, len(wire.data)])


def test_all_the_chunks_of_one_read_come_out_joined_in_one_part() -> None:
    events = [b'data: {"n": %d}\n\n' % n for n in range(50)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
    decoder = ChunkedBody()
    assert decoder.feed(wire) == b"".join(events)
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\n") == b""
    assert decoder.done and decoder.trailing == b""


def test_a_whole_body_in_one_read_ends_it_and_keeps_what_follows() -> None:
    decoder = ChunkedBody()
    assert decoder.feed(b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\nHTTP/1.1") == b"ok!!!"
    assert decoder.done and decoder.trailing == b"HTTP/1.1"


def test_bytes_given_at_construction_are_decoded_first() -> None:
    decoder = ChunkedBody(b"5\r\nhel")
    assert decoder.feed(b"lo\r\n0\r\n\r\n") == b"hello"
    assert decoder.done


def test_reads_after_the_end_are_trailing_and_never_body() -> None:
    decoder = ChunkedBody()
    assert decoder.feed(b"2\r\nok\r\n0\r\n\r") == b"ok"
    assert not decoder.done  # the final LF is still missing
    assert decoder.feed(b"\n") == b"" and decoder.done and decoder.trailing == b""
    # even well-formed chunks after the end are not the body's
    assert decoder.feed(b"2\r\nno\r\n") == b""
    assert decoder.feed(b"") == b""
    assert decoder.feed(b"0\r\n\r\n") == b""
    assert decoder.done and decoder.trailing == b"2\r\nno\r\n0\r\n\r\n"


def test_an_empty_read_changes_nothing() -> None:
    decoder = ChunkedBody()
    assert decoder.feed(b"") == b"" and not decoder.done
    assert decoder.feed(b"3\r\nab") == b"ab"
    assert decoder.feed(b"") == b"" and not decoder.done
    assert decoder.feed(b"c\r\n0\r\n\r\n") == b"c" and decoder.done


MALFORMED = {
    "not-hex": b"5g\r\nhello\r\n0\r\n\r\n",
    "hex-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "secret-as-size": SECRET + b"\r\nhello\r\n0\r\n\r\n",
    "space-before-size": b" 5\r\nhello\r\n0\r\n\r\n",
    "space-inside-size": b"5 5\r\nhello\r\n0\r\n\r\n",
    "empty-size-line": b"\r\nhello\r\n0\r\n\r\n",
    "21-digits": b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n",
    "21-digits-large": b"1" + b"0" * 20 + b"\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "plus-sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "bare-lf-size-line": b"5\nhello\r\n0\r\n\r\n",
    "data-then-garbage": b"5\r\nhello" + SECRET + b"\r\n0\r\n\r\n",
    "data-then-bare-lf": b"5\r\nhello\n0\r\n\r\n",
    "data-then-one-wrong-byte": b"5\r\nhelloX",  # refused at once, not held for more
    "data-then-lone-cr": b"5\r\nhello\r0\r\n\r\n",
    "data-longer-than-size": b"5\r\nhello!\r\n0\r\n\r\n",
    "garbage-between-chunks": b"5\r\nhello\r\n" + SECRET + b"\r\n0\r\n\r\n",
    "empty-line-between-chunks": b"5\r\nhello\r\n\r\n0\r\n\r\n",
    "overlong-size-line": b"5;" + b"x" * MAX_LINE + b"\r\nhello\r\n0\r\n\r\n",
    "overlong-size-line-no-crlf": b"5" * MAX_LINE,
    "overlong-trailers": b"0\r\nx-pad: " + b"a" * MAX_TRAILERS + b"\r\n\r\n",
    "overlong-trailers-no-end": b"0\r\nx-pad: " + b"a" * MAX_TRAILERS,
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("reads", ["whole", "tiny"])
def test_malformed_framing_is_a_chunked_error_in_our_words(wire: bytes, reads: str) -> None:
    decoder = ChunkedBody()
    # tiny reads: one byte each, coarser for the 64 KiB trailers (held trailers are searched
    # again at each read: a 64 KiB search per byte would take seconds)
    size = len(wire) if reads == "whole" else max(1, len(wire) // 2000)
    pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
    with pytest.raises(ChunkedError) as info:
        for piece in pieces:
            decoder.feed(piece)
    assert not decoder.done
    assert "sk-secret" not in str(info.value) and "hello" not in str(info.value)


def feed_all(pieces: list[bytes]) -> bytes:
    decoder = ChunkedBody()
    out = b"".join(decoder.feed(piece) for piece in pieces)
    assert decoder.done
    return out


def splits(wire: bytes, tail: int) -> dict[str, list[bytes]]:
    """The same wire in one read, and with its last `tail` bytes in a read of their own."""
    return {"whole": [wire], "tail-apart": [wire[:-tail], wire[-tail:]]}


@pytest.mark.parametrize("split", ["whole", "tail-apart"])
def test_a_size_line_of_max_line_bytes_is_accepted_and_one_more_is_not(split: str) -> None:
    def body(line_length: int) -> list[bytes]:
        line = b"2;" + b"e" * (line_length - 4) + b"\r\n"
        assert len(line) == line_length  # its CRLF included
        return splits(line + b"ok\r\n0\r\n\r\n", tail=len(b"\r\nok\r\n0\r\n\r\n"))[split]

    assert feed_all(body(MAX_LINE)) == b"ok"
    with pytest.raises(ChunkedError):
        feed_all(body(MAX_LINE + 1))


def test_twenty_hex_digits_are_accepted() -> None:
    assert feed_all([b"0" * 19 + b"2\r\nok\r\n" + b"0" * 20 + b"\r\n\r\n"]) == b"ok"


def trailers_of(length: int) -> bytes:
    """Trailers whose lines take `length` bytes before the CRLFCRLF that ends them."""
    lines = [b"x-pad-%d: %s" % (n, b"a" * 1000) for n in range(length // 1012)]
    section = b"\r\n".join(lines)
    section += (b"\r\n" if section else b"") + b"x-rest: "
    section += b"b" * (length - len(section))
    assert len(section) == length
    return b"0\r\n" + section + b"\r\n\r\n"


def test_trailers_of_max_trailers_bytes_in_one_read_are_accepted_and_one_more_is_not() -> None:
    assert feed_all([b"2\r\nok\r\n", trailers_of(MAX_TRAILERS)]) == b"ok"
    with pytest.raises(ChunkedError):
        feed_all([b"2\r\nok\r\n", trailers_of(MAX_TRAILERS + 1)])


@pytest.mark.parametrize("tail", [1, 2, 3, 4])
def test_the_trailers_limit_does_not_depend_on_where_reads_end(tail: int) -> None:
    # the final CRLFCRLF cut anywhere: what comes before it is held in the meantime
    wire = trailers_of(MAX_TRAILERS)
    assert feed_all([b"2\r\nok\r\n", wire[:-tail], wire[-tail:]]) == b"ok"
