"""The one private Apache on 127.0.0.1 that every row goes through, and its backends.

Everything sits in one world-traversable work directory, deployed by the integration
tests' helpers (see :mod:`bench.harness`):

- ``/testapp/``  pyservd with the shipped settings (conf/pyservd.conf) through the shipped
  conf/apache-proxy-fcgi.conf (``enablereuse=on``); ``/w1/``, ``/noreuse/``, ``/scale/``
  and ``/cache/`` are variants, each its own daemon, mount and ``ProxyPass`` line;
- ``/flup/``     the bare flup hello world on a Unix socket, proxied like ``/testapp/``;
- ``/redis/``    two pyservd on TCP ports, their sessions in one private redis-server,
  behind the shipped conf/apache-balancer.conf (its /testapp/ moved to /redis/);
- ``/fcgid``     pyservd started by mod_fcgid with the shipped conf/apache-fcgid.conf
  (its mount moved from /testapp, which the proxy already serves);
- ``/cgi-bin/``  examples/testapp.cgi (PyServ's CGI mode), a hello-world CGI script and
  the seed's design as a CGI counter, all run by the same world-readable Python;
- ``/hello.txt`` a static file.

A backend runs only while its rows are measured (:meth:`Site.serve`), so idle daemons
neither compete for the CPU nor blur its accounting. Every process is stopped by pid.
"""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .harness import (
    APACHE_USER,
    BALANCER_MODULES,
    REPO,
    WORKER_USER,
    ApacheServer,
    Daemons,
    Pyservd,
    RedisServer,
    daemon_pids,
    daemon_runtime,
    deploy_examples,
    deploy_fcgid,
    free_port,
    http_get,
    install_cgi_script,
    make_work_dir,
    proxy_fcgi_apache_config,
    script_alias_config,
    wait_until,
    write_config,
    write_secret,
)

PEERS = Path(__file__).resolve().parent / "peers"
SHIPPED_DAEMON_CONFIG = REPO / "conf" / "pyservd.conf"
SHIPPED_FCGID_CONFIG = REPO / "conf" / "apache-fcgid.conf"
SHIPPED_BALANCER_CONFIG = REPO / "conf" / "apache-balancer.conf"
# conf/pyservd.conf keys that describe one deployment's paths, not how pyservd performs.
_DEPLOYMENT_KEYS = {"listen", "socket_mode", "socket_group", "error_log", "pidfile"}
_APP_KEYS = {"session_timeout", "session_cookie", "session_cache_size", "session_fsync"}
STATIC_BODY = b"Hello, world!\n"
STOP_TIMEOUT = 10.0
MAIN = "testapp"  # the daemon behind the shipped mod_proxy_fcgi config
BALANCED = "redis"  # the mount of the two daemons behind the shipped balancer config
ROUTES = ("a", "b")  # their session_route, as in conf/apache-balancer.conf
# Ports for the balanced daemons and Redis, below Linux's ephemeral range (32768-60999)
# so that no client connection of an earlier row holds one when its server binds it.
_PORTS = range(20000, 32768)


@dataclass(frozen=True)
class DaemonVariant:
    """A pyservd served at ``/<name>/``: the shipped settings with *server* overrides."""

    name: str
    server: dict[str, str] = field(default_factory=dict)
    reuse: bool = True  # enablereuse=on on its ProxyPass line


VARIANTS = (
    DaemonVariant(MAIN),
    DaemonVariant("w1", {"workers": "1"}),
    DaemonVariant("noreuse", reuse=False),
    DaemonVariant("scale"),
    DaemonVariant("cache", {"workers": "1"}),  # one worker holds every cached session
)


@dataclass(frozen=True)
class Serving:
    """A running backend, as a row's measurement needs to see it.

    ``app_cpu`` says where the application's CPU time is found: ``"roots"`` (the trees of
    ``app_roots()``), ``"apache-tree"`` (non-Apache processes under Apache: mod_fcgid),
    ``"difference"`` (short-lived CGI processes: see :mod:`bench.cpu`) or ``"none"``.
    """

    app_cpu: str
    app_roots: Callable[[], list[int]] = list
    session_dir: Path | None = None


