"""SSE splitting: events come out whole, whatever the chunking or line endings."""

from __future__ import annotations

from crabtrio.sse import EventSplitter, data_of, split_events

STREAM = b'data: {"a":1}\n\ndata: {"b":2}\n\n: comment\n\ndata: [DONE]\n\n'


def test_any_chunking_yields_the_same_events() -> None:
    for size in (1, 2, 3, 7, 64):
        splitter = EventSplitter()
        out = b"".join(splitter.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
        assert out == STREAM
        assert splitter.pending == b""


def test_crlf_is_normalised_even_when_split_between_chunks() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    for size in (1, 2, 5):
        splitter = EventSplitter()
        out = b"".join(splitter.feed(crlf[i : i + size]) for i in range(0, len(crlf), size))
        assert out == STREAM


def test_split_and_data() -> None:
    events = split_events(STREAM)
    assert len(events) == 4
    assert data_of(events[0]) == b'{"a":1}'
    assert data_of(events[2]) == b""
    assert data_of(events[3]) == b"[DONE]"
    assert data_of(b"data:x\ndata: y\n\n") == b"x\ny"
