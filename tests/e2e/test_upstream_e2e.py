"""Hostile upstreams against a real `hypercorn crabtrio:app --worker-class trio`: huge and
compressed bodies, endless SSE events, Retry-After, redirects, echoed secrets, proxies from the
environment or the config, TLS trust and HTTP/2 (tests/e2e/hostile_upstream.py,
forward_proxy.py, tls_upstream.py)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import gateway_config
from .faults import KEY, worker_pids
from .forward_proxy import ForwardProxy
from .hostile_upstream import HostileUpstream, gzip_bomb
from .processes import HYPERCORN, ROOT, Gateway, Process, wait_until

pytestmark = pytest.mark.e2e

SECRET = "sk-upstream-e2e"  # the `api_key` gateway_config gives its providers
TIMEOUT = 30.0  # any one exchange with the gateway
MB = 1024 * 1024
# A JSON escape, also one escaped again (`\\u002d`) by JSON nested in a JSON string.
_ESCAPE = re.compile(r"\\+u([0-9a-fA-F]{4})")


@pytest.fixture(autouse=True)
def _no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways inherit this process's environment: only the proxies a test sets apply."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    server = ForwardProxy()
    try:
        yield server
    finally:
        server.close()


def provider(name: str, base_url: str, settings: str = "") -> str:
    """A provider table serving the model `name`, with the same api_key as `up`."""
    return (
        f'\n[providers.{name}]\nkind = "openai"\nbase_url = "{base_url}"\n'
        f'api_key = "{SECRET}"\nmodels = ["{name}"]\n{settings}\n'
    )


def behaviours(hostile: HostileUpstream, settings: dict[str, str]) -> str:
    """One provider (and model) per hostile behaviour, each with its own settings."""
    return "".join(provider(b, f"{hostile.url}/{b}/v1", s) for b, s in settings.items())


def start(
    start_gateway: Callable[..., Gateway],
    tmp_path: Path,
    hostile: HostileUpstream,
    providers: str,
    **options: object,
) -> Gateway:
    """A gateway whose provider `up` (model gpt-e2e) is the hostile upstream's /ok."""
    config = gateway_config(f"{hostile.url}/ok", tmp_path / "audit.jsonl", extra=providers)
    return start_gateway(config, **options)


