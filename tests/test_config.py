"""Config loading: lookup order, ${VAR} expansion, and one clear line per mistake."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from crabtrio.config import (
    EMBEDDED_SOURCE,
    ConfigError,
    PostgresConfig,
    load_config,
    parse_config,
)

GOOD = """
admin_token = "${TEST_ADMIN_TOKEN}"
[providers.openai]
kind = "openai"
base_url = "https://api.example.com/v1/"
api_key = "${TEST_UPSTREAM_KEY}"
models = ["gpt-4o", "gpt-4o-mini"]
weight = 3
max_retries = 1
timeout = 12.5
[providers.backup]
base_url = "http://127.0.0.1:9/v1"
models = ["gpt-4o"]
[[keys]]
name = "team-a"
key = "sk-a"
models = ["gpt4"]
[[keys]]
name = "team-b"
key = "sk-b"
[aliases]
gpt4 = "gpt-4o"
[pricing.gpt-4o]
prompt_cost_per_million = 2.5
completion_cost_per_million = 10.0
[audit]
path = "logs/audit.jsonl"
sync = "always"
"""


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream")
    monkeypatch.delenv("CRABTRIO_CONFIG", raising=False)


def test_full_config_parses_with_env_expansion() -> None:
    config = parse_config(GOOD, "good.toml")
    assert config.admin_token == "admin-secret"
    openai = config.providers["openai"]
    assert openai.api_key == "sk-upstream"
    assert openai.base_url == "https://api.example.com/v1"
    assert (openai.weight, openai.max_retries, openai.timeout) == (3.0, 1, 12.5)
    backup = config.providers["backup"]
    assert (backup.kind, backup.api_key, backup.max_retries, backup.timeout) == (
        "openai",
        None,
        2,
        600.0,
    )
    defaults = (
        backup.connect_timeout,
        backup.max_connections,
        backup.retry_on_timeout,
        backup.retry_after_max,
        backup.max_response_mb,
        backup.max_event_kb,
        backup.proxy,
        backup.http2,
        backup.verify,
    )
    assert defaults == (10.0, 1000, False, 30.0, 32.0, 1024.0, None, False, True)
    assert config.models == ["gpt-4o", "gpt-4o-mini"]
    assert config.aliases == {"gpt4": "gpt-4o"}
    assert [k.name for k in config.keys] == ["team-a", "team-b"]
    assert config.keys[0].allows("gpt-4o", "gpt4") and not config.keys[0].allows(
        "gpt-4o-mini", "gpt-4o-mini"
    )
    assert config.keys[1].models == ("*",)
    assert config.pricing["gpt-4o"].completion_cost_per_million == 10.0
    assert (config.audit.path, config.audit.sync) == ("logs/audit.jsonl", "always")
    assert config.warnings == ()


def test_env_default_syntax_and_unknown_settings_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    config = parse_config(
        """
