"""The worker's session cache: no unpickling when current, never stale, bounded."""

from __future__ import annotations

import time

import pytest

from container.cache import CachedStore
from pyserv.stores import base
from pyserv.stores.base import Envelope, SessionConflict, SessionRecord, new_session_id
from pyserv.stores.file import FileStore

KEY = b"k" * 32


def stores(tmp_path, size=10):
    def make():
        return FileStore(str(tmp_path / "s"), Envelope(lambda: KEY))

    return CachedStore(make(), size), make()


def new_record(data):
    now = time.time()
    return SessionRecord(new_session_id(), data, 0, now, now, 3600)


def test_a_current_cached_session_is_served_without_unpickling(tmp_path, monkeypatch):
    cached, _ = stores(tmp_path)
    stored = cached.save(new_record({"visits": 1}), time.time())
    calls = []
    real_loads = base.pickle.loads  # what the envelope unpickles with
    monkeypatch.setattr(
        base.pickle, "loads", lambda *a, **k: calls.append(1) or real_loads(*a, **k)
    )
    lock = cached.lock(stored.sid, 1)
    record = cached.load(stored.sid)
    lock.release()
    assert record.data == {"visits": 1} and record is stored
    assert calls == []


def test_a_change_by_another_process_is_seen_not_the_stale_copy(tmp_path):
    cached, other = stores(tmp_path)
    stored = cached.save(new_record({"visits": 1}), time.time())
    lock = other.lock(stored.sid, 1)
    theirs = other.load(stored.sid)
    theirs.data["visits"] = 2
    other.save(theirs, time.time())
    lock.release()
    lock = cached.lock(stored.sid, 1)
    assert cached.load(stored.sid).data == {"visits": 2}
    lock.release()


def test_a_discarded_request_drops_the_possibly_dirty_copy(tmp_path):
    cached, _ = stores(tmp_path)
    stored = cached.save(new_record({"visits": 1}), time.time())
    lock = cached.lock(stored.sid, 1)
    record = cached.load(stored.sid)
    record.data["visits"] = 99  # the servlet changed it, then raised
    cached.discard(stored.sid)
    lock.release()
    lock = cached.lock(stored.sid, 1)
    assert cached.load(stored.sid).data == {"visits": 1}
    lock.release()


def test_a_failed_save_leaves_nothing_cached(tmp_path):
    cached, other = stores(tmp_path)
    stored = cached.save(new_record({"v": 1}), time.time())
    other.delete(stored.sid)
    with pytest.raises(SessionConflict):
        cached.save(stored, time.time())
    assert len(cached) == 0


def test_the_cache_is_bounded_least_recently_used_first(tmp_path):
    cached, _ = stores(tmp_path, size=3)
    records = [cached.save(new_record({"n": n}), time.time()) for n in range(5)]
    assert len(cached) == 3
    assert set(cached._records) == {r.sid for r in records[2:]}
