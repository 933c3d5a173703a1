"""JSON bodies for the errors Hypercorn answers itself, before the app sees a request.

When h11 cannot parse a request it raises RemoteProtocolError with a status hint,
and Hypercorn (`H11Protocol._send_error_response`) answers that status with an
empty body and closes the connection: 431 when the request line and headers
exceed `h11_max_incomplete_size` (16 KiB by default, so a ~100 KB URL lands
here), 400 for a malformed request line or header, 501 for an unsupported
Transfer-Encoding. The app never runs, so its JSON error handlers cannot help.

`install()` replaces that one method with one that sends the same status and
headers plus the API's error body, so every answer is JSON. It patches a private
Hypercorn method, so `install()` checks the method is there (and fails loudly at
start-up if a Hypercorn upgrade removed it), and tests/integration/test_bad_input.py
sends an oversized URL to a real agent to prove the body arrives.
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Any

import h11
from hypercorn.protocol.h11 import H11Protocol

_CODES = {
    400: ("bad_request", "the request line or a header is malformed"),
    431: (
        "request_header_fields_too_large",
        "the request line and headers together exceed {limit} bytes (a URL that long is refused too)",
    ),
    501: ("not_implemented", "the request uses a Transfer-Encoding this server does not implement"),
}


async def _send_json_error_response(self: Any, status_code: int) -> None:
    code, message = _CODES.get(status_code, ("http_error", "the request could not be parsed"))
    body = json.dumps(
        {"error": {"code": code, "message": message.format(limit=self.config.h11_max_incomplete_size)}},
        separators=(",", ":"),
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await self._send_h11_event(
        h11.Response(status_code=status_code, headers=list(chain(headers, self.config.response_headers("h11"))))
    )
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def install() -> None:
    """Make Hypercorn's own HTTP/1.1 error answers JSON (idempotent)."""
    if not callable(getattr(H11Protocol, "_send_error_response", None)):
        raise RuntimeError("hypercorn.protocol.h11.H11Protocol._send_error_response is gone: update agent/http_protocol_errors.py")
    setattr(H11Protocol, "_send_error_response", _send_json_error_response)