def chat(gateway: Gateway, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(
        f"{gateway.base_url}/chat/completions", json=body, headers=KEY, timeout=TIMEOUT
    )


def records(tmp_path: Path, count: int) -> list[dict]:
    """The audit file's records, once there are `count` of them (fails if more or fewer)."""
    audit = tmp_path / "audit.jsonl"

    def lines() -> list[bytes]:
        return audit.read_bytes().splitlines() if audit.exists() else []

    wait_until(lambda: len(lines()) >= count, 5, f"{count} audit records")
    parsed = [json.loads(line) for line in lines()]
    assert len(parsed) == count, parsed
    return parsed


def only_record(tmp_path: Path, count: int, model: str) -> dict:
    [record] = [r for r in records(tmp_path, count) if r["model"] == model]
    return record


def worker(gateway: Gateway) -> int:
    [pid] = worker_pids(gateway.proc.pid)
    return pid


def memory_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM (peak RSS) of `pid`, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+), so a peak is measured per request."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` so far (/proc/<pid>/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sse_events(gateway: Gateway, model: str) -> tuple[int, list[str]]:
    """Stream a chat; its status and the `data:` payloads it carried."""
    body = {"model": model, "messages": [], "stream": True}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=KEY, timeout=TIMEOUT
    ) as response:
        text = response.read().decode()
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return response.status_code, [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    return response.status_code, [text]


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


# 1. Huge bodies


def test_huge_and_compressed_bodies_are_refused_in_bounded_memory(
    tmp_path, start_gateway, hostile
) -> None:
    gateway = start(
        start_gateway,
        tmp_path,
        hostile,
        behaviours(hostile, {"huge": "", "gzip-bomb": "", "gzip-bomb-sse": ""}),
    )
    pid = worker(gateway)
    assert chat(gateway, "gpt-e2e").status_code == 200  # warm: imports, pools, the writer
    figures = {}
    for count, model in enumerate(["huge", "gzip-bomb", "gzip-bomb-sse"], start=2):
        peak_reset = reset_peak(pid)
        before = memory_kb(pid, "VmRSS")
        if model.endswith("-sse"):
            status, events = sse_events(gateway, model)
            assert status == 502
            error = json.loads(events[0])["error"]
        else:
            error = assert_error_shape(chat(gateway, model), 502)
        assert error["code"] == "upstream_response_too_large", error
        assert error["type"] == "upstream_error"
        record = only_record(tmp_path, count, model)
        assert record["status"] == 502
        peak = memory_kb(pid, "VmHWM") if peak_reset else memory_kb(pid, "VmRSS")
        after = memory_kb(pid, "VmRSS")
        figures[model] = {
            "peak_growth_mb": (peak - before) / 1024,
            "rss_growth_mb": (after - before) / 1024,
        }
        assert peak - before < 100 * 1024, figures
        assert len(hostile.seen(model)) == 1  # a broken limit is not retried
    print("RSS", figures)
    assert len(gzip_bomb()) < 400 * 1024  # it was a bomb: 300 MB from under 400 KB


# 2. SSE without an event boundary


def test_sse_without_event_boundary_is_cut_quickly(tmp_path, start_gateway, hostile) -> None:
    # 32 MB of one unfinished event are read before the cut: the splitter must stay linear
    # (re-joining and re-searching its buffer at every chunk cost 18.6 s of CPU for 40 MB).
    large = "max_event_kb = 32768\nmax_retries = 0"
    providers = behaviours(
        hostile, {"sse-unbounded": large, "sse-unbounded-after-event": large}
    ) + provider("sse-default", f"{hostile.url}/sse-unbounded/v1", "max_retries = 0")
    gateway = start(start_gateway, tmp_path, hostile, providers)
    pid = worker(gateway)
    assert chat(gateway, "gpt-e2e").status_code == 200
    figures = {}

    for count, (model, limit) in enumerate(
        [("sse-unbounded", "32768"), ("sse-default", "1024")], start=2
    ):
        used = cpu_seconds(pid)
        status, events = sse_events(gateway, model)
        figures[f"{model}, cut before the first event"] = cpu_seconds(pid) - used
        assert status == 502, events  # nothing was sent yet: a plain error answer
        error = json.loads(events[0])["error"]
        assert error["code"] == "upstream_event_too_large" and limit in error["message"], error
        assert only_record(tmp_path, count, model)["status"] == 502

    used = cpu_seconds(pid)
    status, events = sse_events(gateway, "sse-unbounded-after-event")
    figures["sse-unbounded-after-event, cut mid-stream"] = cpu_seconds(pid) - used
    assert status == 200
    first, last = json.loads(events[0]), json.loads(events[-1])
    assert first["choices"][0]["delta"]["content"] == "first"
    assert last["error"]["code"] == "upstream_event_too_large", events
    assert "[DONE]" not in events  # a cut stream does not pretend to be complete
    record = only_record(tmp_path, 4, "sse-unbounded-after-event")
    assert record["status"] == 502 and record["stream"] is True
    print("CPU seconds", figures)
    assert all(seconds < 2.0 for seconds in figures.values()), figures


@pytest.mark.parametrize("behaviour", ["sse-gzip-header-alone", "sse-gzip-split-event"])
def test_gzip_stream_survives_reads_that_inflate_to_nothing(
    tmp_path, start_gateway, hostile, behaviour
) -> None:
    gateway = start(
        start_gateway, tmp_path, hostile, behaviours(hostile, {behaviour: "max_retries = 0"})
    )
    status, events = sse_events(gateway, behaviour)
    assert status == 200, events
    contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert contents == ["one", "two"] and events[-1] == "[DONE]", events


# 3. Retry-After


def test_retry_after_is_honoured_and_capped(tmp_path, start_gateway, hostile) -> None:
    providers = behaviours(
        hostile,
        {
            "retry-after-1": "max_retries = 1\ntimeout = 5",
            "retry-after-3600": "max_retries = 1\ntimeout = 5\nretry_after_max = 1",
            "retry-after-7200": "max_retries = 1\ntimeout = 2",  # capped by the timeout
        },
    )
    gateway = start(start_gateway, tmp_path, hostile, providers)
    waits = {}
    for model, low, high in [
        ("retry-after-1", 1.0, 2.0),
        ("retry-after-3600", 1.0, 2.0),
        ("retry-after-7200", 2.0, 3.0),
    ]:
        began = time.monotonic()
        response = chat(gateway, model)
        waits[model] = time.monotonic() - began
        assert response.status_code == 200, response.text
        first, second = hostile.seen(model)
        gap = second.at - first.at
        assert low <= gap < high, (model, gap)
        assert low <= waits[model] < high + 1.0, (model, waits[model])
    print("waits", waits)
    assert [r["status"] for r in records(tmp_path, 3)] == [200, 200, 200]


# 4. Redirects


def test_redirect_is_not_followed(tmp_path, start_gateway, hostile) -> None:
    gateway = start(
        start_gateway, tmp_path, hostile, behaviours(hostile, {"redirect": "max_retries = 1"})
    )
    error = assert_error_shape(chat(gateway, "redirect"), 502, "upstream_error")
    assert "302" in error["message"] and "not followed" in error["message"]
    assert len(hostile.seen("redirect")) == 1  # not retried either: it would redirect again
    assert hostile.seen("target") == []
    record = only_record(tmp_path, 1, "redirect")
    assert record["status"] == 502 and "302" in record["error"]


# 5. Secrets echoed by the upstream


# The statuses the client may get (an upstream 500 is relayed as 500 or 502).
SECRET_CASES = {
    "secret-429-raw": {429},
    "secret-429-escaped": {429},
    "secret-500-json-escaped": {500, 502},
    "secret-500-text": {500, 502},
    "secret-400-json-raw": {400},
    "secret-400-json-escaped": {400},
    "secret-400-text-raw": {400},
    "secret-400-text-escaped": {400},
    "secret-400-gzip": {400},
    "secret-status-line": {502},
    "secret-header-line": {502},
}
# An error message that is itself JSON, spelling the key with escapes.
NESTED_CASES = {"secret-400-json-nested": {400}, "secret-429-json-nested": {429}}


def secret_forms(text: str) -> list[str]:
    """Where the secret shows in `text`: raw, escaped (any case) or once escapes are read."""
    found = []
    if SECRET in text:
        found.append("raw")
    if re.search(r"sk\\+u002dupstream", text, re.IGNORECASE):
        found.append("escaped")
    if SECRET in _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text):
        found.append("decoded")
    return found


