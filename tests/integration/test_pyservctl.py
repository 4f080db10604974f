"""``pyservctl`` against a real pyservd: status and reload through the control socket, a
stopped daemon, and session statistics read from disk once the daemon is gone."""

from __future__ import annotations

import configparser
import http.client
import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from apache import REPO_ROOT, free_port
from pyservd import COOKIE, Daemons, wait_until, write_config

pytestmark = pytest.mark.integration

CTL_TIMEOUT = 90.0  # a reload may take the master's 60 s boot timeout


def site_config(daemons: Daemons) -> Path:
    """The test config, its session directory made beforehand (0700, for the workers'
    user when it names one): two workers booting at once may otherwise race to create
    it, and the loser sees it still owned by root."""
    config = write_config(daemons.work_dir())
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    sessions = Path(parser["app:testapp"]["session_dir"])
    sessions.mkdir(mode=0o700)
    user = parser["pyservd"].get("user")
    if user:
        entry = pwd.getpwnam(user)
        os.chown(sessions, entry.pw_uid, entry.pw_gid)
    return config


def pyservctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m container.ctl --config CONFIG ARGS…`` as a real command."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "container.ctl", "--config", str(config), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
    )


def status(config: Path) -> dict:
    result = pyservctl(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def control_socket(config: Path) -> Path:
    return config.parent / "run" / "pyservd.ctl"  # beside the unix: listen socket


def test_status_shows_the_workers_the_daemon_runs(daemons: Daemons) -> None:
    config = site_config(daemons)
    daemon = daemons.start(config)
    workers = daemon.wait_for_workers(2)

    report = status(config)
    text = pyservctl(config, "status")

    assert report["pid"] == daemon.pid
    assert sorted(w["pid"] for w in report["workers"]) == sorted(workers)
    assert all(w["protocol"] == "fastcgi" and w["busy"] == 0 for w in report["workers"])
    assert report["last_reload"] == "none" and report["uptime"] >= 0
    assert text.returncode == 0 and text.stderr == ""
    assert f"pyservd {daemon.pid}: up " in text.stdout
    assert "last reload: none" in text.stdout
    for pid in workers:
        assert any(line.split()[:1] == [str(pid)] for line in text.stdout.splitlines())


def test_reload_replaces_the_workers_and_status_shows_it_ok(daemons: Daemons) -> None:
    config = site_config(daemons)
    daemon = daemons.start(config)
    old = daemon.wait_for_workers(2)

    result = pyservctl(config, "reload")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reload ok: generation 2, workers ")
    new = daemon.wait_for_workers(2, exclude=set(old))

    def settled() -> dict | None:
        report = status(config)
        return report if sorted(w["pid"] for w in report["workers"]) == sorted(new) else None

    report = wait_until(settled, 15, "status to list only the new workers", interval=0.2)
    assert report["last_reload"] == "ok" and report["generation"] == 2
    assert not report["reload_in_progress"]
    assert all(w["generation"] == 2 for w in report["workers"])


@pytest.mark.parametrize("command", ["status", "reload"])
def test_stopped_daemon_exits_3_and_names_the_socket(daemons: Daemons, command: str) -> None:
    config = site_config(daemons)
    daemon = daemons.start(config)
    daemon.stop()

    result = pyservctl(config, command)

    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr == (
        f"pyservctl: pyservd is not running (no control socket at {control_socket(config)})\n"
    )


def test_stale_control_socket_counts_as_not_running(daemons: Daemons) -> None:
    config = site_config(daemons)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control_socket(config)))
    stale.close()  # the file stays, nothing listens: connect is refused

    result = pyservctl(config, "status")

    assert result.returncode == 3
    assert "pyservd is not running (no control socket at " in result.stderr


def _new_session(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/testapp/Count")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 200
    for value in response.headers.get_all("Set-Cookie") or []:
        if value.startswith(f"{COOKIE}="):
            return value.split(";", 1)[0][len(COOKIE) + 1 :]
    raise AssertionError("no session cookie")


def test_session_stats_work_with_the_daemon_stopped(daemons: Daemons) -> None:
    config = site_config(daemons)
    port = free_port()
    daemon = daemons.start(config, args=("--http", f"127.0.0.1:{port}"))
    wait_until(lambda: _serving(port), 10, "the development listener")
    sids = [_new_session(port) for _ in range(3)]
    assert daemon.stop() == 0

    stats = pyservctl(config, "sessions", "stats", "--json")
    shown = pyservctl(config, "sessions", "show", sids[0])

    assert stats.returncode == 0, stats.stderr
    (app,) = json.loads(stats.stdout)["apps"]
    assert app["app"] == "testapp" and app["live"] == 3 and app["expired"] == 0
    assert app["idle_histogram"][0]["count"] == 3  # all used within the last minute
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:1] == ["count"] for line in shown.stdout.splitlines())
    assert not any(sid in stats.stdout + shown.stdout for sid in sids)


def test_verify_as_root_leaves_what_it_creates_to_the_directorys_owner(daemons: Daemons) -> None:
    config = site_config(daemons)
    port = free_port()
    daemon = daemons.start(config, args=("--http", f"127.0.0.1:{port}"))
    wait_until(lambda: _serving(port), 10, "the development listener")
    sid = _new_session(port)
    assert daemon.stop() == 0
    sessions = config.parent / "sessions"
    path = sessions / sid[:2] / f"{sid}.session"
    blob = bytearray(path.read_bytes())
    blob[-2] ^= 0x01
    path.write_bytes(bytes(blob))

    result = pyservctl(config, "sessions", "verify")

    assert result.returncode == 1, result.stderr
    assert "1 checked, 0 good, 1 bad" in result.stdout
    quarantine = sessions / "quarantine"
    (moved,) = quarantine.iterdir()
    assert f"moved to {moved}" in result.stdout and sid not in result.stdout
    owner = sessions.stat().st_uid
    assert quarantine.stat().st_uid == owner and moved.stat().st_uid == owner
    assert not path.exists()


def _serving(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/testapp/Pid")  # no session
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
