"""Many sessions in the file store's real format, written fast; and the sweep timed.

The scale figures need up to a million stored sessions. Going through the store (lock,
header check, temp file, replace) would take far longer than the rows that use them, so
:func:`write_sessions` writes what a save leaves behind directly: the envelope sealed by
:class:`pyserv.stores.base.Envelope` with the directory's own key, as
``DIR/ab/<id>.session`` (``ab``: the id's first two characters), mode 0600, mtime = last
access. pyservd then loads them like any session it saved itself. Started as root,
pyservd's workers run as another user and only trust a session directory that user owns:
*owner* (uid, gid) makes the directory, its files and its key theirs.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyserv.secret import load_or_create_secret
from pyserv.stores.base import Envelope, SessionRecord, new_session_id
from pyserv.stores.file import DATA_SUFFIX, FileStore

Progress = Callable[[int], None]
Owner = tuple[int, int]  # uid, gid


def envelope_for(session_dir: Path, owner: Owner | None = None) -> Envelope:
    """The envelope pyservd uses for *session_dir*: its default key file
    (``<session_dir>/.secret``), created if missing and given to *owner*."""
    key_path = session_dir / ".secret"

    def key() -> bytes:
        _make_directory(session_dir, owner)
        key = load_or_create_secret(str(key_path))
        if owner is not None:
            os.chown(key_path, *owner)
        return key

    return Envelope(key)


def _make_directory(path: str | Path, owner: Owner | None) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)


def write_sessions(
    session_dir: Path,
    envelope: Envelope,
    count: int,
    *,
    data: dict[str, Any] | None = None,
    timeout: int = 3600,
    owner: Owner | None = None,
) -> list[str]:
    """Store *count* new sessions holding *data*, last accessed now; return their ids."""
    data = {"count": 0} if data is None else data
    now = time.time()
    made: set[str] = set()
    _make_directory(session_dir, owner)
    ids = []
    for _ in range(count):
        sid = new_session_id()
        blob = envelope.seal(SessionRecord(sid, data, 1, now, now, timeout))
        subdir = os.path.join(session_dir, sid[:2])
        if subdir not in made:
            _make_directory(subdir, owner)
            made.add(subdir)
        path = os.path.join(subdir, sid + DATA_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        ids.append(sid)
    return ids


def age_sessions(session_dir: Path, ids: Iterable[str], idle_seconds: float) -> None:
    """Back-date the last access (the file's mtime) of sessions *ids* by *idle_seconds*:
    more than their timeout makes them expired, as the sweeper will find them."""
    then = time.time() - idle_seconds
    for sid in ids:
        os.utime(os.path.join(session_dir, sid[:2], sid + DATA_SUFFIX), (then, then))


def lock_sessions(session_dir: Path, envelope: Envelope, ids: Iterable[str]) -> None:
    """Lock and release each of sessions *ids* through the store, as a request does: each
    then has its stable ``<id>.lock`` file, as every session requested at least once has
    (the sweeper must take a session's lock before removing it)."""
    store = FileStore(str(session_dir), envelope)
    for sid in ids:
        held = store.lock(sid, 1.0)
        if held is None:
            raise RuntimeError(f"session {sid[:8]}… vanished before it could be locked")
        held.release()


def fill(
    session_dir: Path,
    envelope: Envelope,
    count: int,
    *,
    chunk: int = 50_000,
    progress: Progress | None = None,
    **options: Any,
) -> float:
    """Store *count* sessions (ids not kept) with one process per core; return seconds.

    Writing is mostly the kernel creating files, so processes, not threads.
    """
    started = time.perf_counter()
    key = envelope.key  # read (or create) the key file once, before the processes start
    _make_directory(session_dir, options.get("owner"))
    batches = [min(chunk, count - done) for done in range(0, count, chunk)]
    context = multiprocessing.get_context("fork")
    written = 0
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        futures = [pool.submit(_write_count, session_dir, key, batch, options) for batch in batches]
        for future in as_completed(futures):
            written += future.result()
            if progress is not None:
                progress(written)
    return time.perf_counter() - started


def _write_count(session_dir: Path, key: bytes, count: int, options: dict[str, Any]) -> int:
    """One batch of :func:`fill`, in a pool process (given the key: closures don't pickle)."""
    return len(write_sessions(session_dir, Envelope(lambda: key), count, **options))


def remove(session_dir: Path) -> float:
    """Delete *session_dir* and everything in it, one process per core; return seconds."""
    started = time.perf_counter()
    subdirs = [entry.path for entry in os.scandir(session_dir) if entry.is_dir()]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        list(pool.map(shutil.rmtree, subdirs, chunksize=64))
    shutil.rmtree(session_dir)
    return time.perf_counter() - started


def replace_cost(directory: Path, count: int = 500) -> float:
    """Microseconds to write a file into place the way the file store stores a new
    session (new temp file, write, close, ``os.replace``), measured in *directory*.

    Every new session pays this in the kernel; on a shared VM disk it varies by orders of
    magnitude with the file system and even with the directory, so the report shows it.
    """
    scratch = Path(tempfile.mkdtemp(prefix="bench-replace-", dir=directory))
    target = scratch / "session"
    blob = b"x" * 120
    try:
        target.write_bytes(blob)
        started = time.perf_counter()
        for index in range(count):
            temp = scratch / f".{index}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, blob)
            finally:
                os.close(fd)
            os.replace(temp, target)
        return (time.perf_counter() - started) / count * 1e6
    finally:
        shutil.rmtree(scratch)


def count_sessions(session_dir: Path) -> int:
    """Session files in *session_dir*, counted by the store itself (names only)."""
    return FileStore(str(session_dir), Envelope(_no_key)).count()


@dataclass(frozen=True)
class SweepTiming:
    stored: int
    removed: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's user + system time


def time_sweep(session_dir: Path, envelope: Envelope) -> SweepTiming:
    """Run ``FileStore.sweep`` once over *session_dir*, in this process, and time it."""
    store = FileStore(str(session_dir), envelope)
    stored = store.count()
    cpu_before, started = time.process_time(), time.perf_counter()
    removed = store.sweep(time.time())
    seconds = time.perf_counter() - started
    return SweepTiming(stored, removed, seconds, time.process_time() - cpu_before)


def _no_key() -> bytes:
    raise RuntimeError("counting sessions needs no key")