def test_secret_forms_are_recognised() -> None:
    """The detector the secret tests rely on sees every form it claims to."""
    assert secret_forms(f"x {SECRET}") == ["raw", "decoded"]
    assert secret_forms('"sk\\u002Dupstream\\u002de2e"') == ["escaped", "decoded"]
    assert secret_forms("\\u0073k-upstream-e2e") == ["decoded"]
    assert secret_forms('"{\\"k\\": \\"sk\\\\u002dupstream-e2e\\"}"') == ["escaped", "decoded"]
    assert secret_forms("sk-[redacted]") == []


def leaks_of_echoed_secrets(
    tmp_path: Path, start_gateway: Callable[..., Gateway], hostile: HostileUpstream, cases: dict
) -> dict[str, list[str]]:
    """Ask each case's provider once; where the key then shows: answers, audit file, log."""
    providers = behaviours(hostile, dict.fromkeys(cases, "max_retries = 0"))
    gateway = start(start_gateway, tmp_path, hostile, providers)
    answers = {}
    for model, statuses in cases.items():
        response = chat(gateway, model)
        answers[model] = response.text
        assert response.status_code in statuses, (model, response.text)
        # OpenAI's shape; an upstream's own 4xx error object is relayed as it came (scrubbed).
        assert isinstance(response.json()["error"]["message"], str)
        [seen] = hostile.seen(model)
        assert seen.bearer == SECRET  # the upstream had the key to echo
    assert len(records(tmp_path, len(cases))) == len(cases)
    leaks = {model: secret_forms(text) for model, text in answers.items()}
    leaks["audit file"] = secret_forms((tmp_path / "audit.jsonl").read_text())
    leaks["gateway log"] = secret_forms(gateway.output)
    return {where: forms for where, forms in leaks.items() if forms}


def test_upstream_secrets_never_reach_client_audit_or_log(tmp_path, start_gateway, hostile) -> None:
    assert leaks_of_echoed_secrets(tmp_path, start_gateway, hostile, SECRET_CASES) == {}


def test_secret_escaped_inside_a_json_message_is_scrubbed(tmp_path, start_gateway, hostile) -> None:
    assert leaks_of_echoed_secrets(tmp_path, start_gateway, hostile, NESTED_CASES) == {}


