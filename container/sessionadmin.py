"""Session-directory maintenance for ``pyservctl sessions``: walk, count, expire, verify.

Works on the files directly (the layout of :mod:`pyserv.stores.file`), so it needs no
running daemon and serves CGI deployments too. It plays by the store's rules: whatever it
removes or moves aside, it does under the session's lock taken without waiting (a session
locked by a request is in use: it is skipped and counted), and it never unpickles a
record it has not verified. Only :func:`find_session` unpickles, for ``show``.
Run it as the owner of the directory (as the daemon's workers): what it creates, lock
files and the quarantine directory, must stay usable by them.

What it returns carries counts and keyed fingerprints, never session ids.
"""

from __future__ import annotations

import bisect
import os
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyserv.secret import read_secret
from pyserv.stores.base import (
    HEADER_SIZE,
    BadEnvelope,
    Envelope,
    Header,
    LockTimeout,
    read_header,
    valid_session_id,
)
from pyserv.stores.file import DATA_SUFFIX, LOCK_SUFFIX, QUARANTINE, SPARE_SUFFIX, FileStore

# Upper bounds (seconds) of the idle-time histogram's buckets; the last one is open.
IDLE_BUCKETS: tuple[int, ...] = (60, 300, 900, 3600, 4 * 3600, 24 * 3600)
IDLE_LABELS: tuple[str, ...] = (
    "< 1 min",
    "1-5 min",
    "5-15 min",
    "15-60 min",
    "1-4 h",
    "4-24 h",
    ">= 1 day",
)


def open_store(directory: str, secret_path: str) -> FileStore:
    """A store on *directory* whose key is read from *secret_path* only when needed."""
    return FileStore(directory, Envelope(lambda: read_secret(secret_path)))


# -- walking the directory -----------------------------------------------------------------


@dataclass(frozen=True)
class SessionFile:
    """One session file as found on disk; *header* is None when it does not parse."""

    sid: str
    path: str
    header: Header | None
    problem: str  # why the header does not parse, else ""
    mtime: float  # the last access
    size: int

    def idle(self, now: float) -> float:
        return max(now - self.mtime, 0.0)

    def expired(self, now: float) -> bool:
        """The store's rule: idle for longer than the header's idle timeout."""
        return self.header is not None and now - self.mtime > self.header.idle_timeout


def session_path(directory: str, sid: str) -> str:
    """Where the session *sid* (a valid id) lives under *directory*."""
    return os.path.join(directory, sid[:2], sid + DATA_SUFFIX)