listen = "0.0.0.0:6000"
[providers.m]
kind = "mock"
models = ["m"]
api_key = "${NOT_SET_ANYWHERE:-fallback}"
colour = "blue"
""",
        "x.toml",
    )
    assert config.providers["m"].api_key == "fallback"
    assert any("listen: unknown setting" in w for w in config.warnings)
    assert any("providers.m.colour" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[providers.x]\nkind = 'bedrock'\nmodels = ['a']",
            "bad.toml: providers.x.kind: unknown provider kind 'bedrock' (use one of: openai, anthropic, mock)",
        ),
        (
            "[providers.x]\nmodels = 'a'",
            "bad.toml: providers.x.models: expected a non-empty list of strings, got a string",
        ),
        ("[providers.x]\nkind = 'mock'", "bad.toml: providers.x.models: missing"),
        (
            "[providers.x]\nmodels = ['a']\nweight = 'heavy'",
            "bad.toml: providers.x.weight: expected a number, got a string",
        ),
        (
            "[providers.x]\nmodels = ['a']\nweight = 0",
            "bad.toml: providers.x.weight: must be greater than 0",
        ),
        (
            "[providers.x]\nmodels = ['a']\nmax_retries = 1.5",
            "bad.toml: providers.x.max_retries: expected an integer",
        ),
        (
            "[providers.x]\nmodels = ['a']\n[aliases]\nb = 'nope'",
            "bad.toml: aliases.b: points to model 'nope', which no provider serves",
        ),
        (
            "[providers.x]\nmodels = ['a']\napi_key = '${MISSING_VAR_FOR_TEST}'",
            "bad.toml: providers.x.api_key: environment variable MISSING_VAR_FOR_TEST is not set",
        ),
        (
            "[providers.x]\nmodels = ['a']\n[audit]\nsync = 'sometimes'",
            "bad.toml: audit.sync: unknown mode 'sometimes'",
        ),
        ("[providers.x]\nmodels = ['a']\n[[keys]]\nname = 'k'", "bad.toml: keys[0].key: missing"),
        (
            "[providers.x]\nmodels = ['a']\n[[keys]]\nname = 'k'\nkey = 's'\n"
            "[[keys]]\nname = 'k'\nkey = 't'",
            "bad.toml: keys[1].name: duplicate key name 'k'",
        ),
        (
            "[providers.x]\nmodels = ['a']\nbase_url = 'ftp://x'",
            "bad.toml: providers.x.base_url: must start with http:// or https://",
        ),
        ("providers = 3", "bad.toml: providers: expected a table, got an integer"),
        (
            "admin_token = 'x'",
            "bad.toml: providers: at least one [providers.NAME] table is required",
        ),
        ("[providers.x\nmodels = ['a']", "bad.toml: invalid TOML:"),
    ],
)
def test_bad_config_names_file_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.toml")
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_error_never_echoes_a_secret_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[providers.x]\nmodels = ['a']\napi_key = 12345678", "s.toml")
    assert "12345678" not in str(info.value)


def test_lookup_order(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config().source == EMBEDDED_SOURCE
    (tmp_path / "crabtrio.toml").write_text("[providers.local]\nkind='mock'\nmodels=['l']\n")
    assert list(load_config().providers) == ["local"]
    other = tmp_path / "other.toml"
    other.write_text("[providers.env]\nkind='mock'\nmodels=['e']\n")
    monkeypatch.setenv("CRABTRIO_CONFIG", str(other))
    assert list(load_config().providers) == ["env"]
    monkeypatch.setenv("CRABTRIO_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml: config file not found"):
        load_config()


def test_embedded_default_serves_the_mock() -> None:
    config = load_config()
    assert config.source == EMBEDDED_SOURCE
    assert config.providers["mock"].kind == "mock"
    assert config.keys == ()
    assert config.audit.path == "crabtrio-audit.jsonl"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'ca_file = "/nonexistent/ca.pem"',
            "providers.p.ca_file: no such file: /nonexistent/ca.pem",
        ),
        (
            'proxy = "ftp://proxy"',
            "providers.p.proxy: must start with http://, https:// or socks5://",
        ),
        ("max_connections = 0", "providers.p.max_connections: must be at least 1, got 0"),
        ('verify = "no"', "providers.p.verify: expected true or false, got a string"),
    ],
)
def test_bad_upstream_client_settings_name_the_field(setting: str, message: str) -> None:
    text = f'[providers.p]\nmodels = ["m"]\n{setting}\n'
    with pytest.raises(ConfigError) as error:
        parse_config(text, "c.toml")
    assert str(error.value) == f"c.toml: {message}"


# --- [audit.postgres] ----------------------------------------------------------------------

SECRET_DSN = "postgresql://crab:pw-hunter2@db.internal:5432/audit"
PROVIDERS = "[providers.x]\nmodels = ['a']\n"


def with_postgres(body: str) -> str:
    return f"{PROVIDERS}[audit]\npath = 'a.jsonl'\n[audit.postgres]\n{body}\n"


def test_without_audit_postgres_nothing_of_the_fleet_is_loaded(tmp_path) -> None:
    assert parse_config(GOOD, "good.toml").audit.postgres is None
    # A gateway without [audit.postgres] never imports asyncpg or trio-asyncio: not while
    # loading its config, nor while its audit log writes and reads.
    (tmp_path / "c.toml").write_text(f"{PROVIDERS}[audit]\npath = '{tmp_path / 'a.jsonl'}'\n")
    script = f"""
import sys, trio
import crabtrio, crabtrio.app
from crabtrio.audit import AuditLog
from crabtrio.config import load_config
from tests.audit.records import record

def fleet():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("asyncpg", "trio_asyncio"))

config = load_config({str(tmp_path / "c.toml")!r})
assert config.audit.postgres is None

