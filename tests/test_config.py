"""Config loading: lookup order, ${VAR} expansion, and one clear line per mistake."""

from __future__ import annotations

import pytest

from crabtrio.config import EMBEDDED_SOURCE, ConfigError, load_config, parse_config

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
    assert defaults == (10.0, 100, False, 30.0, 32.0, 1024.0, None, False, True)
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
            "[providers.x]\nkind = 'anthropic'\nmodels = ['a']",
            "bad.toml: providers.x.kind: unknown provider kind 'anthropic'",
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
