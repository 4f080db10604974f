"""pyservd behind a real Apache with the shipped conf/apache-proxy-fcgi.conf: serving,
session coherence with CGI processes, and sessions across restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from apache import HttpResponse
from pyservd import (
    COOKIE,
    WORKER_USER,
    Daemons,
    Pyservd,
    alive,
    body_field,
    body_number,
    daemon_runtime,
    get,
    give_to_worker_user,
    run_load,
    session_id,
    start_site,
    wait_until,
)

pytestmark = pytest.mark.integration

SEED = {"module": "thisapp"}


def previous_visits(response: HttpResponse) -> int:
    assert response.status == 200, response
    match = re.search(rb"^(\d+) previous visits$", response.body, re.MULTILINE)
    assert match, response.body
    return int(match.group(1))


def count(response: HttpResponse) -> int:
    assert response.status == 200, response
    return int(body_field(response.body, "count"))


# -- serving ----------------------------------------------------------------------------


def test_seed_servlet_counts_visits_with_its_cookie(daemons: Daemons, apache_factory) -> None:
    _, apache = start_site(daemons, apache_factory, app=SEED)

    first = get(apache.base_url, "/testapp/TestServlet")
    sid = session_id(first)
    visits = [previous_visits(first)] + [
        previous_visits(get(apache.base_url, "/testapp/TestServlet", sid)) for _ in range(2)
    ]

    assert visits == [0, 1, 2]
    assert first.body.startswith(b"Hi!\n")


def test_seed_servlet_sees_extra_path(daemons: Daemons, apache_factory) -> None:
    _, apache = start_site(daemons, apache_factory, app=SEED)

    response = get(apache.base_url, "/testapp/TestServlet/extra/path")

    assert response.status == 200, response
    assert b"/testapp/TestServlet/extra/path" in response.body


def test_servlet_gets_mount_path_and_extra_path(daemons: Daemons, apache_factory) -> None:
    _, apache = start_site(daemons, apache_factory)

    response = get(apache.base_url, "/testapp/Paths/extra/path")

    assert response.status == 200, response
    assert body_field(response.body, "script_name") == "/testapp"
    assert body_field(response.body, "path_info") == "/Paths/extra/path"
    assert body_field(response.body, "extra_path") == "extra/path"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/testapp/Test%53ervlet", 200),  # %53 is S: decoded once, TestServlet
        ("/testapp/Test%2553ervlet", 404),  # decoded once: Test%53ervlet, no such name
        ("/testapp/os", 404),  # a module attribute, not a servlet class
        ("/testapp/__class__", 404),
    ],
)
def test_servlet_names_are_decoded_once_and_allow_listed(
    daemons: Daemons, apache_factory, path: str, status: int
) -> None:
    _, apache = start_site(daemons, apache_factory, app=SEED)

    response = get(apache.base_url, path)

    assert response.status == status, response


# -- one session shared by two workers and CGI processes ---------------------------------

CGI_SCRIPT = """\
import sys
sys.path[:0] = [{lib!r}, {apps!r}]
import pyserv
pyserv.cgimain({sessions!r}, "probe", secret_file={secret!r})
"""


def run_cgi(script: Path, sid: str) -> tuple[int, bytes]:
    """Run the CGI script once for /Count with the session cookie: (status, body), as
    the daemon's workers run (Apache runs CGI scripts as that same user)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/cgi-bin/testapp.cgi",
        "PATH_INFO": "/Count",
        "QUERY_STRING": "",
        "HTTP_COOKIE": f"{COOKIE}={sid}",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }
    python, _ = daemon_runtime(script.parent)
    result = subprocess.run(
        [python, str(script)],
        cwd=script.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=20,
        user=WORKER_USER,
        group=WORKER_USER,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    match = re.match(rb"Status: (\d+)", head)
    assert match, (result.stdout, result.stderr)
    return int(match.group(1)), body


def test_workers_and_cgi_share_a_session_without_losing_updates(
    daemons: Daemons, apache_factory
) -> None:
    work = daemons.work_dir()
    secret = work / "secret"  # shared by the daemon and CGI, so it is created beforehand
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    give_to_worker_user(secret)
    daemon, apache = start_site(
        daemons, apache_factory, app={"secret_file": str(secret)}, work_dir=work
    )
    script = work / "testapp.cgi"
    script.write_text(
        CGI_SCRIPT.format(
            lib=daemon_runtime(work)[1],
            apps=str(work / "apps"),
            sessions=str(work / "sessions"),
            secret=str(work / "secret"),
        )
    )
    sid = session_id(get(apache.base_url, "/testapp/Count"))
    cgi_results: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 3

    def cgi_client() -> None:
        while time.monotonic() < deadline:
            cgi_results.append(run_cgi(script, sid))

    cgi_threads = [threading.Thread(target=cgi_client) for _ in range(3)]
    for thread in cgi_threads:
        thread.start()
    outcomes = run_load(lambda: get(apache.base_url, "/testapp/Count", sid), clients=8, seconds=3)
    for thread in cgi_threads:
        thread.join(30)

    served = [o for o in outcomes if o.status == 200]
    cgi_served = [body for status, body in cgi_results if status == 200]
    assert len(served) == len(outcomes), [o for o in outcomes if o.status != 200][:3]
    assert len(cgi_served) == len(cgi_results), cgi_results[:3]
    assert cgi_served, "no CGI request completed"
    pids = {body_number(o.body, "pid") for o in served}
    assert len(pids) == 2, f"expected both workers to serve, got pids {pids}"
    seen = [body_number(body, "count") for body in cgi_served + [o.body for o in served]]
    total = 1 + len(served) + len(cgi_served)  # the first request created the session
    assert sorted(seen) == list(range(1, total)), "two requests saw the same count"
    assert count(get(apache.base_url, "/testapp/Count", sid)) == total


# -- restarts keep sessions ---------------------------------------------------------------


def test_session_survives_stop_and_start(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    sid = session_id(get(apache.base_url, "/testapp/Count"))
    assert count(get(apache.base_url, "/testapp/Count", sid)) == 1

    assert daemon.stop() == 0
    daemons.start(daemon.config)

    assert count(get(apache.base_url, "/testapp/Count", sid)) == 2


def test_session_survives_kill_9_of_master_and_workers(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    sid = session_id(get(apache.base_url, "/testapp/Count"))
    assert count(get(apache.base_url, "/testapp/Count", sid)) == 1
    victims = [daemon.pid, *daemon.workers()]

    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    daemon.wait(5)
    wait_until(lambda: not any(alive(p) for p in victims), 5, "the workers to die")
    restarted: Pyservd = daemons.start(daemon.config)

    assert count(get(apache.base_url, "/testapp/Count", sid)) == 2
    assert restarted.pid != daemon.pid


def test_workers_stop_when_their_master_is_killed(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    sid = session_id(get(apache.base_url, "/testapp/Count"))
    workers = daemon.workers()

    os.kill(daemon.pid, signal.SIGKILL)  # the master alone: an OOM kill, a kill -9
    daemon.wait(5)
    wait_until(lambda: not any(alive(p) for p in workers), 5, "the orphaned workers to stop")
    restarted: Pyservd = daemons.start(daemon.config)  # the socket is free to take over

    assert count(get(apache.base_url, "/testapp/Count", sid)) == 1
    assert not set(restarted.workers()) & set(workers)
