"""Two pyservd hosts behind Apache's mod_proxy_balancer (the shipped
conf/apache-balancer.conf), sharing their sessions in one real redis-server.

Each daemon stands in for a host: its own work directory, its own FastCGI port on
127.0.0.1, the same secret_file and session_store. Which host served a request is told
by the worker pid that the probe servlets print.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from apache import ApacheServer, HttpResponse, free_port
from pyservd import (
    COOKIE,
    REPO_ROOT,
    Daemons,
    Pyservd,
    body_number,
    get,
    give_to_worker_user,
    group_members,
    socket_path,
    wait_until,
    write_config,
)
from redis_server import RedisServer, require_redis

pytestmark = pytest.mark.integration

BALANCER_MODULES = ["proxy", "proxy_fcgi", "proxy_balancer", "slotmem_shm", "lbmethod_byrequests"]
EX_UNAVAILABLE = 69
EX_CONFIG = 78


@dataclass
class Host:
    """One pyservd standing in for a host: the balancer's route name and its daemon."""

    route: str
    daemon: Pyservd
    port: int

    def pids(self) -> set[int]:
        return {self.daemon.pid, *self.daemon.workers()}


@dataclass
class Cluster:
    redis: RedisServer
    hosts: list[Host]
    apache: ApacheServer

    def host_of(self, response: HttpResponse) -> Host:
        """The host whose worker answered (the probe servlets print ``pid=``)."""
        pid = body_number(response.body, "pid")
        for host in self.hosts:
            if pid in host.pids():
                return host
        known = {host.route: sorted(host.pids()) for host in self.hosts}
        raise AssertionError(f"pid {pid} belongs to neither daemon {known}")

    def other(self, host: Host) -> Host:
        return next(h for h in self.hosts if h is not host)


def balancer_apache_config(ports: list[int]) -> str:
    """Apache config that loads the shipped conf/apache-balancer.conf for two ports."""
    a, b = ports
    return (
        f'Define PYSERV_BACKEND_A "fcgi://127.0.0.1:{a}"\n'
        f'Define PYSERV_BACKEND_B "fcgi://127.0.0.1:{b}"\n'
        f'Include "{REPO_ROOT}/conf/apache-balancer.conf"\n'
    )


