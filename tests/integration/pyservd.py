"""Run pyservd as a real process for the integration tests.

A :class:`Pyservd` is one daemon started from a config written by :func:`write_config`
into a private work directory under /tmp (0755, so that Apache's www-data workers can
reach the socket). The daemon runs in its own process group; it is stopped by pid
(SIGTERM, then SIGKILL), and so is every process left in its group. Its stderr goes to
``<work>/pyservd.log``.

Started as root (as on CI), pyservd refuses to run without ``user``, so the config says
``user = www-data`` (:data:`WORKER_USER`): the workers drop to it, and the session
directory is theirs. Everything they import after that must be readable by www-data, so
the daemon then runs from ``<work>/pyservd-lib`` (copies of pyserv, container, flup,
multipart and, when installed, redis) with a Python that www-data can execute (see
:func:`daemon_runtime`).

The test servlets are :data:`APP_MODULES`, written into ``<work>/apps``.
"""

from __future__ import annotations

import configparser
import contextlib
import http.client
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from apache import (
    APACHE_USER,
    REPO_ROOT,
    ApacheServer,
    HttpResponse,
    http_get,
    make_work_dir,
    world_readable_python,
)

T = TypeVar("T")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
COOKIE = "PYSERVSID"

# Test servlets: small enough to read at a glance, each showing one thing.
PROBE_MODULE = '''\
"""Servlets that report what the daemon gave them."""

import os
import time


class Paths:
    def run(self, request, response):
        response.write(f"script_name={request.script_name}\\n")
        response.write(f"path_info={request.path_info}\\n")
        response.write(f"extra_path={request.extra_path}\\n")


class Pid:
    def run(self, request, response):
        response.write(f"pid={os.getpid()}\\n")


class Count:
    """Adds one to the session's counter; shows the value before and the pid."""

    def run(self, request, response):
        count = self.session.get("count", 0)
        self.session["count"] = count + 1
        response.write(f"count={count}\\npid={os.getpid()}\\n")


class Sleep:
    """Changes the session, then sleeps ?seconds= before answering."""

    def run(self, request, response):
        self.session["count"] = self.session.get("count", 0) + 1000
        time.sleep(float(request.query.get("seconds", "1")))
        response.write(f"slept pid={os.getpid()}\\n")


class Fail:
    def run(self, request, response):
        raise RuntimeError(f"deliberate failure {request.query.get('token', '')}")
'''

LIFECYCLE_MODULE = '''\
"""A servlet whose init() and destroy() append a line to lifecycle.log."""

import os

MARKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lifecycle.log")


def _mark(event):
    with open(MARKERS, "a") as stream:
        stream.write(f"{event} {os.getpid()}\\n")


class Life:
    def init(self, context):
        _mark("init")

    def destroy(self):
        _mark("destroy")

    def run(self, request, response):
        response.write(f"pid={os.getpid()}\\n")
'''

BADINIT_MODULE = '''\
"""A servlet whose init() raises."""


class Broken:
    def init(self, context):
        raise RuntimeError("deliberate init failure")

    def run(self, request, response):
        response.write("unreachable\\n")
'''

APP_MODULES = {
    "probe.py": PROBE_MODULE,
    "lifecycle.py": LIFECYCLE_MODULE,
    "badinit.py": BADINIT_MODULE,
}

# Whom the workers run as when the tests run as root (pyservd refuses root without it).
WORKER_USER = APACHE_USER if os.geteuid() == 0 else None

SERVER_DEFAULTS = {
    "listen": "unix:{work}/run/pyservd.sock",
    "user": WORKER_USER,
    "socket_group": "www-data",
    "workers": "2",
    "threads": "8",
    "request_timeout": "30",
    "graceful_timeout": "3",
    "error_log": "-",
    "log_level": "info",
}
APP_DEFAULTS = {
    "mount": "/testapp",
    "module": "probe",
    "pythonpath": "{work}/apps:{repo}/examples",
    "session_dir": "{work}/sessions",
}


def write_config(
    work_dir: Path,
    server: Mapping[str, str | None] | None = None,
    app: Mapping[str, str | None] | None = None,
    name: str = "pyservd.conf",
) -> Path:
    """Write ``<work_dir>/<name>`` and the test servlet modules; return the config path.

    *server* and *app* override :data:`SERVER_DEFAULTS` / :data:`APP_DEFAULTS` (a value of
    None drops the key); ``{work}`` and ``{repo}`` in values are filled in.
    """
    apps = work_dir / "apps"
    apps.mkdir(mode=0o755, exist_ok=True)
    for module, source in APP_MODULES.items():
        (apps / module).write_text(source)
        (apps / module).chmod(0o644)
    give_to_worker_user(apps / "lifecycle.log", touch=True)  # lifecycle.py appends to it
    (work_dir / "run").mkdir(mode=0o755, exist_ok=True)
    sections = []
    for header, defaults, overrides in (
        ("[pyservd]", SERVER_DEFAULTS, server or {}),
        ("[app:testapp]", APP_DEFAULTS, app or {}),
    ):
        values = {**defaults, **overrides}
        lines = [
            f"{key} = {value.format(work=work_dir, repo=REPO_ROOT)}"
            for key, value in values.items()
            if value is not None
        ]
        sections.append("\n".join([header, *lines]))
    path = work_dir / name
    path.write_text("\n\n".join(sections) + "\n")
    path.chmod(0o644)
    return path


