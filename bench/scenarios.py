"""The load scenarios: the API each speaks, request bodies, how many connections each one
runs with and on which targets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
RESPONSES_PATH = "/v1/responses"
MESSAGES_PATH = "/v1/messages"
CHAT_MODEL = "gpt-4o-mini"
PACED_MODEL = "gpt-4o-mini-paced"  # routed to the mock started with --delay-ms 20
# Other shapes of chat stream from the fast mock, picked by model (its --variant option).
LONG_MODEL = "gpt-4o-mini-long"
LARGE_MODEL = "gpt-4o-mini-large"
TOOLS_MODEL = "gpt-4o-mini-tools"
EMBED_MODEL = "text-embedding-3-small"
CLAUDE_MODEL = "claude-sonnet-4-5"  # served by the mock as an Anthropic provider
LOAD_CONNECTIONS = 32  # the reference figures were taken at wrk -c32
STREAM_CHUNKS = 20  # a short answer
LONG_CHUNKS = 500  # a long answer
LARGE_DELTA_BYTES = 1024
PACE_MS = 20  # 50 events/s a stream, within the 20-100/s of real models
PACED_CONNECTIONS = (100, 500, 2000)
# The cost of one paced event, apart from its stream's request (issue 14): the same 200
# streams with 10 and with 60 events, 20 ms apart (the fast mock paces them when the body
# asks, with its `mock` object). Only crabtrio forwards that object: peers do not run them.
MARGINAL_EVENTS = (10, 60)
MARGINAL_CONNECTIONS = 200
MARGINAL_TARGETS = ("crabtrio", "crabtrio-baseline")
# The mock's --variant for each model above: MODEL:CHUNKS[:DELTA_BYTES[:tool]].
VARIANTS = (
    f"{LONG_MODEL}:{LONG_CHUNKS}",
    f"{LARGE_MODEL}:{STREAM_CHUNKS}:{LARGE_DELTA_BYTES}",
    f"{TOOLS_MODEL}:{STREAM_CHUNKS}:{LARGE_DELTA_BYTES}:tool",
)
STREAM_MODELS = (CHAT_MODEL, LONG_MODEL, LARGE_MODEL, TOOLS_MODEL)  # all on the fast mock
# The Responses and Messages APIs are measured against crabtrio's own chat (issue 12): the
# peers need not serve them; `direct` (the mock alone) shows the mock's headroom on them.
OWN_API_TARGETS = ("direct", "crabtrio", "crabtrio-baseline", "crabtrio-w2")
# The long, large and tool-call streams come from the mock upstream: crabtrio-mock (the
# gateway's built-in mock provider) has no such shapes, so it does not run them.
SHAPE_TARGETS = (
    "direct",
    "crabtrio",
    "crabtrio-baseline",
    "crabtrio-noaudit",
    "crabtrio-always",
    "crabtrio-w2",
    "litellm",
    "portkey",
)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    connections: int
    stream: bool = False
    paced: bool = False
    quick: bool = False  # part of `make bench QUICK=1`
    api: str = "chat"  # the answer's shape: chat, embeddings, responses or messages
    targets: tuple[str, ...] | None = None  # the targets that run it; None: every one

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    def runs_on(self, target: str) -> bool:
        return self.targets is None or target in self.targets


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
INSTRUCTIONS = "You are a concise assistant."
RESPONSES_BODY: dict[str, Any] = {"model": CHAT_MODEL, "instructions": INSTRUCTIONS, "input": HELLO}
MESSAGES_BODY: dict[str, Any] = {
    "model": CLAUDE_MODEL,
    "max_tokens": 1024,
    "system": INSTRUCTIONS,
    "messages": HELLO,
}

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
        api="embeddings",
    ),
    Scenario(
        "responses",
        RESPONSES_PATH,
        RESPONSES_BODY,
        LOAD_CONNECTIONS,
        api="responses",
        targets=OWN_API_TARGETS,
    ),
    Scenario(
        "responses-stream",
        RESPONSES_PATH,
        {**RESPONSES_BODY, "stream": True},
        LOAD_CONNECTIONS,
        stream=True,
        api="responses",
        targets=OWN_API_TARGETS,
    ),
    Scenario(
        "messages",
        MESSAGES_PATH,
        MESSAGES_BODY,
        LOAD_CONNECTIONS,
        api="messages",
        targets=OWN_API_TARGETS,
    ),
    Scenario(
        "messages-stream",
        MESSAGES_PATH,
        {**MESSAGES_BODY, "stream": True},
        LOAD_CONNECTIONS,
        stream=True,
        api="messages",
        targets=OWN_API_TARGETS,
    ),
    Scenario(
        "large",
        CHAT_PATH,
        {"model": CHAT_MODEL, "messages": _messages(50), "tools": _tools(10)},
        LOAD_CONNECTIONS,
    ),
    Scenario(
        "stream-long",
        CHAT_PATH,
        {"model": LONG_MODEL, "messages": HELLO, "stream": True},
        LOAD_CONNECTIONS,
        stream=True,
        targets=SHAPE_TARGETS,
    ),
    Scenario(
        "stream-large",
        CHAT_PATH,
        {"model": LARGE_MODEL, "messages": HELLO, "stream": True},
        LOAD_CONNECTIONS,
        stream=True,
        targets=SHAPE_TARGETS,
    ),
    Scenario(
        "stream-tools",
        CHAT_PATH,
        {"model": TOOLS_MODEL, "messages": HELLO, "stream": True, "tools": _tools(3)},
        LOAD_CONNECTIONS,
        stream=True,
        targets=SHAPE_TARGETS,
    ),
    *(
        Scenario(
            "stream-paced-2000" if n == 2000 else f"paced{n}",  # the old names kept
            CHAT_PATH,
            {"model": PACED_MODEL, "messages": HELLO, "stream": True},
            n,
            stream=True,
            paced=True,
            quick=n == 100,
        )
        for n in PACED_CONNECTIONS
    ),
    *(
        Scenario(
            f"paced-{n}ev",
            CHAT_PATH,
            {
                "model": CHAT_MODEL,
                "messages": HELLO,
                "stream": True,
                "mock": {"chunks": n, "chunk_delay_ms": PACE_MS},
            },
            MARGINAL_CONNECTIONS,
            stream=True,
            paced=True,
            targets=MARGINAL_TARGETS,
        )
        for n in MARGINAL_EVENTS
    ),
]
SCENARIO_NAMES = [scenario.name for scenario in SCENARIOS]