# 6. Proxies


@pytest.mark.parametrize(
    ("mode", "through_proxy"),
    [
        ("HTTP_PROXY", True),
        ("http_proxy", True),
        ("ALL_PROXY", True),
        ("HTTPS_PROXY", False),  # not for an http:// upstream
        ("NO_PROXY", False),
        ("setting", True),
    ],
)
def test_proxy_from_environment_or_setting(
    tmp_path, start_gateway, hostile, forward_proxy, mode, through_proxy
) -> None:
    env = {}
    settings = ""
    if mode in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "HTTPS_PROXY"):
        env[mode] = forward_proxy.url
    elif mode == "NO_PROXY":
        env.update(HTTP_PROXY=forward_proxy.url, NO_PROXY="127.0.0.1")
    else:
        settings = f'proxy = "{forward_proxy.url}"'
    providers = provider("via", f"{hostile.url}/ok/v1", settings)
    gateway = start(start_gateway, tmp_path, hostile, providers, env=env)
    response = chat(gateway, "via")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "chatcmpl-hostile"
    [arrived] = hostile.seen("ok")
    assert arrived.bearer == SECRET
    expected = [f"POST {hostile.url}/ok/v1/chat/completions"] if through_proxy else []
    assert forward_proxy.requests() == expected


# 7. and 8. TLS and HTTP/2


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    files = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    authority.cert_pem.write_to_path(str(files["ca"]))
    certificate.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for blob in certificate.cert_chain_pems[1:]:
        blob.write_to_path(str(files["cert"]), append=True)
    certificate.private_key_pem.write_to_path(str(files["key"]))
    return files


@pytest.fixture(scope="module")
def tls_upstream(tls_files: dict[str, Path]) -> Iterator[str]:
    """hypercorn serving tls_upstream.py over TLS (ALPN: h2 and http/1.1); its base URL."""
    args = [HYPERCORN, "tests.e2e.tls_upstream:app", "--bind", "127.0.0.1:0"]
    args += ["--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"])]
    server = Process(args, cwd=ROOT)
    try:
        yield server.wait_for_line(r"Running on (https://[\d.:]+)").group(1) + "/v1"
    finally:
        server.stop()


def test_tls_trust_comes_from_ca_file_or_is_switched_off(
    tmp_path, start_gateway, hostile, forward_proxy, tls_files, tls_upstream
) -> None:
    ca = f'ca_file = "{tls_files["ca"]}"'
    providers = "".join(
        [
            provider("tls-ca", tls_upstream, ca),
            provider("tls-untrusted", tls_upstream, "max_retries = 0"),
            provider("tls-noverify", tls_upstream, "verify = false"),
            provider("tls-proxied", tls_upstream, f'{ca}\nproxy = "{forward_proxy.url}"'),
        ]
    )
    gateway = start(start_gateway, tmp_path, hostile, providers)
    trusted = chat(gateway, "tls-ca")
    assert trusted.status_code == 200, trusted.text
    assert trusted.json()["id"] == "chatcmpl-http-1.1"  # LeanTransport: HTTP/1.1
    error = assert_error_shape(chat(gateway, "tls-untrusted"), 502)
    assert "not trusted" in error["message"], error
    unverified = chat(gateway, "tls-noverify")
    assert unverified.status_code == 200, unverified.text
    proxied = chat(gateway, "tls-proxied")
    assert proxied.status_code == 200, proxied.text
    assert forward_proxy.requests() == [f"CONNECT {tls_upstream[8:-3]}"]
    statuses = {r["model"]: r["status"] for r in records(tmp_path, 4)}
    assert statuses == {
        "tls-ca": 200,
        "tls-untrusted": 502,
        "tls-noverify": 200,
        "tls-proxied": 200,
    }


def test_http2_upstream(tmp_path, start_gateway, hostile, tls_files, tls_upstream) -> None:
    settings = f'ca_file = "{tls_files["ca"]}"\nhttp2 = true'
    gateway = start(start_gateway, tmp_path, hostile, provider("h2", tls_upstream, settings))
    for _ in range(2):  # the second one on the same HTTP/2 connection
        response = chat(gateway, "h2")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == "chatcmpl-http-2"
    assert [r["status"] for r in records(tmp_path, 2)] == [200, 200]
