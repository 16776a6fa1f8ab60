"""Bearer parsing, virtual-key lookup and the constant-time admin-token check."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from .config import KeyConfig
from .errors import Forbidden, Unauthorized


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyRing:
    """The configured virtual keys; with none configured, authentication is off."""

    def __init__(self, keys: Sequence[KeyConfig]) -> None:
        self._by_secret = {key.key: key for key in keys}

    def replace(self, keys: Sequence[KeyConfig]) -> None:
        """Serve these keys from now on (a config reload)."""
        self._by_secret = {key.key: key for key in keys}

    @property
    def configured(self) -> tuple[KeyConfig, ...]:
        return tuple(self._by_secret.values())

    @property
    def enabled(self) -> bool:
        return bool(self._by_secret)

    def authenticate(
        self, header: str | None, api_key: str | None = None, *, x_api_key: bool = False
    ) -> KeyConfig | None:
        """The key presented in the Authorization `header`, or as `api_key` (the x-api-key
        header, on routes of Anthropic's API: `x_api_key`); None when auth is off. Raises
        Unauthorized."""
        if not self._by_secret:
            return None
        token = api_key.strip() if api_key else bearer_token(header)
        if not token:
            how = "'Authorization: Bearer <key>'" + (" or 'x-api-key: <key>'" if x_api_key else "")
            raise Unauthorized(f"missing API key: send it as {how}", code="missing_api_key")
        key = self._by_secret.get(token)
        if key is None:
            raise Unauthorized("invalid API key")
        return key


def is_loopback(client: tuple[str, int] | list[object] | None) -> bool:
    """Whether an ASGI `client` address is this host (a unix socket has none: also local)."""
    if not client:
        return True
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


def check_admin(
    admin_token: str | None, header: str | None, client: tuple[str, int] | None
) -> None:
    """Allow the admin routes, or raise. Without a token configured, only loopback clients."""
    if admin_token is None:
        if not is_loopback(client):
            raise Forbidden(
                "admin routes answer only local clients until admin_token is configured",
                code="admin_local_only",
            )
        return
    token = bearer_token(header)
    if token is None or not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("admin routes need 'Authorization: Bearer <admin_token>'")
