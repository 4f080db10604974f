"""The file store: one signed file per session, shared safely by many processes.

The daemon's workers, mod_fcgid processes and CGI processes may all use one directory at
once. Layout: ``DIR/ab/<id>.session`` (the envelope; its mtime is the last access),
``DIR/ab/<id>.lock`` (a stable lock file), ``ab`` being the id's first two characters.

- A new session is written to a temp file in the same directory, then renamed into
  place. An update overwrites the session's spare file ``<id>.spare`` (its previous
  version) and swaps it with the session file in one atomic step
  (:func:`~pyserv.stores.exchange.exchange`): no inode is created or freed, which on
  ext4 makes a write ~30 times cheaper than a replace. Either way a reader sees the old
  or the new file, never a torn one, and a crash leaves the old one (plus at most a temp
  or a half-written spare, never read). Where swapping is unsupported, updates fall back
  to temp file + ``os.replace``.
- Locking is a per-id in-process lock (threads queue without polling) plus ``flock`` on
  the lock file, which ``os.replace`` never swaps out. A lock file is only unlinked by
  its lock holder, and a locker re-checks after ``flock`` that the file it locked is
  still the one at the path, so a deleted-and-recreated lock file cannot split the lock.
- Nothing is created for an id that has no session file: unknown ids cost a ``stat``.
- A directory that turns read-only (or full) while serving degrades, it does not fail:
  sessions still load (a lock file that cannot be opened for writing is opened
  read-only; a last access that cannot be recorded is skipped), and every write raises
  :class:`StoreUnavailable`, which the application answers with 503.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .base import (
    HEADER_SIZE,
    BadEnvelope,
    Envelope,
    LockTimeout,
    SessionConflict,
    SessionLock,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    read_header,
    valid_session_id,
)
from .exchange import ExchangeUnsupported, exchange
from .keyed import KeyedLocks

DATA_SUFFIX = ".session"
LOCK_SUFFIX = ".lock"
SPARE_SUFFIX = ".spare"
TEMP_SUFFIX = ".tmp"
QUARANTINE = "quarantine"
STALE_TEMP_SECONDS = 3600
_UNAVAILABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


class _FileLock(SessionLock):
    """The in-process lock on *sid* plus, with *fd*, the flock on its lock file (None when
    the directory is read-only and the lock file missing: then nobody can write)."""

    def __init__(self, keyed: KeyedLocks, sid: str, fd: int | None) -> None:
        self._keyed = keyed
        self._sid = sid
        self._fd = fd
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._fd is not None:
                os.close(self._fd)  # drops the flock
            self._keyed.release(self._sid)


def _flock_until(fd: int, deadline: float) -> bool:
    # Polling, since a blocking flock cannot time out; a short cap keeps the wait close
    # to the holder's release (a request holds a session for well under a millisecond).
    delay = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.001)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _spare_path(data_path: str) -> str:
    return data_path[: -len(DATA_SUFFIX)] + SPARE_SUFFIX


def _fsync_directory(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_NO_FILE_LOCK = -1  # _flock_current: read-only directory, no lock file to lock


def _open_lock_file(path: str) -> int | None:
    """Open (creating) the lock file; on a read-only directory open it read-only, which
    flock accepts. None: read-only and there is no lock file (nobody can write then)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.isdir(os.path.dirname(path)):
            return None
        raise


def _touch(fd: int) -> None:
    """Record a last access (the mtime); skipped when the directory is read-only, where
    the session cannot change anyway."""
    try:
        os.utime(fd)
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise


