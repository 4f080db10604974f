"""Per-key thread locks: threads of one process queue for a session without polling.

Both stores take one of these before their cross-process lock (flock, a Redis key), so
only one thread per process polls for a busy session and the others wait in line.
"""

from __future__ import annotations

from _thread import allocate_lock  # threading.Lock, without importing threading (CGI)


class KeyedLocks:
    """Per-key thread locks that exist only while someone holds or waits for them."""

    def __init__(self) -> None:
        self._guard = allocate_lock()
        self._entries: dict[str, list] = {}  # key -> [lock, holders + waiters]

    def acquire(self, key: str, timeout: float) -> bool:
        with self._guard:
            entry = self._entries.setdefault(key, [allocate_lock(), 0])
            entry[1] += 1
        if entry[0].acquire(timeout=max(timeout, 0)):
            return True
        self._forget(key, entry)
        return False

    def release(self, key: str) -> None:
        entry = self._entries[key]
        entry[0].release()
        self._forget(key, entry)

    def _forget(self, key: str, entry: list) -> None:
        with self._guard:
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[key]
