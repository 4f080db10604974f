"""What a row is, and how one row is measured at one connection count.

A measurement: create the row's session if it has one, warm up, time the file store's
save pattern in the row's session directory, read the counter (once the warm-up's last
requests have landed), load with wrk for the row's duration while sampling CPU, read the
counter again. The counter check compares what the server recorded with what wrk saw
answered: for a reused session the counter's increase, for a new session per request the
sessions stored. The server may have recorded up to one request per connection more than
wrk counted (requests still in flight when wrk stopped); fewer means lost updates.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from . import cpu, wrk
from .harness import COOKIE, http_get, session_id
from .sessions import count_sessions, replace_cost
from .site import Serving, Site

_COUNT = re.compile(rb"^count=(\d+)$", re.MULTILINE)  # the test servlet probe.Count
_VISITS = re.compile(rb"(\d+) previous visits")  # examples/thisapp.TestServlet, seed CGI
SETTLE_READS, SETTLE_PAUSE = 50, 0.05  # reads of the counter until the warm-up has landed


def _reader(pattern: re.Pattern[bytes]) -> Callable[[bytes], int]:
    def read(body: bytes) -> int:
        match = pattern.search(body)
        if match is None:
            raise ValueError(f"no counter in {body[:200]!r}")
        return int(match.group(1))

    return read


count_before = _reader(_COUNT)
visits_before = _reader(_VISITS)


@dataclass(frozen=True)
class Row:
    """One system under test. *counter* reads, from a response body, the session's count
    before that request added one; *session* is "none", "reused" or "new"."""

    key: str
    label: str
    backend: str  # see Site.serve
    path: str
    session: str = "none"
    counter: Callable[[bytes], int] | None = None
    warmup: float = 1.0  # seconds of load before measuring (mod_fcgid spawns lazily)


ROWS: tuple[Row, ...] = (
    Row("static", "Apache, static file", "static", "/hello.txt"),
    Row("flup", "bare flup WSGI hello world", "flup", "/flup/"),
    Row(
        "counter",
        "PyServ counter, one session reused",
        "pyservd:testapp",
        "/testapp/Count",
        "reused",
        count_before,
    ),
    Row(
        "new-session",
        "PyServ counter, new session per request",
        "pyservd:testapp",
        "/testapp/Count",
        "new",
    ),
    Row("no-session", "PyServ servlet without session", "pyservd:testapp", "/testapp/Pid"),
    Row(
        "workers-1",
        "PyServ counter, workers = 1",
        "pyservd:w1",
        "/w1/Count",
        "reused",
        count_before,
    ),
    Row(
        "no-reuse",
        "PyServ counter, proxy_fcgi without enablereuse",
        "pyservd:noreuse",
        "/noreuse/Count",
        "reused",
        count_before,
    ),
    Row(
        "redis",
        "PyServ counter, Redis store, two daemons",
        "balancer",
        "/redis/Count",
        "reused",
        count_before,
    ),
    Row(
        "fcgid",
        "PyServ counter through mod_fcgid",
        "fcgid",
        "/fcgid/Count",
        "reused",
        count_before,
        warmup=3.0,
    ),
    Row(
        "pyserv-cgi",
        "PyServ CGI, examples/testapp.cgi",
        "cgi",
        "/cgi-bin/testapp.cgi/TestServlet",
        "reused",
        visits_before,
    ),
    Row(
        "seed-cgi",
        "seed design as CGI (file, flock, pickle)",
        "cgi",
        "/cgi-bin/seed.cgi",
        "reused",
        visits_before,
    ),
    Row("hello-cgi", "Python hello-world CGI", "cgi", "/cgi-bin/hello.cgi"),
)


@dataclass(frozen=True)
class CounterCheck:
    """What the server recorded during the load against what wrk saw answered."""

    answered: int  # 2xx/3xx responses counted by wrk
    recorded: int  # counter increase, or sessions stored
    connections: int

    @property
    def lost(self) -> int:
        return max(0, self.answered - self.recorded)

    @property
    def in_flight(self) -> int:
        """Recorded but not seen by wrk: requests cut off when the load stopped."""
        return max(0, self.recorded - self.answered)


@dataclass(frozen=True)
class Measurement:
    row: Row
    connections: int
    load: wrk.WrkResult
    cpu: cpu.CpuSplit
    check: CounterCheck | None
    save_micros: float | None = None  # the store's save pattern, timed in its directory

    @property
    def app_micros_per_request(self) -> float:
        return self.cpu.app / self.load.requests * 1e6 if self.load.requests else 0.0


def new_session(url: str) -> str:
    """Request *url* without a cookie; return the session id it sets, without the route
    a daemon with ``session_route`` appends (``<id>.<route>``), so that a balancer picks a
    daemon for each request that sends it back."""
    response = http_get(url)
    if response.status != 200:
        raise RuntimeError(f"{url} answered {response.status}: {response.body[:300]!r}")
    return session_id(response).partition(".")[0]


def read_counter(row: Row, url: str, sid: str) -> int:
    """The row's counter before this request (which adds one to it)."""
    assert row.counter is not None
    response = http_get(url, headers={"Cookie": f"{COOKIE}={sid}"})
    if response.status != 200:
        raise RuntimeError(f"{url} answered {response.status}: {response.body[:300]!r}")
    return row.counter(response.body)