def require_root(what: str) -> None:
    """Skip the calling test unless we are root (fail instead under CI=true, which runs
    as root: a CI that silently skipped these would prove nothing)."""
    if os.geteuid() == 0:
        return
    import pytest

    message = f"needs root: {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def give_to_worker_user(path: Path, touch: bool = False) -> Path:
    """Make *path* belong to :data:`WORKER_USER` (when there is one); create it first
    (empty) with *touch*."""
    if touch:
        path.touch(mode=0o644, exist_ok=True)
    if WORKER_USER is not None:
        import pwd

        user = pwd.getpwnam(WORKER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def daemon_runtime(work_dir: Path) -> tuple[str, str]:
    """(python, PYTHONPATH) to run pyservd with from *work_dir*.

    As root, the workers become :data:`WORKER_USER`, who must be able to read every
    module they import after that, and the test runner's Python and this checkout may
    sit in a private home directory: so use a Python that user can execute and copies of
    the packages in ``<work>/pyservd-lib`` (made once per work directory).
    """
    if WORKER_USER is None:
        return sys.executable, str(REPO_ROOT)
    import flup
    import multipart

    lib = work_dir / "pyservd-lib"  # not lib/: deploy_cgi_app() makes that one
    if not lib.exists():
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for package in (REPO_ROOT / "pyserv", REPO_ROOT / "container", Path(flup.__file__).parent):
            shutil.copytree(package, lib / package.name, ignore=ignore)
        shutil.copy(multipart.__file__, lib / "multipart.py")
        # The Redis store's client, when installed; redis-py needs async_timeout on the
        # Pythons before 3.11.3 that world_readable_python() may pick.
        for name in ("redis", "async_timeout"):
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin is not None:
                shutil.copytree(Path(spec.origin).parent, lib / name, ignore=ignore)
        for path in (lib, *lib.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
    return world_readable_python(), str(lib)


def socket_path(work_dir: Path) -> Path:
    """Where the default config puts the daemon's socket."""
    return work_dir / "run" / "pyservd.sock"


def socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def child_pids(pid: int) -> list[int]:
    """Live (non-zombie) children of *pid*, from /proc/<pid>/task/*/children."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.update(int(p) for p in (task / "children").read_text().split())
    return sorted(p for p in children if process_state(p) not in (None, "Z"))


def process_state(pid: int) -> str | None:
    """The one-letter state of *pid* (R, S, Z…), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is *pgid*."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll *condition* until it is true (returning its value); fail after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _error_log(config: Path) -> Path | None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    target = parser.get("pyservd", "error_log", fallback="-")
    return None if target == "-" else config.parent / target


class Pyservd:
    """One ``python -m container.cli --config FILE`` process and its workers."""

    def __init__(
        self,
        config: Path,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
    ) -> None:
        self.config = config
        self.work_dir = config.parent
        self.args = args
        self.env = dict(env or {})  # added to the environment
        self.stdin = stdin  # an fd for its stdin (default /dev/null)
        self.log_path = self.work_dir / f"{config.stem}.log"  # its stderr
        self.error_log = _error_log(config)
        self.process: subprocess.Popen[bytes] | None = None
        self._known: set[int] = set()  # every pid seen, for teardown

    @property
    def pid(self) -> int:
        assert self.process is not None, "pyservd has not been started"
        return self.process.pid

    @property
    def socket(self) -> Path:
        return socket_path(self.work_dir)

    def command(self) -> list[str]:
        python, _ = daemon_runtime(self.work_dir)
        return [python, "-m", "container.cli", "--config", str(self.config), *self.args]

    def start(self, wait: str = "ready") -> Pyservd:
        """Start; *wait* is "ready" (the master logged it), "socket" or "none"."""
        _, pythonpath = daemon_runtime(self.work_dir)
        env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1")
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=pythonpath,  # `python -m` puts the working directory first on sys.path
                env=env,
                stdin=subprocess.DEVNULL if self.stdin is None else self.stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._known.add(self.process.pid)
        if wait in ("socket", "ready"):
            wait_until(self._socket_or_exit, START_TIMEOUT, f"{self.socket} to accept")
            assert self.process.poll() is None, f"pyservd exited early:\n{self.log_text()}"
        if wait == "ready":
            self.wait_for_log(f"pyservd {self.pid} ready")
        return self

    def _socket_or_exit(self) -> bool:
        assert self.process is not None
        return self.process.poll() is not None or socket_accepts(self.socket)

    def workers(self) -> list[int]:
        pids = child_pids(self.pid)
        self._known.update(pids)
        return pids

    def wait_for_workers(
        self, count: int, timeout: float = 10.0, exclude: set[int] | frozenset[int] = frozenset()
    ) -> list[int]:
        """The worker pids once there are *count* of them, none in *exclude*, all serving."""

        def settled() -> list[int] | None:
            pids = self.workers()
            if len(pids) != count or set(pids) & set(exclude):
                return None
            log = self.log_text()
            serving = all(re.search(rf"worker {p} \(generation \d+\) serving", log) for p in pids)
            return pids if serving else None

        return wait_until(settled, timeout, f"{count} serving workers")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGTERM the master and wait; SIGKILL whatever is left. Idempotent."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.workers()
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.signal(signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        self.kill_leftovers()
        return self.process.returncode

    def kill_leftovers(self) -> None:
        """SIGKILL, by pid, every process of this daemon still alive."""
        for pid in sorted(self._known | set(group_members(self.pid))):
            if pid != self.pid and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def log_text(self) -> str:
        """Its stderr, then its error log file if it has one."""
        text = ""
        for path in (self.log_path, self.error_log):
            if path is not None and path.exists():
                text += path.read_text(errors="replace")
        return text

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> str:
        """The log once it contains *text*; fails after *timeout* s or if pyservd exits."""

        def found() -> str | None:
            assert self.process is not None
            exited = self.process.poll() is not None
            log = self.log_text()
            if text not in log and exited:
                raise AssertionError(f"pyservd exited with {self.process.returncode}")
            return log if text in log else None

        try:
            return wait_until(found, timeout, repr(text)) or ""
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {text!r} not in its log:\n{self.log_text()}") from None


class Daemons(contextlib.AbstractContextManager):
    """Creates work directories and daemons; on exit stops them all and removes the dirs."""

    def __init__(self) -> None:
        self._cleanup = contextlib.ExitStack()

    def work_dir(self) -> Path:
        work_dir = make_work_dir("pyservd-")
        self._cleanup.callback(shutil.rmtree, work_dir, True)
        return work_dir

    def start(
        self,
        config: Path,
        wait: str = "ready",
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
        daemon_class: type[Pyservd] | None = None,
    ) -> Pyservd:
        daemon = (daemon_class or Pyservd)(config, args, env, stdin)
        self._cleanup.callback(daemon.stop)
        return daemon.start(wait)

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup.close()


def proxy_fcgi_apache_config(socket: Path) -> str:
    """Apache config that loads the shipped conf/apache-proxy-fcgi.conf for *socket*."""
    return f'Define PYSERV_SOCKET "{socket}"\nInclude "{REPO_ROOT}/conf/apache-proxy-fcgi.conf"\n'


def start_site(
    daemons: Daemons,
    apache_factory: Callable[..., ApacheServer],
    server: Mapping[str, str | None] | None = None,
    app: Mapping[str, str | None] | None = None,
    work_dir: Path | None = None,
) -> tuple[Pyservd, ApacheServer]:
    """pyservd with the test config (plus *server*/*app* overrides) behind a private
    Apache that loads the shipped mod_proxy_fcgi config; in a new work directory unless
    *work_dir* (from ``daemons.work_dir()``) is given."""
    config = write_config(work_dir or daemons.work_dir(), server, app)
    daemon = daemons.start(config)
    apache = apache_factory(
        ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(daemon.socket)
    )
    return daemon, apache


# -- HTTP -------------------------------------------------------------------------------


def session_id(response: HttpResponse) -> str:
    """The session id the response sets."""
    for value in response.headers.get_all("Set-Cookie", []):
        if value.startswith(f"{COOKIE}="):
            return value.split(";", 1)[0][len(COOKIE) + 1 :]
    raise AssertionError(f"no {COOKIE} cookie in {response.headers.items()}")


def get(base_url: str, path: str, sid: str | None = None, timeout: float = 10) -> HttpResponse:
    headers = {"Cookie": f"{COOKIE}={sid}"} if sid else {}
    return http_get(base_url + path, headers=headers, timeout=timeout)


def body_field(body: bytes, name: str) -> str:
    """The value of a probe servlet's ``name=value`` line."""
    match = re.search(rb"^" + re.escape(name.encode()) + rb"=(.*)$", body, re.MULTILINE)
    assert match, f"no {name}= line in {body!r}"
    return match.group(1).decode()


def body_number(body: bytes, name: str) -> int:
    return int(body_field(body, name))


@dataclass(frozen=True)
class Outcome:
    """One request of a load run: when it ran and how it ended."""

    started: float
    finished: float
    status: int | None  # None: no HTTP response (the error says why)
    body: bytes = b""
    error: str = ""


def run_load(
    send: Callable[[], HttpResponse],
    *,
    clients: int,
    seconds: float,
    during: Callable[[], object] | None = None,
) -> list[Outcome]:
    """Call *send* from *clients* threads, back to back, for *seconds*; *during* runs in
    the calling thread meanwhile. Return every request's outcome, in no order."""
    deadline = time.monotonic() + seconds
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = send()
                outcome = Outcome(started, time.monotonic(), response.status, response.body)
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(started, time.monotonic(), None, error=repr(exc))
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        if during is not None:
            during()
    finally:
        for thread in threads:
            thread.join(seconds + 15)
    return outcomes
