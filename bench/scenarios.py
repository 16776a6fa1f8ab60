"""The load scenarios: request bodies and how many connections each one runs with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
CHAT_MODEL = "gpt-4o-mini"
PACED_MODEL = "gpt-4o-mini-paced"  # routed to the mock started with --delay-ms 20
EMBED_MODEL = "text-embedding-3-small"
LOAD_CONNECTIONS = 32  # the reference figures were taken at wrk -c32
STREAM_CHUNKS = 20
PACE_MS = 20


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    connections: int
    stream: bool = False
    paced: bool = False
    quick: bool = False  # part of `make bench QUICK=1`

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def _messages(count: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a concise assistant for a logistics team."}]
    for i in range(count - 1):
        role = "user" if i % 2 == 0 else "assistant"
        text = (
            f"Turn {i}: the shipment to depot {i % 7} left at {8 + i % 10}:15 with {i * 3} pallets"
        )
        messages.append({"role": role, "content": text + "; please confirm the next step. " * 3})
    return messages


def _tools(count: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": f"lookup_{i}",
                "description": f"Look up record type {i} by id and return its fields as JSON.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "description": "the record's id"},
                        "fields": {"type": "array", "items": {"type": "string"}},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    "required": ["id"],
                },
            },
        }
        for i in range(count)
    ]


HELLO = [{"role": "user", "content": "Say hello in five words."}]

SCENARIOS = [
    Scenario(
        "chat", CHAT_PATH, {"model": CHAT_MODEL, "messages": HELLO}, LOAD_CONNECTIONS, quick=True
    ),
    Scenario(
        "stream",
        CHAT_PATH,
        {"model": CHAT_MODEL, "messages": HELLO, "stream": True},
        LOAD_CONNECTIONS,
        stream=True,
        quick=True,
    ),
    Scenario(
        "embeddings",
        EMBED_PATH,
        {"model": EMBED_MODEL, "input": "The quick brown fox jumps over the lazy dog."},
        LOAD_CONNECTIONS,
    ),
    Scenario(
        "large",
        CHAT_PATH,
        {"model": CHAT_MODEL, "messages": _messages(50), "tools": _tools(10)},
        LOAD_CONNECTIONS,
    ),
    Scenario(
        "paced100",
        CHAT_PATH,
        {"model": PACED_MODEL, "messages": HELLO, "stream": True},
        100,
        stream=True,
        paced=True,
        quick=True,
    ),
    Scenario(
        "paced500",
        CHAT_PATH,
        {"model": PACED_MODEL, "messages": HELLO, "stream": True},
        500,
        stream=True,
        paced=True,
    ),
]
SCENARIO_NAMES = [scenario.name for scenario in SCENARIOS]
