"""pyservd started as root behind a real Apache: it refuses to run servlets as root, and
with ``user =`` its workers become that user before a servlet module is imported or a
session touched, while the master keeps root (to fork more workers and reopen logs)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyservd import (
    Daemons,
    body_field,
    get,
    require_root,
    session_id,
    start_site,
    write_config,
)

pytestmark = pytest.mark.integration

MODULE = '''\
"""Reports whom the worker runs as: at import, in init() and per request."""

import os

IMPORTED_AS = os.geteuid()


class Who:
    def init(self, context):
        self.init_as = os.geteuid()

    def run(self, request, response):
        self.session["seen"] = True
        response.write(f"imported={IMPORTED_AS}\\ninit={self.init_as}\\n")
        response.write(f"ids={os.getresuid()} {os.getresgid()}\\n")
        response.write(f"groups={sorted(os.getgroups())}\\n")
'''


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    require_root("starts pyservd as root to see it refuse or drop privileges")
    with Daemons() as started:
        yield started


def start_refused(daemons: Daemons, server: dict[str, str | None]) -> str:
    daemon = daemons.start(write_config(daemons.work_dir(), server=server), wait="none")
    assert daemon.wait(10) == 78, daemon.log_text()
    lines = [line for line in daemon.log_text().splitlines() if "start-up failed" in line]
    assert len(lines) == 1, daemon.log_text()
    assert not daemon.socket.exists()
    return lines[0]


def test_root_without_user_refuses_to_start_with_exit_78_and_one_line(daemons: Daemons) -> None:
    line = start_refused(daemons, {"user": None})

    assert "[pyservd] user is not set and pyservd runs as root" in line


def test_user_root_is_refused(daemons: Daemons) -> None:
    line = start_refused(daemons, {"user": "root"})

    assert "[pyservd] user = 'root': servlets never run as root" in line


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs) uids and gids of *pid*, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return [int(v) for v in fields["Uid"].split()], [int(v) for v in fields["Gid"].split()]


def test_workers_run_as_user_from_before_the_servlet_import(
    daemons: Daemons, apache_factory
) -> None:
    nobody = pwd.getpwnam("nobody")
    work = daemons.work_dir()
    (work / "apps").mkdir(mode=0o755)
    (work / "apps" / "who.py").write_text(MODULE)
    (work / "apps" / "who.py").chmod(0o644)
    daemon, apache = start_site(
        daemons, apache_factory, server={"user": "nobody"}, app={"module": "who"}, work_dir=work
    )

    response = get(apache.base_url, "/testapp/Who")

    assert response.status == 200, response
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert body_field(response.body, "imported") == str(uid)
    assert body_field(response.body, "init") == str(uid)
    assert body_field(response.body, "ids") == f"{(uid, uid, uid)} {(gid, gid, gid)}"
    assert body_field(response.body, "groups") == str(sorted(os.getgrouplist("nobody", gid)))
    for worker in daemon.workers():
        assert proc_ids(worker) == ([uid] * 4, [gid] * 4)
    assert proc_ids(daemon.pid)[0] == [0, 0, 0, 0]  # the master keeps root
    sid = session_id(response)
    sessions = work / "sessions"
    for path in (sessions, sessions / ".secret", sessions / sid[:2] / f"{sid}.session"):
        assert os.stat(path).st_uid == uid, path
    assert os.stat(sessions).st_mode & 0o777 == 0o700


def test_log_files_are_given_to_the_user_so_workers_can_reopen_them(
    daemons: Daemons, apache_factory
) -> None:
    daemon, _ = start_site(
        daemons,
        apache_factory,
        server={"user": "nobody", "error_log": "error.log", "access_log": "access.log"},
    )

    for name in ("error.log", "access.log"):
        assert os.stat(daemon.work_dir / name).st_uid == pwd.getpwnam("nobody").pw_uid
