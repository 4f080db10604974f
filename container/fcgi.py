"""FastCGI serving: the only module that imports flup.

flup decodes records and adapts them to WSGI; this module owns the connections. flup's
own loop runs a thread per connection (so Apache's persistent ``enablereuse``
connections would pin every thread while idle), installs signal handlers of its own,
and uses ``select()``, which fails above fd 1024. Here instead a selector watches idle
connections and a fixed pool of threads each serves one readable connection until it
is idle again; so ``threads`` bounds running requests, not connections.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable

from flup.server import fcgi_base

from . import handover

log = logging.getLogger("pyserv.error")

WSGIApp = Callable[..., Any]
_CLOSE_DRAIN_SECONDS = 1.0
_RECORD_HANDLERS = {
    fcgi_base.FCGI_GET_VALUES: "_do_get_values",
    fcgi_base.FCGI_BEGIN_REQUEST: "_do_begin_request",
    fcgi_base.FCGI_ABORT_REQUEST: "_do_abort_request",
    fcgi_base.FCGI_PARAMS: "_do_params",
    fcgi_base.FCGI_STDIN: "_do_stdin",
    fcgi_base.FCGI_DATA: "_do_data",
}
_ERROR_PAGE = (
    b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Internal Server Error\n"
)


class _WSGIServer(fcgi_base.BaseFCGIServer):
    """flup's WSGI handler without its CGI fallback, debug page or PATH_INFO guessing."""

    def __init__(self, app: WSGIApp) -> None:
        super().__init__(app, multithreaded=True, multiprocess=True, debug=False)

    def _sanitizeEnv(self, environ: dict[str, Any]) -> None:  # noqa: N802 - flup's name
        # flup would rebuild an empty PATH_INFO from REQUEST_URI (raw, still
        # percent-encoded) minus SCRIPT_NAME (decoded): wrong for mod_proxy_fcgi.
        # The application derives its paths from the mount instead.
        for name, default in (
            ("SCRIPT_NAME", ""),
            ("PATH_INFO", ""),
            ("QUERY_STRING", ""),
            ("REQUEST_METHOD", "GET"),
            ("SERVER_NAME", "localhost"),
            ("SERVER_PORT", "80"),
            ("SERVER_PROTOCOL", "HTTP/1.0"),
        ):
            environ.setdefault(name, default)

    def error(self, req: Any) -> None:
        log.error("FastCGI request %s failed in the WSGI adapter", req.requestId)
        req.stdout.write(_ERROR_PAGE)


