"""SSE splitting: events come out whole, whatever the chunking or line endings."""

from __future__ import annotations

import pytest

from crabtrio import sse
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


def test_chat_events_parse_only_the_chunk_that_carries_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With include_usage, OpenAI sends `"usage":null` in every chunk: those are relayed as
    they are without being parsed; the usage chunk is parsed and its counts taken."""
    from crabtrio import stream

    parsed: list[bytes] = []
    loads = stream.orjson.loads

    def counting(data: bytes) -> object:
        parsed.append(data)
        return loads(data)

    monkeypatch.setattr(stream.orjson, "loads", counting)

    class Pending:
        usage: object = None

        def set_usage(self, usage: object) -> None:
            self.usage = usage

    pending = Pending()
    events = stream.ChatEvents(pending, wants_usage=False)  # type: ignore[arg-type]
    words = [{"choices": [{"index": 0, "delta": {"content": w}}], "usage": None} for w in "abc"]
    relayed = [events(sse.event(chunk)) for chunk in words]
    assert relayed == [sse.event(chunk) for chunk in words] and parsed == []
    usage = {"prompt_tokens": 3, "completion_tokens": 3}
    assert events(sse.event({"choices": [], "usage": usage})) == b""  # not asked for
    assert pending.usage == usage and len(parsed) == 1
    assert events(sse.DONE) == b"" and events.done
