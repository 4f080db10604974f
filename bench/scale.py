"""The scale figures: many stored sessions, the sweeper, the session cache's memory.

- Stored sessions: the reused-session counter (the headline row) on a daemon whose
  session directory also holds 1k, then 1M other live sessions (written by
  :mod:`bench.sessions`; the daemon is restarted after each fill, as after a deploy).
  Its workers sweep the directory a few seconds after start and every minute; the
  rows start once the daemon has been idle for a while, and that wait is reported.
- Sweep: ``FileStore.sweep`` over N sessions, first all live (a pass that removes
  nothing, as a worker's periodic sweep mostly is), then all expired by ``os.utime``;
  then over N other expired sessions that were each locked once, as by a request: a
  session requested at least once keeps a lock file, which the sweeper must lock before
  it removes the session (the first N have none, as if never requested again).
- Memory: VmRSS of a single worker before and after N distinct sessions pass through
  its cache, N being the shipped ``session_cache_size``.
"""

from __future__ import annotations

import http.client
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cpu import resident_kib, wait_until_idle
from .harness import COOKIE, http_get
from .rows import Measurement, Row, count_before, measure
from .sessions import (
    SweepTiming,
    age_sessions,
    envelope_for,
    fill,
    lock_sessions,
    remove,
    time_sweep,
    write_sessions,
)
from .site import Site, shipped_settings

Say = Callable[[str], None]


@dataclass(frozen=True)
class StoredSessions:
    stored: int  # other sessions in the directory
    write_seconds: float  # to write the ones added for this step
    settle_seconds: float  # from "workers serving" until the daemon was idle for 6 s
    measurements: list[Measurement]


def label(count: int) -> str:
    """1000 → "1k", 1000000 → "1M"."""
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def stored_sessions(
    site: Site,
    counts: Sequence[int],
    connections: Sequence[int],
    *,
    seconds: float,
    say: Say,
) -> list[StoredSessions]:
    """Measure the counter with each of *counts* (ascending) other sessions stored."""
    session_dir = site.session_dir("scale")
    envelope = envelope_for(session_dir, site.session_owner)
    results, stored = [], 0
    for count in counts:
        say(f"writing {count - stored} sessions ({label(count)} in all)")
        took = fill(
            session_dir,
            envelope,
            count - stored,
            owner=site.session_owner,
            progress=lambda done, base=stored: say(f"  {label(base + done)} stored"),
        )
        stored = count
        row = Row(
            f"stored-{label(count)}",
            f"PyServ counter, {label(count)} sessions stored",
            "pyservd:scale",
            "/scale/Count",
            "reused",
            count_before,
        )
        with site.serve(row.backend) as serving:
            say("waiting until the daemon is idle (its start-up sweep done)")
            settle = wait_until_idle(serving.app_roots)
            measurements = []
            for each in connections:
                say(f"{row.label}, {each} connection(s)")
                measurements.append(measure(site, serving, row, connections=each, seconds=seconds))
        results.append(StoredSessions(count, took, settle, measurements))
    say(f"removing the {label(stored)} stored sessions")
    remove(session_dir)
    return results


@dataclass(frozen=True)
class Sweeps:
    sessions: int
    live: SweepTiming  # nothing expired: a pass that only reads
    expired: SweepTiming  # every session expired, none ever locked: no lock files
    expired_locked: SweepTiming  # every session expired after a request: lock files


def sweeps(site: Site, count: int, *, say: Say) -> Sweeps:
    """Time ``FileStore.sweep`` over *count* live, then *count* expired sessions; then
    over *count* expired sessions that each have a lock file."""
    session_dir = Path(tempfile.mkdtemp(prefix="sweep-", dir=site.work_dir)) / "sessions"
    envelope = envelope_for(session_dir)
    say(f"writing {label(count)} sessions to sweep")
    ids = write_sessions(session_dir, envelope, count)
    say("sweeping them while live")
    live = time_sweep(session_dir, envelope)
    age_sessions(session_dir, ids, idle_seconds=2 * 3600 + 60)  # past the 3600 s timeout
    say("sweeping them once expired")
    expired = time_sweep(session_dir, envelope)
    say(f"writing {label(count)} sessions and locking each once")
    ids = write_sessions(session_dir, envelope, count)
    lock_sessions(session_dir, envelope, ids)
    age_sessions(session_dir, ids, idle_seconds=2 * 3600 + 60)
    say("sweeping them once expired")
    expired_locked = time_sweep(session_dir, envelope)
    return Sweeps(count, live, expired, expired_locked)


@dataclass(frozen=True)
class CacheMemory:
    cache_size: int
    answered: int  # 2xx/3xx responses of the pass over the sessions
    baseline_kib: int  # the worker with one cached session
    filled_kib: int  # after every session passed through its cache
    same_worker: bool  # no worker replacement meanwhile

    @property
    def per_session_bytes(self) -> float:
        extra = (self.filled_kib - self.baseline_kib) * 1024
        return extra / self.cache_size if self.cache_size else 0.0


def cache_memory(site: Site, *, say: Say) -> CacheMemory:
    """RSS of the one worker of the ``cache`` variant, empty and full."""
    cache_size = int(shipped_settings()[1].get("session_cache_size", "10000"))
    session_dir = site.session_dir("cache")
    say(f"writing {cache_size} sessions to cache")
    owner = site.session_owner
    ids = write_sessions(session_dir, envelope_for(session_dir, owner), cache_size, owner=owner)
    url = site.base_url + "/cache/Count"
    with site.pyservd("cache") as daemon:
        (worker,) = daemon.workers()
        http_get(url, headers={"Cookie": f"{COOKIE}={ids[0]}"})
        baseline = resident_kib(worker)
        say(f"one request for each of the {cache_size} sessions")
        answered = _request_each(url, ids)
        filled = resident_kib(worker)
        same = daemon.workers() == [worker]
    return CacheMemory(cache_size, answered, baseline, filled, same)


def _request_each(url: str, session_ids: Sequence[str], clients: int = 4) -> int:
    """GET *url* once with each session's cookie, from *clients* keep-alive connections;
    return how many answered 200. (wrk cannot stop after one pass over a list.)"""
    parts = urllib.parse.urlsplit(url)
    answered = 0
    lock = threading.Lock()

    def client(share: Sequence[str]) -> None:
        nonlocal answered
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        ok = 0
        try:
            for sid in share:
                connection.request("GET", parts.path, headers={"Cookie": f"{COOKIE}={sid}"})
                response = connection.getresponse()
                response.read()
                ok += response.status == 200
        finally:
            connection.close()
            with lock:
                answered += ok

    threads = [
        threading.Thread(target=client, args=(session_ids[i::clients],)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered
