"""One session, many writers: real threads, real processes and SIGKILL, through the
Application and the file store. Not one increment may be lost or invented."""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

import pyserv
from pyserv import Application, AppSettings

SERVLETS = """
from pyserv import Servlet


class Init(Servlet):
    def do_GET(self, request, response):
        self.session["n"] = 0
        response.write("0")


class Increment(Servlet):
    def do_GET(self, request, response):
        n = self.session["n"] + 1  # a lost session is a KeyError, so a 500
        self.session["n"] = n
        response.write(str(n))


class Get(Servlet):
    def do_GET(self, request, response):
        response.write(f"{self.session.get('n')} {self.session.is_new}")
"""

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = Path(pyserv.__file__).resolve().parent.parent


def application(module_dir: str, module: str, session_dir: str) -> Application:
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    settings = AppSettings(
        name="concurrency", module=module, session_dir=session_dir, session_lock_timeout=30.0
    )
    return Application(settings)


def call(app: Application, servlet: str, sid: str | None = None) -> tuple[int, bytes]:
    environ: dict[str, Any] = {"PATH_INFO": f"/{servlet}"}
    if sid is not None:
        environ["HTTP_COOKIE"] = f"PYSERVSID={sid}"
    setup_testing_defaults(environ)
    seen: list[str] = []

    def start_response(status, headers, exc_info=None):
        seen.append(status)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return int(seen[0].split()[0]), body


def increment(app: Application, sid: str, count: int, threads: int) -> list[str]:
    """*threads* threads each send *count* increments; returns what went wrong."""
    problems: list[str] = []

    def worker() -> None:
        for _ in range(count):
            status, body = call(app, "Increment", sid)
            if status != 200:
                problems.append(f"{status}: {body[:200]!r}")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120.0)
    problems.extend("thread still running" for thread in pool if thread.is_alive())
    return problems


def _increment_in_process(args: tuple[str, str, str], sid, count, threads, barrier) -> None:
    app = application(*args)
    barrier.wait(60.0)
    problems = increment(app, sid, count, threads)
    if problems:
        sys.stderr.write(f"{len(problems)} failed increments, first: {problems[0]}\n")
        sys.exit(1)


@pytest.fixture
def setup(tmp_path: Path):
    """(args for application(), the parent's app, the id of a session holding n = 0)."""
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    module = f"counter_app_{uuid.uuid4().hex}"
    (module_dir / f"{module}.py").write_text(SERVLETS)
    args = (str(module_dir), module, str(tmp_path / "sessions"))
    app = application(*args)
    status, _ = call(app, "Init")
    assert status == 200
    (sid,) = [path.stem for path in (tmp_path / "sessions").rglob("*.session")]
    yield args, app, sid
    sys.path.remove(str(module_dir))
    sys.modules.pop(module, None)


def counter(app: Application, sid: str) -> int:
    status, body = call(app, "Get", sid)
    value, is_new = body.decode().split()
    assert status == 200 and is_new == "False", body
    return int(value)


def run_processes(args, sid, processes: int, count: int, threads: int) -> list[int | None]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    children = [
        context.Process(target=_increment_in_process, args=(args, sid, count, threads, barrier))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        barrier.wait(60.0)  # all apps built: start together
        deadline = time.monotonic() + 120.0
        for child in children:
            child.join(max(deadline - time.monotonic(), 0.1))
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5.0)
    return [child.exitcode for child in children]


def test_sixteen_threads_lose_no_increment(setup):
    args, app, sid = setup

    problems = increment(app, sid, 50, 16)

    assert problems == []
    assert counter(app, sid) == 800


def test_eight_processes_lose_no_increment(setup):
    args, app, sid = setup

    exitcodes = run_processes(args, sid, processes=8, count=200, threads=1)

    assert exitcodes == [0] * 8
    assert counter(app, sid) == 1600


def test_thread_pools_in_two_processes_lose_no_increment(setup):
    args, app, sid = setup

    exitcodes = run_processes(args, sid, processes=2, count=50, threads=4)
    problems = increment(app, sid, 50, 2)  # and the parent's own threads afterwards

    assert exitcodes == [0, 0]
    assert problems == []
    assert counter(app, sid) == 2 * 4 * 50 + 2 * 50


# -- SIGKILL ----------------------------------------------------------------------------------

KILL_CHILD = """
import sys
from test_concurrency import increment_until_killed
increment_until_killed(*sys.argv[1:])
"""


def increment_until_killed(module_dir: str, module: str, session_dir: str, sid: str) -> None:
    """Child: increment forever (bounded: 30 s), one stdout line per answered increment."""
    app = application(module_dir, module, session_dir)
    deadline = time.monotonic() + 30.0
    for _ in range(1_000_000):
        if time.monotonic() > deadline:
            return
        status, body = call(app, "Increment", sid)
        if status != 200:
            sys.stderr.write(f"increment failed: {status} {body[:200]!r}\n")
            sys.exit(3)
        os.write(1, body + b"\n")  # one write per line, so a kill cannot split it


def read_first_line(process: subprocess.Popen, timeout: float) -> bytes:
    fd = process.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer


def test_sigkill_at_random_moments_loses_no_answered_increment(setup):
    args, app, sid = setup
    store = app.store
    seed = time.time_ns()
    rng = random.Random(seed)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])]
    )
    stored = 0
    answered_total = 0
    for kill in range(5):
        with subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, *args, sid],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as child:
            try:
                first = read_first_line(child, 30.0)
                assert b"\n" in first, f"child never answered (seed {seed})"
                time.sleep(rng.uniform(0.0, 0.3))
            finally:
                os.kill(child.pid, signal.SIGKILL)
                rest, errors = child.communicate(timeout=30.0)
        assert child.returncode == -signal.SIGKILL, errors
        answered = [int(line) for line in (first + rest).split()]
        assert answered == list(range(stored + 1, stored + 1 + len(answered))), seed
        answered_total += len(answered)

        lock = store.lock(sid, 0)  # nothing is left held by the dead process
        assert lock is not None
        try:
            record = store.load(sid)
        finally:
            lock.release()
        assert record is not None, f"session no longer verifies after kill {kill} (seed {seed})"
        assert answered[-1] <= record.data["n"] <= answered[-1] + 1, seed
        stored = record.data["n"]

    assert answered_total <= stored <= answered_total + 5
    assert not (Path(args[2]) / "quarantine").exists()
    status, body = call(app, "Increment", sid)
    assert (status, body) == (200, str(stored + 1).encode())
