"""pyservd under faults, behind a real Apache: workers and the whole daemon killed with
SIGKILL while sessions are being rewritten, a full and a read-only session directory, and
session directories it must refuse to use.

The killing tests check what a user could lose: every session file still verifies and
holds one whole value (the old or the new), and every increment that was answered 200 is
still there. The file system tests mount a small tmpfs over the session directory, so they
need root (CI runs as root; elsewhere they skip).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from apache import ApacheServer, HttpResponse
from pyservd import (
    WORKER_USER,
    Daemons,
    Pyservd,
    alive,
    body_number,
    get,
    require_root,
    session_id,
    start_site,
    wait_until,
    write_config,
)

from pyserv.stores.base import Envelope

pytestmark = pytest.mark.integration

MODULE = '''\
"""Servlets for fault tests: a counter whose every write is big enough to be cut."""


class Bump:
    """Adds one to n and rewrites ?pad= bytes that repeat n (so a torn write shows)."""

    def run(self, request, response):
        n = self.session.get("n", 0) + 1
        self.session["n"] = n
        self.session["pad"] = f"{n}:" * (int(request.query.get("pad", "0")) // 8)
        response.write(f"n={n}\\n")


class Show:
    def run(self, request, response):
        response.write(f"n={self.session.get('n', 0)}\\n")


class Static:
    def run(self, request, response):
        response.write("no session\\n")
'''

PAD = 200_000  # bytes rewritten per increment: a write takes long enough to be killed in


def prepare_work(daemons: Daemons) -> Path:
    work = daemons.work_dir()
    (work / "apps").mkdir(mode=0o755)
    (work / "apps" / "faults.py").write_text(MODULE)
    (work / "apps" / "faults.py").chmod(0o644)
    return work


def fault_site(
    daemons: Daemons, apache_factory, work: Path | None = None, **server: str
) -> tuple[Pyservd, ApacheServer]:
    return start_site(
        daemons,
        apache_factory,
        server=server,
        app={"module": "faults"},
        work_dir=work or prepare_work(daemons),
    )


def stored_sessions(session_dir: Path) -> dict[str, dict]:
    """Every session file, verified and unpickled with the daemon's key: {id: data}.

    Fails if any file does not verify; nothing is quarantined meanwhile.
    """
    key = (session_dir / ".secret").read_bytes().strip()
    envelope = Envelope(lambda: key)
    found = {}
    for path in session_dir.glob("??/*.session"):
        sid = path.name[: -len(".session")]
        _, found[sid] = envelope.open(sid, path.read_bytes())  # raises BadEnvelope
    assert not (session_dir / "quarantine").exists()
    return found


@dataclass
class Client:
    """One user: bumps its own session, one request at a time, and remembers answers."""

    base_url: str
    sid: str
    acked: int = 1  # the highest n answered with 200 (the session starts at 1)
    attempts: int = 0  # requests sent after the session existed
    answered: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.attempts += 1
            try:
                response = get(self.base_url, f"/testapp/Bump?pad={PAD}", self.sid, timeout=10)
            except (OSError, http.client.HTTPException) as exc:  # cut mid-answer: not a 200
                self.errors.append(repr(exc))
                continue
            if response.status == 200:
                n = body_number(response.body, "n")
                self.answered.append(n)
                self.acked = max(self.acked, n)
            else:
                self.errors.append(str(response.status))

    def check(self, stored: dict) -> None:
        assert self.answered == sorted(set(self.answered)), "an increment was answered twice"
        assert stored["n"] >= self.acked, f"lost an answered increment: {stored['n']} < {self}"
        assert stored["n"] <= 1 + self.attempts
        assert stored["pad"] == f"{stored['n']}:" * (PAD // 8), "a torn value"


def run_clients(clients: list[Client], during: Callable[[], object]) -> None:
    """Run *clients* until *during* returns."""
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    try:
        during()
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)


def new_clients(base_url: str, count: int) -> list[Client]:
    sids = []
    for _ in range(count):
        first = get(base_url, f"/testapp/Bump?pad={PAD}")
        assert first.status == 200, first
        sids.append(session_id(first))
    return [Client(base_url, sid) for sid in sids]


# -- kill -9 -----------------------------------------------------------------------------------

CYCLES = 15


def test_kill_9_of_workers_while_sessions_are_rewritten_loses_no_answered_increment(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = fault_site(daemons, apache_factory)
    clients = new_clients(apache.base_url, 4)
    rng = random.Random(6)
    killed = []

    def kill_workers() -> None:
        deadline = time.monotonic() + 30
        for _ in range(CYCLES):
            time.sleep(rng.uniform(0.05, 0.3))
            victim = rng.choice(daemon.workers())
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            daemon.wait_for_workers(2, timeout=10, exclude=set(killed))
            assert time.monotonic() < deadline, "the cycles took more than 30 s"

    run_clients(clients, kill_workers)

    stored = stored_sessions(daemon.work_dir / "sessions")
    assert set(stored) == {c.sid for c in clients}
    for client in clients:
        client.check(stored[client.sid])
        shown = get(apache.base_url, "/testapp/Show", client.sid)
        assert body_number(shown.body, "n") == stored[client.sid]["n"]
    assert sum(len(c.answered) for c in clients) > CYCLES  # the kills hit a busy daemon


def test_kill_9_of_the_whole_daemon_while_sessions_are_rewritten_loses_nothing_answered(
    daemons: Daemons, apache_factory
) -> None:
    work = prepare_work(daemons)
    daemon, apache = fault_site(daemons, apache_factory, work)
    clients = new_clients(apache.base_url, 4)
    rng = random.Random(9)
    restarts = []

    def kill_daemon() -> None:
        nonlocal daemon
        deadline = time.monotonic() + 30
        for _ in range(CYCLES):
            time.sleep(rng.uniform(0.1, 0.4))
            victims = [daemon.pid, *daemon.workers()]
            for pid in victims:  # master and workers at once, as a power cut would
                os.kill(pid, signal.SIGKILL)
            daemon.wait(5)
            wait_until(lambda v=victims: not any(map(alive, v)), 5, "the workers to die")
            daemon = daemons.start(daemon.config)
            restarts.append(daemon.pid)
            assert time.monotonic() < deadline, "the cycles took more than 30 s"

    run_clients(clients, kill_daemon)

    assert len(restarts) == CYCLES
    stored = stored_sessions(work / "sessions")
    assert set(stored) == {c.sid for c in clients}
    for client in clients:
        client.check(stored[client.sid])
    assert sum(len(c.answered) for c in clients) > CYCLES


# -- the session directory on a small tmpfs ------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of *size* mounted on *path* (0700, owned by the workers' user)."""
    require_root("mounts a tmpfs over the session directory")
    path.mkdir(mode=0o700, exist_ok=True)
    owner = f",uid={os.getuid()},gid={os.getgid()}"
    if WORKER_USER is not None:
        import pwd

        entry = pwd.getpwnam(WORKER_USER)
        owner = f",uid={entry.pw_uid},gid={entry.pw_gid}"
    options = f"size={size},mode=0700{owner}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of *directory* to the last byte; the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as stream:
        with contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * 4096)
    return filler


