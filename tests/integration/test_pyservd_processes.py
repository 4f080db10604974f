"""pyservd's process model behind a real Apache (shipped conf/apache-proxy-fcgi.conf):
workers replaced when killed or stuck, servlet init()/destroy(), the socket."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import time

import pytest
from pyservd import (
    Daemons,
    Pyservd,
    body_number,
    get,
    group_members,
    proxy_fcgi_apache_config,
    run_load,
    session_id,
    start_site,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


# -- workers replaced ---------------------------------------------------------------------


def test_killed_worker_is_replaced_and_only_its_requests_fail(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    victim, survivor = daemon.workers()
    clients = 8
    events: dict[str, float] = {}

    def kill_one_worker() -> None:
        time.sleep(1)
        events["killed"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for_workers(2, exclude={victim})
        events["replaced"] = time.monotonic()

    outcomes = run_load(
        lambda: get(apache.base_url, "/testapp/Pid", timeout=5),
        clients=clients,
        seconds=4,
        during=kill_one_worker,
    )

    failed = [o for o in outcomes if o.status != 200]
    assert len(failed) <= clients, f"{len(failed)} failures: {failed[:3]}"
    assert all(o.started < events["replaced"] for o in failed), failed
    after = [o for o in outcomes if o.started > events["replaced"]]
    assert len(after) > 10, "the load ended before the replacement"
    survivor_answers = [
        o for o in outcomes if o.status == 200 and body_number(o.body, "pid") == survivor
    ]
    assert any(o.finished < events["killed"] for o in survivor_answers)
    assert any(o.started > events["killed"] for o in survivor_answers)
    assert f"worker {victim} (generation 1) killed by SIGKILL" in daemon.log_text()


def test_request_past_timeout_replaces_worker_and_discards_its_session_write(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = start_site(daemons, apache_factory, server={"request_timeout": "2"})
    first = get(apache.base_url, "/testapp/Count")
    sid = session_id(first)
    before = set(daemon.workers())

    started = time.monotonic()
    stuck = get(apache.base_url, "/testapp/Sleep?seconds=15", sid, timeout=20)
    stuck_seconds = time.monotonic() - started
    started = time.monotonic()
    after = get(apache.base_url, "/testapp/Count", sid, timeout=10)
    after_seconds = time.monotonic() - started

    assert 500 <= stuck.status < 600, stuck
    assert stuck_seconds < 6, f"answered after {stuck_seconds:.1f} s"
    assert after.status == 200, (after, daemon.log_text(), apache.error_log_text())
    assert body_number(after.body, "count") == 1, "the stuck request's session change was saved"
    assert after_seconds < 1.5, f"the session stayed locked for {after_seconds:.1f} s"
    wait_until(
        lambda: len(set(daemon.workers()) - before) == 1 and len(daemon.workers()) == 2,
        5,
        "the stuck worker to be replaced",
    )
    assert "request_timeout 2 s" in daemon.log_text()


# -- servlet init() and destroy() -----------------------------------------------------------


def lifecycle_lines(daemon: Pyservd) -> list[str]:
    path = daemon.work_dir / "apps" / "lifecycle.log"
    return path.read_text().splitlines() if path.exists() else []


def test_init_runs_once_per_worker_before_serving_and_destroy_at_stop(
    daemons: Daemons, apache_factory
) -> None:
    work_dir = daemons.work_dir()
    config = write_config(work_dir, app={"module": "lifecycle"})
    socket_path = work_dir / "run" / "pyservd.sock"
    apache = apache_factory(
        ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(socket_path)
    )

    daemon = daemons.start(config, wait="socket")
    response = get(apache.base_url, "/testapp/Life")
    lines_at_first_answer = lifecycle_lines(daemon)
    daemon.wait_for_log(f"pyservd {daemon.pid} ready")
    workers = daemon.workers()
    for _ in range(5):
        assert get(apache.base_url, "/testapp/Life").status == 200

    assert response.status == 200, (response, daemon.log_text())
    answering = body_number(response.body, "pid")
    assert f"init {answering}" in lines_at_first_answer  # its init() ran before it served
    assert sorted(lifecycle_lines(daemon)) == sorted(f"init {pid}" for pid in workers)
    assert daemon.stop() == 0
    assert sorted(lifecycle_lines(daemon)[2:]) == sorted(f"destroy {pid}" for pid in workers)


def test_failing_init_stops_start_up_with_exit_78_and_one_line(daemons: Daemons) -> None:
    config = write_config(daemons.work_dir(), app={"module": "badinit"})
    started = time.monotonic()

    daemon = daemons.start(config, wait="none")
    code = daemon.wait(10)

    assert code == 78, daemon.log_text()
    assert time.monotonic() - started < 5
    lines = [
        line
        for line in daemon.log_text().splitlines()
        if "start-up failed" in line and "RuntimeError: deliberate init failure" in line
    ]
    assert len(lines) == 1, daemon.log_text()
    assert not daemon.socket.exists()
    assert group_members(daemon.pid) == []


# -- the socket ---------------------------------------------------------------------------


def test_socket_is_0660_and_group_www_data(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory)

    info = os.stat(daemon.socket)

    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("www-data").gr_gid
    assert get(apache.base_url, "/testapp/Pid").status == 200


def test_second_daemon_on_live_socket_refuses_and_first_keeps_serving(
    daemons: Daemons, apache_factory
) -> None:
    first, apache = start_site(daemons, apache_factory)
    second_config = first.work_dir / "second.conf"
    shutil.copy(first.config, second_config)

    second = daemons.start(second_config, wait="none")
    code = second.wait(10)

    assert code != 0
    assert f"{first.socket}: another pyservd is serving this socket" in second.log_text()
    assert group_members(second.pid) == []
    response = get(apache.base_url, "/testapp/Pid")
    assert response.status == 200, response
    assert body_number(response.body, "pid") in first.workers()
    assert first.process is not None and first.process.poll() is None


def test_stale_socket_file_is_replaced(daemons: Daemons, apache_factory) -> None:
    work_dir = daemons.work_dir()
    config = write_config(work_dir)
    stale = work_dir / "run" / "pyservd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
    assert os.stat(stale).st_gid != grp.getgrnam("www-data").gr_gid

    daemon = daemons.start(config)
    apache = apache_factory(
        ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(daemon.socket)
    )

    assert os.stat(daemon.socket).st_gid == grp.getgrnam("www-data").gr_gid  # a new socket
    assert get(apache.base_url, "/testapp/Pid").status == 200