def iter_sessions(directory: str) -> Iterator[SessionFile]:
    """Every session file under *directory*, its header read but not verified.

    Files removed while we walk are skipped; other OSErrors (permissions) propagate.
    """
    for subdir in sorted(os.scandir(directory), key=lambda e: e.name):
        if len(subdir.name) != 2 or not subdir.is_dir(follow_symlinks=False):
            continue
        try:
            entries = sorted(os.scandir(subdir.path), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for entry in entries:
            sid = entry.name[: -len(DATA_SUFFIX)]
            if not entry.name.endswith(DATA_SUFFIX) or not valid_session_id(sid):
                continue
            try:
                found = _read_session_file(sid, entry.path)
            except FileNotFoundError:
                continue
            yield found


def _read_session_file(sid: str, path: str) -> SessionFile:
    with open(path, "rb") as stream:
        info = os.fstat(stream.fileno())
        head = stream.read(HEADER_SIZE)
    try:
        header: Header | None = read_header(head)
        problem = ""
    except BadEnvelope as exc:
        header, problem = None, str(exc)
    return SessionFile(sid, path, header, problem, info.st_mtime, info.st_size)


def _current_mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


# -- stats ---------------------------------------------------------------------------------


@dataclass
class Stats:
    """What a directory holds. Bytes are file sizes (the signed envelopes)."""

    live: int = 0
    live_bytes: int = 0
    expired: int = 0  # not yet removed by a sweep
    expired_bytes: int = 0
    unreadable: int = 0  # the header does not parse: for `verify`
    quarantined: int = 0  # files in DIR/quarantine
    idle: list[int] = field(default_factory=lambda: [0] * len(IDLE_LABELS))  # live only

    def histogram(self) -> list[dict[str, Any]]:
        """The idle-time buckets with their bounds in seconds (None: unbounded)."""
        lower = (0, *IDLE_BUCKETS)
        upper: tuple[int | None, ...] = (*IDLE_BUCKETS, None)
        return [
            {"idle": label, "from_seconds": low, "to_seconds": high, "count": count}
            for label, low, high, count in zip(IDLE_LABELS, lower, upper, self.idle)
        ]


def stats(directory: str, now: float) -> Stats:
    """Count the sessions under *directory* by state and idle time (reads headers only)."""
    result = Stats()
    for found in iter_sessions(directory):
        if found.header is None:
            result.unreadable += 1
        elif found.expired(now):
            result.expired += 1
            result.expired_bytes += found.size
        else:
            result.live += 1
            result.live_bytes += found.size
            result.idle[bisect.bisect_right(IDLE_BUCKETS, found.idle(now))] += 1
    try:
        result.quarantined = sum(
            1 for e in os.scandir(os.path.join(directory, QUARANTINE)) if e.is_file()
        )
    except FileNotFoundError:
        pass
    return result


# -- expire and gc -------------------------------------------------------------------------


@dataclass
class Removal:
    """The outcome of ``expire`` or ``gc``."""

    removed: int = 0
    in_use: int = 0  # locked by a request: skipped
    unreadable: int = 0  # header does not parse: left for `verify`


def expire_idle(store: FileStore, idle_seconds: float, now: float) -> Removal:
    """Delete the sessions idle for longer than *idle_seconds*, whatever their timeout.

    Each is locked without waiting and its last access re-read under the lock, so a
    session a request is using, or used meanwhile, stays.
    """
    result = Removal()
    for found in iter_sessions(store.directory):
        if found.idle(now) <= idle_seconds:
            continue
        if found.header is None:
            result.unreadable += 1
            continue
        try:
            held = store.lock(found.sid, 0)
        except LockTimeout:
            result.in_use += 1
            continue
        if held is None:
            continue  # gone meanwhile
        try:
            mtime = _current_mtime(found.path)
            if mtime is not None and now - mtime > idle_seconds:
                store.delete(found.sid)
                result.removed += 1
        finally:
            held.release()
    return result


def collect_garbage(store: FileStore, now: float) -> Removal:
    """Remove expired sessions with the store's own sweep (the cron sweeper's work), then
    count what it had to leave: expired sessions still there were locked by a request."""
    result = Removal(removed=store.sweep(now))
    for found in iter_sessions(store.directory):
        if found.header is None:
            result.unreadable += 1
        elif found.expired(now):
            result.in_use += 1
    return result


# -- verify --------------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def _problem(envelope: Envelope, sid: str, blob: bytes) -> str | None:
    """Why *blob* fails verification for *sid*, None if it passes."""
    try:
        envelope.verify(sid, blob)  # header and HMAC only: nothing is unpickled
    except BadEnvelope as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class BadFile:
    fingerprint: str
    reason: str
    quarantined_to: str | None  # None: in use, left in place


@dataclass
class Verification:
    checked: int = 0
    good: int = 0
    bad: list[BadFile] = field(default_factory=list)

    @property
    def in_use(self) -> int:
        return sum(1 for b in self.bad if b.quarantined_to is None)


def verify(store: FileStore) -> Verification:
    """Check every envelope (header and HMAC, never unpickling) and move each file that
    fails to ``DIR/quarantine``, as the store does on load. A bad file that a request
    holds locked is reported but left in place. Needs the secret."""
    result = Verification()
    for found in iter_sessions(store.directory):
        blob = _read(found.path)
        if blob is None:
            continue  # removed meanwhile
        reason = _problem(store.envelope, found.sid, blob)
        if reason is not None:
            try:
                target = quarantine(store, found.sid)
            except LockTimeout:
                target = None
            else:
                if target is None:
                    continue  # replaced by a good record, or removed, meanwhile
            result.bad.append(BadFile(store.fingerprint(found.sid), reason, target))
        else:
            result.good += 1
        result.checked += 1
    return result


def quarantine(store: FileStore, sid: str) -> str | None:
    """Move the session file of *sid* to ``DIR/quarantine`` if it still fails verification.

    Done under the session's lock, taken without waiting (:class:`LockTimeout` if the
    session is in use). Returns the target path, or None if the file is gone or now
    passes. Never overwrites an earlier quarantined file.
    """
    held = store.lock(sid, 0)
    if held is None:
        return None
    try:
        path = session_path(store.directory, sid)
        blob = _read(path)
        if blob is None or _problem(store.envelope, sid, blob) is None:
            return None
        target_dir = os.path.join(store.directory, QUARANTINE)
        os.makedirs(target_dir, mode=0o700, exist_ok=True)
        base = os.path.join(target_dir, f"{store.fingerprint(sid)}-{int(time.time())}")
        target, n = base, 0
        while os.path.exists(target):
            n += 1
            target = f"{base}.{n}"
        os.replace(path, target)
        for suffix in (SPARE_SUFFIX, LOCK_SUFFIX):  # we hold the lock: we may remove them
            try:
                os.unlink(os.path.join(store.directory, sid[:2], sid + suffix))
            except FileNotFoundError:
                pass
        return target
    finally:
        held.release()


# -- show ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionView:
    """One verified session: its facts and, per key, the pickled size and the value."""

    fingerprint: str
    header: Header
    mtime: float
    size: int
    items: Sequence[tuple[Any, int, Any]]  # (key, pickled size, value)


class Unpicklable(Exception):
    """A session that verifies but cannot be unpickled here (its classes are not
    importable by this process); the message says why."""


def find_session(store: FileStore, sid: str, pythonpath: Sequence[str] = ()) -> SessionView | None:
    """Read session *sid* (a valid id) from *store*; None if there is none.

    Verifies first (BadEnvelope if that fails), then unpickles with *pythonpath* (the
    app's) in front of ``sys.path``, as a worker would (Unpicklable if that fails).
    Read-only: takes no lock (writes are atomic replaces), leaves the last access alone.
    """
    path = session_path(store.directory, sid)
    try:
        with open(path, "rb") as stream:
            mtime = os.fstat(stream.fileno()).st_mtime
            blob = stream.read()
    except FileNotFoundError:
        return None
    header, payload = store.envelope.verify(sid, blob)
    saved_path = list(sys.path)
    sys.path[:0] = [p for p in pythonpath if p not in sys.path]
    try:
        data = pickle.loads(payload)
    except Exception as exc:
        raise Unpicklable(f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path[:] = saved_path
    if not isinstance(data, dict):
        raise Unpicklable(f"the payload is a {type(data).__name__}, not a dict")
    items = [(key, len(pickle.dumps(value)), value) for key, value in data.items()]
    return SessionView(store.fingerprint(sid), header, mtime, len(blob), items)
