"""CPU per request of sending the upstream the parsed-and-re-encoded body instead of the
client's bytes (so duplicate keys cannot be authorized on one reading and served on another).

    .venv/bin/python bench/reencode.py

Prints, per body shape, the cost of the parse the gateway always did, and what the re-encode
adds on top, in microseconds (best of 5 runs, each timing many calls).
"""

from __future__ import annotations

import timeit

import orjson


def chat(messages: int, words: int) -> dict[str, object]:
    text = " ".join(["lorem"] * words)
    return {
        "model": "gpt-4o",
        "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i in range(messages)
        ],
        "temperature": 0.7,
    }


def tools(count: int) -> list[dict[str, object]]:
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "Look something up " * 5,
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
                    "required": ["q"],
                },
            },
        }
        for i in range(count)
    ]


SHAPES: dict[str, dict[str, object]] = {
    "chat, 1 short message": chat(1, 10),
    "chat, 10 messages x 100 words": chat(10, 100),
    "large: 50 messages, 10 tools": {**chat(50, 40), "tools": tools(10)},
    "long context: 20 x 2,000 words": chat(20, 2000),
    "embeddings, 256 inputs": {
        "model": "text-embedding-3-small",
        "input": [" ".join(["lorem"] * 50)] * 256,
    },
}


def best_us(statement: object, number: int) -> float:
    runs = timeit.repeat(statement, number=number, repeat=5)  # type: ignore[arg-type]
    return min(runs) / number * 1e6


def main() -> None:
    print("| body | size | parse (us) | re-encode adds (us) | adds |")
    print("|---|---:|---:|---:|---:|")
    for name, body in SHAPES.items():
        raw = orjson.dumps(body)
        parsed = orjson.loads(raw)
        number = max(20, 2_000_000 // len(raw))
        parse = best_us(lambda raw=raw: orjson.loads(raw), number)
        encode = best_us(lambda parsed=parsed: orjson.dumps(parsed), number)
        size = f"{len(raw) / 1024:,.1f} KB"
        print(f"| {name} | {size} | {parse:.1f} | {encode:.1f} | {encode / parse:.0%} |")


if __name__ == "__main__":
    main()
