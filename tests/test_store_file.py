"""FileStore: the conformance suite plus what only a directory of files can get wrong."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import itertools
import logging
import multiprocessing
import os
import pickle
import random
import re
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
from planted import malicious_payload, raw_envelope
from store_conformance import *  # noqa: F401,F403
from store_conformance import load_locked, make_record

from pyserv.secret import SecretError, load_or_create_secret
from pyserv.stores.base import (
    HEADER_SIZE,
    MAGIC,
    Envelope,
    LockTimeout,
    SessionValueError,
    StoreUnavailable,
    new_session_id,
)
from pyserv.stores.file import FileStore

# magic, generation, created, timeout, new_timeout: the documented envelope
HEADER_FORMAT = ">4sQdII"
MAC_SIZE = hashlib.sha256().digest_size


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "session.key"  # outside the session directory


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


def make_store(session_dir: Path, secret_file: Path, **options) -> FileStore:
    envelope = Envelope(lambda: load_or_create_secret(str(secret_file)))
    return FileStore(str(session_dir), envelope, **options)


@pytest.fixture
def store(session_dir: Path, secret_file: Path) -> FileStore:
    store = make_store(session_dir, secret_file)
    store.ensure_directory()
    return store


@pytest.fixture
def age_session(session_dir: Path):
    def age(sid: str, seconds: float) -> None:
        when = time.time() - seconds
        os.utime(data_path(session_dir, sid), (when, when))

    return age


@pytest.fixture
def store_contents(session_dir: Path):
    def contents() -> set[str]:
        return {
            str(path.relative_to(session_dir)) for path in session_dir.rglob("*") if path.is_file()
        }

    return contents


# -- helpers -------------------------------------------------------------------------


def data_path(session_dir: Path, sid: str) -> Path:
    return session_dir / sid[:2] / f"{sid}.session"


def lock_path(session_dir: Path, sid: str) -> Path:
    return session_dir / sid[:2] / f"{sid}.lock"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_gadget_works(tmp_path: Path) -> None:
    """The malicious payload really does create its marker when unpickled."""
    probe = tmp_path / "gadget-probe"
    pickle.loads(malicious_payload(probe))["x"].close()
    assert probe.exists()


# -- the conformance suite sanity ------------------------------------------------------


def test_envelope_layout_matches_the_documented_format():
    assert struct.calcsize(HEADER_FORMAT) == HEADER_SIZE


# -- permissions -----------------------------------------------------------------------


def test_ensure_directory_creates_the_session_directory_0700(umask_022, session_dir, secret_file):
    make_store(session_dir, secret_file).ensure_directory()

    assert mode_of(session_dir) == 0o700


def test_first_save_creates_a_missing_session_directory_0700(umask_022, session_dir, secret_file):
    store = make_store(session_dir, secret_file)  # no ensure_directory(): Application's way

    stored = store.save(make_record({"v": 1}), time.time())

    assert mode_of(session_dir) == 0o700
    assert mode_of(session_dir / stored.sid[:2]) == 0o700


def test_session_subdirectories_and_files_are_private(umask_022, store, session_dir):
    stored = store.save(make_record({"v": 1}), time.time())
    assert load_locked(store, stored.sid) is not None  # creates the lock file
    store.sweep(time.time())  # creates the sweep guard
    tampered = store.save(make_record({"v": 2}), time.time())
    path = data_path(session_dir, tampered.sid)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))
    assert load_locked(store, tampered.sid) is None  # creates the quarantine

    assert mode_of(session_dir / stored.sid[:2]) == 0o700
    assert mode_of(data_path(session_dir, stored.sid)) == 0o600
    assert mode_of(lock_path(session_dir, stored.sid)) == 0o600
    assert mode_of(session_dir / ".sweep.lock") == 0o600
    assert mode_of(session_dir / "quarantine") == 0o700
    (quarantined,) = (session_dir / "quarantine").iterdir()
    assert mode_of(quarantined) == 0o600


# -- atomic writes ---------------------------------------------------------------------


def test_save_leaves_no_temp_file(store, session_dir):
    stored = store.save(make_record({"v": 1}), time.time())
    lock = store.lock(stored.sid, 5.0)
    try:
        current = store.load(stored.sid)
        store.save(current, time.time())
    finally:
        lock.release()

    names = sorted(path.name for path in (session_dir / stored.sid[:2]).iterdir())
    assert names == [f"{stored.sid}.lock", f"{stored.sid}.session", f"{stored.sid}.spare"]


def test_crash_mid_write_keeps_old_value_and_sweep_removes_stale_temp(store, session_dir):
    stored = store.save(make_record({"v": "old"}), time.time())
    newer = store.envelope.seal(stored.successor({"v": "new"}, time.time()))
    temp = session_dir / stored.sid[:2] / ".0123456789ab.tmp"
    temp.write_bytes(newer[: len(newer) // 2])  # the crash: half a temp file, no replace

    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.data == {"v": "old"}

    assert store.sweep(time.time()) == 0
    assert temp.exists()  # a fresh temp file may be a write in progress
    hour_and_more = time.time() - 3700
    os.utime(temp, (hour_and_more, hour_and_more))
    assert store.sweep(time.time()) == 0
    assert not temp.exists()
    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.data == {"v": "old"}


def update(store: FileStore, sid: str, data: dict) -> None:
    lock = store.lock(sid, 5.0)
    try:
        current = store.load(sid)
        current.data.clear()
        current.data.update(data)
        store.save(current, time.time())
    finally:
        lock.release()


def test_updates_swap_two_files_instead_of_creating_one_per_write(store, session_dir):
    stored = store.save(make_record({"v": 0}), time.time())
    path = data_path(session_dir, stored.sid)
    inodes = set()
    for value in range(1, 6):
        update(store, stored.sid, {"v": value, "pad": "x" * (500 - 100 * value)})  # shrinks
        inodes.add(path.stat().st_ino)
        assert load_locked(store, stored.sid).data["v"] == value
    assert len(inodes) == 2  # the session file and its spare, swapped back and forth


def test_crash_while_writing_the_spare_keeps_the_old_value(store, session_dir):
    stored = store.save(make_record({"v": "old"}), time.time())
    update(store, stored.sid, {"v": "older"})
    update(store, stored.sid, {"v": "current"})
    spare = session_dir / stored.sid[:2] / f"{stored.sid}.spare"
    spare.write_bytes(b"half a write, then kill -9")  # the crash: no swap happened

    assert load_locked(store, stored.sid).data == {"v": "current"}
    update(store, stored.sid, {"v": "next"})  # the torn spare is simply overwritten
    assert load_locked(store, stored.sid).data == {"v": "next"}


def test_updates_fall_back_to_replace_where_files_cannot_be_swapped(store, monkeypatch):
    from pyserv.stores import file as file_module
    from pyserv.stores.exchange import ExchangeUnsupported

    def unsupported(first, second):
        raise ExchangeUnsupported(errno.EINVAL, "not on this file system")

    monkeypatch.setattr(file_module, "exchange", unsupported)
    stored = store.save(make_record({"v": 1}), time.time())
    update(store, stored.sid, {"v": 2})
    update(store, stored.sid, {"v": 3})
    assert load_locked(store, stored.sid).data == {"v": 3}


def test_sweep_removes_the_spare_of_a_session_moved_aside(store, session_dir):
    stored = store.save(make_record({"v": 1}), time.time())
    update(store, stored.sid, {"v": 2})
    spare = session_dir / stored.sid[:2] / f"{stored.sid}.spare"
    data_path(session_dir, stored.sid).unlink()  # as quarantine does
    store.sweep(time.time())
    assert spare.exists()  # young: could belong to a write in progress
    hour_and_more = time.time() - 3700
    os.utime(spare, (hour_and_more, hour_and_more))
    store.sweep(time.time())
    assert not spare.exists()


def test_delete_removes_the_spare_too(store, session_dir):
    stored = store.save(make_record({"v": 1}), time.time())
    update(store, stored.sid, {"v": 2})
    store.delete(stored.sid)
    assert list((session_dir / stored.sid[:2]).iterdir()) == []


def test_disk_full_during_write_raises_store_unavailable_and_keeps_old_value(
    store, session_dir, monkeypatch
):
    stored = store.save(make_record({"v": "old"}), time.time())
    lock = store.lock(stored.sid, 5.0)
    try:
        current = store.load(stored.sid)
        current.data["v"] = "new"

        def disk_full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as patch:
            patch.setattr(os, "write", disk_full)  # a new file (replace)
            patch.setattr(os, "pwrite", disk_full)  # the spare (swap)
            with pytest.raises(StoreUnavailable):
                store.save(current, time.time())
    finally:
        lock.release()

    assert not [p for p in (session_dir / stored.sid[:2]).iterdir() if p.suffix == ".tmp"]
    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.data == {"v": "old"}


def test_permission_denied_on_write_raises_store_unavailable(store, session_dir, monkeypatch):
    real_open = os.open

    def refuse_temp_files(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    record = make_record({"v": 1})
    assert store.envelope.key  # the secret exists before the disk turns hostile
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", refuse_temp_files)
        with pytest.raises(StoreUnavailable):
            store.save(record, time.time())

    assert not data_path(session_dir, record.sid).exists()


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root: root bypasses directory permissions, so chmod 0500 cannot "
    "make the session directory unwritable",
)
def test_unwritable_session_directory_raises_store_unavailable(store, session_dir):
    existing = store.save(make_record({"v": 1}), time.time())
    dirs = [session_dir, session_dir / existing.sid[:2]]
    for directory in dirs:
        directory.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailable):
            store.save(
                make_record({"v": 2}, sid=existing.sid[:2] + new_session_id()[2:]), time.time()
            )
        with pytest.raises(StoreUnavailable):
            store.save(make_record({"v": 3}), time.time())
    finally:
        for directory in dirs:
            directory.chmod(0o700)


def test_fsync_option_syncs_file_and_directory(session_dir, secret_file, monkeypatch):
    store = make_store(session_dir, secret_file, fsync=True)
    store.ensure_directory()
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    stored = store.save(make_record({"v": 1}), time.time())

    assert "file" in synced and "dir" in synced
    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.data == {"v": 1}


def test_without_fsync_option_nothing_is_synced(store, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)

    store.save(make_record({"v": 1}), time.time())

    assert synced == []


# -- ids never reach the disk unchecked ----------------------------------------------------


@pytest.mark.parametrize(
    "sid", ["../../etc/passwd", "A" * 42, "A" * 44, "A" * 42 + "/", "A" * 42 + "\x00", ""]
)
def test_malformed_id_is_refused_before_touching_the_disk(store, store_contents, sid):
    before = store_contents()

    with pytest.raises(ValueError):
        store.lock(sid, 1.0)
    with pytest.raises(ValueError):
        store.load(sid)

    assert store_contents() == before


# -- verification and quarantine ---------------------------------------------------------


def tampered_flipped_byte(store, sid, marker):
    """Correctly signed, then one payload byte flipped ("marker" -> "markes"): the pickle
    stays valid and would create a file, so only the signature check stops it."""
    blob = bytearray(raw_envelope(store.envelope.key, sid, malicious_payload(marker)))
    name = marker.name.encode()
    at = blob.rindex(name) + len(name) - 1
    assert at > HEADER_SIZE + MAC_SIZE
    blob[at] ^= 0x01
    return bytes(blob)


def tampered_swapped_payload(store, sid, marker):
    blob = data_path(Path(store.directory), sid).read_bytes()
    return blob[: HEADER_SIZE + MAC_SIZE] + malicious_payload(marker)


def tampered_wrong_key(store, sid, marker):
    return raw_envelope(b"0" * 64, sid, malicious_payload(marker))


def tampered_copied_from_other_id(store, sid, marker):
    other = new_session_id()
    return raw_envelope(store.envelope.key, other, malicious_payload(marker))


@pytest.mark.parametrize(
    "tamper",
    [
        tampered_flipped_byte,
        tampered_swapped_payload,
        tampered_wrong_key,
        tampered_copied_from_other_id,
    ],
)
def test_tampered_session_file_is_never_unpickled_and_is_quarantined(
    store, session_dir, tmp_path, caplog, tamper
):
    assert_gadget_works(tmp_path)
    marker = tmp_path / "unpickled-marker"
    stored = store.save(make_record({"v": 1}), time.time())
    path = data_path(session_dir, stored.sid)
    blob = tamper(store, stored.sid, marker)
    path.write_bytes(blob)
    caplog.set_level(logging.WARNING, logger="pyserv.error")

    assert load_locked(store, stored.sid) is None

    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("unpickled-marke")]
    assert not path.exists()
    (quarantined,) = (session_dir / "quarantine").iterdir()
    assert quarantined.read_bytes() == blob
    assert stored.sid not in quarantined.name
    warnings = [
        r for r in caplog.records if r.name == "pyserv.error" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert store.fingerprint(stored.sid) in message
    assert stored.sid not in message
    assert store.lock(stored.sid, 1.0) is None


def test_valid_signature_from_the_right_key_is_what_gets_unpickled(store, session_dir, tmp_path):
    """The control for the tampering tests: the same hand-built envelope, correctly
    signed for this id, does load, so the tests above fail for the right reason."""
    stored = store.save(make_record({"v": 1}), time.time())
    payload = pickle.dumps({"v": "hand-built"}, protocol=4)
    data_path(session_dir, stored.sid).write_bytes(
        raw_envelope(store.envelope.key, stored.sid, payload)
    )

    loaded = load_locked(store, stored.sid)

    assert loaded is not None and loaded.data == {"v": "hand-built"}


# -- sweep housekeeping --------------------------------------------------------------------


def test_sweep_removes_orphan_lock_files_only(store, session_dir):
    orphan = store.save(make_record({"v": 1}), time.time())
    live = store.save(make_record({"v": 2}), time.time())
    held = store.save(make_record({"v": 3}), time.time())
    for sid in (orphan.sid, live.sid, held.sid):
        assert load_locked(store, sid) is not None  # leaves a lock file behind
    data_path(session_dir, orphan.sid).unlink()  # a crash between the two unlinks of delete
    data_path(session_dir, held.sid).unlink()
    fd = os.open(lock_path(session_dir, held.sid), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # someone is still in the middle of it
        assert store.sweep(time.time()) == 0
        assert lock_path(session_dir, held.sid).exists()
    finally:
        os.close(fd)

    assert not lock_path(session_dir, orphan.sid).exists()
    assert lock_path(session_dir, live.sid).exists()
    assert store.sweep(time.time()) == 0
    assert not lock_path(session_dir, held.sid).exists()


# -- the lock file race ---------------------------------------------------------------------


@pytest.mark.parametrize("waiter_store", ["same store", "second store on the same directory"])
@pytest.mark.parametrize("recreate_lock_file", [False, True])
def test_deleted_and_recreated_lock_file_does_not_split_the_lock(
    store, session_dir, secret_file, waiter_store, recreate_lock_file
):
    other = store if waiter_store == "same store" else make_store(session_dir, secret_file)
    stored = store.save(make_record({"v": 1}), time.time())
    holder = store.lock(stored.sid, 5.0)
    assert holder is not None
    results: list[object] = []

    def waiter() -> None:
        try:
            results.append(other.lock(stored.sid, 5.0))
        except BaseException as exc:  # reported to the test thread
            results.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        time.sleep(0.2)  # the waiter is now queued on the lock
        assert thread.is_alive()
        store.delete(stored.sid)
        if recreate_lock_file:  # a newcomer opened the path meanwhile
            os.close(os.open(lock_path(session_dir, stored.sid), os.O_CREAT | os.O_RDWR, 0o600))
    finally:
        holder.release()
        thread.join(10.0)
    assert not thread.is_alive()

    assert results == [None]
    assert not data_path(session_dir, stored.sid).exists()
    assert store.lock(stored.sid, 0.5) is None


# -- the secret -----------------------------------------------------------------------------


def test_secret_is_created_0600_with_64_hex_chars_on_first_save(umask_022, store, secret_file):
    unknown = new_session_id()
    assert store.lock(unknown, 1.0) is None
    assert store.load(unknown) is None
    assert not secret_file.exists()  # nothing stored yet, so no key needed yet

    store.save(make_record({"v": 1}), time.time())

    assert mode_of(secret_file) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n?", secret_file.read_text())
    assert mode_of(secret_file.parent) == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=oct)
def test_secret_readable_by_others_is_refused_naming_chmod_600(store, secret_file, mode):
    secret_file.parent.mkdir(mode=0o700)
    secret_file.write_text("ab" * 32 + "\n")
    secret_file.chmod(mode)

    with pytest.raises(SecretError, match=re.escape(f"chmod 600 {secret_file}")):
        store.save(make_record({"v": 1}), time.time())


def _create_secret_in_child(path: str, out: str, start) -> None:
    start.wait(20.0)
    key = load_or_create_secret(path)
    with open(out, "wb") as stream:
        stream.write(key)


def test_concurrent_secret_creation_by_eight_processes_yields_one_key(tmp_path, secret_file):
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    outputs = [tmp_path / f"key-{i}" for i in range(8)]
    processes = [
        context.Process(target=_create_secret_in_child, args=(str(secret_file), str(out), start))
        for out in outputs
    ]
    for process in processes:
        process.start()
    try:
        time.sleep(0.5)  # let them all reach the starting line
        start.set()
        for process in processes:
            process.join(30.0)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5.0)

    assert [process.exitcode for process in processes] == [0] * 8
    keys = {out.read_bytes() for out in outputs}
    assert keys == {secret_file.read_bytes().strip()}
    assert re.fullmatch(rb"[0-9a-f]{64}", keys.pop())
    assert sorted(path.name for path in secret_file.parent.iterdir()) == [secret_file.name]


# -- envelope versions and limits -------------------------------------------------------


def test_session_written_before_new_timeout_existed_still_loads_and_sweeps(store, session_dir):
    sid = new_session_id()
    payload = pickle.dumps({"v": "from v1"}, protocol=4)
    header = struct.pack(">4sQdI", b"PSV1", 3, time.time(), 60)  # the first layout
    mac = hmac.new(store.envelope.key, header + sid.encode() + payload, hashlib.sha256)
    path = data_path(session_dir, sid)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(header + mac.digest() + payload)

    loaded = load_locked(store, sid)
    assert loaded is not None and loaded.data == {"v": "from v1"}
    assert (loaded.generation, loaded.timeout, loaded.new_timeout) == (3, 60, 0)
    saved = store.save(loaded, time.time())  # written back in the current layout
    assert path.read_bytes().startswith(MAGIC) and saved.generation == 4
    when = time.time() - 61
    os.utime(path, (when, when))
    assert store.sweep(time.time()) == 1


def test_provisional_session_is_swept_after_its_new_timeout(store, session_dir):
    now = time.time()
    provisional = store.save(make_record({"v": 1}).replace(new_timeout=60), now)
    confirmed = store.save(make_record({"v": 2}), now)
    for sid in (provisional.sid, confirmed.sid):
        os.utime(data_path(session_dir, sid), (now - 61, now - 61))

    assert store.sweep(time.time()) == 1
    assert not data_path(session_dir, provisional.sid).exists()
    assert data_path(session_dir, confirmed.sid).exists()


def test_session_over_the_envelope_size_limit_is_refused_before_any_write(session_dir, secret_file):
    store = make_store(session_dir, secret_file)
    store.envelope.max_bytes = 1000
    stored = store.save(make_record({"v": "small"}), time.time())
    before = data_path(session_dir, stored.sid).read_bytes()
    lock = store.lock(stored.sid, 5.0)
    try:
        current = store.load(stored.sid)
        with pytest.raises(SessionValueError, match=r"over max_session_bytes \(1000\)"):
            current.data["v"] = "x" * 2000
            store.save(current, time.time())
    finally:
        lock.release()

    assert data_path(session_dir, stored.sid).read_bytes() == before
    assert sorted(p.name for p in data_path(session_dir, stored.sid).parent.iterdir()) == [
        f"{stored.sid}.lock",
        f"{stored.sid}.session",
    ]


# -- a directory that turns read-only ----------------------------------------------------


@pytest.fixture
def read_only(session_dir: Path, monkeypatch):
    """``freeze()`` makes every write under *session_dir* fail with EROFS, as after
    ``mount -o remount,ro`` (tests/integration does the real thing as root)."""
    real = {name: getattr(os, name) for name in ("open", "utime", "unlink", "replace", "mkdir")}
    root = str(session_dir)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refuse(path: object) -> None:
        if isinstance(path, int) or str(path).startswith(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_open(path, flags, *args, **kwargs):
        if flags & writing:
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def guarded(name: str):
        def call(path, *args, **kwargs):
            refuse(path)
            return real[name](path, *args, **kwargs)

        return call

    def freeze() -> None:
        monkeypatch.setattr(os, "open", fake_open)
        for name in ("utime", "unlink", "replace", "mkdir"):
            monkeypatch.setattr(os, name, guarded(name))

    return freeze


def test_read_only_directory_still_serves_loads_and_refuses_writes_as_unavailable(
    store, session_dir, read_only
):
    locked_before = store.save(make_record({"v": "locked before"}), time.time())
    load_locked(store, locked_before.sid)  # it has a lock file now
    never_locked = store.save(make_record({"v": "never locked"}), time.time())
    assert store.envelope.key
    read_only()

    for stored in (locked_before, never_locked):
        lock = store.lock(stored.sid, 1.0)
        assert lock is not None
        try:
            current = store.load(stored.sid)
            assert current is not None and current.data == stored.data
            current.data["v"] = "new"
            with pytest.raises(StoreUnavailable):
                store.save(current, time.time())
            with pytest.raises(StoreUnavailable):
                store.delete(stored.sid)
        finally:
            lock.release()
    with pytest.raises(StoreUnavailable):
        store.save(make_record({"v": "brand new"}), time.time())
    assert store.sweep(time.time() + 7200) == 0
    assert not list(session_dir.rglob("*.tmp"))


def test_read_only_directory_still_serialises_requests_of_one_session(store, read_only):
    stored = store.save(make_record({"v": 1}), time.time())  # no lock file yet
    read_only()
    held = store.lock(stored.sid, 1.0)
    try:
        with pytest.raises(LockTimeout):
            store.lock(stored.sid, 0.1)
    finally:
        held.release()
    store.lock(stored.sid, 0.1).release()


def test_sweep_skips_a_session_locked_by_a_request(store, age_session, store_contents):
    """A request that locked a session the sweeper finds idle is using it: it stays."""
    expired = store.save(make_record({"v": "expired"}, timeout=60), time.time())
    busy = store.save(make_record({"v": "busy"}, timeout=60), time.time())
    age_session(expired.sid, 120)
    age_session(busy.sid, 120)
    lock = store.lock(busy.sid, 5.0)
    assert lock is not None
    try:
        removed = store.sweep(time.time())
        remaining = store_contents()
    finally:
        lock.release()

    assert removed == 1
    assert not any(expired.sid in name for name in remaining)
    assert any(busy.sid in name for name in remaining)
    assert store.sweep(time.time()) == 1  # unlocked now: the idle busy one goes too
    assert store.lock(busy.sid, 1.0) is None


def test_sweep_removes_a_never_locked_session_without_making_a_lock_file(
    store, age_session, session_dir
):
    idle = store.save(make_record({"v": "idle"}, timeout=60), time.time())  # never loaded
    age_session(idle.sid, 120)
    assert store.sweep(time.time()) == 1
    assert list((session_dir / idle.sid[:2]).iterdir()) == []


def test_sweep_puts_back_a_session_a_request_locked_while_it_was_moved(
    store, age_session, session_dir, monkeypatch
):
    """Near its expiry (a clock stepped back could make it live again for a request), a
    session without lock file is moved aside before it is removed."""
    idle = store.save(make_record({"v": "idle"}, timeout=60), time.time())
    age_session(idle.sid, 80)  # expired 20 s ago
    lock_path = session_dir / idle.sid[:2] / f"{idle.sid}.lock"
    real_rename = os.rename
    held: list[int] = []

    def rename_then_a_request_locks(source, target):
        real_rename(source, target)
        if not held:  # a request takes the lock right after the sweeper moved the file
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)

    monkeypatch.setattr(os, "rename", rename_then_a_request_locks)
    try:
        assert store.sweep(time.time()) == 0  # put back, then skipped: it is in use
    finally:
        for fd in held:
            os.close(fd)
    monkeypatch.undo()
    assert data_path(session_dir, idle.sid).exists()
    assert store.sweep(time.time()) == 1  # idle and unlocked now


def test_sweep_removes_a_long_expired_session_without_lock_file_outright(
    store, age_session, session_dir, monkeypatch
):
    """Expiry is final: a session expired well before the sweep, and never locked, is
    unlinked without first being moved aside."""
    idle = store.save(make_record({"v": "idle"}, timeout=60), time.time())
    age_session(idle.sid, 7200)

    def no_rename(source, target):
        raise AssertionError("moved aside")

    monkeypatch.setattr(os, "rename", no_rename)
    assert store.sweep(time.time()) == 1
    assert list((session_dir / idle.sid[:2]).iterdir()) == []


def test_sweep_leaves_a_session_used_between_its_read_and_its_lock(
    store, age_session, session_dir, monkeypatch
):
    """A request that loaded the session just before it expired touches it; the sweeper,
    having read the old mtime, finds the file changed once it holds the lock."""
    used = store.save(make_record({"v": "used"}, timeout=60), time.time())
    assert load_locked(store, used.sid) is not None  # a lock file, as after any request
    age_session(used.sid, 7200)
    real_stamp = FileStore._expired_stamp

    def stamp_then_touched(path, now):
        stamp = real_stamp(path, now)
        os.utime(path)  # the request's load, between the sweeper's read and its lock
        return stamp

    monkeypatch.setattr(FileStore, "_expired_stamp", staticmethod(stamp_then_touched))
    assert store.sweep(time.time()) == 0
    monkeypatch.undo()
    assert data_path(session_dir, used.sid).exists()
    assert load_locked(store, used.sid).data == {"v": "used"}


def test_sweep_threads_must_be_one_to_four(session_dir, secret_file):
    for threads in (0, 5):
        with pytest.raises(ValueError, match="sweep_threads"):
            make_store(session_dir, secret_file, sweep_threads=threads)


def _many_sessions(store, age_session, count: int, *, locked: bool) -> list[str]:
    sids = []
    for _ in range(count):
        record = store.save(make_record({"v": 1}, timeout=60), time.time())
        if locked:
            assert load_locked(store, record.sid) is not None
        age_session(record.sid, 7200)
        sids.append(record.sid)
    return sids


def test_sweep_removal_threads_run_at_once_and_the_count_is_exact(
    session_dir, secret_file, age_session, monkeypatch
):
    store = make_store(session_dir, secret_file, sweep_threads=3)
    store.ensure_directory()
    expired = _many_sessions(store, age_session, 40, locked=True)
    expired += _many_sessions(store, age_session, 40, locked=False)
    live = [store.save(make_record({"v": 2}), time.time()).sid for _ in range(20)]
    together = threading.Barrier(2, timeout=10.0)  # broken unless two threads run at once
    calls = itertools.count()
    names: set[str] = set()
    real_remove = FileStore._remove_expired

    def remove_expired(self, expired, now):
        names.add(threading.current_thread().name)
        if next(calls) < 2:
            together.wait()  # BrokenBarrierError, raised by sweep, if they run one by one
        return real_remove(self, expired, now)

    monkeypatch.setattr(FileStore, "_remove_expired", remove_expired)
    assert store.sweep(time.time()) == len(expired)
    assert len(names) >= 2 and all(name.startswith("pyserv-sweep") for name in names)
    remaining = {p.name for p in session_dir.rglob("*") if p.parent != session_dir}
    assert remaining == {f"{sid}.session" for sid in live}


def test_error_in_a_sweep_thread_is_raised_and_the_guard_released(
    session_dir, secret_file, age_session, monkeypatch
):
    store = make_store(session_dir, secret_file, sweep_threads=2)
    store.ensure_directory()
    sids = _many_sessions(store, age_session, 30, locked=False)
    failing = sids[0][:2]
    real_remove = FileStore._remove_expired

    def remove_expired(self, expired, now):
        if os.path.basename(expired[0].subdir) == failing:
            raise OSError(errno.EIO, "I/O error")
        return real_remove(self, expired, now)

    monkeypatch.setattr(FileStore, "_remove_expired", remove_expired)
    with pytest.raises(OSError, match="I/O error"):
        store.sweep(time.time())
    monkeypatch.undo()
    assert data_path(session_dir, sids[0]).exists()
    assert store.sweep(time.time()) >= 1  # not left locked by the failed sweep
    assert store.count() == 0


def _hold_sessions_in_child(session_dir, secret_file, sids, ready, release) -> None:
    store = make_store(Path(session_dir), Path(secret_file))
    held = [store.lock(sid, 5.0) for sid in sids]
    assert all(lock is not None for lock in held)
    ready.set()
    release.wait(60.0)
    for lock in held:
        lock.release()


def _request_sessions_in_child(session_dir, secret_file, sids, start) -> None:
    store = make_store(Path(session_dir), Path(secret_file))
    start.wait(30.0)
    for sid in sids:
        assert load_locked(store, sid) is None  # expired: refused (and removed) by load


def test_sweep_racing_real_requests_spares_held_sessions_and_counts_exactly(
    store, session_dir, secret_file, age_session, monkeypatch
):
    """A process holds some expired sessions, another requests the rest while two sweep
    threads remove them: the held ones stay, locks are not split, nothing is counted
    twice."""
    sids = _many_sessions(store, age_session, 120, locked=True)
    sids += _many_sessions(store, age_session, 60, locked=False)
    random.shuffle(sids)
    held, requested = sids[:20], sids[20:]
    context = multiprocessing.get_context("spawn")
    ready, release, start = context.Event(), context.Event(), context.Event()
    holder = context.Process(
        target=_hold_sessions_in_child,
        args=(str(session_dir), str(secret_file), held, ready, release),
    )
    requester = context.Process(
        target=_request_sessions_in_child,
        args=(str(session_dir), str(secret_file), requested[::-1], start),
    )
    holder.start()
    requester.start()
    unlinked: list[str] = []
    real_unlink = os.unlink

    def counting_unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if str(path).endswith(".session"):
            unlinked.append(str(path))

    try:
        assert ready.wait(30.0)
        monkeypatch.setattr(os, "unlink", counting_unlink)
        start.set()
        removed = store.sweep(time.time())
        monkeypatch.undo()
        requester.join(30.0)
        assert requester.exitcode == 0
        assert removed == len(unlinked) == len(set(unlinked))
        for sid in held:
            assert data_path(session_dir, sid).exists()
            with pytest.raises(LockTimeout):
                store.lock(sid, 0)  # the holder's lock file is still the one at the path
        for sid in requested:
            assert not data_path(session_dir, sid).exists()
    finally:
        release.set()
        for process in (holder, requester):
            process.join(30.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
    assert holder.exitcode == 0
    assert store.sweep(time.time()) == len(held)
    assert store.count() == 0


def test_sweep_never_unlinks_a_lock_file_it_did_not_lock(
    store, age_session, session_dir, monkeypatch
):
    """Between the sweeper's open and its flock the lock file at the path is replaced:
    the flock it gets is on the old file, so it must leave the new one (and the session)."""
    idle = store.save(make_record({"v": "idle"}, timeout=60), time.time())
    assert load_locked(store, idle.sid) is not None
    age_session(idle.sid, 7200)
    path = lock_path(session_dir, idle.sid)
    real_flock = fcntl.flock
    replaced: list[int] = []

    def flock_after_replacement(fd, operation):
        if not replaced and os.fstat(fd).st_ino == path.stat().st_ino:
            path.unlink()
            replaced.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_replacement)
    try:
        assert store.sweep(time.time()) == 0
    finally:
        monkeypatch.undo()
        for fd in replaced:
            os.close(fd)
    assert replaced and path.exists() and data_path(session_dir, idle.sid).exists()
