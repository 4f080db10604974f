"""The session store interface and the signed envelope every backend stores.

A store keeps session records keyed by id. The application holds a store's lock for the
whole request that uses a session, so that read-modify-write sequences from different
threads, processes and hosts are serialised; the generation number is a second line of
defence (fencing): a save whose record is not the generation currently stored raises
:class:`SessionConflict` instead of overwriting, and nothing is ever written for a session
that has expired or been deleted.

The envelope is ``header | HMAC-SHA256 | pickle``. The HMAC covers the header, the
session id and the pickle, so a record cannot be forged, altered or moved to another id
without the key, and nothing that fails verification is ever unpickled.

The header (big-endian) is ``magic "PSV2" | generation u64 | created f64 | timeout u32 |
new_timeout u32``: everything a sweeper needs to decide expiry without the key.
``new_timeout`` is non-zero while the session is *provisional* (created, its cookie not
yet seen again): it then expires after that shorter idle time. Files written before the
field existed (magic "PSV1", no ``new_timeout``) are still read.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import struct
from abc import ABC, abstractmethod

try:  # pickle.py's own dumps/loads are these; pickle.py also imports re (~4 ms for CGI)
    import _pickle as pickle
except ImportError:  # an interpreter without the C accelerator
    import pickle  # type: ignore[no-redef]

from ..errors import LazyLogger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any, Callable

MAGIC = b"PSV2"
# magic, generation, created (Unix time), timeout (s), new_timeout (s, 0 = confirmed)
_HEADER = struct.Struct(">4sQdII")
HEADER_SIZE = _HEADER.size  # the most bytes a header takes: read this many to parse one
_MAGIC_V1 = b"PSV1"
_HEADER_V1 = struct.Struct(">4sQdI")  # before new_timeout: read, never written
_MAC_SIZE = hashlib.sha256().digest_size
_PICKLE_PROTOCOL = 4


log = LazyLogger("pyserv.error")

_URLSAFE_BASE64 = bytes.maketrans(b"+/", b"-_")  # as base64.urlsafe_b64encode
# The URL-safe base64 alphabet; a set, not a regex, so that a CGI process need not import re.
_SESSION_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def new_session_id() -> str:
    """256 random bits, URL-safe: the only way a session id comes into being.

    What ``secrets.token_urlsafe(32)`` returns (os.urandom, URL-safe base64, no padding),
    built from binascii: secrets also imports random and base64 (and with it re), several
    ms of a CGI request that creates a session.
    """
    encoded = binascii.b2a_base64(os.urandom(32), newline=False)
    return encoded.translate(_URLSAFE_BASE64).rstrip(b"=").decode("ascii")


def valid_session_id(sid: object) -> bool:
    """True if *sid* has the exact shape of our ids; check before any store access."""
    return isinstance(sid, str) and len(sid) == 43 and _SESSION_ID_CHARS.issuperset(sid)


class StoreError(Exception):
    """Base class of store failures."""


class LockTimeout(StoreError):
    """The session stayed locked by another request for longer than the lock timeout."""


class SessionConflict(StoreError):
    """The stored session is not the one this request loaded (expired, deleted, replaced)."""


class StoreUnavailable(StoreError):
    """The store cannot be used now (disk full, read-only, server down): answer 503."""


class BadEnvelope(StoreError):
    """Stored bytes that fail verification; they are never unpickled."""


class SessionValueError(StoreError):
    """A session cannot be stored as it is: a value cannot be pickled (the message names
    the key) or the pickle is over the size limit (the message names both sizes)."""


class SessionRecord:
    """One session as stored: its data plus the facts the store keeps about it.

    A plain class, not a dataclass: a CGI process builds a few of these per request, and
    importing and generating dataclasses costs it more than that (~10 ms).
    """

    __slots__ = (
        "sid",
        "data",
        "generation",
        "created",
        "last_access",
        "timeout",
        "size",
        "new_timeout",
    )

    def __init__(
        self,
        sid: str,
        data: dict[str, Any],
        generation: int = 0,  # 0 = never stored; each save stores generation + 1
        created: float = 0.0,
        last_access: float = 0.0,
        timeout: int = 3600,
        size: int = 0,  # bytes of the stored envelope (not compared)
        new_timeout: int = 0,  # > 0: provisional (cookie not seen again), idle limit until then
    ) -> None:
        self.sid = sid
        self.data = data
        self.generation = generation
        self.created = created
        self.last_access = last_access
        self.timeout = timeout
        self.size = size
        self.new_timeout = new_timeout

    def _compared(self) -> tuple[Any, ...]:
        return (
            self.sid,
            self.data,
            self.generation,
            self.created,
            self.last_access,
            self.timeout,
            self.new_timeout,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionRecord):
            return NotImplemented
        return self._compared() == other._compared()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"SessionRecord({fields})"

    @classmethod
    def loaded(
        cls, sid: str, data: dict[str, Any], header: Header, now: float, size: int
    ) -> SessionRecord:
        """The record a store's load returns: *header*'s facts, last accessed *now*."""
        return cls(
            sid,
            data,
            header.generation,
            header.created,
            now,
            header.timeout,
            size,
            header.new_timeout,
        )

    def replace(self, **changes: Any) -> SessionRecord:
        """A copy with *changes* (as ``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return SessionRecord(**values)

    @property
    def idle_timeout(self) -> int:
        """The idle time after which this session expires now."""
        return _idle_timeout(self.timeout, self.new_timeout)

    def expired(self, now: float) -> bool:
        return now - self.last_access > self.idle_timeout

    def successor(self, data: dict[str, Any], now: float) -> SessionRecord:
        return self.replace(data=data, generation=self.generation + 1, last_access=now)


def _idle_timeout(timeout: int, new_timeout: int) -> int:
    return min(timeout, new_timeout) if new_timeout else timeout


class Header:
    """The unverified header of an envelope: enough to sweep or check a cache, no more."""

    __slots__ = ("generation", "created", "timeout", "new_timeout", "size")

    def __init__(
        self,
        generation: int,
        created: float,
        timeout: int,
        new_timeout: int = 0,
        size: int = HEADER_SIZE,  # bytes this header takes in its envelope
    ) -> None:
        self.generation = generation
        self.created = created
        self.timeout = timeout
        self.new_timeout = new_timeout
        self.size = size

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Header({fields})"

    @property
    def idle_timeout(self) -> int:
        """Idle seconds after which the stored session is expired."""
        return _idle_timeout(self.timeout, self.new_timeout)


def pack_header(generation: int, created: float, timeout: int, new_timeout: int = 0) -> bytes:
    """A header in the current layout (for the envelope, and for tools and tests)."""
    return _HEADER.pack(MAGIC, generation, created, timeout, new_timeout)


class Envelope:
    """Seals records into signed bytes and opens them again, verifying first.

    *key* is a callable so that the secret is only read (or created) when a session is
    first stored or loaded; a servlet that never uses sessions never needs it.
    *max_bytes* bounds the pickle: a session over it is refused by :meth:`seal`, before
    any store writes, so what is stored stays as it was (0 = no limit).
    """

    def __init__(self, key: Callable[[], bytes], *, max_bytes: int = 0) -> None:
        self._key_source = key
        self._key: bytes | None = None
        self.max_bytes = max_bytes

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self._key_source()
        return self._key

    def _mac(self, sid: str, header: bytes, payload: bytes) -> bytes:
        mac = hmac.new(self.key, header, hashlib.sha256)
        mac.update(sid.encode("ascii"))
        mac.update(payload)
        return mac.digest()

    def seal(self, record: SessionRecord) -> bytes:
        """The signed bytes of *record*; SessionValueError if it cannot or may not be stored."""
        payload = pickle_session(record.data)
        if self.max_bytes and len(payload) > self.max_bytes:
            raise SessionValueError(
                f"session is {len(payload)} bytes pickled, over max_session_bytes "
                f"({self.max_bytes}); nothing was stored"
            )
        header = pack_header(record.generation, record.created, record.timeout, record.new_timeout)
        return header + self._mac(record.sid, header, payload) + payload

    def verify(self, sid: str, blob: bytes) -> tuple[Header, bytes]:
        """Check *blob*'s header and HMAC for *sid*; return the header and the (still
        pickled) payload. Raises BadEnvelope; unpickles nothing."""
        header = read_header(blob)
        if len(blob) < header.size + _MAC_SIZE:
            raise BadEnvelope("too short")
        raw_header = blob[: header.size]
        mac = blob[header.size : header.size + _MAC_SIZE]
        payload = blob[header.size + _MAC_SIZE :]
        if not hmac.compare_digest(mac, self._mac(sid, raw_header, payload)):
            raise BadEnvelope("signature does not match")
        return header, payload

    def open(self, sid: str, blob: bytes) -> tuple[Header, dict[str, Any]]:
        """Verify *blob* for *sid*, then unpickle; raises BadEnvelope, never unpickles first."""
        header, payload = self.verify(sid, blob)
        try:
            data = pickle.loads(payload)
        except Exception as exc:  # signed by us, but written by other code
            raise BadEnvelope(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc
        if not isinstance(data, dict):
            raise BadEnvelope("payload is not a dict")
        return header, data

    def fingerprint(self, sid: str) -> str:
        """A short keyed hash of *sid* for logs: correlates, never reveals the id."""
        digest = hmac.new(self.key, b"log:" + sid.encode("ascii"), hashlib.sha256)
        return digest.hexdigest()[:12]


def read_header(blob: bytes) -> Header:
    """Parse the header at the start of *blob* without verifying anything.

    *blob* may be just the first :data:`HEADER_SIZE` bytes of a file (or all of it).
    """
    magic = blob[:4]
    if magic == MAGIC and len(blob) >= _HEADER.size:
        _, generation, created, timeout, new_timeout = _HEADER.unpack_from(blob)
        return Header(generation, created, timeout, new_timeout, _HEADER.size)
    if magic == _MAGIC_V1 and len(blob) >= _HEADER_V1.size:
        _, generation, created, timeout = _HEADER_V1.unpack_from(blob)
        return Header(generation, created, timeout, 0, _HEADER_V1.size)
    if len(blob) < _HEADER_V1.size or magic in (MAGIC, _MAGIC_V1):
        raise BadEnvelope("too short")
    raise BadEnvelope("unknown format")


def pickle_session(data: dict[str, Any]) -> bytes:
    """Pickle *data*; on failure name the key whose value cannot be pickled."""
    try:
        return pickle.dumps(data, protocol=_PICKLE_PROTOCOL)
    except Exception as exc:
        for key, value in data.items():
            try:
                pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
            except Exception as value_exc:
                raise SessionValueError(
                    f"session[{key!r}] cannot be stored: {type(value_exc).__name__}: {value_exc}"
                ) from value_exc
        raise SessionValueError(f"session cannot be stored: {exc}") from exc


class SessionLock(ABC):
    """A held session lock; ``release()`` is idempotent."""

    @abstractmethod
    def release(self) -> None: ...


class SessionStore(ABC):
    """Where sessions live. Thread-safe; shared by every request of a process.

    Contract: ``lock`` then ``load``/``save``/``delete`` while holding the lock, then
    ``release``. A brand-new session (generation 0, a fresh id) is saved without a lock.
    ``save`` is atomic (readers see the old or the new record, never a mix) and raises
    :class:`SessionConflict` if the stored generation is not ``record.generation`` or the
    session has expired or vanished meanwhile; :class:`StoreUnavailable` when the backend
    cannot take the write (answer 503).
    """

    @abstractmethod
    def lock(self, sid: str, timeout: float) -> SessionLock | None:
        """Lock the stored session *sid*; None (nothing created) if no such session.

        Raises :class:`LockTimeout` if the lock is not free within *timeout* seconds.
        """

    @abstractmethod
    def load(self, sid: str, known: SessionRecord | None = None) -> SessionRecord | None:
        """The live record for *sid*, or None if absent, expired (then removed) or failing
        verification (then quarantined). Refreshes its last access. If *known* has the
        stored generation, return it without unpickling (the worker's cache)."""

    @abstractmethod
    def save(self, record: SessionRecord, now: float) -> SessionRecord:
        """Store *record*'s data as the next generation; return the stored record."""

    @abstractmethod
    def delete(self, sid: str) -> None:
        """Remove the session (its id is never valid again)."""

    @abstractmethod
    def sweep(self, now: float) -> int:
        """Remove expired sessions without unpickling them; return how many."""

    envelope: Envelope

    def count(self) -> int:
        """How many sessions are stored (expired ones not yet swept included)."""
        raise NotImplementedError

    def discard(self, sid: str) -> None:
        """The request holding *sid* discarded its changes (a cache drops its copy)."""
        return None

    def fingerprint(self, sid: str) -> str:
        """A keyed hash of *sid* for logs."""
        return self.envelope.fingerprint(sid)

    def _log_quarantine(
        self, sid: str, reason: str, target: str | None, failure: object = None
    ) -> None:
        """Log a record that failed verification: moved to *target*, or, with *failure*,
        left in place. Names the session by its fingerprint, never by id."""
        if failure is not None:
            log.warning(
                "session %s failed verification (%s); cannot move it aside: %s",
                self.fingerprint(sid),
                reason,
                failure,
            )
        else:
            log.warning(
                "session %s failed verification (%s); moved to %s",
                self.fingerprint(sid),
                reason,
                target,
            )