def temp_files(directory: Path) -> list[Path]:
    return list(directory.rglob("*.tmp"))


def n_of(response: HttpResponse) -> int:
    assert response.status == 200, response
    return body_number(response.body, "n")


def test_full_disk_answers_503_for_writes_keeps_data_and_recovers(
    daemons: Daemons, apache_factory
) -> None:
    work = prepare_work(daemons)
    with tmpfs(work / "sessions") as sessions:
        daemon, apache = fault_site(daemons, apache_factory, work)
        sid = session_id(get(apache.base_url, "/testapp/Bump"))
        assert n_of(get(apache.base_url, "/testapp/Bump", sid)) == 2
        before = stored_sessions(sessions)
        filler = fill(sessions)

        # Bigger than the session's spare file (an update that fits there needs no
        # new space and succeeds, atomically, even on a full disk).
        write = get(apache.base_url, "/testapp/Bump?pad=40000", sid)
        create = get(apache.base_url, "/testapp/Bump?pad=40000")
        read = get(apache.base_url, "/testapp/Show", sid)

        assert write.status == 503 and write.headers["Retry-After"] == "1"
        assert create.status == 503 and "Set-Cookie" not in create.headers
        assert n_of(read) == 2
        assert stored_sessions(sessions) == before
        assert temp_files(sessions) == []
        assert "No space left on device" in daemon.log_text()

        filler.unlink()
        assert n_of(get(apache.base_url, "/testapp/Bump?pad=8000", sid)) == 3
        assert get(apache.base_url, "/testapp/Bump").status == 200
        assert temp_files(sessions) == []


