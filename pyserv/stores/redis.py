"""The Redis store: sessions shared by every host, each write a compare-and-set.

Layout, all under the application's *prefix* (e.g. ``pyserv:testapp:``):

- ``PREFIX<id>``: a hash ``{g: generation, t: idle timeout (s), e: signed envelope}``
  whose TTL is the idle timeout, so Redis expires idle sessions itself (no sweeper).
  ``g`` and ``t`` are unsigned hints for the scripts; whenever data is unpickled, the
  envelope's signed header is what counts, and it must agree with ``g``.
- ``PREFIX<id>:lock``: the lock, a random token set with ``NX`` and a lease (``PX``), so
  a crashed holder's lock lapses by itself.
- ``PREFIXquarantine:<fingerprint>:<time>``: a record that failed verification, kept
  seven days for inspection, never unpickled.

Each ``load``, ``save``, ``delete`` and lock attempt is one round trip: the checks and
the writes of ``load``, ``save`` and the lock are Lua scripts, atomic on the server.
``save`` is the fence: it writes only if the stored generation is the one the request
loaded (or, for a new session, if there is none), so a request whose lock lease ran out
while another saved cannot overwrite that save, and an expired or deleted session is
never written back.

Nothing is retried: a write whose reply was lost may have been applied, and sending it
again could apply it twice (so a save that raised StoreUnavailable may yet be stored; the
generation check keeps that harmless). Any failure to talk to Redis raises
:class:`StoreUnavailable` (answered with 503) within about *timeout* seconds; redis-py's
pool reconnects on the next call, so the same store works again once Redis is back.

``redis`` (``pip install 'pyserv[redis]'``) is imported only when a store is built.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .base import (
    BadEnvelope,
    Envelope,
    LockTimeout,
    SessionConflict,
    SessionLock,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    valid_session_id,
)
from .keyed import KeyedLocks

if TYPE_CHECKING:
    import redis

log = logging.getLogger("pyserv.error")

LOCK_SUFFIX = ":lock"
QUARANTINE = "quarantine:"
QUARANTINE_SECONDS = 7 * 24 * 3600
_LOCK_POLL_FIRST = 0.0002  # seconds between lock attempts: doubling from this...
_LOCK_POLL_MAX = 0.002  # ...up to this (a request holds a session about a millisecond)

# KEYS: session, lock. ARGV: token, lease (ms).
# -> -1 no such session (nothing created), 0 locked by someone else, 1 acquired.
_LOCK_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: lock. ARGV: token. Deletes the lock only if it is still this holder's.
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: session. ARGV: the generation the caller has cached ('' = none).
# -> nil: no session; {g}: the caller's generation is stored (TTL refreshed);
#    {g, e}: another generation (TTL refreshed); {'', e}: malformed, for quarantine.
_LOAD_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return nil end
if kind ~= 'hash' then return {'', false} end
local fields = redis.call('HMGET', KEYS[1], 'g', 't')
local g, t = fields[1], tonumber(fields[2])
if not g or not string.match(g, '^%d+$') or not t or t <= 0 then
  return {'', redis.call('HGET', KEYS[1], 'e')}
end
redis.call('PEXPIRE', KEYS[1], string.format('%d', t * 1000))
if g == ARGV[1] then return {g} end
return {g, redis.call('HGET', KEYS[1], 'e')}
"""

# KEYS: session. ARGV: loaded generation (0 = new), next generation, idle timeout (s),
# envelope, TTL (ms). -> {'saved'} | {'exists'} | {'gone'} | {'corrupt'} |
# {'generation', stored g}; nothing is written unless 'saved'.
_SAVE_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1]).ok
if ARGV[1] == '0' then
  if kind ~= 'none' then return {'exists'} end
elseif kind == 'none' then
  return {'gone'}
elseif kind ~= 'hash' then
  return {'corrupt'}
else
  local g = redis.call('HGET', KEYS[1], 'g')
  if g ~= ARGV[1] then return {'generation', g or ''} end
