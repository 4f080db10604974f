"""The WSGI application every deployment wraps: request → servlet → session → response.

CGI, the FastCGI daemon, mod_fcgid and the development listener all call the same
:class:`Application`, so no deployment mode has its own dispatch or session logic.

Per request: check the limits the environ alone can show (headers, query string,
Content-Length), decode the path, find the servlet, run it inside a :class:`SessionScope`,
then save the session (only if modified) *before* anything is sent, so a response the
client sees always reflects stored state. Any exception discards the session's changes
and becomes an error page; a 500 page shows only the request id, the traceback goes to
the ``pyserv.error`` log with that id.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterable
from types import ModuleType

from .dispatch import Dispatcher
from .errors import HTTPError, LazyLogger, error_response
from .frozen import Frozen
from .request import Request, RequestLimits, check_limits
from .response import Response
from .secret import SecretError, load_or_create_secret, secret_path
from .servlet import ServletContext
from .session import SessionInterface, SessionScope, TooManySessions
from .stores.base import (
    Envelope,
    SessionConflict,
    SessionStore,
    SessionValueError,
    StoreUnavailable,
)
from .stores.file import FileStore

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any, Callable

    StartResponse = Callable[..., Callable[[bytes], object]]

log = LazyLogger("pyserv.error")

_DEFAULT_LIMITS = RequestLimits()


class AppSettings(Frozen):
    """One application's settings, validated by whoever builds them (config or cgimain).

    Immutable (a :class:`~pyserv.frozen.Frozen`, not a dataclass: CGI start-up)."""

    __slots__ = (
        "name",
        "module",
        "session_dir",
        "mount",
        "session_timeout",
        "session_cookie",
        "secret_file",
        "session_fsync",
        "session_lock_timeout",
        "max_session_bytes",
        "max_sessions",
        "new_session_timeout",
        "session_route",
        "limits",
    )

    def __init__(
        self,
        name: str,
        module: str,
        session_dir: str | None,  # None: the store is not a directory (then set secret_file)
        mount: str | None = None,  # None: trust SCRIPT_NAME (CGI); else split the path here
        session_timeout: int = 3600,
        session_cookie: str = "PYSERVSID",
        secret_file: str | None = None,  # None: <session_dir>/.secret
        session_fsync: bool = False,
        session_lock_timeout: float = 10.0,
        max_session_bytes: int = 1024 * 1024,  # pickled; a bigger session is not stored: 500
        max_sessions: int = 0,  # stored sessions; beyond, a request creating one gets 503
        new_session_timeout: int = 300,  # idle timeout until the session's cookie comes back
        session_route: str | None = None,  # cookie value <id>.<route> for sticky balancers
        limits: RequestLimits = _DEFAULT_LIMITS,
    ) -> None:
        self.name = name
        self.module = module
        self.session_dir = session_dir
        self.mount = mount
        self.session_timeout = session_timeout
        self.session_cookie = session_cookie
        self.secret_file = secret_file
        self.session_fsync = session_fsync
        self.session_lock_timeout = session_lock_timeout
        self.max_session_bytes = max_session_bytes
        self.max_sessions = max_sessions
        self.new_session_timeout = new_session_timeout
        self.session_route = session_route
        self.limits = limits

    @property
    def secret_path(self) -> str:
        return secret_path(self.secret_file, self.session_dir)


class _RequestIds:
    """Request ids: 16 hex digits, a random per-process prefix and a counter.

    Unique enough to find one request in the logs, without reading the kernel's random
    source per request: a system call that, in a busy threaded worker, costs a GIL
    hand-off. Re-seeded in a forked child, so workers never share a prefix.
    """

    def __init__(self) -> None:
        self._seed()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._seed)

    def _seed(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(int.from_bytes(os.urandom(3), "big"))

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFF:08x}"


_request_ids = _RequestIds()


def new_request_id() -> str:
    """A new request id (16 hex digits); see :class:`_RequestIds`."""
    return _request_ids.next()


def file_store(settings: AppSettings, *, spares: bool = True) -> FileStore:
    """The default store: a :class:`FileStore` on ``settings.session_dir`` whose secret is
    read (or created) on first session use. *spares*: see FileStore (off for a process
    that serves one request)."""
    if settings.session_dir is None:
        raise ValueError(f"app {settings.name!r}: no session_dir and no store given")
    envelope = Envelope(
        lambda: load_or_create_secret(settings.secret_path),
        max_bytes=settings.max_session_bytes,
    )
    return FileStore(settings.session_dir, envelope, fsync=settings.session_fsync, spares=spares)


class Application:
    """The WSGI callable for one servlet module. Thread-safe.

    *store* defaults to :func:`file_store`.
    """

    def __init__(
        self,
        settings: AppSettings,
        *,
        store: SessionStore | None = None,
        module: ModuleType | None = None,
    ) -> None:
        self.settings = settings
        self.module = module or _import(settings.module)
        self.context = ServletContext(
            app_name=settings.name,
            mount=settings.mount or "",
            module=settings.module,
            settings=settings.as_dict(),
            log=LazyLogger(f"pyserv.app.{settings.name}"),
        )
        self.dispatcher = Dispatcher(self.module, self.context)
        if store is None:
            store = file_store(settings)
        self.store = store
        self.sessions = SessionInterface(
            store,
            cookie_name=settings.session_cookie,
            timeout=settings.session_timeout,
            lock_timeout=settings.session_lock_timeout,
            new_session_timeout=settings.new_session_timeout,
            max_sessions=settings.max_sessions,
            route=settings.session_route,
        )
        mount = (settings.mount or "").rstrip("/")
        self._wsgi_mount = mount.encode("utf-8").decode("latin-1") if settings.mount else None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = new_request_id()
        environ.pop("HTTP_PROXY", None)  # httpoxy: a client's Proxy: header is not config
        environ["pyserv.request_id"] = request_id
        self._split_mount(environ)
        request: Request | None = None
        try:
            check_limits(environ, self.settings.limits)
            request = Request(environ, self.settings.limits, request_id=request_id)
            response = self._handle(request, start_response)
        except HTTPError as exc:
            response = exc.to_response(request_id)
        try:
            if response.streaming:
                return []
            body = response.body
            if response.status in (204, 304):
                body = b""
            else:
                response.headers.set("Content-Length", str(len(body)))
            start_response(response.status_line, response.headers.items())
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        finally:
            if request is not None:
                request.close()

    def serves(self, environ: dict[str, Any]) -> bool:
        """True if the request's path lies under this app's mount (always, without one)."""
        mount = self._wsgi_mount
        if mount is None:
            return True
        full = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        return full == mount or full.startswith(mount + "/")

    def _split_mount(self, environ: dict[str, Any]) -> None:
        """Derive SCRIPT_NAME/PATH_INFO from the mount when the server cannot.

        mod_proxy_fcgi, for one, sends the whole path as SCRIPT_NAME and no PATH_INFO.
        """
        mount = self._wsgi_mount
        if mount is not None and self.serves(environ):
            full = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            environ["SCRIPT_NAME"], environ["PATH_INFO"] = mount, full[len(mount) :]

    def _handle(self, request: Request, start_response: StartResponse) -> Response:
        name, _, extra = request.path_info[1:].partition("/")
        if not request.path_info.startswith("/"):
            name = ""
        try:
            servlet = self.dispatcher.find(name)
        except Exception:
            log.exception("request_id=%s servlet %r failed to initialise", request.request_id, name)
            return error_response(500, "", request.request_id)
        if servlet is None:
            raise HTTPError(404, "no such servlet")
        request.servlet_name, request.extra_path = name, extra
        response = Response()
        with SessionScope(self.sessions, request) as scope:
            response._start = lambda r: self._start_streaming(r, scope, request, start_response)
            try:
                servlet.run(request, response)
            except HTTPError as exc:
                if response.streaming:
                    log.warning("request_id=%s %s after response.flush()", request.request_id, exc)
                    return response
                return exc.to_response(request.request_id)
            except Exception:
                log.exception("request_id=%s servlet %s raised", request.request_id, name)
                return (
                    response if response.streaming else error_response(500, "", request.request_id)
                )
            response = self._commit(scope, request, response)
            if scope.stored_id is not None:  # the key is loaded: fingerprinting is free
                request.environ["pyserv.session"] = self.store.fingerprint(scope.stored_id)
            return response

    def _commit(self, scope: SessionScope, request: Request, response: Response) -> Response:
        """Save the session into store and response; map store failures to error pages."""
        request_id = request.request_id
        deadline = request.environ.get("pyserv.deadline")
        if deadline is not None and time.monotonic() > deadline:
            log.error("request_id=%s past its deadline; session changes discarded", request_id)
            return error_response(504, "the request took too long", request_id)
        try:
            scope.commit(response)
        except (StoreUnavailable, SessionConflict) as exc:
            log.error("request_id=%s session not saved: %s", request_id, exc)
            return error_response(
                503, "session storage unavailable, try again", request_id, [("Retry-After", "1")]
            )
        except TooManySessions:
            return error_response(
                503, "too many sessions, try again later", request_id, [("Retry-After", "60")]
            )
        except (SessionValueError, SecretError) as exc:
            log.error("request_id=%s session not saved: %s", request_id, exc)
            return error_response(500, "", request_id)
        except Exception:
            log.exception("request_id=%s session not saved", request_id)
            return error_response(500, "", request_id)
        return response

    def _start_streaming(
        self,
        response: Response,
        scope: SessionScope,
        request: Request,
        start_response: StartResponse,
    ) -> Callable[[bytes], object]:
        scope.commit(response)  # the cookie must go out with the headers, now
        write = start_response(response.status_line, response.headers.items())
        if request.method == "HEAD":
            return lambda chunk: None
        return write

    def load_servlets(self) -> None:
        """Create and init every servlet now; a daemon calls this before serving."""
        self.dispatcher.load_all()

    def close(self) -> None:
        """Call every servlet's ``destroy()``; a daemon calls this at shutdown."""
        self.dispatcher.destroy_all()


def _import(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for an absolute name, without importing importlib
    (and warnings with it): a CGI process pays for every module it loads."""
    __import__(name)
    return sys.modules[name]
