"""The conformance suite every session store backend must pass.

A backend's test module provides three fixtures and star-imports this module:

- ``store``: a fresh, empty :class:`~pyserv.stores.base.SessionStore`;
- ``age_session``: ``age(sid, seconds)`` makes the stored session's last access *seconds*
  older, as if it had been idle that long;
- ``store_contents``: ``contents()`` returns the set of names the backend holds now (file
  paths, keys), each naming the session id it belongs to.

Times are real: a backend must not be tested with a mocked clock it does not use.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pyserv.stores.base import (
    LockTimeout,
    SessionConflict,
    SessionRecord,
    SessionValueError,
    new_session_id,
)


def make_record(
    data: dict[str, Any] | None = None, *, timeout: int = 3600, sid: str | None = None
) -> SessionRecord:
    """A brand-new record (generation 0) as SessionInterface builds one."""
    now = time.time()
    return SessionRecord(sid or new_session_id(), dict(data or {}), 0, now, now, timeout)


def load_locked(store: Any, sid: str) -> SessionRecord | None:
    """Load *sid* the way the contract says: under its lock."""
    lock = store.lock(sid, 5.0)
    if lock is None:
        return None
    try:
        return store.load(sid)
    finally:
        lock.release()


class UnpickleCounter:
    """A session value that counts how often any instance was unpickled."""

    unpickled = 0

    def __init__(self) -> None:
        self.value = 1  # non-empty state, so unpickling calls __setstate__

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).unpickled += 1
        self.__dict__.update(state)


def test_lock_of_unknown_id_returns_none_and_creates_nothing(store, store_contents):
    existing = store.save(make_record({"n": 1}), time.time())
    before = store_contents()
    unknown = new_session_id()

    assert store.lock(unknown, 1.0) is None
    assert store.load(unknown) is None

    assert store_contents() == before
    assert any(existing.sid in name for name in before)
    assert not any(unknown in name for name in store_contents())


def test_new_record_round_trips_through_lock_and_load(store):
    record = make_record({"n": 1, "nested": [1, {"b": b"\x00bytes"}]}, timeout=123)
    before_save = time.time()

    stored = store.save(record, time.time())

    assert stored.generation == 1
    assert stored.sid == record.sid
    assert stored.size > 0
    loaded = load_locked(store, record.sid)
    assert loaded is not None
    assert loaded.data == {"n": 1, "nested": [1, {"b": b"\x00bytes"}]}
    assert loaded.created == record.created
    assert loaded.timeout == 123
    assert loaded.generation == 1
    assert loaded.last_access >= before_save


def test_saving_a_new_record_over_an_existing_id_raises_conflict(store):
    stored = store.save(make_record({"owner": "first"}), time.time())

    with pytest.raises(SessionConflict):
        store.save(make_record({"owner": "second"}, sid=stored.sid), time.time())

    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.data == {"owner": "first"}


def test_saving_a_stale_generation_raises_conflict_and_keeps_stored_data(store):
    first = store.save(make_record({"v": 1}), time.time())
    lock = store.lock(first.sid, 5.0)
    assert lock is not None
    try:
        current = store.load(first.sid)
        assert current is not None
        current.data["v"] = 2
        second = store.save(current, time.time())
        assert second.generation == 2

        stale = first.replace(data={"v": "stale"})
        with pytest.raises(SessionConflict):
            store.save(stale, time.time())

        loaded = store.load(first.sid)
    finally:
        lock.release()
    assert loaded is not None
    assert loaded.data == {"v": 2}
    assert loaded.generation == 2


def test_save_after_delete_raises_conflict_and_does_not_resurrect(store, store_contents):
    stored = store.save(make_record({"v": 1}), time.time())
    lock = store.lock(stored.sid, 5.0)
    assert lock is not None
    try:
        current = store.load(stored.sid)
        assert current is not None
        store.delete(stored.sid)
        current.data["v"] = 2
        with pytest.raises(SessionConflict):
            store.save(current, time.time())
    finally:
        lock.release()

    assert store.lock(stored.sid, 1.0) is None
    assert store.load(stored.sid) is None
    assert store.load(stored.sid, known=current) is None  # a cached copy does not revive it
    assert not any(stored.sid in name for name in store_contents())


def test_loading_an_expired_record_returns_none_and_removes_it(store, age_session, store_contents):
    stored = store.save(make_record({"v": 1}, timeout=60), time.time())
    age_session(stored.sid, 120)

    assert load_locked(store, stored.sid) is None

    assert not any(stored.sid in name for name in store_contents())
    assert store.lock(stored.sid, 1.0) is None


def test_record_idle_for_less_than_its_timeout_still_loads(store, age_session):
    stored = store.save(make_record({"v": 1}, timeout=60), time.time())
    age_session(stored.sid, 30)

    loaded = load_locked(store, stored.sid)

    assert loaded is not None and loaded.data == {"v": 1}


def test_late_save_after_expiry_raises_conflict_and_nothing_reappears(
    store, age_session, store_contents
):
    stored = store.save(make_record({"v": 1}, timeout=60), time.time())
    lock = store.lock(stored.sid, 5.0)
    assert lock is not None
    try:
        current = store.load(stored.sid)
        assert current is not None
        age_session(stored.sid, 120)  # the request took longer than the idle timeout
        current.data["v"] = 2
        with pytest.raises(SessionConflict):
            store.save(current, time.time())
    finally:
        lock.release()

    assert load_locked(store, stored.sid) is None
    assert not any(stored.sid in name for name in store_contents())
    with pytest.raises(SessionConflict):
        store.save(current, time.time())
    assert not any(stored.sid in name for name in store_contents())


def test_lock_held_by_another_thread_times_out_after_the_lock_timeout(store):
    stored = store.save(make_record({"v": 1}), time.time())
    held = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            lock = store.lock(stored.sid, 5.0)
            assert lock is not None
            held.set()
            done.wait(10.0)
            lock.release()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
            held.set()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(5.0)
        assert not errors
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            store.lock(stored.sid, 0.3)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        thread.join(10.0)
    assert not thread.is_alive()
    assert not errors
    assert 0.25 <= elapsed < 2.0

    lock = store.lock(stored.sid, 1.0)
    assert lock is not None
    lock.release()
    lock.release()  # idempotent


def test_load_with_known_record_of_current_generation_skips_unpickling(store):
    stored = store.save(make_record({"probe": UnpickleCounter()}), time.time())
    lock = store.lock(stored.sid, 5.0)
    assert lock is not None
    try:
        UnpickleCounter.unpickled = 0
        first = store.load(stored.sid)
        assert first is not None
        assert UnpickleCounter.unpickled == 1

        again = store.load(stored.sid, known=first)

        assert again is first
        assert UnpickleCounter.unpickled == 1
    finally:
        lock.release()


def test_load_with_known_record_returns_fresh_record_after_another_write(store):
    stored = store.save(make_record({"probe": UnpickleCounter()}), time.time())
    lock = store.lock(stored.sid, 5.0)
    assert lock is not None
    try:
        UnpickleCounter.unpickled = 0
        cached = store.load(stored.sid)
        assert cached is not None
        other_writer = cached.replace(data={"probe": UnpickleCounter(), "other": True})
        newer = store.save(other_writer, time.time())

        fresh = store.load(stored.sid, known=cached)
    finally:
        lock.release()
    assert fresh is not None and fresh is not cached
    assert fresh.generation == newer.generation == cached.generation + 1
    assert fresh.data["other"] is True
    assert UnpickleCounter.unpickled == 2


def test_unpicklable_value_raises_value_error_naming_the_key(store, store_contents):
    record = make_record({"fine": 1, "bad": threading.Lock()})

    with pytest.raises(SessionValueError, match="'bad'"):
        store.save(record, time.time())

    assert not any(record.sid in name for name in store_contents())


def test_expired_sessions_go_and_live_ones_stay(store, age_session, store_contents):
    """However a backend expires sessions (a sweep, or the server itself), an idle one is
    gone after a sweep, and a live one is untouched."""
    expired = store.save(make_record({"v": "expired"}, timeout=60), time.time())
    live = store.save(make_record({"v": "live"}, timeout=60), time.time())
    age_session(expired.sid, 120)

    store.sweep(time.time())

    assert not any(expired.sid in name for name in store_contents())
    assert store.lock(expired.sid, 1.0) is None
    loaded_live = load_locked(store, live.sid)
    assert loaded_live is not None and loaded_live.data == {"v": "live"}