def test_read_only_session_directory_at_start_exits_78_naming_it(daemons: Daemons) -> None:
    work = prepare_work(daemons)
    with tmpfs(work / "sessions") as sessions:
        remount(sessions, "ro")
        config = write_config(work, app={"module": "faults"})

        daemon = daemons.start(config, wait="none")

        assert daemon.wait(10) == 78, daemon.log_text()
        lines = [line for line in daemon.log_text().splitlines() if "start-up failed" in line]
        assert len(lines) == 1, daemon.log_text()
        assert f"session_dir = '{sessions}': on a read-only file system" in lines[0]


def test_read_only_at_run_time_refuses_writes_serves_reads_and_recovers(
    daemons: Daemons, apache_factory
) -> None:
    work = prepare_work(daemons)
    with tmpfs(work / "sessions") as sessions:
        daemon, apache = fault_site(daemons, apache_factory, work)
        provisional = session_id(get(apache.base_url, "/testapp/Bump"))
        confirmed = session_id(get(apache.base_url, "/testapp/Bump"))
        assert n_of(get(apache.base_url, "/testapp/Bump", confirmed)) == 2
        workers = daemon.workers()
        remount(sessions, "ro")

        assert get(apache.base_url, "/testapp/Bump", confirmed).status == 503
        assert get(apache.base_url, "/testapp/Bump").status == 503
        assert n_of(get(apache.base_url, "/testapp/Show", confirmed)) == 2
        assert n_of(get(apache.base_url, "/testapp/Show", provisional)) == 1  # can't confirm
        assert get(apache.base_url, "/testapp/Static").status == 200
        assert daemon.process is not None and daemon.process.poll() is None
        assert daemon.workers() == workers

        remount(sessions, "rw")
        assert n_of(get(apache.base_url, "/testapp/Bump", confirmed)) == 3
        assert n_of(get(apache.base_url, "/testapp/Bump", provisional)) == 2


# -- session directories pyservd must not use ------------------------------------------------


def refused_start(daemons: Daemons, work: Path) -> str:
    """Start pyservd on *work*'s config; it must exit 78: its one start-up failure line."""
    daemon = daemons.start(write_config(work, app={"module": "faults"}), wait="none")
    assert daemon.wait(10) == 78, daemon.log_text()
    lines = [line for line in daemon.log_text().splitlines() if "start-up failed" in line]
    assert len(lines) == 1, daemon.log_text()
    assert not daemon.socket.exists()
    return lines[0]


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o702])
def test_group_or_world_writable_session_directory_is_refused_naming_it(
    daemons: Daemons, mode: int
) -> None:
    work = prepare_work(daemons)
    sessions = work / "sessions"
    sessions.mkdir()
    sessions.chmod(mode)
    if WORKER_USER is not None:
        import pwd

        entry = pwd.getpwnam(WORKER_USER)
        os.chown(sessions, entry.pw_uid, entry.pw_gid)

    line = refused_start(daemons, work)

    assert f"session_dir = '{sessions}': writable by group or others (mode {mode:04o})" in line
    assert f"chmod 0700 {sessions}" in line


def test_session_directory_of_another_owner_is_refused_naming_it(daemons: Daemons) -> None:
    require_root("needs a directory owned by someone other than the workers' user")
    work = prepare_work(daemons)
    sessions = work / "sessions"
    sessions.mkdir(mode=0o700)  # root's; the workers run as www-data

    line = refused_start(daemons, work)

    assert f"session_dir = '{sessions}': owned by 'root', not by '{WORKER_USER}'" in line
    assert f"chown {WORKER_USER} {sessions}" in line


def test_a_good_session_directory_is_created_0700_for_the_workers(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = fault_site(daemons, apache_factory)
    sid = session_id(get(apache.base_url, "/testapp/Bump"))

    info = os.stat(daemon.work_dir / "sessions")
    assert info.st_mode & 0o777 == 0o700
    assert os.stat(daemon.work_dir / "sessions" / sid[:2] / f"{sid}.session").st_uid == info.st_uid
    assert get(apache.base_url, "/testapp/Show", sid).status == 200
