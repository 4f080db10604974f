"""One worker process: imports the apps, serves FastCGI, reports to the master.

The constructor runs in the master and only stores arguments; :meth:`Worker.run` runs
in the forked child: reseed random, install signals, check the session directories and
drop privileges (:mod:`container.privileges`), import the apps and run every servlet's
``init()``, then serve until told to stop. What the master needs to know —
booted or failed (and why), heartbeat, requests served, busy threads, the start of the
oldest running request — is published in a small shared-memory :class:`WorkerStatus`.

Signals: TERM = stop accepting, finish running requests within ``graceful_timeout``,
exit 0; INT/QUIT = exit now; USR1 = reopen log files; HUP is the master's.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable

from pyserv.stores.base import StoreUnavailable

from . import logs, privileges
from .apps import Router, build_router
from .config import Config, ConfigError
from .devhttp import DevHTTPServer
from .fcgi import FastCGIServer, TransportLimits

log = logging.getLogger("pyserv.error")

EXIT_BOOT_FAILED = 3  # apps failed to import or init: at start, halt; on reload, keep old
BOOTING, READY, STOPPING = 0, 1, 2


class WorkerStatus:
    """A worker's state in anonymous shared memory, written by it, read by the master.

    Fields are written without a lock: the master only needs recent values, and each
    field is naturally aligned.
    """

    # Written by the serving loop: state, busy, heartbeat, oldest request start, requests.
    _LAYOUT = struct.Struct("=IIddQ")
    # Written by the sweeper thread: live sessions + 1 (0 = not counted yet).
    _SESSIONS = struct.Struct("=Q")
    _MESSAGE = 512
    _MESSAGE_AT = _LAYOUT.size + _SESSIONS.size

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self._MESSAGE_AT + self._MESSAGE)

    def _read(self) -> tuple[int, int, float, float, int]:
        return self._LAYOUT.unpack_from(self._map)

    def publish(self, state: int, busy: int, oldest: float, requests: int) -> None:
        self._LAYOUT.pack_into(self._map, 0, state, busy, time.monotonic(), oldest, requests)

    def publish_sessions(self, count: int) -> None:
        self._SESSIONS.pack_into(self._map, self._LAYOUT.size, count + 1)

    def fail(self, message: str) -> None:
        data = message.encode("utf-8", "replace")[: self._MESSAGE - 1]
        self._map[self._MESSAGE_AT : self._MESSAGE_AT + len(data) + 1] = data + b"\0"

    @property
    def message(self) -> str:
        raw = self._map[self._MESSAGE_AT :]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def state(self) -> int:
        return self._read()[0]

    @property
    def busy(self) -> int:
        return self._read()[1]

    @property
    def heartbeat(self) -> float:
        return self._read()[2]

    @property
    def oldest_request(self) -> float:
        """Monotonic start time of the oldest running request; 0.0 if none."""
        return self._read()[3]

    @property
    def requests(self) -> int:
        return self._read()[4]

    @property
    def sessions(self) -> int | None:
        """Live sessions of this worker's apps at its last sweep; None before one."""
        (stored,) = self._SESSIONS.unpack_from(self._map, self._LAYOUT.size)
        return stored - 1 if stored else None

    def close(self) -> None:
        self._map.close()


class _RequestTracker:
    """Wraps the WSGI app: counts requests, knows when each running one started, and
    gives each a deadline the application enforces before saving a session."""

    def __init__(self, app: Callable[..., Iterable[bytes]], timeout: float) -> None:
        self._app = app
        self._timeout = timeout
        self._running: dict[int, float] = {}
        self.requests = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.monotonic()
        ident = threading.get_ident()
        environ["pyserv.deadline"] = started + self._timeout
        self._running[ident] = started
        try:
            return self._app(environ, start_response)
        finally:
            del self._running[ident]
            self.requests += 1

    def oldest(self) -> float:
        return min(self._running.values(), default=0.0)

    @property
    def busy(self) -> int:
        return len(self._running)


