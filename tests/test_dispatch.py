"""RequestDispatch and Exchange: disconnects never cancel a send or the server's close steps;
CORS, OPTIONS and odd paths answered in OpenAI's shape."""

from __future__ import annotations

from typing import Any

import orjson
import trio
import trio.testing

from crabtrio.dispatch import Exchange

from .harness import TEAM_A, gateway

DISCONNECT = {"type": "http.disconnect"}


class FakeServer:
    """Like hypercorn: puts `http.disconnect` in the app's queue from inside a send, then runs
    its own steps (for the final send: closing or recycling the connection)."""

    def __init__(self) -> None:
        self.to_app, self.app_inbox = trio.open_memory_channel[dict[str, Any]](10)
        self.disconnect_during: int | None = None  # disconnect inside the n-th send
        self.sends = 0
        self.completed: list[int] = []  # sends whose server-side steps all ran

    async def send(self, message: dict[str, Any]) -> None:
        self.sends += 1
        number = self.sends
        if number == self.disconnect_during:
            await self.to_app.send(DISCONNECT)
        # Let every task that could react (a disconnect watcher) run before our own steps.
        await trio.testing.wait_all_tasks_blocked()
        self.completed.append(number)


async def watch(receive: Any, scope: trio.CancelScope, seen: list[str]) -> None:
    """The shape of quart-trio's and the proxied routes' watchers."""
    while (await receive())["type"] != "http.disconnect":
        pass
    seen.append("disconnect")
    scope.cancel()


async def test_a_disconnect_inside_the_final_send_cancels_nothing() -> None:
    server = FakeServer()
    server.disconnect_during = 2
    exchange = Exchange(server.app_inbox.receive, server.send, [])
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, exchange.receive, nursery.cancel_scope, seen)
        await exchange.send({"type": "http.response.start", "status": 200, "headers": []})
        await exchange.send({"type": "http.response.body", "body": b"done"})
        nursery.cancel_scope.cancel()  # the route's own end, as quart-trio does it
    assert server.completed == [1, 2]  # the server's close steps ran to the end
    assert seen == [] and not exchange.disconnected


async def test_a_disconnect_mid_stream_waits_for_the_send_then_cancels_the_work() -> None:
    server = FakeServer()
    server.disconnect_during = 2
    exchange = Exchange(server.app_inbox.receive, server.send, [])
    seen: list[str] = []
    sent_after = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, exchange.receive, nursery.cancel_scope, seen)
        await exchange.send({"type": "http.response.start", "status": 200, "headers": []})
        await exchange.send({"type": "http.response.body", "body": b"a", "more_body": True})
        await trio.sleep_forever()  # the next upstream read: cancelled by the watcher
        sent_after.append(True)
    assert server.completed == [1, 2]  # the send in progress was not cut
    assert seen == ["disconnect"] and exchange.disconnected and not sent_after


async def test_a_disconnect_before_the_response_is_handed_over_at_once() -> None:
    server = FakeServer()
    exchange = Exchange(server.app_inbox.receive, server.send, [])
    await server.to_app.send(DISCONNECT)
    with trio.fail_after(1):
        assert (await exchange.receive())["type"] == "http.disconnect"
    assert exchange.disconnected


async def test_response_headers_get_the_request_id(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        response = await gw.client.get("/health")
        assert len(response.headers["x-request-id"]) == 32


async def test_options_is_a_405_in_openai_shape_without_cors(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        for path in ("/v1/chat/completions", "/v1/models", "/health", "/v1/admin/logs"):
            response = await gw.client.options(path, headers={"origin": "https://app.test"})
            body = orjson.loads(await response.get_data())
            assert response.status_code == 405, path
            assert body["error"]["code"] == "method_not_allowed"
            assert "access-control-allow-origin" not in response.headers


CORS = 'cors_origins = ["https://app.test"]\n'
PREFLIGHT = {
    "origin": "https://app.test",
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type, x-stainless-os",
}


async def test_cors_preflight_and_responses_for_allowed_origins(tmp_path) -> None:
    async with gateway(tmp_path, top=CORS) as gw:
        preflight = await gw.client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.test"
        assert preflight.headers["access-control-allow-methods"] == "POST"
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
        answer = await gw.post(
            "/v1/chat/completions",
            {"model": "mock-chat", "messages": []},
            headers={**TEAM_A, "origin": "https://app.test"},
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.test"
        assert answer.headers["access-control-expose-headers"] == "x-request-id"
        models = await gw.client.get("/v1/models", headers={**TEAM_A, "origin": "https://app.test"})
        assert models.headers["access-control-allow-origin"] == "https://app.test"


async def test_cors_never_for_other_origins_or_admin_routes(tmp_path) -> None:
    async with gateway(tmp_path, top=CORS) as gw:
        other = await gw.client.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "origin": "https://evil.test"}
        )
        assert other.status_code == 405 and "access-control-allow-origin" not in other.headers
        admin = await gw.client.options("/v1/admin/logs", headers=PREFLIGHT)
        assert admin.status_code == 405 and "access-control-allow-origin" not in admin.headers
        logs = await gw.client.get(
            "/v1/admin/logs",
            headers={"authorization": "Bearer admin-secret", "origin": "https://app.test"},
        )
        assert logs.status_code == 200 and "access-control-allow-origin" not in logs.headers


async def test_a_double_slash_path_is_a_404_not_a_redirect(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        for path in ("//v1/models", "/v1//models", "//v1/chat/completions"):
            response = await gw.client.get(path, headers={"host": "evil.test"})
            assert response.status_code == 404, path
            assert "location" not in response.headers
            assert orjson.loads(await response.get_data())["error"]["code"] == "not_found"


async def test_an_unknown_model_name_is_clipped_in_the_error(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        name = "x" * 1_000_000
        response = await gw.post(
            "/v1/chat/completions", {"model": name, "messages": []}, headers=TEAM_A
        )
        error = orjson.loads(await response.get_data())["error"]
        assert response.status_code == 404 and error["code"] == "model_not_found"
        assert len(error["message"]) < 400
    (record,) = gw.records()
    assert record["status"] == 404 and len(record["model"]) <= 256