def measure(
    site: Site,
    serving: Serving,
    row: Row,
    *,
    connections: int,
    seconds: float,
    warmup: float | None = None,
) -> Measurement:
    """Measure *row* (its backend already running as *serving*)."""
    url = site.base_url + row.path
    headers: Sequence[str] = ()
    sid = ""
    if row.session == "reused":
        sid = new_session(url)
        headers = (f"Cookie: {COOKIE}={sid}",)
    warmup = row.warmup if warmup is None else warmup
    wrk.run(url, connections=connections, seconds=warmup, headers=headers)
    save_micros = None
    if row.session != "none" and serving.session_dir and serving.session_dir.is_dir():
        save_micros = replace_cost(serving.session_dir, count=200)
    total_before = _settled(row, serving, url, sid) if row.session != "none" else 0
    roots = serving.app_roots()
    in_apache = serving.app_cpu == "apache-tree"
    before = cpu.sample(site.apache_pid, roots, app_in_apache=in_apache)
    load = wrk.run(url, connections=connections, seconds=seconds, headers=headers)
    after = cpu.sample(site.apache_pid, roots, app_in_apache=in_apache)
    check = None
    if row.session != "none":
        # Reading the counter is itself a request that adds one.
        reads = 1 if row.session == "reused" else 0
        recorded = _recorded(row, serving, url, sid) - total_before - reads
        check = CounterCheck(load.answered, recorded, connections)
    split = cpu.CpuSplit.between(
        before, after, load.cpu_seconds, app_by_difference=serving.app_cpu == "difference"
    )
    return Measurement(row, connections, load, split, check, save_micros)


def _settled(row: Row, serving: Serving, url: str, sid: str) -> int:
    """:func:`_recorded` once the warm-up's last requests have landed.

    wrk exits without waiting for the requests it has in flight, and a read may take the
    session's lock before them (the Redis store's lock is not first come, first served),
    which would count them in the load's figures: read until a read finds nothing new
    but the previous read's own request.
    """
    own = 1 if row.session == "reused" else 0
    total = _recorded(row, serving, url, sid)
    for _ in range(SETTLE_READS):
        time.sleep(SETTLE_PAUSE)
        previous, total = total, _recorded(row, serving, url, sid)
        if total == previous + own:
            break
    return total


def _recorded(row: Row, serving: Serving, url: str, sid: str) -> int:
    """The server's running total for the counter check: the reused session's counter
    (before the reading request adds one), or the sessions stored."""
    if row.session == "reused":
        return read_counter(row, url, sid)
    assert serving.session_dir is not None
    return count_sessions(serving.session_dir)
