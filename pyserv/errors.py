"""HTTPError, the error pages and the error log.

A servlet raises ``HTTPError(404)`` (or any status) to answer with an error; the
application reads the status off the exception. Error pages never show a traceback: a
500 page shows only the request id, which the error log carries with the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    import logging
    from typing import Any

    from .response import Response

LOG_FORMAT = "pyserv: %(levelname)s %(message)s"  # when nothing else is configured


class LazyLogger:
    """``logging.getLogger(name)``, imported on first use: pyserv logs only when something
    goes wrong, and a CGI request that logs nothing does not load logging (~5 ms).

    If nothing handles pyserv's records by then (no handler on the ``pyserv`` logger nor
    on the root logger: a CGI script), they go to stderr as ``pyserv: LEVEL message``,
    which Apache writes to its error log. Configured logging (pyservd's) is left alone.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.logger, attribute)

    @property
    def logger(self) -> logging.Logger:
        import logging

        top = logging.getLogger("pyserv")
        if not top.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            top.addHandler(handler)
        return logging.getLogger(self.name)

    def __repr__(self) -> str:
        return f"<LazyLogger {self.name}>"


# The usual statuses, as http.HTTPStatus words them in every Python version: a CGI
# process answering with one of them does not pay for importing http (its enums).
_COMMON_PHRASES = {
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def reason_phrase(status: int) -> str:
    phrase = _COMMON_PHRASES.get(status)
    if phrase is not None:
        return phrase
    from http import HTTPStatus

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
    from html import escape  # only error pages need it: a CGI request without one never does

    from .response import Response

    phrase = reason_phrase(status)
    parts = [
        f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head>\n",
        f"<body><h1>{phrase}</h1>\n",
    ]
    if message:
        parts.append(f"<p>{escape(message)}</p>\n")
    if request_id:
        parts.append(f"<p>Request id: <code>{escape(request_id)}</code></p>\n")
    parts.append("</body></html>\n")
    response = Response()
    response.status = status
    response.content_type = "text/html; charset=utf-8"
    for name, value in headers:
        response.headers.add(name, value)
    response.write("".join(parts))
    return response
