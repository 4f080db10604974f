"""pyservd's life cycle behind a real Apache: a graceful stop lets a running request
finish, INT/QUIT stop at once, and a reload that meets a bad config or code that fails
to import keeps the old workers serving."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest
from pyservd import Daemons, alive, get, start_site, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    with Daemons() as started:
        yield started


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
