"""The one error tree of the gateway: each error knows its HTTP status, OpenAI type and code.

Errors are raised anywhere in the pipeline and rendered in one place (`render_error`), as the
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """A request that the gateway answers itself with an error."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> bytes:
        return render_error(self.message, self.type, self.code, self.param)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UpstreamError(GatewayError):
    """The backend failed (5xx, reset, malformed answer) and no retry could help."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class NoHealthyBackend(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def render_error(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """The OpenAI-shaped error body."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def internal_error_body(request_id: str) -> bytes:
    """The body of an unexpected failure: no detail leaks, the request id lets operators find the log."""
    return render_error(
        f"The gateway failed unexpectedly; the error was logged with request id {request_id}.",
        "server_error",
        "internal_error",
    )
