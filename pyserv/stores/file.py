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
# A session without a lock file that expired this long before the sweep began is removed
# outright (see FileStore._remove_one); nearer its expiry, the careful way.
_UNLOCKED_MARGIN = 60.0
_UNAVAILABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


class _Expired:
    """A session :meth:`FileStore.sweep` found expired, as its subdirectory listed it.
    (A plain class: ``typing.NamedTuple`` would cost every CGI process its import.)"""

    __slots__ = ("subdir", "sid", "stamp", "clear", "has_lock", "has_spare")

    def __init__(
        self,
        subdir: str,
        sid: str,
        stamp: tuple[int, int],  # inode, mtime (ns) of the session file that was read
        clear: bool,  # expired before the sweep by more than _UNLOCKED_MARGIN
        has_lock: bool,
        has_spare: bool,
    ) -> None:
        self.subdir = subdir
        self.sid = sid
        self.stamp = stamp
        self.clear = clear
        self.has_lock = has_lock
        self.has_spare = has_spare


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


def _open_for_reading(path: str) -> int:
    """A raw descriptor, not ``open()``: a buffered file object costs three more system
    calls (fstat, ioctl, lseek) per open, and a session request opens its file twice
    while it holds the lock."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _read_up_to(fd: int, size: int) -> bytes:
    """*size* bytes from *fd*, fewer only at the end of the file."""
    data = os.read(fd, size)
    while 0 < len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


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
    *sweep_threads* (1–4) share a :meth:`sweep`'s subdirectories.
    """

    def __init__(
        self,
        directory: str,
        envelope: Envelope,
        *,
        fsync: bool = False,
        spares: bool = True,
        sweep_threads: int = 2,
    ) -> None:
        if not 1 <= sweep_threads <= 4:
            raise ValueError(f"sweep_threads = {sweep_threads!r}: expected 1 to 4")
        self.directory = os.path.abspath(directory)
        self.envelope = envelope
        self._fsync = fsync
        self._spares = spares
        self._sweep_threads = sweep_threads
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
            fd = _open_for_reading(data_path)
        except FileNotFoundError:
            return None
        try:
            mtime = os.fstat(fd).st_mtime
            head = _read_up_to(fd, HEADER_SIZE)
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
                _touch(fd)
                known.last_access = now
                return known
            blob = head + _read_to_end(fd)
            try:
                header, data = self.envelope.open(sid, blob)
            except BadEnvelope as exc:
                self._quarantine(sid, data_path, str(exc))
                return None
            _touch(fd)
        finally:
            os.close(fd)
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
            fd = _open_for_reading(data_path)
        except FileNotFoundError:
            return None
        try:
            mtime = os.fstat(fd).st_mtime
            header = read_header(_read_up_to(fd, HEADER_SIZE))
        except BadEnvelope:
            raise SessionConflict("the stored session is corrupt") from None
        finally:
            os.close(fd)
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
        """Remove expired sessions, stale temp files and orphan lock files; return the
        number of sessions removed.

        Reads only headers and mtimes (never unpickles); a session locked by a request
        is skipped. One sweeper at a time per directory (others return 0 at once).

        This thread surveys the two-character subdirectories one by one (listing, header
        reads: short system calls, where a second thread would only fight for the GIL);
        with *sweep_threads* > 1, that many threads remove what it found expired (each
        removal is a few long system calls, which release the GIL). The first error in
        any of them is raised here, once the others have stopped.
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
            with os.scandir(self.directory) as listing:
                subdirs = [
                    e.path for e in listing if len(e.name) == 2 and e.is_dir(follow_symlinks=False)
                ]
            if self._sweep_threads == 1:
                return sum(self._remove_expired(self._survey(d, now), now) for d in subdirs)
            return self._sweep_with_removers(subdirs, now)
        finally:
            os.close(guard)

    def _sweep_with_removers(self, subdirs: list[str], now: float) -> int:
        # Imported here: a CGI process never sweeps, and these imports cost it start-up.
        import threading
        from concurrent.futures import ThreadPoolExecutor

        failed = threading.Event()
        with ThreadPoolExecutor(self._sweep_threads, thread_name_prefix="pyserv-sweep") as pool:
            futures = []
            try:
                for subdir in subdirs:
                    if failed.is_set():
                        break  # raised below
                    expired = self._survey(subdir, now)
                    if expired:
                        future = pool.submit(self._remove_expired, expired, now)
                        future.add_done_callback(lambda f: f.exception() and failed.set())
                        futures.append(future)
                return sum(future.result() for future in futures)
            finally:
                for future in futures:
                    future.cancel()  # after an error: the removals not yet begun

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

    def _survey(self, subdir: str, now: float) -> list[_Expired]:
        """The sessions of *subdir* expired at *now*, from one complete listing of it
        (which :meth:`_remove_one` relies on, and which spares a ``stat`` per file);
        stale temp files, orphan spares and orphan lock files are removed on the way."""
        try:
            with os.scandir(subdir) as listing:
                entries = list(listing)
        except FileNotFoundError:
            return []
        # Sessions past expiry by this much are not even near the edge for a request.
        clear_of_requests = min(now, time.time()) - _UNLOCKED_MARGIN
        sessions: list[str] = []
        locks: set[str] = set()
        spares: set[str] = set()
        temps: list[os.DirEntry[str]] = []
        for entry in entries:
            name = entry.name
            if name.endswith(DATA_SUFFIX):
                sessions.append(name[: -len(DATA_SUFFIX)])
            elif name.endswith(LOCK_SUFFIX):
                locks.add(name[: -len(LOCK_SUFFIX)])
            elif name.endswith(SPARE_SUFFIX):
                spares.add(name[: -len(SPARE_SUFFIX)])
            elif name.endswith(TEMP_SUFFIX):
                temps.append(entry)
        expired = []
        for sid in sessions:
            if not valid_session_id(sid):
                continue
            try:
                stamp = self._expired_stamp(os.path.join(subdir, sid + DATA_SUFFIX), now)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            if stamp is not None:
                ino, mtime_ns, expired_at = stamp
                expired.append(
                    _Expired(
                        subdir,
                        sid,
                        (ino, mtime_ns),
                        expired_at < clear_of_requests,
                        sid in locks,
                        sid in spares,
                    )
                )
        listed = set(sessions)
        for entry in temps:
            try:
                if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    _unlink_quietly(entry.path)
            except FileNotFoundError:
                continue
        for sid in spares - listed:
            path = os.path.join(subdir, sid + SPARE_SUFFIX)
            try:
                if (
                    valid_session_id(sid)
                    and not os.path.exists(os.path.join(subdir, sid + DATA_SUFFIX))
                    and now - os.stat(path).st_mtime > STALE_TEMP_SECONDS
                ):
                    _unlink_quietly(path)  # its session was moved aside
            except FileNotFoundError:
                continue
        for sid in locks - listed:
            if valid_session_id(sid) and not os.path.exists(
                os.path.join(subdir, sid + DATA_SUFFIX)
            ):
                try:
                    self._remove_orphan_lock(os.path.join(subdir, sid + LOCK_SUFFIX))
                except FileNotFoundError:
                    continue
        return expired

    def _remove_expired(self, expired: list[_Expired], now: float) -> int:
        """Remove the sessions :meth:`_survey` found expired, as :meth:`_remove_one`
        allows; return how many this call removed."""
        removed = 0
        for session in expired:
            try:
                removed += self._remove_one(session, now)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
        return removed

    @staticmethod
    def _expired_stamp(path: str, now: float) -> tuple[int, int, float] | None:
        """If the session file at *path* is expired at *now*: its inode, its mtime in ns
        and the time it expired; else None (also for a header that fails to parse, left
        for ``verify``, which quarantines)."""
        fd = _open_for_reading(path)
        try:
            stat = os.fstat(fd)
            head = _read_up_to(fd, HEADER_SIZE)
        finally:
            os.close(fd)
        try:
            header = read_header(head)
        except BadEnvelope:
            return None
        expires = stat.st_mtime + header.idle_timeout
        return (stat.st_ino, stat.st_mtime_ns, expires) if now > expires else None

    def _remove_one(self, session: _Expired, now: float) -> int:
        """Remove the expired *session* unless a request holds it; return 1 if this call
        removed its file. *has_lock*, *has_spare*: the subdirectory's listing (taken
        after *now*) had its lock file, its spare; *stamp*: the file that was read.

        With a lock file, the session is removed under its flock (taken without waiting:
        a request holding it is using it, so it is not idle), and only if its file is
        still the one read (same inode and mtime: a load touches it, a save replaces it).

        Without one, expiry is final, so the file is simply unlinked. A session's file
        changes only under its lock (``load`` touches it, ``save`` replaces it), and
        both refuse an expired session: ``load`` deletes it instead, ``save`` raises
        SessionConflict. A request that held the lock before the listing had its lock
        file listed (a lock file is never removed while its session file exists, except
        with it by ``delete``); one that locks later created or opened the lock file
        after the listing, hence after *now*, and so finds the session expired, if the
        clock reads later than *now*. That holds when the session expired before the
        earlier of *now* and the clock at the listing, less a margin that covers the
        clock being stepped back (then it is *clear*); a session nearer its expiry is
        moved aside first (a request arriving then finds no session), and put back for
        the locked way if a lock file appeared meanwhile.
        """
        subdir, sid = session.subdir, session.sid
        if session.has_lock:
            return self._remove_locked(subdir, sid, session.stamp, session.has_spare)
        if not session.clear:
            return self._remove_unlocked_carefully(subdir, sid, now)
        data_path = os.path.join(subdir, sid + DATA_SUFFIX)
        try:
            os.unlink(data_path)
        except FileNotFoundError:
            return 0  # a request found it expired and removed it first
        if session.has_spare:
            _unlink_quietly(_spare_path(data_path))
        return 1

    @staticmethod
    def _remove_locked(subdir: str, sid: str, stamp: tuple[int, int], has_spare: bool) -> int:
        data_path = os.path.join(subdir, sid + DATA_SUFFIX)
        lock_path = os.path.join(subdir, sid + LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # its holder removed the session meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # in use right now, so not idle
            if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                return 0  # its holder removed the session (and the lock file) meanwhile
            current = os.stat(data_path)
            if (current.st_ino, current.st_mtime_ns) != stamp:
                return 0  # used since it was read; the next sweep judges it afresh
            os.unlink(data_path)
            if has_spare:
                _unlink_quietly(_spare_path(data_path))
            _unlink_quietly(lock_path)  # we hold it, and it is still the one at the path
            return 1
        finally:
            os.close(fd)

    def _remove_unlocked_carefully(self, subdir: str, sid: str, now: float) -> int:
        """Remove the expired session *sid*, which had no lock file, near its expiry.

        It is moved out of sight first (a request arriving now finds no session, and a
        request holding it would have made the lock file); only if a lock file appeared
        meanwhile is it put back, for the locked way. (Creating a lock file only to
        delete it would double the cost.)
        """
        path = os.path.join(subdir, sid + DATA_SUFFIX)
        lock_path = os.path.join(subdir, sid + LOCK_SUFFIX)
        if not os.path.exists(lock_path):
            doomed = os.path.join(subdir, f".{os.urandom(6).hex()}{TEMP_SUFFIX}")
            os.rename(path, doomed)
            if not os.path.exists(lock_path):
                os.unlink(doomed)
                _unlink_quietly(_spare_path(path))
                return 1
            os.rename(doomed, path)
        try:
            held = self._lock(sid, 0)
        except LockTimeout:
            return 0  # in use right now, so not idle
        if held is None:
            return 0
        try:
            if self._expired_stamp(path, now) is None:
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