async def main():
    async with AuditLog.open(config.audit) as audit:
        await audit.settle(audit.record(record(1)))
        lines, _ = await audit.query()
        assert len(lines) == 1

trio.run(main)
assert fleet() == [], fleet()
import crabtrio.fleet.shipper  # the check itself: the fleet modules do import them
assert "asyncpg" in fleet() and "trio_asyncio" in fleet(), fleet()
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


def test_audit_postgres_defaults_and_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PG_PASSWORD", "pw-hunter2")
    config = parse_config(
        with_postgres('dsn = "postgresql://crab:${TEST_PG_PASSWORD}@db.internal/audit"'), "c.toml"
    )
    postgres = config.audit.postgres
    assert postgres is not None
    assert postgres.dsn == "postgresql://crab:pw-hunter2@db.internal/audit"
    assert (postgres.instance, postgres.table, postgres.batch_max, postgres.retention_days) == (
        socket.gethostname(),
        "crabtrio_audit",
        5000,
        None,
    )
    assert config.warnings == ()
    custom = parse_config(
        with_postgres(
            f'dsn = "{SECRET_DSN.replace("postgresql", "postgres")}"\ninstance = "gw-7"\n'
            'table = "_fleet_2"\nbatch_max = 1\nretention_days = 30\nbatchmax = 5'
        ),
        "c.toml",
    )
    assert custom.audit.postgres == PostgresConfig(
        dsn=SECRET_DSN.replace("postgresql", "postgres"),
        instance="gw-7",
        table="_fleet_2",
        batch_max=1,
        retention_days=30.0,
    )
    assert custom.warnings == ("c.toml: audit.postgres.batchmax: unknown setting, ignored",)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('instance = "gw-1"', "dsn"),
        (f'dsn = "{SECRET_DSN.replace("postgresql://", "mysql://")}"', "dsn"),
        (f'dsn = "{SECRET_DSN.replace("postgresql://", "")}"', "dsn"),
        (f'dsn = " {SECRET_DSN}"', "dsn"),
        ('dsn = ""', "dsn"),
        ("dsn = 12345", "dsn"),
        ('dsn = "${MISSING_PG_DSN_FOR_TEST}"', "dsn"),
        (f'dsn = "{SECRET_DSN}"\ntable = "Audit"', "table"),
        (f'dsn = "{SECRET_DSN}"\ntable = "audit-log"', "table"),
        (f'dsn = "{SECRET_DSN}"\ntable = "1audit"', "table"),
        (f'dsn = "{SECRET_DSN}"\ntable = "a; drop table x"', "table"),
        (f'dsn = "{SECRET_DSN}"\ntable = "{"a" * 41}"', "table"),
        (f'dsn = "{SECRET_DSN}"\ntable = ""', "table"),
        (f'dsn = "{SECRET_DSN}"\nbatch_max = 0', "batch_max"),
        (f'dsn = "{SECRET_DSN}"\nbatch_max = 1.5', "batch_max"),
        (f'dsn = "{SECRET_DSN}"\nretention_days = 0', "retention_days"),
        (f'dsn = "{SECRET_DSN}"\ninstance = ""', "instance"),
        (f'dsn = "{SECRET_DSN}"\ninstance = "{"i" * 201}"', "instance"),
    ],
)
def test_bad_audit_postgres_names_the_field_never_the_dsn(body: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_postgres(body), "bad.toml")
    message = str(info.value)
    assert message.startswith(f"bad.toml: audit.postgres.{field}: "), message
    for secret in ("pw-hunter2", "db.internal", "12345"):
        assert secret not in message


def test_audit_postgres_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'{PROVIDERS}[audit]\npostgres = "{SECRET_DSN}"\n', "bad.toml")
    assert str(info.value) == "bad.toml: audit.postgres: expected a table, got a string"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://crab:pw-hunter2@db.internal:port/audit",
        "postgresql://crab:pw-hunter2@db.internal:99999/audit",
        "postgresql://crab:pw-hunter2@[::1/audit",
    ],
    ids=["port-not-a-number", "port-out-of-range", "broken-ipv6"],
)
def test_a_dsn_the_driver_cannot_use_is_a_config_error(dsn: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_postgres(f'dsn = "{dsn}"'), "bad.toml")
    assert str(info.value).startswith("bad.toml: audit.postgres.dsn: ")
    assert "pw-hunter2" not in str(info.value)
