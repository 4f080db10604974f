"""The master: holds the listening socket, supervises workers, turns signals into actions.

Signal handlers only record: ``signal.set_wakeup_fd`` writes each signal's number to a
pipe, and the loop reads that pipe (waiting at most LOOP_INTERVAL), calls one short method per
signal, then runs the reconcilers — reap exited workers, finish or abandon a pending
reload, keep the worker count, replace workers whose request outlived
``request_timeout`` or whose heartbeat stopped.

Reload (HUP) goes by generations: the new config is read and validated first (on error:
one log line, keep serving), a new generation of workers is started, and the old one is
retired only once every new worker reports that it has booted; if a new worker fails to
import or ``init()``, it is stopped and the old generation keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from pyserv.stores.base import StoreUnavailable

from . import handover, logs, stores, systemd
from .config import EX_CONFIG, Config, ConfigError, ListenAddress
from .config import load as load_config
from .control import ControlServer
from .reloader import ChangeWatcher
from .worker import BOOTING, EXIT_BOOT_FAILED, READY, Worker, WorkerStatus

log = logging.getLogger("pyserv.error")

BOOT_TIMEOUT = 60.0
STATUS_INTERVAL = 5.0
KILL_GRACE = 0.5  # after request_timeout: time for the worker to answer 504 itself
LOOP_INTERVAL = 0.25  # the longest the master sleeps: how late a stuck worker is killed
RESPAWN_BACKOFF = 1.0
_HINTS = {signal.SIGKILL: " (killed: out of memory, or a request past request_timeout?)"}


class StartupError(Exception):
    """pyservd cannot start; the message is one line saying why."""


@dataclass
class _Child:
    pid: int
    generation: int
    status: WorkerStatus
    protocol: str = "fastcgi"
    channel: socket.socket | None = None  # master's end; see handover.py
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False
    kill_at: float = 0.0  # when retiring: SIGKILL if still alive then

    @property
    def heartbeat(self) -> float:
        """Its last sign of life. Not before it started: the status fields are written
        one after the other, so a new worker can already read READY while its first
        heartbeat is still the zero of fresh shared memory."""
        return max(self.status.heartbeat, self.started)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name
        return f"killed by {name}{_HINTS.get(number, '')}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def open_listener(address: ListenAddress, mode: int, group: str | None) -> socket.socket:
    """Bind *address*; a Unix socket gets *mode* and *group* before anyone can connect."""
    if address.kind == "fd":
        return socket.socket(fileno=0)
    if address.kind == "tcp":
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
        sock.listen(socket.SOMAXCONN)
        return sock
    path = address.path
    _remove_stale_socket(path)
    temp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temp)
        os.chmod(temp, mode)
        if group is not None:
            import grp

            os.chown(temp, -1, grp.getgrnam(group).gr_gid)
        sock.listen(socket.SOMAXCONN)
        os.rename(temp, path)
    except OSError as exc:
        sock.close()
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    """Refuse if a live server answers on *path*; remove a dead one's leftover socket."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left by a daemon that crashed
        return
    except OSError as exc:
        raise StartupError(f"{path} exists and is not a usable socket: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"{path}: another pyservd is serving this socket; not starting")


class Arbiter:
    """Runs pyservd's master process. ``run()`` returns the exit code."""

    def __init__(
        self, config: Config, *, http: tuple[str, int] | None = None, reload: bool = False
    ) -> None:
        self.config = config
        self.http = http
        self._watcher = ChangeWatcher(config) if reload else None
        self._http_listener: socket.socket | None = None
        self.generation = 1
        self._children: dict[int, _Child] = {}
        self._pending: list[int] = []  # pids of a reload's new generation
        self._pending_config: Config | None = None
        self._pending_deadline = 0.0
        self._listener: socket.socket | None = None
        self._wakeup_read = -1
        self._next_spawn = 0.0
        self._handover_turn = 0
        self._control: ControlServer | None = None
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) we bound
        self._watchdog = systemd.watchdog_interval()
        self._next_watchdog = 0.0
        self._next_status = 0.0
        self.started = time.monotonic()
        self.last_reload = "none"
        self._stop: str | None = None  # "graceful" or "fast"

    # -- life cycle ----------------------------------------------------------------

    def run(self) -> int:
        logs.setup(self.config.server)
        try:
            stores.check_reachable(self.config)
        except StoreUnavailable as exc:
            log.error("start-up failed: %s", exc)
            systemd.notify(f"STATUS=start-up failed: {exc}")
            return stores.EX_UNAVAILABLE
        except ConfigError as exc:
            log.error("start-up failed: %s", exc)
            return EX_CONFIG
        activated = systemd.listen_fds()
        try:
            if activated:
                self._listener = activated[0]  # socket activation: systemd owns the file
                log.info("serving the socket systemd passed (fd %d)", self._listener.fileno())
            else:
                listen = self.config.server.listen
                self._listener = open_listener(
                    listen, self.config.server.socket_mode, self.config.server.socket_group
                )
                if listen.kind == "unix":
                    # fstat() on a socket describes the socket, not its file: remember
                    # the file, to remove it at exit only if it is still ours.
                    bound = os.stat(listen.path)
                    self._socket_file = (bound.st_dev, bound.st_ino)
            if self.http is not None:
                host, port = self.http
                self._http_listener = open_listener(
                    ListenAddress("tcp", host=host, port=port), 0, None
                )
                log.warning(
                    "development HTTP listener on http://%s:%d/ (not for production)", host, port
                )
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        if self.config.server.control_socket:
            try:
                self._control = ControlServer(
                    self.config.server.control_socket, self._control_request
                )
            except OSError as exc:
                log.error(
                    "cannot create control socket %s: %s",
                    self.config.server.control_socket,
                    exc.strerror,
                )
                self._close_listener()
                return 1
        self._write_pidfile()
        self._install_signals()
        try:
            failure = self._boot()
            if failure is not None:
                log.error("start-up failed: %s", failure)
                systemd.notify(f"STATUS=start-up failed: {failure}", "ERRNO=78")
                return 78
            systemd.notify("READY=1", self._status_line())
            log.info(
                "pyservd %d ready: %d worker(s) on %s",
                os.getpid(),
                self.config.server.workers,
                self.config.server.listen,
            )
            self._main_loop()
            return 0
        finally:
            self._shutdown()

    def _boot(self) -> str | None:
        """Start the first generation; the failure message if a worker cannot boot."""
        pids = self._spawn_generation(self.config, self.generation)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            failure = None
            for pid, status in self._reap():  # forget every one reaped: none is reaped twice
                child_status = self._forget(pid)
                if failure is None and pid in pids:
                    failure = child_status.message or _describe_exit(status)
            if failure is not None:
                return failure
            if all(self._children[pid].status.state == READY for pid in pids):
                return None
            if time.monotonic() > deadline:
                return f"workers did not boot within {BOOT_TIMEOUT:g} s"
            if self._read_signals(0.05) & {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}:
                return "stopped during start-up"

    def _main_loop(self) -> None:
        handlers = {
            signal.SIGHUP: self._handle_hup,
            signal.SIGTERM: self._handle_term,
            signal.SIGINT: self._handle_fast_stop,
            signal.SIGQUIT: self._handle_fast_stop,
            signal.SIGUSR1: self._handle_usr1,
        }
        while self._stop is None:
            for signum in sorted(self._read_signals(LOOP_INTERVAL)):
                handler = handlers.get(signum)
                if handler is not None:
                    handler()
            if self._stop is not None:
                break
            for pid, status in self._reap():
                self._on_exit(pid, status)
            self._reconcile_reload()
            self._reconcile_count()
            self._check_deadlines()
            self._tell_systemd()
            self._reload_on_change()

    def _shutdown(self) -> None:
        fast = self._stop == "fast"
        signum = signal.SIGQUIT if fast else signal.SIGTERM
        for child in self._children.values():
            self._kill(child.pid, signum)
        timeout = 2.0 if fast else self.config.server.graceful_timeout + 1.0
        deadline = time.monotonic() + timeout
        while self._children and time.monotonic() < deadline:
            for pid, _ in self._reap():
                self._forget(pid)
            self._read_signals(0.05)  # also closes connections the workers hand back
        for child in list(self._children.values()):
            log.warning("worker %d did not stop in time: SIGKILL", child.pid)
            self._kill(child.pid, signal.SIGKILL)
        while self._children:
            pid, _ = os.waitpid(-1, 0)
            self._forget(pid)
        self._close_listener()
        if self._control is not None:
            self._control.close()
        if self.config.server.pidfile:
            try:
                os.unlink(self.config.server.pidfile)
            except OSError:
                pass
        log.info("pyservd %d stopped", os.getpid())

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        listen = self.config.server.listen
        identity, self._socket_file = self._socket_file, None
        if listen.kind == "unix" and identity is not None:
            try:
                found = os.stat(listen.path)
                if (found.st_dev, found.st_ino) == identity:
                    os.unlink(listen.path)
            except OSError:
                pass
        self._listener.close()
        self._listener = None
        if self._http_listener is not None:
            self._http_listener.close()

    # -- signals ---------------------------------------------------------------------

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_read = read_fd
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (
            signal.SIGHUP,
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGCHLD,
        ):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number

    def _read_signals(self, timeout: float) -> set[int]:
        import select

        channels = {c.channel: c for c in self._children.values() if c.channel is not None}
        waitables: list = [self._wakeup_read, *channels]
        if self._control is not None:
            waitables.append(self._control)
        try:
            ready, _, _ = select.select(waitables, [], [], timeout)
        except InterruptedError:
            ready = [self._wakeup_read]
        for item in ready:
            if item in channels:
                self._forward_connections(channels[item])
            elif item is self._control:
                self._control.serve_pending()
        found: set[int] = set()
        if self._wakeup_read in ready:
            try:
                while True:
                    data = os.read(self._wakeup_read, 256)
                    if not data:
                        break
                    found.update(data)
            except BlockingIOError:
                pass
        return found

    def _control_request(self, request: dict) -> dict:
        command = request.get("command")
        if command == "status":
            return {"ok": True, **self.status()}
        if command == "reload":
            if self._stop is not None:
                return {"ok": False, "error": "pyservd is stopping"}
            self._handle_hup()
            return {"ok": True, "reload": "started" if self._pending else self.last_reload}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def status(self) -> dict:
        """What ``pyservctl status`` shows and systemd's STATUS= summarises."""
        now = time.monotonic()
        workers = [
            {
                "pid": child.pid,
                "generation": child.generation,
                "protocol": child.protocol,
                "state": {BOOTING: "booting", READY: "ready"}.get(child.status.state, "stopping"),
                "requests": child.status.requests,
                "busy": child.status.busy,
                "retiring": child.retiring,
            }
            for child in sorted(self._children.values(), key=lambda c: c.pid)
        ]
        return {
            "pid": os.getpid(),
            "uptime": round(now - self.started, 1),
            "generation": self.generation,
            "reload_in_progress": bool(self._pending),
            "last_reload": self.last_reload,
            "workers": workers,
            "requests": sum(w["requests"] for w in workers),
        }

    def _forward_connections(self, sender: _Child) -> None:
        """Pass the idle connections a retiring worker sent on to a current worker;
        when there is none (we are stopping), close them."""
        assert sender.channel is not None
        fds = handover.receive(sender.channel)
        if not fds:
            return
        targets = [
            c
            for c in self._current("fastcgi")
            if c is not sender and c.status.state == READY and c.channel is not None
        ]
        unsent = fds if self._stop is None else []
        for _ in range(len(targets)):  # round robin; a worker stopping by itself refuses
            if not unsent:
                break
            self._handover_turn = (self._handover_turn + 1) % len(targets)
            target = targets[self._handover_turn]
            assert target.channel is not None
            unsent = handover.send(target.channel, unsent)
        if unsent:
            log.warning("no worker took %d handed-over connection(s): closed", len(unsent))
        handover.close_all(fds)  # the master's copies

    def _handle_term(self) -> None:
        log.info("SIGTERM: stopping gracefully")
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self._stop = "graceful"

    def _handle_fast_stop(self) -> None:
        log.info("stopping now")
        systemd.notify("STOPPING=1", "STATUS=stopping now")
        self._stop = "fast"

    def _reload_on_change(self) -> None:
        if self._watcher is None or self._pending:
            return
        changes = self._watcher.changed(self.config)
        if changes:
            log.info("--reload: %s changed", ", ".join(changes[:3]))
            self._handle_hup()

    def _status_line(self) -> str:
        """STATUS= for systemctl status: workers, requests served, live sessions."""
        workers = self._current("fastcgi")
        requests = sum(child.status.requests for child in self._children.values())
        text = f"STATUS={len(workers)} workers, {requests} requests served"
        sessions = [c.status.sessions for c in workers if c.status.sessions is not None]
        if sessions:
            text += f", {max(sessions)} live sessions"
        if self.last_reload.startswith("failed"):
            text += f"; last reload {self.last_reload}"
        return text

    def _tell_systemd(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while every worker shows progress
        (a fresh heartbeat), so a stuck worker stops the pings."""
        now = time.monotonic()
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            systemd.notify(self._status_line())
        if self._watchdog is None or now < self._next_watchdog:
            return
        workers = [c for c in self._current("fastcgi") if c.status.state == READY]
        fresh = max(self._watchdog, 2.0)
        if workers and all(now - c.heartbeat < fresh for c in workers):
            systemd.notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog

    def _handle_usr1(self) -> None:
        logs.reopen()
        for pid in self._children:
            self._kill(pid, signal.SIGUSR1)

    def _handle_hup(self) -> None:
        if self._pending:
            log.warning("SIGHUP: a reload is already in progress; ignored")
            return
        systemd.notify("RELOADING=1", systemd.monotonic_usec(), "STATUS=reloading")
        try:
            new_config = load_config(self.config.path)
        except ConfigError as exc:
            self.last_reload = f"failed: {exc}"
            log.error("reload failed, still serving the old configuration: %s", exc)
            systemd.notify("READY=1", self._status_line())
            return
        if new_config.server.listen != self.config.server.listen:
            log.warning(
                "reload: listen changed to %s; restart pyservd to apply it",
                new_config.server.listen,
            )
        log.info("SIGHUP: starting generation %d", self.generation + 1)
        self._pending_config = new_config
        self._pending_deadline = time.monotonic() + BOOT_TIMEOUT
        self._pending = self._spawn_generation(new_config, self.generation + 1)

    # -- workers ---------------------------------------------------------------------

    def _spawn_generation(self, config: Config, generation: int) -> list[int]:
        pids = [self._spawn(config, generation) for _ in range(config.server.workers)]
        if self._http_listener is not None:
            pids.append(self._spawn(config, generation, "http"))
        return pids

    def _spawn(self, config: Config, generation: int, protocol: str = "fastcgi") -> int:
        listener = self._http_listener if protocol == "http" else self._listener
        assert listener is not None
        status = WorkerStatus()
        master_end, worker_end = handover.channel_pair()
        worker = Worker(config, listener, status, generation, protocol, worker_end)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(self._wakeup_read)
                master_end.close()
                for other in self._children.values():
                    if other.channel is not None:
                        other.channel.close()
                code = worker.run()
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        worker_end.close()
        self._children[pid] = _Child(pid, generation, status, protocol, master_end)
        return pid

    def _reap(self) -> list[tuple[int, int]]:
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited.append((pid, status))
        return exited

    def _forget(self, pid: int) -> WorkerStatus:
        child = self._children.pop(pid)
        if child.channel is not None:
            self._forward_connections(child)  # what it sent just before it exited
            child.channel.close()
        if pid in self._pending:
            self._pending.remove(pid)
        return child.status

    def _on_exit(self, pid: int, status: int) -> None:
        child = self._children.get(pid)
        if child is None:
            return
        message = child.status.message
        self._forget(pid)
        if child.retiring and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            log.info("worker %d (generation %d) retired", pid, child.generation)
            return
        detail = f": {message}" if message else ""
        log.warning(
            "worker %d (generation %d) %s%s", pid, child.generation, _describe_exit(status), detail
        )
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILED:
            if child.generation != self.generation:
                self._abandon_reload(message or "a new worker failed to boot")
            else:
                self._next_spawn = time.monotonic() + RESPAWN_BACKOFF

    def _kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _current(self, protocol: str | None = None) -> list[_Child]:
        return [
            c
            for c in self._children.values()
            if c.generation == self.generation
            and not c.retiring
            and (protocol is None or c.protocol == protocol)
        ]

    def _reconcile_count(self) -> None:
        if time.monotonic() < self._next_spawn:
            return
        wanted = {"fastcgi": self.config.server.workers}
        if self._http_listener is not None:
            wanted["http"] = 1
        for protocol, count in wanted.items():
            for _ in range(count - len(self._current(protocol))):
                pid = self._spawn(self.config, self.generation, protocol)
                log.info("worker %d started (generation %d, %s)", pid, self.generation, protocol)

    def _reconcile_reload(self) -> None:
        if self._pending_config is None:
            return
        if self._pending and all(
            self._children[pid].status.state == READY for pid in self._pending
        ):
            old = self._current()
            self.config = self._pending_config
            self.generation += 1
            self._pending, self._pending_config = [], None
            logs.setup(self.config.server)
            for child in old:
                self._retire(child)
            self.last_reload = "ok"
            log.info("reload complete: generation %d serving", self.generation)
            systemd.notify("READY=1", self._status_line())
        elif time.monotonic() > self._pending_deadline:
            self._abandon_reload(f"new workers did not boot within {BOOT_TIMEOUT:g} s")

    def _abandon_reload(self, reason: str) -> None:
        for pid in list(self._pending):
            self._kill(pid, signal.SIGKILL)
            self._children[pid].retiring = True
        self._pending, self._pending_config = [], None
        self.last_reload = f"failed: {reason}"
        log.error("reload failed, old workers keep serving: %s", reason)
        systemd.notify("READY=1", self._status_line())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        timeout = self.config.server.request_timeout
        for child in list(self._children.values()):
            status = child.status
            if child.retiring:
                if child.kill_at and now > child.kill_at:
                    log.warning("worker %d did not retire in time: SIGKILL", child.pid)
                    child.kill_at = 0.0
                    self._kill(child.pid, signal.SIGKILL)
                continue
            if status.state != READY:
                if status.state == BOOTING and now - child.started > BOOT_TIMEOUT:
                    log.error("worker %d did not boot in time: SIGKILL", child.pid)
                    self._kill(child.pid, signal.SIGKILL)
                continue
            oldest = status.oldest_request
            if oldest and now - oldest > timeout + KILL_GRACE:
                log.error(
                    "worker %d: a request has run %.0f s (request_timeout %g s): "
                    "replacing the worker",
                    child.pid,
                    now - oldest,
                    timeout,
                )
                self._replace(child)
            elif now - child.heartbeat > max(timeout, 10.0):
                log.error("worker %d stopped responding: replacing it", child.pid)
                self._replace(child)

    def _retire(self, child: _Child) -> None:
        """Graceful stop: its idle connections come back through its channel."""
        child.retiring = True
        child.kill_at = time.monotonic() + self.config.server.graceful_timeout + 1.0
        self._kill(child.pid, signal.SIGTERM)

    def _replace(self, child: _Child) -> None:
        """SIGKILL: the kernel frees its session locks and nothing half-done is saved."""
        child.retiring = True
        self._kill(child.pid, signal.SIGKILL)

    def _write_pidfile(self) -> None:
        path = self.config.server.pidfile
        if path:
            with open(path, "w") as stream:
                stream.write(f"{os.getpid()}\n")
