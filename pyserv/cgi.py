"""The CGI deployment: ``pyserv.cgimain(SESSION_DIR, SERVLET_PREFIX)`` from a tiny script.

One process per request, so this imports only what a request needs. Sessions use the
same file store and on-disk format as the daemon, so CGI and pyservd can share them.
Errors (with tracebacks) go to stderr, which Apache writes to its error log.
"""

from __future__ import annotations

import os
import sys

from .request import RequestLimits

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, Callable

_LIMITS = RequestLimits()  # the defaults


def cgimain(
    session_dir: str,
    servlet_prefix: str,
    *,
    secret_file: str | None = None,
    session_timeout: int = 3600,
    session_cookie: str = "PYSERVSID",
    max_body: int = _LIMITS.max_body,
    max_params: int = _LIMITS.max_params,
    max_param_bytes: int = _LIMITS.max_param_bytes,
    max_header_bytes: int = _LIMITS.max_header_bytes,
    max_session_bytes: int = 1024 * 1024,
    max_sessions: int = 0,
    new_session_timeout: int = 300,
) -> None:
    """Serve the one request in this process's environment with servlets from the module
    *servlet_prefix*, keeping sessions in *session_dir* (relative to the working directory,
    which Apache sets to the script's directory).

    The keyword arguments are pyservd's settings of the same names. ``max_sessions``
    counts the session directory once per session created (each CGI process starts
    afresh), so keep it off (0) unless sessions are few or created rarely.
    """
    os.environ.pop("HTTP_PROXY", None)  # httpoxy: before anything reads the environment
    from .application import AppSettings

    settings = AppSettings(
        name=servlet_prefix,
        module=servlet_prefix,
        session_dir=os.path.abspath(session_dir),
        session_timeout=session_timeout,
        session_cookie=session_cookie,
        secret_file=secret_file,
        max_session_bytes=max_session_bytes,
        max_sessions=max_sessions,
        new_session_timeout=new_session_timeout,
        limits=RequestLimits(
            max_body=max_body,
            max_params=max_params,
            max_param_bytes=max_param_bytes,
            max_header_bytes=max_header_bytes,
        ),
    )
    _CGIGateway(_cgi_environ()).run(_application_or_error(settings))


def _application_or_error(settings):  # noqa: ANN001, ANN202 - private
    """The app, or a WSGI app answering 500 if the servlet module cannot be imported."""
    from .application import Application, file_store, new_request_id
    from .errors import LazyLogger, error_response

    try:
        # No spare files: swapping one in needs ctypes, which costs more than one write saves.
        return Application(settings, store=file_store(settings, spares=False))
    except Exception:
        request_id = new_request_id()
        LazyLogger("pyserv.error").exception(
            "request_id=%s cannot load servlet module %r", request_id, settings.module
        )

        def broken(environ, start_response):  # noqa: ANN001, ANN202
            response = error_response(500, "", request_id)
            start_response(response.status_line, response.headers.items())
            return [response.body]

        return broken


# Request variables that carry the request's bytes; os.environ has decoded them, PEP 3333
# wants them as latin-1 text (so does wsgiref's read_environ, which this follows).
_REQUEST_VARIABLES = frozenset(
    ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "AUTH_TYPE", "CONTENT_TYPE")
    + ("CONTENT_LENGTH", "HTTPS", "REMOTE_USER", "REMOTE_IDENT")
)
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te")
    + ("trailers", "transfer-encoding", "upgrade")
)
_ERROR_BODY = b"A server error occurred.  Please contact the administrator."


def _cgi_environ() -> dict[str, Any]:
    """The WSGI environ of this CGI request (RFC 3875 variables, PEP 3333 keys)."""
    encoding, errors = sys.getfilesystemencoding(), "surrogateescape"
    environ: dict[str, Any] = {}
    for key, value in os.environ.items():
        name = key
        while name.startswith("REDIRECT_"):
            name = name[len("REDIRECT_") :]
        if name in _REQUEST_VARIABLES or name.startswith(("HTTP_", "SSL_")):
            value = value.encode(encoding, errors).decode("latin-1")
        environ[key] = value
    environ.update(
        {
            "wsgi.input": sys.stdin.buffer,
            "wsgi.errors": sys.stderr,
            "wsgi.version": (1, 0),
            "wsgi.run_once": True,
            "wsgi.url_scheme": "https" if environ.get("HTTPS") in ("yes", "on", "1") else "http",
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
        }
    )
    return environ


class _CGIGateway:
    """Runs one WSGI request as CGI: status line, headers and body to stdout (binary),
    errors with their traceback to stderr. What wsgiref's CGIHandler does, without its
    import: a CGI process pays for every module it loads, on every request."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self._head = environ.get("REQUEST_METHOD") == "HEAD"
        self._stdout = sys.stdout.buffer

    def run(self, app: Callable[..., Iterable[bytes]]) -> None:
        try:
            result = app(self.environ, self.start_response)
            try:
                if isinstance(result, list) and len(result) == 1:
                    self._set_default("Content-Length", str(len(result[0])))
                for data in result:
                    self.write(data)
                if not self.headers_sent:
                    self._set_default("Content-Length", "0")
                    self.write(b"")
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return  # the client went away: there is no one to answer
        except BaseException:  # as wsgiref: an error page whenever the headers are unsent
            self._fail()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            if self.headers_sent:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP:
                raise AssertionError(f"Hop-by-hop header, '{name}: {value}', not allowed")
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("write() before start_response()")
            lines = [f"Status: {self.status}", *(f"{k}: {v}" for k, v in self.headers), "", ""]
            self._stdout.write("\r\n".join(lines).encode("latin-1"))
            self.headers_sent = True
        if data and not self._head:
            self._stdout.write(data)
        self._stdout.flush()

    def _set_default(self, name: str, value: str) -> None:
        if not any(key.lower() == name.lower() for key, _ in self.headers):
            self.headers.append((name, value))

    def _fail(self) -> None:
        import traceback

        traceback.print_exc(file=sys.stderr)  # Apache's error log
        sys.stderr.flush()
        if not self.headers_sent:
            self.status = "500 Internal Server Error"
            self.headers = [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(_ERROR_BODY))),
            ]
            self.write(_ERROR_BODY)
