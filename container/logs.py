"""Logging for pyservd: the error log and the access log, as named stdlib loggers.

``pyserv.error``: key=value friendly lines with pid and request id in messages.
``pyserv.access``: Apache combined format plus duration, request id and a keyed hash of
the session id (never the id itself). Files are reopened on USR1 (logrotate).
"""

from __future__ import annotations

import logging
import os
import pwd
import sys
import time
from collections.abc import Iterable
from typing import Any, Callable

from .config import ServerConfig

ERROR_FORMAT = "%(asctime)s pid=%(process)d level=%(levelname)s %(message)s"


class _ReopenableFileHandler(logging.FileHandler):
    """A log file that USR1 reopens. Opened by the root master, it is given to *owner*
    (uid, gid), whom the workers run as, so that they can reopen it too (gunicorn does
    the same); a reopen that fails keeps the old file rather than killing the process."""

    def __init__(self, target: str, owner: tuple[int, int] | None) -> None:
        self._owner = owner
        super().__init__(target, encoding="utf-8")

    def _open(self):  # noqa: ANN202 - logging's signature
        stream = super()._open()
        if self._owner is not None:
            os.fchown(stream.fileno(), *self._owner)
        return stream

    def reopen(self) -> None:
        self.acquire()
        try:
            try:
                stream = self._open()
            except OSError as exc:
                failure = f"cannot reopen {self.baseFilename}: {exc.strerror}; still writing"
                logging.getLogger("pyserv.error").warning("%s to the old file", failure)
                return
            if self.stream is not None:
                self.stream.close()
            self.stream = stream
        finally:
            self.release()


def _handler(target: str, owner: tuple[int, int] | None) -> logging.Handler:
    if target == "-":
        return logging.StreamHandler(sys.stderr)
    return _ReopenableFileHandler(target, owner)


def _log_owner(server: ServerConfig) -> tuple[int, int] | None:
    """Whom log files are given to: the workers' user when the master runs as root."""
    if os.geteuid() != 0 or server.user is None:
        return None
    try:
        entry = pwd.getpwnam(server.user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def setup(server: ServerConfig) -> None:
    """Configure both loggers from *server*; replaces earlier handlers (on reload)."""
    error = logging.getLogger("pyserv")
    access = logging.getLogger("pyserv.access")
    for logger in (error, access):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
    owner = _log_owner(server)
    handler = _handler(server.error_log, owner)
    handler.setFormatter(logging.Formatter(ERROR_FORMAT))
    error.addHandler(handler)
    error.setLevel(server.log_level.upper())
    access.propagate = False
    if server.access_log is None:
        access.disabled = True
    else:
        access.disabled = False
        access_handler = _handler(server.access_log, owner)
        access_handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(access_handler)
        access.setLevel(logging.INFO)


def reopen() -> None:
    """Reopen log files (after logrotate moved them); USR1."""
    for name in ("pyserv", "pyserv.access"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, _ReopenableFileHandler):
                handler.reopen()


_access = logging.getLogger("pyserv.access")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def access_logged(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap a WSGI app so that each request adds one access log line."""

    def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if _access.disabled:
            return app(environ, start_response)
        started = time.time()
        seen: dict[str, str] = {}

        def recording_start_response(status: str, headers: list, *args: Any) -> Any:
            seen["status"] = status.split(" ", 1)[0]
            seen["length"] = next((v for k, v in headers if k.lower() == "content-length"), "-")
            return start_response(status, headers, *args)

        result = app(environ, recording_start_response)
        request_line = "{} {}{} {}".format(
            environ.get("REQUEST_METHOD", "-"),
            environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
            "?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "",
            environ.get("SERVER_PROTOCOL", "-"),
        )
        _access.info(
            "%s - - [%s] %s %s %s %s %s duration_ms=%d request_id=%s session=%s",
            environ.get("REMOTE_ADDR", "-"),
            time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(started)),
            _quote(request_line),
            seen.get("status", "-"),
            seen.get("length", "-"),
            _quote(environ.get("HTTP_REFERER", "-")),
            _quote(environ.get("HTTP_USER_AGENT", "-")),
            (time.time() - started) * 1000,
            environ.get("pyserv.request_id", "-"),
            environ.get("pyserv.session", "-"),
        )
        return result

    return logged
