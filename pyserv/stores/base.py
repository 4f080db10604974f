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
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import re
import secrets
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable

MAGIC = b"PSV1"
# magic, generation, created (Unix time), timeout (s)
_HEADER = struct.Struct(">4sQdI")
HEADER_SIZE = _HEADER.size
_MAC_SIZE = hashlib.sha256().digest_size
_PICKLE_PROTOCOL = 4


_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}\Z")


def new_session_id() -> str:
    """256 random bits, URL-safe: the only way a session id comes into being."""
    return secrets.token_urlsafe(32)


def valid_session_id(sid: object) -> bool:
    """True if *sid* has the exact shape of our ids; check before any store access."""
    return isinstance(sid, str) and _SESSION_ID.match(sid) is not None


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
    """A session value cannot be pickled; the message names the key."""


@dataclass
class SessionRecord:
    """One session as stored: its data plus the facts the store keeps about it."""

    sid: str
    data: dict[str, Any]
    generation: int = 0  # 0 = never stored; each save stores generation + 1
    created: float = 0.0
    last_access: float = 0.0
    timeout: int = 3600
    size: int = field(default=0, compare=False)  # bytes of the stored envelope

    def expired(self, now: float) -> bool:
        return now - self.last_access > self.timeout

    def successor(self, data: dict[str, Any], now: float) -> SessionRecord:
        return replace(self, data=data, generation=self.generation + 1, last_access=now)


@dataclass(frozen=True)
class Header:
    """The unverified header of an envelope: enough to sweep or check a cache, no more."""

    generation: int
    created: float
    timeout: int


class Envelope:
    """Seals records into signed bytes and opens them again, verifying first.

    *key* is a callable so that the secret is only read (or created) when a session is
    first stored or loaded; a servlet that never uses sessions never needs it.
    """

    def __init__(self, key: Callable[[], bytes]) -> None:
        self._key_source = key
        self._key: bytes | None = None

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
        payload = pickle_session(record.data)
        header = _HEADER.pack(MAGIC, record.generation, record.created, record.timeout)
        return header + self._mac(record.sid, header, payload) + payload

    def open(self, sid: str, blob: bytes) -> tuple[Header, dict[str, Any]]:
        """Verify *blob* for *sid*, then unpickle; raises BadEnvelope, never unpickles first."""
        header = read_header(blob)
        if len(blob) < HEADER_SIZE + _MAC_SIZE:
            raise BadEnvelope("too short")
        raw_header = blob[:HEADER_SIZE]
        mac = blob[HEADER_SIZE : HEADER_SIZE + _MAC_SIZE]
        payload = blob[HEADER_SIZE + _MAC_SIZE :]
        if not hmac.compare_digest(mac, self._mac(sid, raw_header, payload)):
            raise BadEnvelope("signature does not match")
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
    """Parse the header at the start of *blob* without verifying anything."""
    if len(blob) < HEADER_SIZE:
        raise BadEnvelope("too short")
    magic, generation, created, timeout = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise BadEnvelope("unknown format")
    return Header(generation, created, timeout)


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