def write_secret(path: Path) -> Path:
    """A key file every host shares, readable by the workers' user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as stream:
        stream.write(secrets.token_hex(32) + "\n")
    return give_to_worker_user(path)


def write_password(path: Path, password: str) -> Path:
    """The Redis password file pyservd reads (session_store_password_file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as stream:
        stream.write(password + "\n")
    return give_to_worker_user(path)


def redis_config(
    work_dir: Path,
    store: str,
    *,
    secret: Path | None = None,
    password: Path | None = None,
    route: str | None = None,
    port: int | None = None,
) -> Path:
    """A pyservd config whose app keeps sessions in *store* (no session_dir), signed with
    *secret* (hosts share one; by default a new one), on TCP *port* if given (a host)."""
    if secret is None:
        secret = write_secret(work_dir / "testapp.key")
    server = {"listen": f"127.0.0.1:{port}", "socket_group": None} if port else None
    return write_config(
        work_dir,
        server=server,
        app={
            "session_dir": None,
            "session_store": store,
            "session_store_password_file": None if password is None else str(password),
            "secret_file": str(secret),
            "session_route": route,
        },
    )


def start_daemon(daemons: Daemons, config: Path) -> Pyservd:
    """Start pyservd on a TCP listener (the harness waits for Unix sockets) until ready."""
    daemon = daemons.start(config, wait="none")
    daemon.wait_for_log(f"pyservd {daemon.pid} ready")
    return daemon


@contextlib.contextmanager
def cluster(
    daemons: Daemons, apache_factory, routes: tuple[str | None, str | None]
) -> Iterator[Cluster]:
    """redis-server (with a password), one pyservd per entry of *routes* (its
    session_route), and Apache."""
    require_redis()
    shared = daemons.work_dir()
    redis = RedisServer(shared / "redis", password=secrets.token_urlsafe(16))
    try:
        redis.start()
        secret = write_secret(shared / "testapp.key")
        password = write_password(shared / "redis.pass", redis.password)
        hosts = []
        for name, route in zip("ab", routes):
            port = free_port()
            config = redis_config(
                daemons.work_dir(),
                redis.url,
                secret=secret,
                password=password,
                route=route,
                port=port,
            )
            hosts.append(Host(name, start_daemon(daemons, config), port))
        apache = apache_factory(
            BALANCER_MODULES, extra_config=balancer_apache_config([h.port for h in hosts])
        )
        yield Cluster(redis, hosts, apache)
    finally:
        redis.stop()


def session_cookie(response: HttpResponse) -> str | None:
    """The value of the session cookie the response sets, None if it sets none."""
    for value in response.headers.get_all("Set-Cookie", []):
        if value.startswith(f"{COOKIE}="):
            return value.split(";", 1)[0][len(COOKIE) + 1 :]
    return None


def kill_host(host: Host) -> None:
    """SIGKILL the daemon's master, then its workers, by pid, as when its machine dies.

    The master goes first: killed after one of its workers, it could fork a replacement
    in between, and workers outlive their master (they keep serving on its socket).
    """
    master = host.daemon.pid
    os.kill(master, signal.SIGKILL)
    host.daemon.wait(timeout=10)

    def all_gone() -> bool:
        left = group_members(master)  # its process group: the workers, orphaned now
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not left

    wait_until(all_gone, 10, "the killed daemon's workers to be gone")


# -- round robin: one session, both hosts at once -----------------------------------------


def test_round_robin_hosts_count_one_shared_session_exactly(daemons, apache_factory) -> None:
    clients, each = 8, 125
    with cluster(daemons, apache_factory, routes=(None, None)) as site:
        first = get(site.apache.base_url, "/testapp/Count")
        assert first.status == 200, first
        sid = session_cookie(first)
        assert sid is not None and "." not in sid  # no route: lbmethod picks each time

        answers: list[HttpResponse] = []
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + 30  # 8 x 125 takes about 5 s

        def client() -> None:
            for _ in range(each):
                if time.monotonic() > deadline:
                    return
                try:
                    response = get(site.apache.base_url, "/testapp/Count", sid)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors.append(repr(exc))
                    return
                with lock:
                    answers.append(response)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(45)
        assert not any(thread.is_alive() for thread in threads), "clients still running"

        assert errors == []  # a request lost in transit might or might not have counted
        assert [r.status for r in answers] == [200] * len(answers), answers
        assert len(answers) == clients * each, f"only {len(answers)} answers in 30 s"
        assert [session_cookie(r) for r in answers] == [None] * len(answers)  # never replaced
        served = Counter(site.host_of(r).route for r in answers)
        assert min(served["a"], served["b"]) >= len(answers) // 4, served  # byrequests: ~1/2
        final = get(site.apache.base_url, "/testapp/Count", sid)
        assert final.status == 200
        # The first request stored 1; all 1,000 increments are in Redis, none lost.
        assert body_number(final.body, "count") == 1 + clients * each


# -- sticky routes and failover --------------------------------------------------------


def test_session_sticks_to_its_route_and_fails_over_with_its_state(daemons, apache_factory) -> None:
    with cluster(daemons, apache_factory, routes=("a", "b")) as site:
        base = site.apache.base_url
        first = get(base, "/testapp/Count")
        assert first.status == 200, first
        home = site.host_of(first)
        value = session_cookie(first)
        assert value is not None and value.endswith(f".{home.route}"), value
        sid = value.rpartition(".")[0]

        for count in range(1, 21):
            response = get(base, "/testapp/Count", value)
            assert response.status == 200
            assert site.host_of(response) is home  # sticky: never the other host
            assert body_number(response.body, "count") == count
            assert session_cookie(response) is None  # the route is right: nothing to re-issue

        kill_host(home)
        survivor = site.other(home)
        moved = get(base, "/testapp/Count", value)
        assert moved.status == 200, (moved, site.apache.error_log_text()[-2000:])
        assert site.host_of(moved) is survivor
        assert body_number(moved.body, "count") == 21  # the same session, nothing lost
        assert session_cookie(moved) == f"{sid}.{survivor.route}"  # re-routed to its new host

        rerouted = f"{sid}.{survivor.route}"
        for count in range(22, 27):
            response = get(base, "/testapp/Count", rerouted)
            assert response.status == 200
            assert site.host_of(response) is survivor
            assert body_number(response.body, "count") == count
            assert session_cookie(response) is None


# -- Redis outages -----------------------------------------------------------------------


def test_redis_stopped_answers_503_to_sessions_only_and_recovers(daemons, apache_factory) -> None:
    with cluster(daemons, apache_factory, routes=("a", "b")) as site:
        base = site.apache.base_url
        value = session_cookie(get(base, "/testapp/Count"))
        assert value is not None
        assert get(base, "/testapp/Count", value).status == 200

        site.redis.stop()

        for cookie in (None, value):  # a servlet that never touches the session
            assert get(base, "/testapp/Pid", cookie).status == 200
        for cookie in (value, None):  # an existing session; one that would be created
            for _ in range(2):  # whichever host the balancer picks
                started = time.monotonic()
                refused = get(base, "/testapp/Count", cookie)
                elapsed = time.monotonic() - started
                assert refused.status == 503, refused
                assert elapsed < 1.5, f"503 after {elapsed:.2f} s"
                assert refused.headers.get("Retry-After") == "1"
                assert session_cookie(refused) is None  # nothing minted, nothing re-routed

        site.redis.restart()  # same port; the test server keeps nothing across restarts

        def new_session() -> str | None:
            response = get(base, "/testapp/Count")
            return session_cookie(response) if response.status == 200 else None

        value = wait_until(new_session, 5, "session requests to succeed again", interval=0.1)
        sid = value.rpartition(".")[0]  # no route: the balancer alternates
        served = set()
        for count in range(1, 5):
            response = get(base, "/testapp/Count", sid)
            assert response.status == 200, response
            assert body_number(response.body, "count") == count
            served.add(site.host_of(response).route)
        assert served == {"a", "b"}  # both daemons reconnected by themselves


def start_up_failure(daemon: Pyservd, status: int) -> str:
    """The one line a daemon that refused to start logged; it exited with *status*."""
    assert daemon.wait(timeout=15) == status
    log = daemon.log_text()
    failures = [line for line in log.splitlines() if "start-up failed" in line]
    assert len(failures) == 1, log
    assert "Traceback" not in log, log
    return failures[0]


def test_redis_unreachable_at_start_exits_69_naming_app_and_address(daemons) -> None:
    require_redis()
    work_dir = daemons.work_dir()
    port = free_port()  # nothing listens there
    config = redis_config(work_dir, f"redis://127.0.0.1:{port}/0")
    daemon = daemons.start(config, wait="none")
    failure = start_up_failure(daemon, EX_UNAVAILABLE)
    assert "[app:testapp]" in failure and f"127.0.0.1:{port}" in failure, failure
    assert "cannot reach Redis" in failure, failure
    assert not socket_path(work_dir).exists()
    assert not (work_dir / "run" / "pyservd.ctl").exists()
    assert group_members(daemon.pid) == []


def test_wrong_redis_password_exits_69_without_showing_it(daemons) -> None:
    require_redis()
    work_dir = daemons.work_dir()
    with RedisServer(work_dir / "redis", password=secrets.token_urlsafe(16)) as redis:
        wrong = secrets.token_urlsafe(16)
        password = write_password(work_dir / "pass", wrong)
        config = redis_config(work_dir, redis.url, password=password)
        daemon = daemons.start(config, wait="none")
        failure = start_up_failure(daemon, EX_UNAVAILABLE)
    assert "[app:testapp]" in failure and "password was refused" in failure, failure
    log = daemon.log_text()
    assert wrong not in log and redis.password not in log
    assert not socket_path(work_dir).exists()


def test_unreadable_redis_password_file_exits_78_naming_it(daemons) -> None:
    require_redis()
    work_dir = daemons.work_dir()
    missing = work_dir / "no-such.pass"
    config = redis_config(work_dir, f"redis://127.0.0.1:{free_port()}/0", password=missing)
    daemon = daemons.start(config, wait="none")
    failure = start_up_failure(daemon, EX_CONFIG)
    assert "session_store_password_file" in failure and str(missing) in failure, failure