class Worker:
    def __init__(
        self,
        config: Config,
        listener: socket.socket,
        status: WorkerStatus,
        generation: int,
        protocol: str = "fastcgi",
        channel: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.channel = channel
        self.protocol = protocol
        self.status = status
        self.generation = generation
        self._stop = threading.Event()
        self._wake: Callable[[], None] | None = None  # the server's, once serving

    def run(self) -> int:
        """The child's whole life; returns its exit code."""
        random.seed()
        self._install_signals()
        os.environ.pop("HTTP_PROXY", None)  # httpoxy: may come from a request (mod_fcgid)
        server_config = self.config.server
        try:
            privileges.enter_worker(self.config)  # before any servlet import or session
            router = build_router(self.config)
            router.load_servlets()
        except ConfigError as exc:
            return self._boot_failed(str(exc))
        except Exception as exc:
            log.exception("worker %d: servlet init failed", os.getpid())
            return self._boot_failed(f"servlet init failed: {type(exc).__name__}: {exc}")
        tracker = _RequestTracker(logs.access_logged(router), server_config.request_timeout)
        if self.protocol == "http":
            server = DevHTTPServer(tracker, self.listener, server_config.threads)
        else:
            limits = TransportLimits(
                read_timeout=server_config.read_timeout,
                max_connections=server_config.max_connections,
                request_timeout=server_config.request_timeout,
            )
            server = FastCGIServer(
                tracker, self.listener, server_config.threads, self.channel, limits
            )
        sweeper = _Sweeper(router, self.status)
        master = os.getppid()

        def tick() -> None:
            self.status.publish(READY, tracker.busy, tracker.oldest(), tracker.requests)
            if os.getppid() != master and not self._stop.is_set():
                # The master was killed (kill -9, OOM): nobody supervises us or would
                # replace us, and a new pyservd could not bind the socket we still
                # serve. Finish what is running and go, as gunicorn's workers do.
                log.warning("worker %d: the master (%d) is gone: stopping", os.getpid(), master)
                self._stop.set()
            if server_config.max_requests and tracker.requests >= server_config.max_requests:
                log.info("worker %d: served %d requests, recycling", os.getpid(), tracker.requests)
                self._stop.set()
            sweeper.maybe_run()

        self._wake = server.wake
        tick()
        log.info(
            "worker %d (generation %d) serving %s", os.getpid(), self.generation, self.protocol
        )
        server.serve(self._stop, tick)
        self.status.publish(STOPPING, tracker.busy, tracker.oldest(), tracker.requests)
        still_busy = server.drain(server_config.graceful_timeout)
        if still_busy:
            log.warning("worker %d: %d request(s) still running at exit", os.getpid(), still_busy)
        router.close()
        return 0

    def _request_stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            self._wake()

    def _boot_failed(self, message: str) -> int:
        log.error("worker %d: %s", os.getpid(), message)
        self.status.fail(message)
        return EXIT_BOOT_FAILED

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))
        signal.signal(signal.SIGUSR1, lambda *_: logs.reopen())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class _Sweeper:
    """Removes expired sessions now and then (the store lets one process sweep at a
    time), then publishes how many live sessions remain, for systemd's STATUS=."""

    INTERVAL = 60.0
    FIRST_AFTER = (1.0, 5.0)  # seconds after start: a count soon, workers not in step

    def __init__(self, router: Router, status: WorkerStatus) -> None:
        self._router = router
        self._status = status
        self._next = time.monotonic() + random.uniform(*self.FIRST_AFTER)

    def maybe_run(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.INTERVAL
        threading.Thread(target=self._sweep, name="pyserv-sweep", daemon=True).start()

    def _sweep(self) -> None:
        live = 0
        for store in self._router.stores():
            try:
                removed = store.sweep(time.time())
                live += store.count()
            except StoreUnavailable as exc:
                log.warning("session sweep skipped: %s", exc)
                return
            except Exception:
                log.exception("session sweep failed")
                return
            if removed:
                log.info("swept %d expired session(s)", removed)
        self._status.publish_sessions(live)
