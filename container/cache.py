"""The worker's in-memory session cache: a store wrapper, write-through and coherent.

Every save goes to the underlying store before the response is sent (write-through).
A load still takes the store's lock and reads the stored generation (a header read);
only when it equals the cached record's generation is the cached record used, so a
change by another worker, a mod_fcgid process or a CGI process is always seen, and a
cached session is served without unpickling. Bounded LRU of ``size`` sessions.

The cached dict is handed to the request that holds the session's lock; if that
request's changes are discarded (an exception), the entry is dropped, since the dict
may hold the discarded changes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from pyserv.stores.base import SessionLock, SessionRecord, SessionStore


class CachedStore(SessionStore):
    """Wraps *store*; thread-safe; one per application per worker."""

    def __init__(self, store: SessionStore, size: int) -> None:
        self.store = store
        self.envelope = store.envelope
        self.size = size
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._guard = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def lock(self, sid: str, timeout: float) -> SessionLock | None:
        return self.store.lock(sid, timeout)

    def load(self, sid: str, known: SessionRecord | None = None) -> SessionRecord | None:
        with self._guard:
            cached = self._records.get(sid)
        record = self.store.load(sid, known=cached)
        if record is None:
            self._forget(sid)
        else:
            self._remember(record)
        return record

    def save(self, record: SessionRecord, now: float) -> SessionRecord:
        try:
            stored = self.store.save(record, now)
        except BaseException:
            self._forget(record.sid)
            raise
        self._remember(stored)
        return stored

    def delete(self, sid: str) -> None:
        self._forget(sid)
        self.store.delete(sid)

    def discard(self, sid: str) -> None:
        self._forget(sid)
        self.store.discard(sid)

    def sweep(self, now: float) -> int:
        return self.store.sweep(now)

    def count(self) -> int:
        return self.store.count()

    def _remember(self, record: SessionRecord) -> None:
        if self.size == 0:
            return
        with self._guard:
            self._records[record.sid] = record
            self._records.move_to_end(record.sid)
            while len(self._records) > self.size:
                self._records.popitem(last=False)

    def _forget(self, sid: str) -> None:
        with self._guard:
            self._records.pop(sid, None)
