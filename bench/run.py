"""One benchmark run: the plan (how long, how many sessions) and everything it measured.

Backends run one at a time, in the order of :data:`bench.rows.ROWS`; a backend that fails
is recorded in ``Results.failures`` and the run goes on, so one broken row still leaves
a report of the others.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import cpu, scale, sessions
from .rows import ROWS, Measurement, Row, measure
from .site import MAIN, Site

Say = Callable[[str], None]
CONNECTIONS = (16, 1)


@dataclass(frozen=True)
class Plan:
    quick: bool
    seconds: float  # of load per row and connection count
    stored_counts: tuple[int, ...]  # other sessions stored, ascending
    sweep_count: int
    connections: tuple[int, ...] = CONNECTIONS
    rows: tuple[Row, ...] = ROWS

    @classmethod
    def make(cls, *, quick: bool, seconds: float | None = None) -> Plan:
        """Full: 10 s a row, 1k and 1M stored sessions. Quick: 3 s, 1k and 100k."""
        if quick:
            return cls(True, seconds or 3.0, (1000, 100_000), 100_000)
        return cls(False, seconds or 10.0, (1000, 1_000_000), 100_000)


@dataclass
class Results:
    plan: Plan
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    measurements: list[Measurement] = field(default_factory=list)
    stored: list[scale.StoredSessions] = field(default_factory=list)
    sweeps: scale.Sweeps | None = None
    memory: scale.CacheMemory | None = None
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    daemon_python: str = sys.executable  # what pyservd and flup ran on
    background_cores: float = 0.0  # busy before the run started (a shared machine?)
    replace_micros: dict[str, float] = field(default_factory=dict)  # where -> µs per save

    def get(self, key: str, connections: int) -> Measurement | None:
        for each in self.all_measurements():
            if each.row.key == key and each.connections == connections:
                return each
        return None

    def all_measurements(self) -> Iterator[Measurement]:
        yield from self.measurements
        for step in self.stored:
            yield from step.measurements


def _by_backend(rows: tuple[Row, ...]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.backend, []).append(row)
    return groups


def run(plan: Plan, say: Say) -> Results:
    """Deploy the site, measure every row, then the scale figures; never raises for a
    failing backend (see the module docstring)."""
    results = Results(plan)
    started = time.monotonic()
    results.background_cores = cpu.machine_cores_busy(2.0)
    say(f"background load before starting: {results.background_cores:.2f} cores busy")
    with Site() as site:
        say(f"Apache on {site.base_url}, work directory {site.work_dir}")
        results.daemon_python = site.daemon_python
        _calibrate(site, results, "at start")
        for backend, rows in _by_backend(plan.rows).items():
            with _failure_recorded(results, say, backend):
                _measure_rows(site, plan, backend, rows, say, results)
        with _failure_recorded(results, say, "stored sessions"):
            results.stored = scale.stored_sessions(
                site, plan.stored_counts, plan.connections, seconds=plan.seconds, say=say
            )
        with _failure_recorded(results, say, "sweep"):
            results.sweeps = scale.sweeps(site, plan.sweep_count, say=say)
        with _failure_recorded(results, say, "cache memory"):
            results.memory = scale.cache_memory(site, say=say)
        _calibrate(site, results, "at end")
        say("stopping everything and removing the work directory")
    results.elapsed = time.monotonic() - started
    return results


def _calibrate(site: Site, results: Results, when: str) -> None:
    """Time the file store's save pattern where the daemons keep sessions, and in tmpfs."""
    places = {"daemon work directory": site.session_dir(MAIN).parent}
    if Path("/dev/shm").is_dir():
        places["tmpfs (/dev/shm)"] = Path("/dev/shm")
    for name, directory in places.items():
        results.replace_micros[f"{name}, {when}"] = sessions.replace_cost(directory)


def _measure_rows(
    site: Site, plan: Plan, backend: str, rows: list[Row], say: Say, results: Results
) -> None:
    with site.serve(backend) as serving:
        for row in rows:
            for connections in plan.connections:
                say(f"{row.label}, {connections} connection(s)")
                results.measurements.append(
                    measure(site, serving, row, connections=connections, seconds=plan.seconds)
                )


@contextlib.contextmanager
def _failure_recorded(results: Results, say: Say, what: str) -> Iterator[None]:
    """Record an exception in *results* and carry on (Ctrl-C still stops the run)."""
    try:
        yield
    except Exception as exc:
        say(f"{what} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results.failures.append(f"{what}: {type(exc).__name__}: {exc}")
