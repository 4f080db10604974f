"""pyservd under systemd, with stand-ins: a unixgram socket bound by the test is
NOTIFY_SOCKET, a socket bound by the test and passed as fd 3 is socket activation; the
shipped unit files pass systemd-analyze verify."""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyservd import (
    REPO_ROOT,
    Daemons,
    Pyservd,
    get,
    proxy_fcgi_apache_config,
    socket_path,
    write_config,
)

pytestmark = pytest.mark.integration


class Systemd:
    """The notification end of systemd: collects what pyservd sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self._cursor = 0  # messages before it were matched or passed over by wait_for

    def collect(self, seconds: float) -> list[dict[str, str]]:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                break
            pairs = (line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(dict(pairs))
        return self.messages

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10) -> dict:
        """The first message (not seen before) with *key* (= *value*)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.collect(0.1)
            for message in self.messages[self._cursor :]:
                self._cursor += 1
                if key in message and (value is None or message[key] == value):
                    return message
        raise AssertionError(f"no {key}={value} from pyservd; got {self.messages}")


@pytest.fixture
def notify_socket(tmp_path, monkeypatch) -> Iterator[Systemd]:
    systemd = Systemd(tmp_path / "notify.sock")
    yield systemd
    systemd.sock.close()


def test_ready_only_after_init_then_status_reloading_and_stopping(
    daemons: Daemons, notify_socket: Systemd
) -> None:
    work = daemons.work_dir()
    config = write_config(work, app={"module": "lifecycle"})
    daemon = daemons.start(config, wait="none", env={"NOTIFY_SOCKET": str(notify_socket.path)})

    ready = notify_socket.wait_for("READY", "1")
    init_lines = (work / "apps" / "lifecycle.log").read_text().split()
    assert init_lines.count("init") == 2  # both workers ran init() before READY=1
    assert re.match(r"2 workers, \d+ requests served", ready["STATUS"])

    daemon.signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", "1")
    assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify_socket.wait_for("READY", "1")
    assert "reload complete" in daemon.log_text()

    daemon.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING", "1")
    assert daemon.wait(10) == 0


def test_failed_reload_is_reported_in_status(daemons: Daemons, notify_socket: Systemd) -> None:
    work = daemons.work_dir()
    config = write_config(work)
    daemon = daemons.start(config, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    notify_socket.wait_for("READY", "1")
    module = work / "apps" / "probe.py"
    module.write_text(module.read_text() + "\nraise ImportError('deliberately broken')\n")

    daemon.signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING", "1")
    ready = notify_socket.wait_for("READY", "1")

    assert "last reload failed" in ready["STATUS"] and "deliberately broken" in ready["STATUS"]


def test_watchdog_pings_only_while_workers_make_progress(
    daemons: Daemons, notify_socket: Systemd
) -> None:
    config = write_config(daemons.work_dir())
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    daemon = daemons.start(config, env=env)
    notify_socket.wait_for("READY", "1")
    before = sum("WATCHDOG" in m for m in notify_socket.collect(2.0))
    assert before >= 2  # every 0.5 s (half of WATCHDOG_USEC), give or take the loop

    stuck = daemon.workers()[0]
    os.kill(stuck, signal.SIGSTOP)  # a worker that makes no progress
    try:
        notify_socket.collect(2.5)  # its heartbeat goes stale
        seen = len(notify_socket.messages)
        quiet = notify_socket.collect(2.0)[seen:]
        assert not any("WATCHDOG" in m for m in quiet), quiet
    finally:
        os.kill(stuck, signal.SIGCONT)
    seen = len(notify_socket.messages)
    assert any("WATCHDOG" in m for m in notify_socket.collect(2.0)[seen:])


class _Activated(Pyservd):
    """pyservd started as systemd would: the socket as fd 3, LISTEN_PID its own pid."""

    def command(self) -> list[str]:
        script = 'exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@"'
        return ["/bin/bash", "-c", script, "bash", *super().command()]


def test_socket_activation_serves_the_passed_socket_and_leaves_it(
    daemons: Daemons, apache_factory
) -> None:
    work = daemons.work_dir()
    config = write_config(work, server={"listen": "unix:{work}/run/not-this-one.sock"})
    path = socket_path(work)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chown(path, -1, grp.getgrnam("www-data").gr_gid)
    os.chmod(path, 0o660)
    listener.listen(16)
    try:
        daemon = daemons.start(config, stdin=listener.fileno(), daemon_class=_Activated)
        apache = apache_factory(
            ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(path)
        )

        assert get(apache.base_url, "/testapp/Pid").status == 200
        assert not (work / "run" / "not-this-one.sock").exists()
        assert "serving the socket systemd passed" in daemon.log_text()

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        assert path.exists()  # systemd's socket: not ours to remove
    finally:
        listener.close()


def test_shipped_unit_files_pass_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing: scripts/test installs the systemd package")
        pytest.skip("systemd-analyze missing: apt-get install systemd (scripts/test as root)")
    # verify checks that ExecStart exists: point it at this checkout's pyservd.
    pyservd = shutil.which("pyservd") or str(Path(sys.executable).parent / "pyservd")
    if not os.path.exists(pyservd):
        pytest.fail(f"no pyservd console script next to {sys.executable}: pip install -e .")
    service = (REPO_ROOT / "conf" / "pyservd.service").read_text()
    (tmp_path / "pyservd.service").write_text(service.replace("/usr/local/bin/pyservd", pyservd))
    shutil.copy(REPO_ROOT / "conf" / "pyservd.socket", tmp_path / "pyservd.socket")

    def verify(*units: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    # verify exits 0 for directives it ignores and only warns: a pass is no word at all
    # about our files.
    result = verify("./pyservd.socket", "./pyservd.service")
    assert result.returncode == 0 and "pyservd." not in result.stderr, result.stderr
    # The check can fail: systemd 252 has no Type=notify-reload.
    broken = service.replace("Type=notify", "Type=notify-reload")
    (tmp_path / "broken.service").write_text(broken.replace("/usr/local/bin/pyservd", pyservd))
    assert "broken.service" in verify("./broken.service").stderr
