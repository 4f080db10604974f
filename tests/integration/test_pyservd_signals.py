"""pyservd's signals behind a real Apache (shipped conf/apache-proxy-fcgi.conf): TERM stops
cleanly and promptly, HUP replaces the workers without a failed request, USR1 reopens the
log files."""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest
from apache import HttpResponse
from pyservd import Daemons, alive, get, run_load, start_site, wait_until

pytestmark = pytest.mark.integration


def test_term_exits_0_removes_socket_and_stops_workers(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    assert get(apache.base_url, "/testapp/Pid").status == 200
    workers = daemon.workers()

    daemon.signal(signal.SIGTERM)
    code = daemon.wait(10)

    assert code == 0, daemon.log_text()
    assert not daemon.socket.exists()
    assert not any(alive(pid) for pid in workers)
    assert f"pyservd {daemon.pid} stopped" in daemon.log_text()


def test_term_with_idle_keepalive_connections_stops_within_graceful_timeout(
    daemons: Daemons, apache_factory
) -> None:
    graceful_timeout = 2
    daemon, apache = start_site(
        daemons, apache_factory, server={"graceful_timeout": str(graceful_timeout)}
    )
    # Concurrent requests leave Apache with several pooled (enablereuse) connections.
    outcomes = run_load(lambda: get(apache.base_url, "/testapp/Pid"), clients=16, seconds=1)
    assert {o.status for o in outcomes} == {200}

    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(graceful_timeout + 5)
    stop_seconds = time.monotonic() - started

    assert code == 0, daemon.log_text()
    assert stop_seconds < graceful_timeout + 2, f"stopped after {stop_seconds:.1f} s"
    assert "did not stop in time" not in daemon.log_text()  # no worker needed SIGKILL


def test_hup_under_load_replaces_workers_without_a_failed_request(
    daemons: Daemons, apache_factory
) -> None:
    graceful_timeout = 3
    daemon, apache = start_site(
        daemons, apache_factory, server={"graceful_timeout": str(graceful_timeout)}
    )
    old = daemon.workers()

    def reload() -> None:
        time.sleep(0.7)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload complete: generation 2 serving")

    outcomes = run_load(
        lambda: get(apache.base_url, "/testapp/Pid", timeout=3),
        clients=16,
        seconds=3,
        during=reload,
    )

    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:3]}"
    wait_until(
        lambda: not any(alive(pid) for pid in old), graceful_timeout + 2, "old workers to exit"
    )
    new = daemon.workers()
    assert len(new) == 2 and not set(new) & set(old), (old, new)
    assert get(apache.base_url, "/testapp/Pid").status == 200


def test_usr1_reopens_log_files(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(
        daemons,
        apache_factory,
        server={"error_log": "error.log", "access_log": "access.log"},
    )
    error_log = daemon.work_dir / "error.log"
    access_log = daemon.work_dir / "access.log"
    assert get(apache.base_url, "/testapp/Pid?before").status == 200
    wait_until(lambda: "?before" in access_log.read_text(), 5, "the access log line")
    for path in (error_log, access_log):
        path.rename(path.with_suffix(".log.1"))

    daemon.signal(signal.SIGUSR1)
    wait_until(error_log.exists, 5, "a new error.log")
    time.sleep(0.3)  # the workers reopen on their own signal
    workers = daemon.workers()
    numbers = itertools.count()  # next() on it is atomic: safe from the load's threads

    def fail() -> HttpResponse:  # a failing servlet: its worker logs the traceback
        return get(apache.base_url, f"/testapp/Fail?token=token{next(numbers)}")

    def both_workers_logged() -> bool:  # concurrent requests reach both workers
        assert {o.status for o in run_load(fail, clients=8, seconds=0.2)} == {500}
        return all(f"pid={pid} level=ERROR" in error_log.read_text() for pid in workers)

    wait_until(both_workers_logged, 10, "both workers to log a failure", interval=0)
    os.kill(workers[0], signal.SIGKILL)  # the master logs the loss
    wait_until(lambda: f"worker {workers[0]} (gen" in error_log.read_text(), 5, "the master")

    new_text, old_text = error_log.read_text(), error_log.with_suffix(".log.1").read_text()
    for number in range(next(numbers)):
        assert f"deliberate failure token{number}\n" in new_text
    assert "token" not in old_text
    assert f"pid={daemon.pid} level=WARNING worker {workers[0]}" in new_text
    assert "SIGKILL" not in old_text
    assert "token0" in access_log.read_text()
    assert "token0" not in access_log.with_suffix(".log.1").read_text()
