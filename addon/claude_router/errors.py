"""Answers in the Anthropic error shape, which every Claude client parses."""

import json
import secrets

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
KNOWN_ERROR_TYPES = frozenset({*_TYPES.values(), "api_error"})


def error_type_for(status: int) -> str:
    return _TYPES.get(status, "api_error")


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    return json.dumps(
        {
            "type": "error",
            "error": {"type": error_type or error_type_for(status), "message": message},
            "request_id": f"req_router_{secrets.token_hex(8)}",
        }
    ).encode()


def sse_error_event(message: str, error_type: str = "api_error") -> bytes:
    """An ``event: error`` that ends a stream cleanly, so clients see a failure, not a cut."""
    data = json.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return f"event: error\ndata: {data}\n\n".encode()
