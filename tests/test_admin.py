"""GET /v1/admin/logs: the guard, parameter checks, filters and gapless pagination."""

from __future__ import annotations

import base64
import socket
from urllib.parse import quote

import orjson
import pytest
import trio

from crabtrio.admin import decode_cursor, encode_cursor, parse_query
from crabtrio.errors import InvalidRequest

from .harness import BASE, TEAM_A, gateway

TEAM_B = {"authorization": "Bearer sk-team-b"}
ADMIN = {"authorization": "Bearer admin-secret"}
NO_TOKEN = BASE.replace('admin_token = "admin-secret"\n', "")


async def logs(gw, query: str = "", headers=ADMIN, client=None):
    scope_base = {"client": client} if client else None
    return await gw.client.get(f"/v1/admin/logs{query}", headers=headers, scope_base=scope_base)


def cursor_of(value) -> str:
    """`value` encoded as `encode_cursor` would, whatever it is."""
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


async def fill(gw, n: int) -> list[str]:
    ids = []
    for i in range(n):
        headers, body = (
            (TEAM_A, {"model": "mock-chat", "messages": []})
            if i % 3
            else (TEAM_B, {"model": "nope"})
        )
        ids.append(
            (await gw.post("/v1/chat/completions", body, headers=headers)).headers["x-request-id"]
        )
    return ids


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer wrong"}, 401), (TEAM_A, 401), (ADMIN, 200)],
)
async def test_admin_token_guard(tmp_path, headers, status) -> None:
    async with gateway(tmp_path) as gw:
        response = await logs(gw, headers=headers)
        assert response.status_code == status
        if status != 200:
            assert b"admin-secret" not in await response.get_data()


async def test_without_a_token_only_loopback_clients_are_answered(tmp_path) -> None:
    async with gateway(tmp_path, base=NO_TOKEN) as gw:
        assert (await logs(gw, headers={}, client=("127.0.0.1", 5000))).status_code == 200
        assert (await logs(gw, headers={}, client=("::1", 5000))).status_code == 200
        remote = await logs(gw, headers={}, client=("10.1.2.3", 5000))
        assert remote.status_code == 403
        assert orjson.loads(await remote.get_data())["error"]["code"] == "admin_local_only"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?since=yesterday", "since"),
        ("?until=-5", "until"),
        ("?status=2000", "status"),
        ("?before=not-a-cursor", "before"),
        ("?modle=gpt-4o", "modle"),
        ("?limit=1_000", "limit"),
        ("?limit=%2B5", "limit"),
        ("?limit=%205", "limit"),
        ("?limit=5%20", "limit"),
        ("?limit=", "limit"),
        ("?limit=" + quote("\u0663"), "limit"),  # ARABIC-INDIC DIGIT THREE
        ("?since=-0", "since"),
        ("?since=" + "9" * 40, "since"),
        ("?limit=1&limit=5000", "limit"),
        ("?key=team-a&limit=5&key=team-b", "key"),
        ("?before=" + cursor_of([-1, "0a"]), "before"),
        ("?before=" + cursor_of([2**53, "0a"]), "before"),
        ("?before=" + cursor_of([1, "0a" * 17]), "before"),
        ("?before=" + cursor_of([1, "0a\n"]), "before"),
        ("?before=" + cursor_of([1, "0A"]), "before"),
        ("?before=" + cursor_of([1, "0"]), "before"),
        ("?before=" + cursor_of([1, "zz"]), "before"),
        ("?before=" + cursor_of([1, "caf\u00e9"]), "before"),
        ("?before=" + cursor_of([1, ""]), "before"),
        ("?before=" + cursor_of([1, "0a", 2]), "before"),
        ("?before=" + cursor_of([True, "0a"]), "before"),
        ("?before=" + cursor_of([1, "0a"])[:4] + "!!!!" + cursor_of([1, "0a"])[4:], "before"),
        ("?before=" + cursor_of([1, "0a"]) + "=", "before"),
        ("?model=" + "m" * 257, "model"),
        ("?provider=" + "p" * 257, "provider"),
    ],
)
async def test_bad_parameters_are_400_naming_them(tmp_path, query, param) -> None:
    async with gateway(tmp_path) as gw:
        response = await logs(gw, query)
        error = orjson.loads(await response.get_data())["error"]
        assert response.status_code == 400
        assert error["param"] == param and param in error["message"]


def test_good_parameters_parse_once_each() -> None:
    cursor = encode_cursor((2**53 - 1, b"\xff" * 16))
    pairs = [
        ("key", "k" * 256),
        ("status", "404"),
        ("since", "0"),
        ("until", str(2**63 - 1)),
        ("limit", "007"),
        ("before", cursor),
    ]
    assert parse_query(pairs) == {
        "filters": {"key": "k" * 256, "status": 404},
        "since": 0,
        "until": 2**63 - 1,
        "limit": 7,
        "before": (2**53 - 1, b"\xff" * 16),
    }
    assert parse_query([]) == {"filters": {}, "limit": 100}
    assert decode_cursor(encode_cursor((1_700_000_000_000, b"0f" * 8))) == (
        1_700_000_000_000,
        b"0f" * 8,
    )


