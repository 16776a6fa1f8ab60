"""Client-visible failures, each rendered in OpenAI's error shape."""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """A failure the client sees as `{"error": {"message", "type", "code"}}` with `status`."""

    status: int = 500
    kind: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code
        self.param = param
        if status is not None:
            self.status = status
        # Response headers that go with the error (retry-after, x-ratelimit-*).
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": str(self), "type": self.kind, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(GatewayError):
    status, kind, default_code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, kind, default_code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, kind, default_code = 403, "permission_error", "model_not_allowed"


class NotFound(GatewayError):
    status, kind, default_code = 404, "invalid_request_error", "not_found"


class RequestTimeout(GatewayError):
    status, kind, default_code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(GatewayError):
    status, kind, default_code = 413, "invalid_request_error", "request_too_large"


class RateLimited(GatewayError):
    """The key is at its rpm or tpm (see `limits`)."""

    status, kind, default_code = 429, "rate_limit_exceeded", "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    """The key has spent its budget for the period (see `budgets`)."""

    status, kind, default_code = 429, "insufficient_quota", "budget_exceeded"


class UpstreamError(GatewayError):
    """An upstream attempt failed: unreachable, broken, a limit broken, or an error status.

    The one type above the upstream client for everything that went wrong upstream (transport
    failures become one in `upstream.client`, bad answers in `providers`). `retryable`: worth
    another attempt on the same provider; `retry_after`: the seconds the upstream asked us
    to wait (capped by `providers` when it waits).
    """

    status, kind, default_code = 502, "upstream_error", "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retryable = retryable
        self.retry_after = retry_after


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer, or stalled, within its timeout (504)."""

    status, kind, default_code = 504, "timeout_error", "upstream_timeout"


class UpstreamRejected(UpstreamError):
    """An upstream 4xx (not 429) relayed as-is: its status and its scrubbed JSON error body."""

    def __init__(self, status: int, body: bytes, provider: str) -> None:
        super().__init__(f"upstream {provider} returned {status}", status=status, retryable=False)
        self.relayed = body

    def body_bytes(self) -> bytes:
        return self.relayed


class Unavailable(GatewayError):
    status, kind, default_code = 503, "server_error", "unavailable"


def error_body(status: int, message: str, kind: str, code: str | None) -> bytes:
    """Encode an OpenAI-shaped error body for failures that are not GatewayErrors."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})
