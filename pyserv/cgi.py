"""The CGI deployment: ``pyserv.cgimain(SESSION_DIR, SERVLET_PREFIX)`` from a tiny script.

One process per request, so this imports only what a request needs. Sessions use the
same file store and on-disk format as the daemon, so CGI and pyservd can share them.
Errors (with tracebacks) go to stderr, which Apache writes to its error log.
"""

from __future__ import annotations

import logging
import os
import sys

from .request import RequestLimits


def cgimain(
    session_dir: str,
    servlet_prefix: str,
    *,
    secret_file: str | None = None,
    session_timeout: int = 3600,
    session_cookie: str = "PYSERVSID",
    max_body: int = RequestLimits.max_body,
    max_params: int = RequestLimits.max_params,
    max_param_bytes: int = RequestLimits.max_param_bytes,
    max_header_bytes: int = RequestLimits.max_header_bytes,
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
    from wsgiref.handlers import CGIHandler

    from .application import AppSettings

    if not logging.getLogger("pyserv").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyserv: %(levelname)s %(message)s"))
        logging.getLogger("pyserv").addHandler(handler)
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
    CGIHandler().run(_application_or_error(settings))


def _application_or_error(settings):  # noqa: ANN001, ANN202 - private
    """The app, or a WSGI app answering 500 if the servlet module cannot be imported."""
    from .application import Application, new_request_id
    from .errors import error_response

    try:
        return Application(settings)
    except Exception:
        request_id = new_request_id()
        logging.getLogger("pyserv.error").exception(
            "request_id=%s cannot load servlet module %r", request_id, settings.module
        )

        def broken(environ, start_response):  # noqa: ANN001, ANN202
            response = error_response(500, "", request_id)
            start_response(response.status_line, response.headers.items())
            return [response.body]

        return broken
