"""Load and validate crabtrio's TOML configuration into frozen dataclasses."""

from __future__ import annotations

import functools
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

ENV_CONFIG = "CRABTRIO_CONFIG"
LOCAL_CONFIG = "crabtrio.toml"
EMBEDDED_SOURCE = "<embedded default config>"
PROVIDER_KINDS = ("openai", "anthropic", "mock")
# Where each kind is when `base_url` is left out.
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
}
SYNC_MODES = ("interval", "always", "never")
PROVIDER_SETTINGS = (
    *("kind", "base_url", "api_key", "models", "weight", "max_retries", "timeout"),
    *("connect_timeout", "max_connections", "retry_on_timeout", "retry_after_max"),
    *("max_response_mb", "max_event_kb", "proxy", "http2", "verify", "ca_file"),
    *("client_cert", "client_key"),
    *("chunks", "delay_ms"),  # the built-in mock's pacing
)
DEFAULT_AUDIT_PATH = "crabtrio-audit.jsonl"

EMBEDDED_DEFAULT = """
# Serves out of the box: a built-in mock provider, no virtual keys, audit next to the cwd.
[providers.mock]
kind = "mock"
models = ["mock-chat", "mock-embed"]

[aliases]
mock = "mock-chat"

[pricing.mock-chat]
prompt_cost_per_million = 0.15
completion_cost_per_million = 0.60

[audit]
path = "crabtrio-audit.jsonl"
"""


class ConfigError(Exception):
    """A configuration problem; its message is one line naming the file and the field."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: Literal["openai", "anthropic", "mock"]
    base_url: str
    api_key: str | None
    models: tuple[str, ...]
    weight: float = 1.0
    max_retries: int = 2
    # Until the response head, then each gap between reads (the official OpenAI client: 600 s).
    timeout: float = 600.0
    connect_timeout: float = 10.0
    # Per provider and worker; more requests wait for one (within `timeout`). Streams hold
    # theirs for their whole length, so it is the concurrent streams a worker relays: the
    # OpenAI SDK's own default (httpx pool) is 1000.
    max_connections: int = 1000
    # A timeout after the body was sent may leave the upstream generating (and billing) the
    # answer: by default it is not retried on the same provider, only the next one is tried.
    retry_on_timeout: bool = False
    retry_after_max: float = 30.0  # Retry-After on 429/503 is honoured up to this
    max_response_mb: float = 32.0  # a non-streaming body, after decompression
    max_event_kb: float = 1024.0  # one SSE event
    proxy: str | None = None  # else HTTP(S)_PROXY / ALL_PROXY / NO_PROXY from the environment
    http2: bool = False
    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # Built-in mock only: content chunks per stream and the pause between them.
    chunks: int = 8
    delay_ms: float = 0.0


# What a provider setting is when its table leaves it out: the dataclass's own defaults.
_PROVIDER_DEFAULTS = {f.name: f.default for f in fields(ProviderConfig) if f.default is not MISSING}


BUDGET_PERIODS = ("day", "month", "total")


@dataclass(frozen=True, slots=True)
class KeyConfig:
    name: str
    key: str
    models: tuple[str, ...] = ("*",)
    # Requests and tokens (prompt + completion) per sliding minute, for the whole gateway.
    rpm: int | None = None
    tpm: int | None = None
    # Spend (sum of the records' cost) allowed per calendar period in UTC.
    max_budget_usd: float | None = None
    budget_period: Literal["day", "month", "total"] = "month"

    @property
    def limited(self) -> bool:
        """Whether requests with this key are counted against rpm or tpm."""
        return self.rpm is not None or self.tpm is not None

    @property
    def metered(self) -> bool:
        """Whether this key has a rate limit or a budget."""
        return self.limited or self.max_budget_usd is not None

    def allows(self, model: str, requested: str) -> bool:
        return "*" in self.models or model in self.models or requested in self.models


@dataclass(frozen=True, slots=True)
class Pricing:
    prompt_cost_per_million: float = 0.0
    completion_cost_per_million: float = 0.0
    # Anthropic's prompt caching: input tokens read from, and written to, the cache.
    cache_read_cost_per_million: float = 0.0
    cache_creation_cost_per_million: float = 0.0


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """`[audit.postgres]`: ship every record to PostgreSQL and answer fleet-wide queries."""

    dsn: str  # may hold a password: never logged, never in an error
    instance: str  # this replica's name on every shipped row
    table: str = "crabtrio_audit"
    batch_max: int = 5000
    retention_days: float | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = DEFAULT_AUDIT_PATH
    enabled: bool = True
    sync: Literal["interval", "always", "never"] = "interval"
    sync_interval_ms: int = 100
    # Bound on records accepted but not yet written; past it new requests get a 503.
    queue_max: int = 100_000
    # Rotation is on by default (sealed segments load from their sidecar indexes); 0 = off.
    max_file_mb: float | None = 256.0
    retention_days: float | None = None
    max_total_mb: float | None = None
    postgres: PostgresConfig | None = None
    # The hash chain's HMAC key (without one: SHA-256), and keys it had before (verify).
    chain_key: str | None = None
    chain_old_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    keys: tuple[KeyConfig, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    pricing: Mapping[str, Pricing] = field(default_factory=dict)
    audit: AuditConfig = field(default_factory=AuditConfig)
    admin_token: str | None = None
    max_body_mb: float = 16.0
    # Browser origins allowed to call the proxied routes and /v1/models ("*": any).
    cors_origins: tuple[str, ...] = ()
    source: str = EMBEDDED_SOURCE
    warnings: tuple[str, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def models(self) -> list[str]:
        """Canonical model names, in the order the providers list them."""
        seen: dict[str, None] = {}
        for provider in self.providers.values():
            seen.update(dict.fromkeys(provider.models))
        return list(seen)


def tls_settings(provider: ProviderConfig) -> tuple[str | None, bool, str | None, str | None, bool]:
    """The arguments of `tls_context` for this provider."""
    p = provider
    return p.ca_file, p.verify, p.client_cert, p.client_key, p.http2


@functools.cache
def tls_context(
    ca_file: str | None,
    verify: bool,
    client_cert: str | None,
    client_key: str | None,
    http2: bool,
) -> ssl.SSLContext:
    """The TLS context for these settings, built once per process: loading the CA store takes
    milliseconds, and the config check and every provider with the same settings share it.
    Raises ssl.SSLError or OSError for files that cannot be loaded."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    if http2:
        context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Find the config: `path`, $CRABTRIO_CONFIG, ./crabtrio.toml, else the embedded default."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None and Path(LOCAL_CONFIG).is_file():
        path = LOCAL_CONFIG
    if path is None:
        return parse_config(EMBEDDED_DEFAULT, EMBEDDED_SOURCE)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc}") from None
    return parse_config(text, source)