async def test_filters_and_pages_newest_first(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        ids = await fill(gw, 30)
        everything = orjson.loads(await (await logs(gw, "?limit=1000")).get_data())
        newest_first = sorted(
            gw.records(), key=lambda r: (r["timestamp"], r["request_id"]), reverse=True
        )
        assert sorted(ids) == sorted(r["request_id"] for r in newest_first)
        assert everything == newest_first

        team_a = [r["request_id"] for r in newest_first if r["key_name"] == "team-a"]
        assert len(team_a) == 20
        seen: list[str] = []
        query = "?key=team-a&limit=6"
        while True:
            response = await logs(gw, query)
            page = orjson.loads(await response.get_data())
            assert len(page) <= 6
            seen += [r["request_id"] for r in page]
            cursor = response.headers.get("x-next-cursor")
            if cursor is None:
                break
            query = f"?key=team-a&limit=6&before={cursor}"
        assert seen == team_a

        rejected = orjson.loads(await (await logs(gw, "?status=404&limit=1000")).get_data())
        assert [r["request_id"] for r in rejected] == [
            r["request_id"] for r in newest_first if r["status"] == 404
        ]
        assert len(rejected) == 10
        assert orjson.loads(await (await logs(gw, "?model=mock-chat&key=team-b")).get_data()) == []
        assert (
            len(orjson.loads(await (await logs(gw, "?provider=mock&limit=1000")).get_data())) == 20
        )

        middle = everything[10]["timestamp"]
        bounded = orjson.loads(
            await (await logs(gw, f"?since={middle}&until={middle}&limit=1000")).get_data()
        )
        assert bounded and all(r["timestamp"] == middle for r in bounded)
        assert everything[10]["request_id"] in [r["request_id"] for r in bounded]


async def test_admin_routes_are_not_audited_but_carry_request_ids(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        response = await logs(gw)
        assert response.headers["x-request-id"]
    assert gw.records() == []


async def test_client_disconnect_mid_stream_is_recorded_as_499(tmp_path) -> None:
    extra = '[providers.slow]\nkind = "mock"\nmodels = ["slow-chat"]\nchunks = 50\ndelay_ms = 20\n'
    async with gateway(tmp_path, extra=extra) as gw:
        body = {"model": "slow-chat", "messages": [], "stream": True}
        response = await gw.post("/v1/chat/completions", body, headers=TEAM_A, disconnect_after=3)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
    (record,) = gw.records()
    assert (record["request_id"], record["status"], record["stream"]) == (request_id, 499, True)
    assert "client disconnected" in record["error"]


# --- scope=fleet ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?scope=bogus", "scope"),
        ("?scope=", "scope"),
        ("?scope=FLEET", "scope"),
        ("?scope=fleet&scope=local", "scope"),
        ("?instance=gw-a", "instance"),
        ("?scope=local&instance=gw-a", "instance"),
        ("?scope=fleet", "scope"),  # no [audit.postgres] in this gateway's config
        ("?scope=fleet&instance=gw-a&key=team-a", "scope"),
    ],
)
async def test_bad_scope_or_instance_is_400_naming_it(tmp_path, query, param) -> None:
    async with gateway(tmp_path) as gw:
        response = await logs(gw, query)
        error = orjson.loads(await response.get_data())["error"]
        assert response.status_code == 400
        assert error["param"] == param and param in error["message"]


def test_scope_and_instance_parse() -> None:
    assert parse_query([("scope", "local")]) == {"filters": {}, "limit": 100}
    assert parse_query([("instance", "gw-a"), ("scope", "fleet"), ("key", "k")]) == {
        "filters": {"key": "k"},
        "limit": 100,
        "scope": "fleet",
        "instance": "gw-a",
    }
    with pytest.raises(InvalidRequest) as long_instance:
        parse_query([("scope", "fleet"), ("instance", "i" * 257)])
    assert long_instance.value.param == "instance"


def postgres_audit(dsn: str) -> str:
    return f'[audit.postgres]\ndsn = "{dsn}"\ninstance = "gw-a"\n'


async def test_fleet_scope_pages_what_was_shipped_like_the_local_scope(
    tmp_path, postgres_dsn
) -> None:
    async with gateway(tmp_path, audit=postgres_audit(postgres_dsn)) as gw:
        ids = await fill(gw, 12)
        local = orjson.loads(await (await logs(gw, "?limit=1000")).get_data())
        assert len(local) == 12

        async def fleet(query: str) -> tuple[list[dict], str | None]:
            response = await logs(gw, f"?scope=fleet&{query}")
            assert response.status_code == 200, await response.get_data()
            return orjson.loads(await response.get_data()), response.headers.get("x-next-cursor")

        async def shipped() -> int:  # 503 until the shipper has created the table
            response = await logs(gw, "?scope=fleet&limit=1000")
            return (
                len(orjson.loads(await response.get_data())) if response.status_code == 200 else 0
            )

        with trio.move_on_after(15):
            while await shipped() < 12:
                await trio.sleep(0.05)
        everything, cursor = await fleet("limit=1000")
        assert everything == [{**record, "instance": "gw-a"} for record in local]
        assert cursor is None
        assert sorted(r["request_id"] for r in everything) == sorted(ids)

        team_a = [r["request_id"] for r in local if r["key_name"] == "team-a"]
        seen: list[str] = []
        query = "key=team-a&instance=gw-a&limit=3"
        while True:
            page, cursor = await fleet(query)
            assert len(page) <= 3
            seen += [r["request_id"] for r in page]
            if cursor is None:
                break
            query = f"key=team-a&instance=gw-a&limit=3&before={cursor}"
        assert seen == team_a
        assert (await fleet("instance=gw-b"))[0] == []


async def test_fleet_scope_with_postgres_down_is_503_without_the_password(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = f"postgresql://u:s3cret-pw@127.0.0.1:{port}/db"
    async with gateway(tmp_path, audit=postgres_audit(dsn)) as gw:
        with trio.fail_after(5):
            response = await logs(gw, "?scope=fleet")
        body = await response.get_data()
        assert response.status_code == 503
        assert orjson.loads(body)["error"]["code"] == "fleet_unavailable"
        assert b"s3cret-pw" not in body
        # The local scope still answers.
        assert (await logs(gw)).status_code == 200
