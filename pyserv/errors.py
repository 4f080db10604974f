"""HTTPError and the error pages.

A servlet raises ``HTTPError(404)`` (or any status) to answer with an error; the
application reads the status off the exception. Error pages never show a traceback: a
500 page shows only the request id, which the error log carries with the traceback.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .response import Response


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HTTPError(Exception):
    """Answer the request with *status*, a short *message* and optional extra *headers*.

    Session changes made by the servlet are discarded, as for any exception.
    """

    def __init__(
        self, status: int, message: str = "", *, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"HTTPError status must be 4xx or 5xx, not {status}")
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = list(headers)

    def __str__(self) -> str:
        return f"{self.status} {reason_phrase(self.status)}: {self.message}".rstrip(": ")

    def to_response(self, request_id: str = "") -> Response:
        return error_response(self.status, self.message, request_id, self.headers)


class BadRequestKeyError(HTTPError, KeyError):
    """A missing request parameter; a 400 if the servlet does not catch it."""

    def __init__(self, key: str) -> None:
        super().__init__(400, f"missing parameter {key!r}")
        self.key = key

    __str__ = HTTPError.__str__


def error_response(
    status: int,
    message: str = "",
    request_id: str = "",
    headers: Iterable[tuple[str, str]] = (),
) -> Response:
    """A small HTML error page; *message* is escaped, the request id is shown if given."""
    from .response import Response

    phrase = reason_phrase(status)
    parts = [
        f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head>\n",
        f"<body><h1>{phrase}</h1>\n",
    ]
    if message:
        parts.append(f"<p>{html.escape(message)}</p>\n")
    if request_id:
        parts.append(f"<p>Request id: <code>{html.escape(request_id)}</code></p>\n")
    parts.append("</body></html>\n")
    response = Response()
    response.status = status
    response.content_type = "text/html; charset=utf-8"
    for name, value in headers:
        response.headers.add(name, value)
    response.write("".join(parts))
    return response