end
redis.call('HSET', KEYS[1], 'g', ARGV[2], 't', ARGV[3], 'e', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'saved'}
"""

# KEYS: session, quarantine. ARGV: the envelope found (''= none), TTL (s). Moves the
# session aside only if it still holds what failed verification (not a newer save).
_QUARANTINE_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return 0 end
if kind == 'hash' and (redis.call('HGET', KEYS[1], 'e') or '') ~= ARGV[1] then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_SCRIPT_LOCATION = re.compile(r"\s*script: \w+, on @user_script:\d+\.?\Z")  # Redis 7 appends it


class _RedisLock(SessionLock):
    """A held lock: its key and the token only this holder knows."""

    def __init__(self, store: RedisStore, sid: str, key: str, token: str) -> None:
        self._store = store
        self._sid = sid
        self._key = key
        self._token = token
        self._held = True

    def release(self) -> None:
        """Delete the lock if it is still ours. Never raises for an unreachable Redis:
        release runs while a response is being finished, and the lease ends the lock
        anyway."""
        if not self._held:
            return
        self._held = False
        try:
            self._store._unlock(self._key, self._token)
        except StoreUnavailable as exc:
            log.warning("session lock not released (it lapses after its lease): %s", exc)
        finally:
            self._store._keyed.release(self._sid)


class RedisStore(SessionStore):
    """Sessions in Redis at *url* (``redis://HOST:PORT/DB`` or ``rediss://`` for TLS).

    *prefix* namespaces the keys (one per application). *password* is sent with AUTH;
    it never appears in messages. *timeout* bounds connecting and every reply, in
    seconds. *lock_lease* is how long a lock outlives a holder that never releases it;
    keep it above the longest request. Thread-safe; build it after fork.
    """

    def __init__(
        self,
        url: str,
        envelope: Envelope,
        *,
        prefix: str,
        password: str | None = None,
        timeout: float = 1.0,
        lock_lease: float = 60.0,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ImportError(
                "the Redis session store needs the redis package: pip install 'pyserv[redis]'"
            ) from exc
        if not prefix:
            raise ValueError("a Redis store needs a key prefix, such as 'pyserv:myapp:'")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
        self.envelope = envelope
        self.prefix = prefix
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.where = f"{host}:{parts.port or 6379}/{parts.path.strip('/') or '0'}"
        self._timeout = timeout
        self._lease_ms = max(1, round(lock_lease * 1000))
        self._keyed = KeyedLocks()
        self._secrets = [s for s in (password, parts.password) if s]
        options: dict[str, object] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            # RESP2 whatever the redis-py version (8.x defaults to RESP3 and its
            # maintenance notifications): one protocol, as tested, and no HELLO needed.
            "protocol": 2,
        }
        if password is not None:
            options["password"] = password
        self._pool: redis.ConnectionPool = redis.ConnectionPool.from_url(url, **options)
        self._redis: redis.Redis = redis.Redis(connection_pool=self._pool)
        self._lock_script = self._redis.register_script(_LOCK_SCRIPT)
        self._unlock_script = self._redis.register_script(_UNLOCK_SCRIPT)
        self._load_script = self._redis.register_script(_LOAD_SCRIPT)
        self._save_script = self._redis.register_script(_SAVE_SCRIPT)
        self._quarantine_script = self._redis.register_script(_QUARANTINE_SCRIPT)
        errors = redis.exceptions
        self._unreachable: tuple[type[BaseException], ...] = (
            errors.ConnectionError,  # also AuthenticationError, BusyLoadingError
            errors.TimeoutError,
            errors.InvalidResponse,
        )
        self._refusing: tuple[type[BaseException], ...] = (
            errors.ReadOnlyError,
            errors.OutOfMemoryError,
            errors.NoPermissionError,
            errors.ClusterDownError,  # also MASTERDOWN: a replica cut off from its master
        )
        self._response_error = errors.ResponseError
        self._authentication_error = errors.AuthenticationError
        self._timeout_error = errors.TimeoutError

    # -- connection --------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailable (one line, naming HOST:PORT/DB) unless Redis answers."""
        with self._talking():
            self._redis.ping()

    def close(self) -> None:
        """Disconnect the pool's connections (a later call would connect again)."""
        self._pool.disconnect()

    @contextlib.contextmanager
    def _talking(self) -> Iterator[None]:
        """Turn redis-py's failures to reach or use Redis into StoreUnavailable."""
        try:
            yield
        except self._unreachable as exc:
            raise StoreUnavailable(
                f"cannot reach Redis at {self.where}: {self._reason(exc)}"
            ) from exc
        except self._response_error as exc:
            if not isinstance(exc, self._refusing) and not str(exc).startswith(
                ("MISCONF", "BUSY ")  # failed snapshot stops writes; a script hogs Redis
            ):
                raise
            reason = _SCRIPT_LOCATION.sub("", self._scrub(str(exc)))
            raise StoreUnavailable(f"Redis at {self.where} refuses the command: {reason}") from exc

    def _reason(self, exc: BaseException) -> str:
        """A short, password-free reason for *exc*."""
        if isinstance(exc, self._authentication_error):
            if not self._secrets:
                return "it requires a password and none is configured"
            return f"the password was refused ({self._scrub(str(exc))})"
        if isinstance(exc, self._timeout_error):
            return f"no answer within {self._timeout:g} s"
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return self._scrub(cause.strerror)
        return self._scrub(str(exc)) or type(exc).__name__

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- keys ----------------------------------------------------------------------------

    def _key(self, sid: str) -> str:
        if not valid_session_id(sid):
            raise ValueError("invalid session id")  # callers validate first; never reach Redis
        return self.prefix + sid

    # -- locking -------------------------------------------------------------------------

    def lock(self, sid: str, timeout: float) -> SessionLock | None:
        """Lock *sid*, polling (0.2 ms doubling to 2 ms) until *timeout*.

        Checking the session and taking the lock is one atomic step, so no lock is ever
        created for an absent session, and a waiter whose session is deleted meanwhile
        gets None. Threads of one process queue in-process first (only one of them
        polls Redis); each lock has its own token.
        """
        key = self._key(sid)
        lock_key = key + LOCK_SUFFIX
        deadline = time.monotonic() + timeout
        if not self._keyed.acquire(sid, timeout):
            raise LockTimeout(f"session locked for more than {timeout:g} s")
        try:
            token = self._take(key, lock_key, deadline, timeout)
        except BaseException:
            self._keyed.release(sid)
            raise
        if token is None:
            self._keyed.release(sid)
            return None
        return _RedisLock(self, sid, lock_key, token)

    def _take(self, key: str, lock_key: str, deadline: float, timeout: float) -> str | None:
        """The lock key's token once set by us; None if there is no such session."""
        token = secrets.token_urlsafe(16)
        delay = _LOCK_POLL_FIRST
        while True:
            with self._talking():
                taken = self._lock_script(keys=[key, lock_key], args=[token, self._lease_ms])
            if taken == 1:
                return token
            if taken == -1:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(f"session locked for more than {timeout:g} s")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _LOCK_POLL_MAX)

    def _unlock(self, lock_key: str, token: str) -> None:
        with self._talking():
            self._unlock_script(keys=[lock_key], args=[token])

    # -- records -------------------------------------------------------------------------

    def load(self, sid: str, known: SessionRecord | None = None) -> SessionRecord | None:
        """One round trip: refresh the TTL and fetch the envelope unless *known* holds
        the stored generation (then *known* itself is returned, nothing unpickled)."""
        key = self._key(sid)
        now = time.time()
        cached = str(known.generation) if known is not None else ""
        with self._talking():
            reply = self._load_script(keys=[key], args=[cached])
        if reply is None:
            return None
        if known is not None and len(reply) == 1:
            known.last_access = now
            return known
        stored_generation, blob = reply
        try:
            if blob is None:
                raise BadEnvelope("no envelope")
            header, data = self.envelope.open(sid, blob)
            if str(header.generation).encode("ascii") != stored_generation:
                raise BadEnvelope("signed generation differs from the stored one")
        except BadEnvelope as exc:
            self._quarantine(sid, key, blob, str(exc))
            return None
        return SessionRecord.loaded(sid, data, header, now, len(blob))

    def save(self, record: SessionRecord, now: float) -> SessionRecord:
        """Compare-and-set: generation 0 only where no session is; otherwise only over
        the generation *record* was loaded as. SessionConflict writes nothing."""
        key = self._key(record.sid)
        successor = record.successor(record.data, now)
        blob = self.envelope.seal(successor)  # SessionValueError before any Redis write
        idle = successor.idle_timeout
        with self._talking():
            reply = self._save_script(
                keys=[key],
                args=[record.generation, successor.generation, idle, blob, idle * 1000],
            )
        status = reply[0]
        if status == b"saved":
            successor.size = len(blob)
            return successor
        if status == b"exists":
            raise SessionConflict("a session with this id already exists")
        if status == b"gone":
            raise SessionConflict("the session expired or was invalidated")
        if status == b"corrupt":
            raise SessionConflict("the stored session is corrupt")
        stored = reply[1].decode("ascii", "replace") or "none"
        raise SessionConflict(
            f"stored generation {stored}, this request loaded {record.generation}"
        )

    def delete(self, sid: str) -> None:
        """Remove the session; its lock stays with its holder, who releases it."""
        key = self._key(sid)
        with self._talking():
            self._redis.delete(key)

    def _quarantine(self, sid: str, key: str, blob: bytes | None, reason: str) -> None:
        """Move a record that fails verification aside (never unpickled) and log it."""
        target = f"{self.prefix}{QUARANTINE}{self.fingerprint(sid)}:{int(time.time())}"
        try:
            with self._talking():
                self._quarantine_script(keys=[key, target], args=[blob or b"", QUARANTINE_SECONDS])
        except StoreUnavailable as exc:
            self._log_quarantine(sid, reason, None, exc)
            return
        self._log_quarantine(sid, reason, target)

    # -- maintenance ---------------------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Nothing to do: each session's TTL is its idle timeout, Redis expires it."""
        return 0

    def count(self) -> int:
        """Session keys under the prefix (not locks, not quarantine), by SCAN: linear in
        the size of the database, so callers cache it (see SessionCounter)."""
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + "*"
        start = len(self.prefix.encode("utf-8"))
        total = 0
        with self._talking():
            for name in self._redis.scan_iter(match=pattern, count=1000):
                if valid_session_id(name[start:].decode("latin-1")):
                    total += 1
        return total