def shipped_settings() -> tuple[dict[str, str], dict[str, str]]:
    """The performance settings of conf/pyservd.conf: ([pyservd], [app:...]) overrides."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read(SHIPPED_DAEMON_CONFIG)
    app_section = next(s for s in parser.sections() if s.startswith("app:"))
    server = {k: v for k, v in parser["pyservd"].items() if k not in _DEPLOYMENT_KEYS}
    app = {k: v for k, v in parser[app_section].items() if k in _APP_KEYS}
    return server, app


def _free_ports(count: int) -> list[int]:
    """*count* distinct ports free on 127.0.0.1 now, from :data:`_PORTS` if possible."""
    ports: list[int] = []
    for _ in range(count):
        ports.append(free_port(port for port in _PORTS if port not in ports))
    return ports


def _set_option(path: Path, section: str, key: str, value: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    parser[section][key] = value
    with open(path, "w") as stream:
        parser.write(stream)


class Site(contextlib.AbstractContextManager):
    """Deploys everything, starts Apache; on exit stops every process and removes it all."""

    def __init__(self) -> None:
        self._cleanup = contextlib.ExitStack()
        self.work_dir = Path()
        self.cgi_bin = Path()
        self.apache: ApacheServer | None = None
        self._daemons = Daemons()
        self._configs: dict[str, Path] = {}
        self._workers: dict[str, int] = {}
        self._redis: RedisServer | None = None  # started by serve("balancer")

    @property
    def base_url(self) -> str:
        assert self.apache is not None
        return self.apache.base_url

    @property
    def apache_pid(self) -> int:
        assert self.apache is not None
        return self.apache.pid

    def __enter__(self) -> Site:
        try:
            self._start()
        except BaseException:
            self._cleanup.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup.close()

    def _start(self) -> None:
        self.work_dir = make_work_dir("pyserv-bench-")
        self._cleanup.callback(shutil.rmtree, self.work_dir, True)
        self._cleanup.enter_context(self._daemons)
        self.cgi_bin = self._deploy_cgi()
        (self.work_dir / "htdocs").mkdir(mode=0o755)
        (self.work_dir / "htdocs" / "hello.txt").write_bytes(STATIC_BODY)
        (self.work_dir / "htdocs" / "hello.txt").chmod(0o644)
        fcgid_config = self._deploy_fcgid()
        server, app = shipped_settings()
        proxy_lines = []
        for variant in VARIANTS:
            work = self._daemons.work_dir()
            settings = {**server, **variant.server}
            self._workers[variant.name] = int(settings.get("workers", "2"))
            self._configs[variant.name] = write_config(
                work, settings, {**app, "mount": f"/{variant.name}"}
            )
            socket = work / "run" / "pyservd.sock"
            if variant.name == MAIN:
                proxy_lines.append(proxy_fcgi_apache_config(socket))
            else:
                proxy_lines.append(self._proxy_pass(variant.name, socket, variant.reuse))
        proxy_lines.append(self._proxy_pass("flup", self.flup_socket, reuse=True))
        balancer_lines = self._deploy_balancer(server, app)
        extra_config = "\n".join(
            [
                "# One connection serves any number of requests (default: 100, then a close).",
                "MaxKeepAliveRequests 0",
                *proxy_lines,
                *balancer_lines,
                script_alias_config("/cgi-bin/", self.cgi_bin),
                f'Define PYSERV_FCGI_WRAPPER "{self.work_dir}/fcgid/pyservd.fcgi"',
                f'Include "{fcgid_config}"',
            ]
        )
        self.apache = ApacheServer(
            self.work_dir, [*BALANCER_MODULES, "cgid", "fcgid"], extra_config=extra_config
        )
        self._cleanup.callback(self._stop_fcgid_daemons)  # runs after Apache has stopped
        self._cleanup.callback(self.apache.stop)
        self.apache.start()

    @staticmethod
    def _proxy_pass(name: str, socket: Path, reuse: bool) -> str:
        options = " enablereuse=on" if reuse else ""
        return f'ProxyPass "/{name}/" "unix:{socket}|fcgi://{name}/{name}/"{options}'

    def _deploy_cgi(self) -> Path:
        cgi_bin = deploy_examples(self.work_dir)
        install_cgi_script(cgi_bin, "hello.cgi", (PEERS / "hello_cgi.py").read_text())
        install_cgi_script(cgi_bin, "seed.cgi", (PEERS / "seed_counter_cgi.py").read_text())
        return cgi_bin

    def _deploy_fcgid(self) -> Path:
        """The fcgid tests' layout in ``<work>/fcgid``, mounted at /fcgid; return the
        shipped conf/apache-fcgid.conf with its /testapp location moved to /fcgid."""
        fcgid_dir = self.work_dir / "fcgid"
        fcgid_dir.mkdir(mode=0o755)
        deploy_fcgid(fcgid_dir)
        _set_option(fcgid_dir / "pyservd-fcgid.conf", "app:testapp", "mount", "/fcgid")
        text = SHIPPED_FCGID_CONFIG.read_text()
        for directive in ("Alias ", "<Location "):
            text = text.replace(f"{directive}/testapp", f"{directive}/fcgid")
        config = fcgid_dir / "apache-fcgid.conf"
        config.write_text(text)
        config.chmod(0o644)
        return config

    def _deploy_balancer(self, server: dict[str, str], app: dict[str, str]) -> list[str]:
        """Configs of two daemons (``redis-a``, ``redis-b``) with the shipped settings, each
        on a TCP port, sharing one key file and one Redis, mounted at /redis; return the
        Apache lines that include the shipped conf/apache-balancer.conf, remounted there."""
        shared = self.work_dir / BALANCED
        shared.mkdir(mode=0o755)
        redis_port, *ports = _free_ports(1 + len(ROUTES))
        self._redis = RedisServer(shared / "redis-server", port=redis_port)
        secret = write_secret(shared / "testapp.key")
        lines = []
        for route, port in zip(ROUTES, ports):
            name = f"{BALANCED}-{route}"
            settings = {**server, "listen": f"127.0.0.1:{port}", "socket_group": None}
            self._workers[name] = int(settings.get("workers", "2"))
            self._configs[name] = write_config(
                self._daemons.work_dir(),
                settings,
                {
                    **app,
                    "mount": f"/{BALANCED}",
                    "session_dir": None,
                    "session_store": self._redis.url,
                    "secret_file": str(secret),
                    "session_route": route,
                },
            )
            lines.append(f'Define PYSERV_BACKEND_{route.upper()} "fcgi://127.0.0.1:{port}"')
        text = SHIPPED_BALANCER_CONFIG.read_text()
        for old, new in (
            ('"/testapp/"', f'"/{BALANCED}/"'),  # ProxyPass and <Location>
            ("balancer://pyserv/testapp/", f"balancer://pyserv/{BALANCED}/"),
        ):
            if old not in text:
                raise RuntimeError(f"{SHIPPED_BALANCER_CONFIG} has no {old}: see bench/site.py")
            text = text.replace(old, new)
        config = shared / "apache-balancer.conf"
        config.write_text(text)
        config.chmod(0o644)
        return [*lines, f'Include "{config}"']

    def _stop_fcgid_daemons(self) -> None:
        """Kill, by pid, any mod_fcgid daemon that outlived Apache."""
        for pid in daemon_pids(self.work_dir / "fcgid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- backends ----------------------------------------------------------------------

    def session_dir(self, variant: str) -> Path:
        """The session directory of pyservd variant *variant* (see write_config)."""
        return self._configs[variant].parent / "sessions"

    @property
    def session_owner(self) -> tuple[int, int] | None:
        """(uid, gid) that pyservd's workers run as, when they drop privileges."""
        if WORKER_USER is None:
            return None
        entry = pwd.getpwnam(WORKER_USER)
        return entry.pw_uid, entry.pw_gid

    @property
    def daemon_python(self) -> str:
        """The interpreter pyservd runs on (the harness's choice); flup runs on it too."""
        return daemon_runtime(self.work_dir)[0]

    @property
    def flup_socket(self) -> Path:
        return self.work_dir / "flup" / "flup.sock"

    @contextlib.contextmanager
    def serve(self, backend: str) -> Iterator[Serving]:
        """Run *backend* ("pyservd:NAME", "balancer", "flup", "fcgid", "cgi", "static")
        meanwhile."""
        kind, _, name = backend.partition(":")
        if kind == "pyservd":
            with self.pyservd(name) as daemon:
                yield Serving("roots", lambda: [daemon.pid], self.session_dir(name))
        elif kind == "balancer":
            with self._balanced() as pids:
                yield Serving("roots", lambda: pids)
        elif kind == "flup":
            with self._flup() as pid:
                yield Serving("roots", lambda: [pid])
        elif kind == "fcgid":
            yield Serving("apache-tree", session_dir=self.work_dir / "fcgid" / "sessions")
        elif kind == "cgi":
            yield Serving("difference", session_dir=self.cgi_bin / "sessions")
        elif kind == "static":
            yield Serving("none")
        else:
            raise ValueError(f"unknown backend {backend!r}")

    @contextlib.contextmanager
    def pyservd(self, variant: str) -> Iterator[Pyservd]:
        """Start the daemon of *variant*, wait until its workers serve; stop it after."""
        daemon = Pyservd(self._configs[variant])
        try:
            # "ready" follows the bind; a TCP listener has no socket file to wait for.
            daemon.start(wait="none")
            daemon.wait_for_log(f"pyservd {daemon.pid} ready")
            daemon.wait_for_workers(self._workers[variant])
            yield daemon
        finally:
            daemon.stop()

    @contextlib.contextmanager
    def _balanced(self) -> Iterator[list[int]]:
        """Run redis-server and the two balanced daemons; yield their pids (the
        application's CPU includes Redis's), once a request without a session cookie has
        reached each daemon."""
        assert self._redis is not None
        with self._redis as redis, self.pyservd(f"{BALANCED}-{ROUTES[0]}") as first:
            with self.pyservd(f"{BALANCED}-{ROUTES[1]}") as second:
                self._check_alternation(first, second)
                yield [first.pid, second.pid, redis.pid]

    def _check_alternation(self, *daemons: Pyservd) -> None:
        """Raise unless byrequests sends requests without a route to every daemon."""
        served: set[int] = set()
        for _ in range(4 * len(daemons)):
            response = http_get(f"{self.base_url}/{BALANCED}/Pid")
            match = re.search(rb"^pid=(\d+)$", response.body, re.MULTILINE)
            if response.status != 200 or match is None:
                raise RuntimeError(f"/{BALANCED}/Pid answered {response.status}: {response.body!r}")
            pid = int(match.group(1))
            served |= {index for index, daemon in enumerate(daemons) if pid in daemon.workers()}
        if len(served) < len(daemons):
            raise RuntimeError(f"the balancer sent every request to daemon {served}")

    @contextlib.contextmanager
    def _flup(self) -> Iterator[int]:
        socket = self.flup_socket
        socket.parent.mkdir(mode=0o755, exist_ok=True)
        python, pythonpath = daemon_runtime(self.work_dir)  # pyservd's Python and flup
        with open(socket.parent / "flup.log", "ab") as log:
            process = subprocess.Popen(
                [python, str(PEERS / "flup_hello.py"), str(socket)],
                env=dict(os.environ, PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(lambda: socket.exists() or process.poll() is not None, 10, "flup")
            if process.poll() is not None:
                raise RuntimeError(f"flup exited with {process.returncode}: see {log.name}")
            os.chown(socket, -1, grp.getgrnam(APACHE_USER).gr_gid)  # created 0660
            yield process.pid
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_TIMEOUT)