class FileStore(SessionStore):
    """Sessions as files under *directory* (created 0700; files 0600).

    *fsync* makes each save durable against power loss (fsync of file and directory),
    at a cost per write; without it a save is atomic but may be lost in a power cut.
    *spares* (the default) updates sessions by swapping in a spare file; off, by
    replacing the file (cheaper for a process that writes once: no ctypes import).
    """

    def __init__(
        self, directory: str, envelope: Envelope, *, fsync: bool = False, spares: bool = True
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.envelope = envelope
        self._fsync = fsync
        self._spares = spares
        self._keyed = KeyedLocks()

    def _paths(self, sid: str) -> tuple[str, str, str]:
        if not valid_session_id(sid):
            raise ValueError("invalid session id")  # callers validate first; never reach disk
        subdir = os.path.join(self.directory, sid[:2])
        return (
            subdir,
            os.path.join(subdir, sid + DATA_SUFFIX),
            os.path.join(subdir, sid + LOCK_SUFFIX),
        )

    def ensure_directory(self) -> None:
        """Create the session directory (0700) if it does not exist."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create session directory {self.directory!r}: {exc.strerror}"
            ) from None

    # -- locking ---------------------------------------------------------------------

    def lock(self, sid: str, timeout: float) -> SessionLock | None:
        return self._lock(sid, timeout)

    def _lock(self, sid: str, timeout: float) -> _FileLock | None:
        _, data_path, lock_path = self._paths(sid)
        if not os.path.exists(data_path):
            return None
        deadline = time.monotonic() + timeout
        if not self._keyed.acquire(sid, timeout):
            raise LockTimeout(f"session locked for more than {timeout:g} s")
        fd = None
        try:
            fd = self._flock_current(lock_path, data_path, deadline)
        finally:
            if fd is None:
                self._keyed.release(sid)
        if fd is _NO_FILE_LOCK:
            return _FileLock(self._keyed, sid, None)
        return _FileLock(self._keyed, sid, fd) if fd is not None else None

    @staticmethod
    def _flock_current(lock_path: str, data_path: str, deadline: float) -> int | None:
        """flock the file now at *lock_path*; None if the session is gone meanwhile,
        :data:`_NO_FILE_LOCK` if the directory is read-only and has no lock file."""
        while True:
            try:
                fd = _open_lock_file(lock_path)
            except FileNotFoundError:  # the whole subdirectory is gone
                return None
            if fd is None:
                return _NO_FILE_LOCK if os.path.exists(data_path) else None
            if not _flock_until(fd, deadline):
                os.close(fd)
                raise LockTimeout("session locked by another request for too long")
            try:
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                if os.path.exists(data_path):
                    return fd
                try:
                    _unlink_quietly(lock_path)  # we hold it: an orphan lock file goes
                except OSError as exc:
                    if exc.errno not in _READ_ONLY:
                        os.close(fd)
                        raise
            os.close(fd)
            if not os.path.exists(data_path):
                return None

    # -- records ---------------------------------------------------------------------

    def load(self, sid: str, known: SessionRecord | None = None) -> SessionRecord | None:
        _, data_path, _ = self._paths(sid)
        now = time.time()
        try:
            stream = open(data_path, "rb")
        except FileNotFoundError:
            return None
        with stream:
            mtime = os.fstat(stream.fileno()).st_mtime
            head = stream.read(HEADER_SIZE)
            try:
                header = read_header(head)
            except BadEnvelope as exc:
                self._quarantine(sid, data_path, str(exc))
                return None
            if now - mtime > header.idle_timeout:
                try:
                    self.delete(sid)
                except StoreUnavailable:
                    pass  # expired all the same; the sweeper removes it later
                return None
            if known is not None and known.generation == header.generation:
                _touch(stream.fileno())
                known.last_access = now
                return known
            blob = head + stream.read()
            try:
                header, data = self.envelope.open(sid, blob)
            except BadEnvelope as exc:
                self._quarantine(sid, data_path, str(exc))
                return None
            _touch(stream.fileno())
        return SessionRecord.loaded(sid, data, header, now, len(blob))

    def save(self, record: SessionRecord, now: float) -> SessionRecord:
        subdir, data_path, _ = self._paths(record.sid)
        stored = self._stored_header(data_path)
        if record.generation == 0:
            if stored is not None:
                raise SessionConflict("a session with this id already exists")
        elif stored is None:
            raise SessionConflict("the session expired or was invalidated")
        else:
            generation, mtime, timeout = stored
            if generation != record.generation:
                raise SessionConflict(
                    f"stored generation {generation}, this request loaded {record.generation}"
                )
            if now - mtime > timeout:
                raise SessionConflict("the session expired")
        successor = record.successor(record.data, now)
        blob = self.envelope.seal(successor)  # SessionValueError before touching the disk
        if stored is not None and self._spares:
            self._write_swapped(data_path, blob)
        else:
            self._write_atomic(subdir, data_path, blob)
        successor.size = len(blob)
        return successor

    def delete(self, sid: str) -> None:
        _, data_path, lock_path = self._paths(sid)
        try:
            _unlink_quietly(data_path)
            _unlink_quietly(_spare_path(data_path))
            _unlink_quietly(lock_path)
        except OSError as exc:
            if exc.errno in _UNAVAILABLE:
                raise StoreUnavailable(f"cannot remove session: {exc.strerror}") from exc
            raise

    def _stored_header(self, data_path: str) -> tuple[int, float, int] | None:
        try:
            with open(data_path, "rb") as stream:
                mtime = os.fstat(stream.fileno()).st_mtime
                header = read_header(stream.read(HEADER_SIZE))
        except FileNotFoundError:
            return None
        except BadEnvelope:
            raise SessionConflict("the stored session is corrupt") from None
        return header.generation, mtime, header.idle_timeout

    def _write_atomic(self, subdir: str, data_path: str, blob: bytes) -> None:
        temp = os.path.join(subdir, f".{os.urandom(6).hex()}{TEMP_SUFFIX}")
        try:
            if not os.path.isdir(subdir):
                os.makedirs(self.directory, mode=0o700, exist_ok=True)  # mode is the leaf's
                os.makedirs(subdir, mode=0o700, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, data_path)
            if self._fsync:
                _fsync_directory(subdir)
        except OSError as exc:
            try:
                _unlink_quietly(temp)
            except OSError:
                pass  # read-only: there is no temp file to remove
            if exc.errno in _UNAVAILABLE:
                raise StoreUnavailable(f"cannot write session: {exc.strerror}") from exc
            raise

    def _write_swapped(self, data_path: str, blob: bytes) -> None:
        """Overwrite the spare with *blob* and swap it in; the old version becomes the
        spare. Caller holds the session's lock (so nobody else touches the spare)."""
        spare = _spare_path(data_path)
        try:
            try:
                fd = os.open(spare, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(spare, flags, 0o600)
            try:
                view, offset = memoryview(blob), 0
                while offset < len(blob):
                    offset += os.pwrite(fd, view[offset:], offset)
                os.ftruncate(fd, len(blob))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                exchange(spare, data_path)
            except ExchangeUnsupported:
                self._spares = False  # this file system: replace from now on
                os.replace(spare, data_path)
            if self._fsync:
                _fsync_directory(os.path.dirname(data_path))
        except OSError as exc:
            if exc.errno in _UNAVAILABLE:
                raise StoreUnavailable(f"cannot write session: {exc.strerror}") from exc
            raise

    def _quarantine(self, sid: str, data_path: str, reason: str) -> None:
        """Move a file that fails verification aside (never unpickled) and log it."""
        target_dir = os.path.join(self.directory, QUARANTINE)
        target = os.path.join(target_dir, f"{self.fingerprint(sid)}-{int(time.time())}")
        try:
            os.makedirs(target_dir, mode=0o700, exist_ok=True)
            os.replace(data_path, target)
            _unlink_quietly(_spare_path(data_path))  # the version before; signed, but stale
        except OSError as exc:
            self._log_quarantine(sid, reason, None, exc.strerror)
            return
        self._log_quarantine(sid, reason, target)

    # -- maintenance -----------------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Remove expired sessions, stale temp files and orphan lock files.

        Reads only headers and mtimes (never unpickles); a session locked by a request
        is skipped. One sweeper at a time per directory (others return 0 at once).
        """
        try:
            guard = os.open(
                os.path.join(self.directory, ".sweep.lock"),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if exc.errno in _READ_ONLY:
                return 0  # nothing can be removed from a read-only directory
            raise
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            removed = 0
            for subdir in os.scandir(self.directory):
                if len(subdir.name) == 2 and subdir.is_dir(follow_symlinks=False):
                    removed += self._sweep_subdir(subdir.path, now)
            return removed
        finally:
            os.close(guard)

    def count(self) -> int:
        """Session files on disk, by name only (no stat, no read): cheap even at 1M."""
        total = 0
        try:
            subdirs = [e.path for e in os.scandir(self.directory) if len(e.name) == 2]
        except FileNotFoundError:
            return 0
        for subdir in subdirs:
            try:
                total += sum(1 for e in os.scandir(subdir) if e.name.endswith(DATA_SUFFIX))
            except FileNotFoundError:
                continue
        return total

    def _sweep_subdir(self, subdir: str, now: float) -> int:
        removed = 0
        for entry in os.scandir(subdir):
            name = entry.name
            try:
                if name.endswith(DATA_SUFFIX):
                    sid = name[: -len(DATA_SUFFIX)]
                    if valid_session_id(sid) and self._expired_on_disk(entry.path, now):
                        removed += self._remove_if_expired(sid, entry.path, now)
                elif name.endswith(TEMP_SUFFIX):
                    if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                        _unlink_quietly(entry.path)
                elif name.endswith(SPARE_SUFFIX):
                    sid = name[: -len(SPARE_SUFFIX)]
                    if (
                        valid_session_id(sid)
                        and not os.path.exists(os.path.join(subdir, sid + DATA_SUFFIX))
                        and now - entry.stat().st_mtime > STALE_TEMP_SECONDS
                    ):
                        _unlink_quietly(entry.path)  # its session was moved aside
                elif name.endswith(LOCK_SUFFIX):
                    sid = name[: -len(LOCK_SUFFIX)]
                    if valid_session_id(sid) and not os.path.exists(
                        os.path.join(subdir, sid + DATA_SUFFIX)
                    ):
                        self._remove_orphan_lock(entry.path)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
        return removed

    @staticmethod
    def _expired_on_disk(path: str, now: float) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mtime = os.fstat(fd).st_mtime
            head = os.read(fd, HEADER_SIZE)
        finally:
            os.close(fd)
        try:
            header = read_header(head)
        except BadEnvelope:
            return False  # left for `verify`, which quarantines
        return now - mtime > header.idle_timeout

    def _remove_if_expired(self, sid: str, path: str, now: float) -> int:
        """Remove the expired session *sid* unless a request holds it (then it is in
        use, so not idle).

        A session that was never locked has no lock file, and creating one only to
        delete it would double the cost of a sweep: such a session is moved out of
        sight first (a request arriving now finds no session, and a request holding it
        would have made the lock file); only if a lock file appeared meanwhile is it put
        back, for the locked way.
        """
        subdir = os.path.dirname(path)
        lock_path = os.path.join(subdir, sid + LOCK_SUFFIX)
        if not os.path.exists(lock_path):
            doomed = os.path.join(subdir, f".{os.urandom(6).hex()}{TEMP_SUFFIX}")
            os.rename(path, doomed)
            if not os.path.exists(lock_path):
                os.unlink(doomed)
                return 1
            os.rename(doomed, path)
        try:
            held = self._lock(sid, 0)
        except LockTimeout:
            return 0  # in use right now, so not idle
        if held is None:
            return 0
        try:
            if not self._expired_on_disk(path, now):
                return 0
            self.delete(sid)
            return 1
        finally:
            held.release()

    @staticmethod
    def _remove_orphan_lock(path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                _unlink_quietly(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
