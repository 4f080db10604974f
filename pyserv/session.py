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

Two limits protect the store from clients that never send a cookie back (bots, scripts):
a session created by a request is *provisional* and expires after ``new_session_timeout``
idle seconds until a request brings its cookie back (that request confirms it, and its
own timeout applies from then on); and with ``max_sessions`` a request that would create
a session while the store holds that many is refused (503), while existing sessions keep
working.
"""

from __future__ import annotations

import contextvars
import time
from _thread import allocate_lock  # threading.Lock, without importing threading (CGI)
from collections.abc import Iterator, MutableMapping

from .errors import HTTPError, LazyLogger
from .request import Request
from .response import Response
from .stores.base import (
    LockTimeout,
    SessionConflict,
    SessionLock,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    new_session_id,
    valid_session_id,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any

MAX_TIMEOUT = 10 * 365 * 24 * 3600  # ten years; the envelope stores 32 bits

COUNT_TTL = 5.0  # seconds a count of the stored sessions is used for (max_sessions)

log = LazyLogger("pyserv.error")


class TooManySessions(Exception):
    """Creating a session now would exceed ``max_sessions``: answer 503."""


class Session(MutableMapping[str, "Any"]):
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
        self._confirmed = False  # its cookie came back: save once to store that fact
        self._cookie_route: str | None = None  # the route its cookie came with, if any

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


class SessionCounter:
    """How many sessions the store holds, cheaply enough to ask on every session creation.

    ``store.count()`` lists the session directory (names only), which is linear in the
    number of sessions, so it runs at most once per *ttl* seconds per process, by one
    thread while the others use the last value; creations by this process since then are
    added. A counter kept by the store itself would have to be shared by every process
    (workers, CGI) and would drift for ever after a crash between a write and its
    increment; a count of the directory is always right again after *ttl*. The price: the
    sessions other processes create within *ttl* are seen late, so ``max_sessions`` may
    be overshot by what they create in that window. Thread-safe.
    """

    def __init__(self, store: SessionStore, ttl: float = COUNT_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._guard = allocate_lock()
        self._counted = 0
        self._created = 0  # by this process since the last count
        self._counted_at: float | None = None  # monotonic
        self._counting = False

    def current(self) -> int:
        with self._guard:
            at = self._counted_at
            stale = at is None or time.monotonic() - at > self._ttl
            if stale and not self._counting:
                self._counting = True
            else:
                return self._counted + self._created
        try:
            counted = self._store.count()
        finally:
            with self._guard:
                self._counting = False
        with self._guard:
            self._counted, self._created = counted, 0
            self._counted_at = time.monotonic()
            return counted

    def created(self) -> None:
        with self._guard:
            self._created += 1


class SessionInterface:
    """Opens the session a request's cookie names and saves it after the servlet.

    Holds no per-request state; shared by all threads of an application.
    *new_session_timeout* (0 = off) is the idle timeout of a session until its cookie
    comes back; *max_sessions* (0 = unlimited) refuses new sessions beyond that many.
    *route* (mod_proxy_balancer's stickysession) is appended to the cookie value as
    ``<id>.<route>``; it is only a routing hint, never part of the id, so a session moved
    to another host by failover is found there and its cookie re-issued with that
    host's route.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        cookie_name: str = "PYSERVSID",
        timeout: int = 3600,
        lock_timeout: float = 10.0,
        new_session_timeout: int = 0,
        max_sessions: int = 0,
        route: str | None = None,
    ) -> None:
        self.store = store
        self.route = route
        self.cookie_name = cookie_name
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.new_session_timeout = new_session_timeout
        self.max_sessions = max_sessions
        self._counter = SessionCounter(store, COUNT_TTL) if max_sessions else None
        self._next_limit_log = 0.0

    def open(self, request: Request) -> Session:
        """The session the request's cookie names, locked; else a new one (not stored).

        Raises HTTPError 503 when the session is busy beyond the lock timeout or the
        store cannot be reached (nothing is minted then: a new session is only stored,
        and its cookie only sent, by a save that succeeds).
        """
        for value in request.cookies.getall(self.cookie_name):
            sid, _, route = value.partition(".")
            if not valid_session_id(sid):
                continue  # forged, overlong, non-ASCII, '../': as if no cookie
            try:
                lock = self.store.lock(sid, self.lock_timeout)
            except LockTimeout:
                raise HTTPError(
                    503, "session busy, try again", headers=[("Retry-After", "1")]
                ) from None
            except StoreUnavailable as exc:
                log.error("request_id=%s session store: %s", request.request_id, exc)
                raise HTTPError(
                    503, "session storage unavailable, try again", headers=[("Retry-After", "1")]
                ) from None
            if lock is None:
                continue
            try:
                record = self.store.load(sid)
            except StoreUnavailable as exc:
                lock.release()
                log.error("request_id=%s session store: %s", request.request_id, exc)
                raise HTTPError(
                    503, "session storage unavailable, try again", headers=[("Retry-After", "1")]
                ) from None
            except BaseException:
                lock.release()
                raise
            if record is None:
                lock.release()
                continue
            session = Session(record, new=False, lock=lock)
            session._cookie_route = route or None
            if record.new_timeout:  # the cookie came back: no longer provisional
                record.new_timeout = 0
                session._confirmed = True
            return session
        now = time.time()
        record = SessionRecord(new_session_id(), {}, 0, now, now, self.timeout)
        if 0 < self.new_session_timeout < self.timeout:
            record.new_timeout = self.new_session_timeout
        return Session(record, new=True)

    def save(self, session: Session, request: Request, response: Response) -> None:
        """Store the servlet's changes (if any) and set or delete the cookie.

        Raises the store's errors (SessionConflict, StoreUnavailable, SessionValueError)
        and TooManySessions with nothing written; the caller turns them into an error
        response.
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
            if session._confirmed:
                self._confirm(session)
            if not session.is_new and self._route_changed(session):
                self._set_cookie(session, request, response)  # failed over: route here now
            return
        if session.is_new:
            self._check_capacity()
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
        if session.is_new and self._counter is not None:
            self._counter.created()
        if session.is_new or session.rotated or self._route_changed(session):
            self._set_cookie(session, request, response)

    def _route_changed(self, session: Session) -> bool:
        """The cookie came with another host's route (or none): this host serves it now."""
        return self.route is not None and session._cookie_route != self.route

    def _set_cookie(self, session: Session, request: Request, response: Response) -> None:
        value = session.id if self.route is None else f"{session.id}.{self.route}"
        response.set_cookie(
            self.cookie_name,
            value,
            path=self._cookie_path(request),
            secure=request.is_secure,
            httponly=True,
            samesite="Lax",
        )
        response.headers.set("Cache-Control", "private, no-store")

    def _confirm(self, session: Session) -> None:
        """Store that a provisional session's cookie came back (its own timeout applies
        from now on). Best effort: a request that only reads is served even when the
        store cannot take a write now (read-only, full); a later request confirms."""
        try:
            session._record = self.store.save(session._record, time.time())
        except (StoreUnavailable, SessionConflict) as exc:
            log.debug("session not confirmed: %s", exc)

    def _check_capacity(self) -> None:
        """Raise TooManySessions if the store already holds ``max_sessions``."""
        if self._counter is None:
            return
        stored = self._counter.current()
        if stored < self.max_sessions:
            return
        now = time.monotonic()
        if now >= self._next_limit_log:  # once per minute, not once per refused request
            self._next_limit_log = now + 60.0
            log.warning(
                "max_sessions reached: %d stored (limit %d); new sessions get 503",
                stored,
                self.max_sessions,
            )
        raise TooManySessions(f"{stored} sessions stored, max_sessions is {self.max_sessions}")

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
