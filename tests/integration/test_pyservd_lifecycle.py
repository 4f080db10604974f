"""pyservd's life cycle behind a real Apache: a graceful stop lets a running request
finish, INT/QUIT stop at once, and a reload that meets a bad config or code that fails
to import keeps the old workers serving."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
from pyservd import (
    Daemons,
    alive,
    body_number,
    get,
    proxy_fcgi_apache_config,
    start_site,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


def test_term_lets_a_running_request_finish(daemons: Daemons, apache_factory) -> None:
    daemon, apache = start_site(daemons, apache_factory, server={"graceful_timeout": "5"})
    answers = []
    request = threading.Thread(
        target=lambda: answers.append(get(apache.base_url, "/testapp/Sleep?seconds=1.5"))
    )
    request.start()
    time.sleep(0.5)  # the request is running now

    daemon.signal(signal.SIGTERM)
    request.join(10)

    assert answers and answers[0].status == 200 and b"slept" in answers[0].body
    assert daemon.wait(10) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_at_once(daemons: Daemons, apache_factory, signum) -> None:
    daemon, apache = start_site(daemons, apache_factory, server={"graceful_timeout": "30"})
    assert get(apache.base_url, "/testapp/Pid").status == 200
    workers = daemon.workers()
    busy = threading.Thread(target=get, args=(apache.base_url, "/testapp/Sleep?seconds=20"))
    busy.start()
    time.sleep(0.3)

    started = time.monotonic()
    daemon.signal(signum)
    code = daemon.wait(10)

    assert code == 0
    assert time.monotonic() - started < 4  # not the 20 s request, not graceful_timeout
    assert not daemon.socket.exists()
    assert not any(alive(pid) for pid in workers)
    busy.join(25)


def test_reload_with_a_bad_config_keeps_serving_and_says_why(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    workers = daemon.workers()
    config = daemon.work_dir / "pyservd.conf"
    config.write_text(config.read_text().replace("workers = 2", "workers = abc"))

    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reload failed, still serving the old configuration")

    assert "[pyservd] workers = 'abc'" in daemon.log_text()
    assert get(apache.base_url, "/testapp/Pid").status == 200
    assert daemon.workers() == workers


def test_reload_whose_code_fails_to_import_keeps_the_old_workers(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = start_site(daemons, apache_factory)
    workers = daemon.workers()
    module = daemon.work_dir / "apps" / "probe.py"
    module.write_text(module.read_text() + "\nraise ImportError('deliberately broken')\n")

    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reload failed, old workers keep serving")

    assert "deliberately broken" in daemon.log_text()
    wait_until(lambda: sorted(daemon.workers()) == sorted(workers), 5, "only the old workers")
    assert get(apache.base_url, "/testapp/Pid").status == 200


def test_ten_reloads_under_wrk_load_fail_no_request(daemons: Daemons, apache_factory) -> None:
    wrk = shutil.which("wrk")
    if wrk is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wrk missing: scripts/test installs it with apt")
        pytest.skip("wrk missing: apt-get install wrk, or run scripts/test as root")
    daemon, apache = start_site(daemons, apache_factory, server={"graceful_timeout": "3"})
    load = subprocess.Popen(
        [wrk, "-t2", "-c16", "-d8s", "--timeout", "5s", f"{apache.base_url}/testapp/Pid"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        # Reloads back to back: connections handed over by one retiring generation
        # reach workers that are themselves told to stop moments later.
        for generation in range(2, 12):
            daemon.signal(signal.SIGHUP)
            daemon.wait_for_log(f"reload complete: generation {generation} serving")
            time.sleep(0.1)
        report, _ = load.communicate(timeout=20)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()

    requests = int(re.search(r"(\d+) requests in", report).group(1))
    assert requests > 1000, report  # the load really ran across the reloads
    problems = [
        line
        for line in apache.error_log_text().splitlines() + daemon.log_text().splitlines()
        if ":error]" in line or "level=WARNING" in line or "level=ERROR" in line
    ]
    assert "Non-2xx" not in report and not problems, report + "\n".join(problems[-20:])
    assert "Socket errors" not in report, report


def test_reload_flag_serves_changed_code_and_sessions_survive(
    daemons: Daemons, apache_factory
) -> None:
    work = daemons.work_dir()
    daemon = daemons.start(write_config(work), args=("--reload",))
    apache = apache_factory(
        ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(daemon.socket)
    )
    first = get(apache.base_url, "/testapp/Count")
    sid = first.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    assert body_number(get(apache.base_url, "/testapp/Count", sid).body, "count") == 1

    module = work / "apps" / "probe.py"
    old_workers = daemon.workers()
    version = "\n\nclass Version:\n    def run(self, q, r):\n        r.write('version=2\\n')\n"
    module.write_text(module.read_text() + version)
    daemon.wait_for_log("reload complete: generation 2 serving")
    wait_until(lambda: not any(alive(p) for p in old_workers), 5, "old workers to retire")

    assert get(apache.base_url, "/testapp/Version").body == b"version=2\n"
    assert body_number(get(apache.base_url, "/testapp/Count", sid).body, "count") == 2