def parse_config(text: str, source: str = EMBEDDED_SOURCE) -> Config:
    """Parse TOML text into a validated Config; raise ConfigError naming `source` and a field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _Parser(source).config(raw)


# scheme://host[:port], as browsers send it in the Origin header (no path, no trailing slash).
_ORIGIN_PATTERN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Parser:
    """Walks the raw TOML tables; every error names the dotted field it concerns."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []
        # Settings that count from the audit trail: refused when it is disabled.
        self.needs_audit: set[str] = set()

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {problem}")

    def expand(self, where: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is None or (found == "" and default is not None):
                if default is None:
                    raise self.fail(where, f"environment variable {name} is not set")
                return default
            return found

        return _ENV_PATTERN.sub(substitute, value) if "${" in value else value

    def table(self, where: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {_kind(value)}")
        return value

    def string(self, where: str, value: Any, *, empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {_kind(value)}")
        text = self.expand(where, value)
        if not text and not empty:
            raise self.fail(where, "must not be empty")
        return text

    def strings(self, where: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list of strings, got {_kind(value)}")
        return tuple(self.string(f"{where}[{i}]", item) for i, item in enumerate(value))

    def number(self, where: str, value: Any, *, minimum: float, strict: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"expected a number, got {_kind(value)}")
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            raise self.fail(where, f"must be {bound} {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, where: str, value: Any, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise self.fail(where, f"must be at least {minimum}, got {value}")
        return value

    def boolean(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_kind(value)}")
        return value

    def known(self, where: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
        for name in table:
            if name not in allowed:
                prefix = f"{where}." if where else ""
                self.warnings.append(f"{self.source}: {prefix}{name}: unknown setting, ignored")

    def config(self, raw: dict[str, Any]) -> Config:
        self.known(
            "",
            raw,
            (
                *("admin_token", "providers", "keys", "aliases", "pricing", "audit"),
                *("max_body_mb", "cors_origins"),
            ),
        )
        providers = self.providers(raw.get("providers"))
        served = {model for provider in providers.values() for model in provider.models}
        aliases = self.aliases(raw.get("aliases", {}), served)
        keys = self.keys(raw.get("keys", []), served | set(aliases))
        pricing = {
            model: self.pricing(f"pricing.{model}", entry)
            for model, entry in self.table("pricing", raw.get("pricing", {})).items()
        }
        admin_token = raw.get("admin_token")
        if admin_token is not None:
            admin_token = self.string("admin_token", admin_token, empty=True) or None
        max_body_mb = self.number(
            "max_body_mb", raw.get("max_body_mb", 16.0), minimum=0, strict=True
        )
        cors_origins = self.origins("cors_origins", raw.get("cors_origins", []))
        audit = self.audit(raw.get("audit", {}))
        if self.needs_audit and not audit.enabled:
            raise self.fail(
                min(self.needs_audit), "counts from the audit trail: needs [audit] enabled = true"
            )
        return Config(
            providers=providers,
            keys=keys,
            aliases=aliases,
            pricing=pricing,
            audit=audit,
            admin_token=admin_token,
            max_body_mb=max_body_mb,
            cors_origins=cors_origins,
            source=self.source,
            warnings=tuple(self.warnings),
        )

    def origins(self, where: str, value: Any) -> tuple[str, ...]:
        if value == []:
            return ()
        origins = self.strings(where, value)
        for i, origin in enumerate(origins):
            if origin != "*" and not _ORIGIN_PATTERN.fullmatch(origin):
                raise self.fail(
                    f"{where}[{i}]",
                    f"expected an origin like https://app.example.com or *, got {origin!r}",
                )
        return origins

    def providers(self, raw: Any) -> dict[str, ProviderConfig]:
        if raw is None:
            raise self.fail("providers", "at least one [providers.NAME] table is required")
        providers: dict[str, ProviderConfig] = {}
        for name, entry in self.table("providers", raw).items():
            where = f"providers.{name}"
            entry = self.table(where, entry)
            self.known(
                where,
                entry,
                PROVIDER_SETTINGS,
            )
            kind = self.string(f"{where}.kind", entry.get("kind", "openai"))
            if kind not in PROVIDER_KINDS:
                raise self.fail(
                    f"{where}.kind",
                    f"unknown provider kind {kind!r} (use one of: {', '.join(PROVIDER_KINDS)})",
                )
            if "models" not in entry:
                raise self.fail(f"{where}.models", "missing: list the models this provider serves")
            default_url = DEFAULT_BASE_URLS.get(kind, DEFAULT_BASE_URLS["openai"])
            base_url = self.string(f"{where}.base_url", entry.get("base_url", default_url))
            if kind != "mock" and not base_url.startswith(("http://", "https://")):
                raise self.fail(f"{where}.base_url", "must start with http:// or https://")
            api_key = entry.get("api_key")

            setting = functools.partial(self.setting, where, entry)
            providers[name] = ProviderConfig(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                base_url=base_url.rstrip("/"),
                api_key=None if api_key is None else self.string(f"{where}.api_key", api_key),
                models=self.strings(f"{where}.models", entry["models"]),
                weight=setting("weight", self.number, minimum=0, strict=True),
                max_retries=setting("max_retries", self.integer, minimum=0),
                timeout=setting("timeout", self.number, minimum=0, strict=True),
                connect_timeout=setting("connect_timeout", self.number, minimum=0, strict=True),
                max_connections=setting("max_connections", self.integer, minimum=1),
                retry_on_timeout=setting("retry_on_timeout", self.boolean),
                retry_after_max=setting("retry_after_max", self.number, minimum=0),
                max_response_mb=setting("max_response_mb", self.number, minimum=0, strict=True),
                max_event_kb=setting("max_event_kb", self.number, minimum=1),
                proxy=self.proxy(f"{where}.proxy", entry.get("proxy")),
                http2=setting("http2", self.boolean),
                verify=setting("verify", self.boolean),
                ca_file=self.file(f"{where}.ca_file", entry.get("ca_file")),
                client_cert=self.file(f"{where}.client_cert", entry.get("client_cert")),
                client_key=self.file(f"{where}.client_key", entry.get("client_key")),
                chunks=setting("chunks", self.integer, minimum=1),
                delay_ms=setting("delay_ms", self.number, minimum=0),
            )
            if providers[name].client_key and not providers[name].client_cert:
                raise self.fail(f"{where}.client_key", "needs client_cert beside it")
            self.tls_material(where, providers[name])
        if not providers:
            raise self.fail("providers", "at least one [providers.NAME] table is required")
        return providers

    def setting(
        self, where: str, entry: dict[str, Any], field: str, read: Callable[..., Any], **limits: Any
    ) -> Any:
        """A provider's setting, checked by `read` (self.number...), or its default."""
        return read(f"{where}.{field}", entry.get(field, _PROVIDER_DEFAULTS[field]), **limits)

    def tls_material(self, where: str, provider: ProviderConfig) -> None:
        """Load the CA file and client certificate now, so a bad one stops startup here."""
        if provider.ca_file is None and provider.client_cert is None:
            return
        try:
            tls_context(*tls_settings(provider))
        except (ssl.SSLError, OSError) as exc:
            field = "client_cert"
            try:  # which file: the CA file alone loads, or not
                tls_context(provider.ca_file, provider.verify, None, None, provider.http2)
            except (ssl.SSLError, OSError):
                field = "ca_file"
            reason = exc.strerror or getattr(exc, "reason", None) or type(exc).__name__
            raise self.fail(f"{where}.{field}", f"cannot be loaded: {reason}") from None

    def file(self, where: str, value: Any) -> str | None:
        if value is None:
            return None
        path = self.string(where, value)
        if not os.path.isfile(path):
            raise self.fail(where, f"no such file: {path}")
        return path

    def proxy(self, where: str, value: Any) -> str | None:
        if value is None:
            return None
        url = self.string(where, value)
        if not url.startswith(("http://", "https://", "socks5://")):
            raise self.fail(where, "must start with http://, https:// or socks5://")
        return url

    def aliases(self, raw: Any, served: set[str]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for alias, target in self.table("aliases", raw).items():
            where = f"aliases.{alias}"
            target = self.string(where, target)
            if target not in served:
                raise self.fail(where, f"points to model {target!r}, which no provider serves")
            if alias in served:
                raise self.fail(where, "is also a model name served by a provider; rename it")
            aliases[alias] = target
        return aliases

    def keys(self, raw: Any, known_models: set[str]) -> tuple[KeyConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail("keys", f"expected [[keys]] tables, got {_kind(raw)}")
        keys: list[KeyConfig] = []
        names: set[str] = set()
        secrets: set[str] = set()
        for i, entry in enumerate(raw):
            where = f"keys[{i}]"
            entry = self.table(where, entry)
            self.known(where, entry, ("name", "key", "models", *_KEY_LIMITS))
            for required in ("name", "key"):
                if required not in entry:
                    raise self.fail(f"{where}.{required}", "missing")
            name = self.string(f"{where}.name", entry["name"])
            secret = self.string(f"{where}.key", entry["key"])
            if name in names:
                raise self.fail(f"{where}.name", f"duplicate key name {name!r}")
            if secret in secrets:
                raise self.fail(f"{where}.key", "the same key is configured twice")
            models = self.strings(f"{where}.models", entry.get("models", ["*"]))
            for model in models:
                if model != "*" and model not in known_models:
                    self.warnings.append(
                        f"{self.source}: {where}.models: {model!r} is not served by any provider"
                    )
            names.add(name)
            secrets.add(secret)
            keys.append(
                KeyConfig(name=name, key=secret, models=models, **self.limits(where, entry))
            )
        return tuple(keys)

    def limits(self, where: str, entry: dict[str, Any]) -> dict[str, Any]:
        """A key's rate limits and budget (each is counted from the audit trail)."""
        found: dict[str, Any] = {}
        for name in ("rpm", "tpm"):
            if name in entry:
                found[name] = self.integer(f"{where}.{name}", entry[name], minimum=1)
        if "max_budget_usd" in entry:
            found["max_budget_usd"] = self.number(
                f"{where}.max_budget_usd", entry["max_budget_usd"], minimum=0
            )
        if "budget_period" in entry:
            period = self.string(f"{where}.budget_period", entry["budget_period"])
            if period not in BUDGET_PERIODS:
                raise self.fail(
                    f"{where}.budget_period", f"unknown period {period!r} (use day, month or total)"
                )
            found["budget_period"] = period
        self.needs_audit |= {f"{where}.{name}" for name in found if name != "budget_period"}
        return found

    def pricing(self, where: str, raw: Any) -> Pricing:
        entry = self.table(where, raw)
        names = [field.name for field in fields(Pricing)]
        self.known(where, entry, tuple(names))
        return Pricing(
            **{
                name: self.number(f"{where}.{name}", entry.get(name, 0), minimum=0)
                for name in names
            }
        )

    def audit(self, raw: Any) -> AuditConfig:
        entry = self.table("audit", raw)
        fields = ("path", "enabled", "sync", "sync_interval_ms", "queue_max")
        limits = ("max_file_mb", "retention_days", "max_total_mb")
        self.known("audit", entry, (*fields, *limits, "postgres", "chain_key", "chain_old_keys"))
        sync = self.string("audit.sync", entry.get("sync", "interval"))
        if sync not in SYNC_MODES:
            raise self.fail("audit.sync", f"unknown mode {sync!r} (use interval, always or never)")

        def optional(name: str, check: Callable[[str, Any], float]) -> float | None:
            return None if name not in entry else check(f"audit.{name}", entry[name])

        def positive(where: str, value: Any) -> float:
            return self.number(where, value, minimum=0, strict=True)

        return AuditConfig(
            path=self.string("audit.path", entry.get("path", DEFAULT_AUDIT_PATH)),
            enabled=self.boolean("audit.enabled", entry.get("enabled", True)),
            sync=sync,  # type: ignore[arg-type]
            sync_interval_ms=self.integer(
                "audit.sync_interval_ms", entry.get("sync_interval_ms", 100), minimum=1
            ),
            queue_max=self.integer("audit.queue_max", entry.get("queue_max", 100_000), minimum=1),
            max_file_mb=self.number("audit.max_file_mb", entry.get("max_file_mb", 256), minimum=0)
            or None,
            retention_days=optional("retention_days", positive),
            max_total_mb=optional("max_total_mb", positive),
            postgres=self.postgres(entry["postgres"]) if "postgres" in entry else None,
            chain_key=self.string("audit.chain_key", entry["chain_key"])
            if "chain_key" in entry
            else None,
            chain_old_keys=self.strings("audit.chain_old_keys", entry["chain_old_keys"])
            if "chain_old_keys" in entry
            else (),
        )

    def postgres(self, raw: Any) -> PostgresConfig:
        where = "audit.postgres"
        entry = self.table(where, raw)
        self.known(where, entry, ("dsn", "instance", "table", "batch_max", "retention_days"))
        if "dsn" not in entry:
            raise self.fail(f"{where}.dsn", "is required (postgresql://user:password@host/db)")
        dsn = self.string(f"{where}.dsn", entry["dsn"])
        if not dsn.startswith(("postgresql://", "postgres://")):  # the text itself may be secret
            raise self.fail(f"{where}.dsn", "must be a postgresql:// URL")
        try:
            parts = urlsplit(dsn)
            parts.port  # noqa: B018 - raises ValueError for a port that is no number or too big
        except ValueError:
            raise self.fail(
                f"{where}.dsn", "is not a valid URL (check the host and port)"
            ) from None
        instance = self.string(f"{where}.instance", entry.get("instance", socket.gethostname()))
        if len(instance) > 200:
            raise self.fail(f"{where}.instance", "must be at most 200 characters")
        table = self.string(f"{where}.table", entry.get("table", "crabtrio_audit"))
        if not _TABLE_NAME.fullmatch(table):
            raise self.fail(
                f"{where}.table", "must be a lower-case SQL name: a-z, 0-9 and _, up to 40"
            )
        retention = entry.get("retention_days")
        return PostgresConfig(
            dsn=dsn,
            instance=instance,
            table=table,
            batch_max=self.integer(f"{where}.batch_max", entry.get("batch_max", 5000), minimum=1),
            retention_days=None
            if retention is None
            else self.number(f"{where}.retention_days", retention, minimum=1),
        )


_KEY_LIMITS = ("rpm", "tpm", "max_budget_usd", "budget_period")
# A table name we put into SQL text (with `_p20261130` and `_checkpoints` suffixes).
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def _kind(value: Any) -> str:
    """Name a TOML value's type without echoing it (it may be a secret)."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)
