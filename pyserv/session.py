"""Sessions as servlets see them, and their life within one request.

Servlet instances are long-lived and shared by concurrent requests, so ``self.session``
is resolved per request: :class:`SessionAttribute` is a data descriptor that looks up
the session of the request the current thread (context) is serving. One servlet object
can therefore serve two users at the same moment without either seeing the other's
session, and ``init()`` still runs once per instance.

A session is opened lazily, on the first ``self.session`` access: the cookie's id is used
only if it has our exact id shape and names a live stored session; otherwise the request
gets a new, empty session with a fresh id. An opened stored session is locked until the
request ends, which serialises concurrent requests of one user (across processes too).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from .errors import HTTPError
from .request import Request
from .response import Response
from .stores.base import (
    LockTimeout,
    SessionLock,
    SessionRecord,
    SessionStore,
    new_session_id,
    valid_session_id,
)

MAX_TIMEOUT = 10 * 365 * 24 * 3600  # ten years; the envelope stores 32 bits


class Session(MutableMapping[str, Any]):
    """A dict of picklable values plus a few facts about the session.

    Tracked: setting, deleting or clearing keys sets ``modified``. Not tracked: changes
    inside a value (``session['cart'].append(x)``); set ``session.modified = True`` after
    such a change, or assign the value again. Only modified sessions are saved.
    """

    def __init__(self, record: SessionRecord, *, new: bool, lock: SessionLock | None = None):
        self._record = record
        self._data = record.data
        self._lock = lock
        self.is_new = new
        self.modified = False
        self.invalidated = False
        self.rotated = False

    @property
    def id(self) -> str:
        return self._record.sid

    @property
    def created(self) -> float:
        return self._record.created

    @property
    def last_access(self) -> float:
        return self._record.last_access

    @property
    def timeout(self) -> int:
        """Idle timeout of this session in seconds; assign to change it for this session."""
        return self._record.timeout

    @timeout.setter
    def timeout(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ValueError(f"session timeout must be an int of seconds, not {seconds!r}")
        if not 0 < seconds <= MAX_TIMEOUT:
            raise ValueError(f"session timeout must be 1 to {MAX_TIMEOUT} seconds, not {seconds}")
        self._record.timeout = seconds
        self.modified = True

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def invalidate(self) -> None:
        """End the session: its data is dropped and its id is never valid again."""
        self._data.clear()
        self.invalidated = True
        self.modified = True

    def rotate(self) -> None:
        """Keep the data under a new id and retire the old one (do this at login)."""
        self.rotated = True
        self.modified = True

    def __repr__(self) -> str:
        return f"<Session {'new ' if self.is_new else ''}{self._data!r}>"


class SessionInterface:
    """Opens the session a request's cookie names and saves it after the servlet.

    Holds no per-request state; shared by all threads of an application.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        cookie_name: str = "PYSERVSID",
        timeout: int = 3600,
        lock_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.cookie_name = cookie_name
        self.timeout = timeout
        self.lock_timeout = lock_timeout

    def open(self, request: Request) -> Session:
        for sid in request.cookies.getall(self.cookie_name):
            if not valid_session_id(sid):
                continue  # forged, overlong, non-ASCII, '../': as if no cookie
            try:
                lock = self.store.lock(sid, self.lock_timeout)
            except LockTimeout:
                raise HTTPError(
                    503, "session busy, try again", headers=[("Retry-After", "1")]
                ) from None
            if lock is None:
                continue
            try:
                record = self.store.load(sid)
            except BaseException:
                lock.release()
                raise
            if record is None:
                lock.release()
                continue
            return Session(record, new=False, lock=lock)
        now = time.time()
        return Session(SessionRecord(new_session_id(), {}, 0, now, now, self.timeout), new=True)

    def save(self, session: Session, request: Request, response: Response) -> None:
        """Store the servlet's changes (if any) and set or delete the cookie.

        Raises the store's errors (SessionConflict, StoreUnavailable, SessionValueError)
        with nothing written; the caller turns them into an error response.
        """
        if "cookie" not in (value.lower() for value in response.headers.getall("Vary")):
            response.headers.add("Vary", "Cookie")
        if session.invalidated:
            if not session.is_new:
                self.store.delete(session.id)
            if self.cookie_name in request.cookies:
                response.delete_cookie(self.cookie_name, path=self._cookie_path(request))
            return
        if not session.modified:
            return
        now = time.time()
        record = session._record
        if session.rotated and not session.is_new:
            fresh = SessionRecord(
                new_session_id(), session._data, 0, record.created, now, record.timeout
            )
            session._record = self.store.save(fresh, now)
            self.store.delete(record.sid)
        else:
            session._record = self.store.save(record, now)
        if session.is_new or session.rotated:
            response.set_cookie(
                self.cookie_name,
                session.id,
                path=self._cookie_path(request),
                secure=request.is_secure,
                httponly=True,
                samesite="Lax",
            )
            response.headers.set("Cache-Control", "private, no-store")

    @staticmethod
    def _cookie_path(request: Request) -> str:
        return request.script_name or "/"


_current_scope: contextvars.ContextVar[SessionScope | None] = contextvars.ContextVar(
    "pyserv_session_scope", default=None
)


class SessionScope:
    """The session of one request: opened on first use, saved or discarded at the end.

    Used as a context manager around the servlet call, so ``self.session`` anywhere in
    that call resolves to this request's session; leaving it always releases the lock.
    """

    def __init__(self, interface: SessionInterface, request: Request) -> None:
        self._interface = interface
        self._request = request
        self._session: Session | None = None
        self._closed = False
        self._saved = False
        self._token: contextvars.Token | None = None

    @property
    def session(self) -> Session:
        if self._closed:
            raise RuntimeError("the session was already saved by response.flush()")
        if self._session is None:
            self._session = self._interface.open(self._request)
        return self._session

    @property
    def opened(self) -> Session | None:
        return self._session

    @property
    def stored_id(self) -> str | None:
        """The id of this request's session if it exists in the store (for logs)."""
        session = self._session
        if session is None or session.invalidated:
            return None
        if session.is_new and not (self._saved and session.modified):
            return None
        return session.id

    def commit(self, response: Response) -> None:
        """Save the session's changes into the store and the response; then close it."""
        if self._closed:
            return
        try:
            if self._session is not None:
                self._interface.save(self._session, self._request, response)
                self._saved = True
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock; unsaved changes are discarded."""
        if self._closed and (self._session is None or self._session._lock is None):
            return
        self._closed = True
        session = self._session
        if session is not None and session._lock is not None:
            if not self._saved:
                self._interface.store.discard(session.id)
            lock, session._lock = session._lock, None
            lock.release()

    def __enter__(self) -> SessionScope:
        self._token = _current_scope.set(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        if self._token is not None:
            _current_scope.reset(self._token)


class SessionAttribute:
    """``self.session`` on servlets: the session of the request being served now."""

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        scope = _current_scope.get()
        if scope is None:
            raise RuntimeError("self.session is only available while serving a request")
        return scope.session

    def __set__(self, instance: object, value: object) -> None:
        raise AttributeError("self.session is managed by PyServ: assign to its keys instead")