def _readable_now(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return True  # let the next read see the error


class _Connection(fcgi_base.Connection):
    """One web-server connection, served in turns by pool threads."""

    def __init__(self, sock: socket.socket, addr: Any, server: _WSGIServer) -> None:
        super().__init__(sock, addr, server, 0)
        self.closed = False

    def serve_until_idle(self) -> bool:
        """Handle records until no request is open and no input waits; False if closed."""
        self._keepGoing = True
        try:
            while self._keepGoing:
                self.process_input()
                if not self._requests and not _readable_now(self._sock):
                    return self._keepGoing
        except (EOFError, OSError, struct.error):
            pass
        self.close()
        return False

    def process_input(self) -> None:
        record = fcgi_base.Record()
        record.read(self._sock)  # EOFError on end of stream or read error
        handler = _RECORD_HANDLERS.get(record.type)
        if handler is not None:
            getattr(self, handler)(record)
        elif record.requestId == fcgi_base.FCGI_NULL_REQUEST_ID:
            self._do_unknown_type(record)

    def _cleanupSocket(self) -> None:  # noqa: N802 - flup's name
        """Close after the last response without flup's unbounded wait for the peer."""
        self.close()

    def detach(self) -> int:
        """Give up this connection's fd (to hand it over) without touching the socket."""
        self.closed = True
        return self._sock.detach()

    def close(self, drain: bool = True) -> None:
        """Close; with *drain*, first read what the peer still sends (bounded)."""
        if self.closed:
            return
        self.closed = True
        if not drain:
            self._sock.close()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(_CLOSE_DRAIN_SECONDS)
            deadline = time.monotonic() + _CLOSE_DRAIN_SECONDS
            while time.monotonic() < deadline and self._sock.recv(4096):
                pass  # unread input would turn our close into a reset that loses the reply
        except OSError:
            pass
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()


class FastCGIServer:
    """Serve *app* over FastCGI on *listener* with a fixed pool of *threads*.

    ``serve(stop)`` runs the connection loop in the calling thread until ``stop`` is
    set; ``tick`` is called at least every ``tick_interval`` seconds from that loop (the
    worker's heartbeat). ``drain(timeout)`` then waits for running requests.
    """

    def __init__(
        self,
        app: WSGIApp,
        listener: socket.socket,
        threads: int,
        channel: socket.socket | None = None,
    ) -> None:
        self._server = _WSGIServer(app)
        self._listener = listener
        self._channel = channel  # to the master: connections handed over, in and out
        self._selector = selectors.DefaultSelector()
        self._ready: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._active = 0
        self._active_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"pyserv-{n}", daemon=True)
            for n in range(threads)
        ]

    @property
    def active(self) -> int:
        """Connections being served by a thread right now."""
        return self._active

    def serve(
        self, stop: threading.Event, tick: Callable[[], None], tick_interval: float = 0.5
    ) -> None:
        for thread in self._threads:
            thread.start()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        if self._channel is not None:
            self._selector.register(self._channel, selectors.EVENT_READ, None)
        while not stop.is_set():
            for key, _ in self._selector.select(tick_interval):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._channel:
                    self._adopt()
                elif key.fileobj == self._wake_read:
                    self._drain_wake_pipe()
                else:
                    self._selector.unregister(key.fileobj)
                    self._dispatch(key.fileobj)
            self._take_back_returned()
            tick()
        self._selector.unregister(self._listener)
        if self._channel is not None:
            self._selector.unregister(self._channel)

    def _adopt(self) -> None:
        """Serve connections a retiring worker handed over (see handover.py)."""
        assert self._channel is not None
        for fd in handover.receive(self._channel):
            sock = socket.socket(fileno=fd)
            sock.setblocking(True)
            self._selector.register(_Connection(sock, None, self._server), selectors.EVENT_READ)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a connection: %s", exc.strerror)
                    return
                raise
            sock.setblocking(True)
            self._selector.register(_Connection(sock, addr, self._server), selectors.EVENT_READ)

    def _dispatch(self, connection: _Connection) -> None:
        with self._active_lock:
            self._active += 1
        self._ready.put(connection)

    def _work(self) -> None:
        while True:
            connection = self._ready.get()
            if connection is None:
                return
            try:
                if connection.serve_until_idle():
                    self._returned.put(connection)
                    self.wake()
            except Exception:
                log.exception("FastCGI connection failed")
                connection.close()
            finally:
                with self._active_lock:
                    self._active -= 1

    def wake(self) -> None:
        """Make ``serve`` look at its stop event now (safe from a signal handler)."""
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_back_returned(self) -> None:
        while True:
            try:
                connection = self._returned.get_nowait()
            except queue.Empty:
                return
            self._selector.register(connection, selectors.EVENT_READ)

    def _release_idle(self) -> None:
        """Hand idle connections to the master (or close them if there is no channel)."""
        self._take_back_returned()
        idle = [
            key.fileobj
            for key in list(self._selector.get_map().values())
            if isinstance(key.fileobj, _Connection)
        ]
        for connection in idle:
            self._selector.unregister(connection)
        if self._channel is None:
            for connection in idle:
                connection.close(drain=False)
            return
        fds = [connection.detach() for connection in idle]
        unsent = handover.send(self._channel, fds)
        if unsent:
            log.warning("could not hand over %d idle connection(s): closing them", len(unsent))
        handover.close_all(fds)  # our copies: the master holds those sent

    def drain(self, timeout: float) -> int:
        """Release idle connections, and busy ones as their request ends, for up to
        *timeout*; return how many were still busy. Call after ``serve`` returned."""
        deadline = time.monotonic() + timeout
        while True:
            self._release_idle()
            if not self._active or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        self._release_idle()  # includes connections handed back by the last requests
        busy = self._active
        for _ in self._threads:
            self._ready.put(None)
        return busy
