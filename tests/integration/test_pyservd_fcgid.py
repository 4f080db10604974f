"""pyservd started by Apache's mod_fcgid (``listen = fd``) with the shipped
conf/apache-fcgid.conf: several processes share one session without losing updates.

mod_fcgid runs the daemon as www-data, so everything it runs lives in the Apache work
directory: copies of ``pyserv``, ``container``, ``flup`` and ``multipart``, the test
servlets, a config and a wrapper script.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from apache import APACHE_USER, REPO_ROOT, ApacheServer, world_readable_python
from pyservd import alive, body_number, get, run_load, session_id, write_config

pytestmark = pytest.mark.integration

WRAPPER = """\
#!/bin/sh
PYTHONPATH={lib} PYTHONDONTWRITEBYTECODE=1 exec {python} -m container.cli --config {config}
"""


def deploy(work_dir: Path) -> None:
    """Lay out the daemon for www-data: lib/, apps/, pyservd-fcgid.conf, pyservd.fcgi."""
    import flup
    import multipart

    lib = work_dir / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in (REPO_ROOT / "pyserv", REPO_ROOT / "container", Path(flup.__file__).parent):
        shutil.copytree(package, lib / package.name, ignore=ignore)
    shutil.copy(multipart.__file__, lib / "multipart.py")
    for path in (lib, *lib.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    sessions = work_dir / "sessions"
    sessions.mkdir(mode=0o700)
    user = pwd.getpwnam(APACHE_USER)
    os.chown(sessions, user.pw_uid, user.pw_gid)
    config = write_config(
        work_dir,
        server={"listen": "fd", "socket_group": None, "workers": "1", "threads": "4"},
        name="pyservd-fcgid.conf",
    )
    wrapper = work_dir / "pyservd.fcgi"
    wrapper.write_text(WRAPPER.format(lib=lib, python=world_readable_python(), config=config))
    wrapper.chmod(0o755)


def daemon_pids(work_dir: Path) -> list[int]:
    """Processes running the daemon of *work_dir* (mod_fcgid's and their workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(work_dir).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def apache(apache_factory) -> Iterator[ApacheServer]:
    extra_config = (
        'Define PYSERV_FCGI_WRAPPER "${WORK_DIR}/pyservd.fcgi"\n'
        f'Include "{REPO_ROOT}/conf/apache-fcgid.conf"\n'
    )
    server = apache_factory(["fcgid"], extra_config=extra_config, prepare=deploy)
    yield server
    server.stop()
    for pid in daemon_pids(server.work_dir):  # mod_fcgid should have stopped them
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_processes_share_a_session_without_losing_updates(apache: ApacheServer) -> None:
    first = get(apache.base_url, "/testapp/Count")
    assert first.status == 200, (first, apache.error_log_text())
    sid = session_id(first)

    outcomes = run_load(lambda: get(apache.base_url, "/testapp/Count", sid), clients=16, seconds=3)

    served = [o for o in outcomes if o.status == 200]
    assert served, [o for o in outcomes][:3]
    seen = sorted(body_number(o.body, "count") for o in served)
    assert seen == list(range(1, len(served) + 1)), "two requests saw the same count"
    pids = {body_number(o.body, "pid") for o in served}
    assert len(pids) >= 2, f"expected several processes, got {pids}"
    final = get(apache.base_url, "/testapp/Count", sid)
    assert final.status == 200, final
    assert f"count={len(served) + 1}".encode() in final.body
