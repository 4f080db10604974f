"""FastCGI serving: the only module that imports flup.

flup adapts a request to WSGI and writes the response; this module owns everything that
reads from the web server, because flup (checked on this machine) has no limits and no
timeouts: a malformed record hangs a connection, a name-value pair split across PARAMS
records arrives truncated, any number of parameters is accepted, and its loop gives
every connection a thread, so idle or half-open connections starve real requests.

Here one I/O thread (the caller of :meth:`FastCGIServer.serve`) reads every connection
without blocking, parses records itself and collects a request's PARAMS whole, within
limits. Only a request whose PARAMS are complete is handed to one of a fixed pool of
threads, so ``threads`` bounds running requests, and slow or idle connections cost a
file descriptor, never a thread. The I/O thread also answers on its own, without a
thread: 431 for oversized parameters, 503 when no thread frees up within
``queue_timeout``, 504 for a request past ``request_timeout`` (the master then replaces
the worker). A malformed record or an incomplete request older than ``read_timeout``
closes its connection with one log line.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flup.server import fcgi_base

from . import handover

log = logging.getLogger("pyserv.error")

WSGIApp = Callable[..., Any]
_HEADER = struct.Struct("!BBHHBx")  # version, type, request id, content length, padding
_BEGIN_BODY = struct.Struct("!HB5x")  # role, flags
_CLOSE_DRAIN_SECONDS = 1.0
_RECV_BYTES = 65536
_HELD_BYTES = 65536  # response bytes queued before they are sent anyway
_DEADLINE_CHECK_INTERVAL = 0.25


@dataclass(frozen=True)
class TransportLimits:
    read_timeout: float = 30.0  # an incomplete request, or a stalled body, this long: close
    max_connections: int = 1024  # per worker; more are closed at once
    max_fcgi_params: int = 1000  # FastCGI parameters (CGI variables, headers): 431 beyond
    max_fcgi_param_bytes: int = 256 * 1024  # their encoded size: 431 beyond
    queue_timeout: float = 1.0  # wait for a free thread this long, then 503
    request_timeout: float = 30.0  # then 504, and the master replaces the worker


class ProtocolError(Exception):
    """Input that is not FastCGI as the web server speaks it: close the connection."""


def decode_params(data: bytes, max_count: int) -> dict[str, str] | None:
    """Decode a request's whole PARAMS stream; None if it has more than *max_count*."""
    params: dict[str, str] = {}
    position, end = 0, len(data)
    while position < end:
        lengths = []
        for _ in range(2):
            if position >= end:
                raise ProtocolError("truncated name-value length")
            if data[position] < 128:
                lengths.append(data[position])
                position += 1
            elif position + 4 <= end:
                lengths.append(struct.unpack_from("!I", data, position)[0] & 0x7FFFFFFF)
                position += 4
            else:
                raise ProtocolError("truncated name-value length")
        name_end = position + lengths[0]
        value_end = name_end + lengths[1]
        if value_end > end:
            raise ProtocolError("name-value pair longer than its PARAMS stream")
        if len(params) >= max_count:
            return None
        params[data[position:name_end].decode("latin-1")] = data[name_end:value_end].decode(
            "latin-1"
        )
        position = value_end
    return params


def _record_bytes(kind: int, request_id: int, content: bytes) -> bytes:
    padding = -len(content) % 8
    return _HEADER.pack(1, kind, request_id, len(content), padding) + content + bytes(padding)


def _dead_socket() -> socket.socket:
    """A socket whose reads see end of input and whose writes fail: what a thread that
    outlived its deadline keeps, once its connection has been answered and passed on."""
    mine, other = socket.socketpair()
    other.close()
    return mine


def _canned(status: str, text: str, extra: str = "") -> bytes:
    body = f"{text}\n".encode()
    head = (
        f"Status: {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


_serving = threading.local()  # .connection: the connection a pool thread is running


class _PoolSlot:
    """One pool thread's hand-off: the I/O thread sets ``connection`` and releases
    ``wake``, which wakes that thread alone. (A queue shared by every idle thread wakes
    a second waiter on each hand-off, only for it to go back to sleep: two more thread
    switches and GIL hand-offs per request.) ``connection`` None means: stop."""

    __slots__ = ("wake", "connection")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held until there is work
        self.connection: _Connection | None = None


def _streaming_flushes(app: WSGIApp) -> WSGIApp:
    """*app*, whose WSGI ``write`` calls (streamed output) are sent at once; a returned
    body goes out with the end of the response (see :meth:`_Connection.writeRecord`)."""

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def start(status: str, headers: list[Any], exc_info: Any = None) -> Callable[..., Any]:
            write = start_response(status, headers, exc_info)

            def write_now(data: bytes) -> None:
                write(data)
                connection = getattr(_serving, "connection", None)
                if connection is not None:
                    connection.flush_output()

            return write_now

        return app(environ, start)

    return application


class _WSGIServer(fcgi_base.BaseFCGIServer):
    """flup's WSGI handler without its CGI fallback, debug page or PATH_INFO guessing."""

    def __init__(self, app: WSGIApp) -> None:
        super().__init__(
            _streaming_flushes(app), multithreaded=True, multiprocess=True, debug=False
        )

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
        # The FastCGI STDIN stream has an end: a chunked body (no CONTENT_LENGTH) can be
        # read to it; flup does not say so, and PEP 3333 readers would read nothing.
        environ["wsgi.input_terminated"] = True

    def error(self, req: Any) -> None:
        log.error("FastCGI request %s failed in the WSGI adapter", req.requestId)
        req.stdout.write(_canned("500 Internal Server Error", "Internal Server Error"))


class _Connection(fcgi_base.Connection):
    """One web-server connection. The I/O thread parses it up to a complete request
    (:meth:`receive`); a pool thread then runs that request (:meth:`run_ready`)."""

    def __init__(self, sock: socket.socket, server: _WSGIServer, limits: TransportLimits):
        super().__init__(sock, None, server, 0)
        sock.settimeout(limits.read_timeout)  # bounds a pool thread's body reads and writes
        self.limits = limits
        self.closed = False
        self.ready: Any = None  # the request whose PARAMS are complete, not yet run
        self.running: tuple[Any, float] | None = None  # (request, monotonic start)
        self.partial_since = 0.0  # when the current incomplete request began
        self._buffer = bytearray()
        self._params = bytearray()
        self._params_overflow = False
        self._write_lock = threading.Lock()
        self._held = b""  # records not sent yet (see writeRecord)
        self._muted = False  # the request was answered for: drop its servlet's output
        self._broken = False  # its input ended early: close once the request is done
        self._quick_close = False  # closing from the I/O thread: no blocking drain

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- parsing (I/O thread, and pool thread while a request reads its body) ----------

    def _next_record(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return None
        version, kind, request_id, length, padding = _HEADER.unpack_from(buffer)
        if version != fcgi_base.FCGI_VERSION_1:
            raise ProtocolError(f"record version {version}")
        total = _HEADER.size + length + padding
        if len(buffer) < total:
            return None
        content = bytes(buffer[_HEADER.size : _HEADER.size + length])
        del buffer[:total]
        return kind, request_id, content

    def receive(self) -> None:
        """Read what the socket has (it is readable) and parse up to a complete request.

        Raises EOFError when the peer closed, ProtocolError on malformed input.
        """
        try:
            # os.read, not recv: a socket with a timeout polls before every recv, one
            # more system call (and GIL release) per request; the fd is non-blocking.
            data = os.read(self._sock.fileno(), _RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise EOFError from exc
        if not data:
            raise EOFError
        self._buffer += data
        self.parse()

    def parse(self) -> None:
        while self.ready is None:
            record = self._next_record()
            if record is None:
                break
            self._handle(*record)
        waiting = self.ready is None and bool(self._buffer or self._requests)
        if not waiting:
            self.partial_since = 0.0
        elif not self.partial_since:
            self.partial_since = time.monotonic()

    def _handle(self, kind: int, request_id: int, content: bytes) -> None:
        request = self._requests.get(request_id)
        if kind == fcgi_base.FCGI_BEGIN_REQUEST:
            if request_id == fcgi_base.FCGI_NULL_REQUEST_ID or len(content) != _BEGIN_BODY.size:
                raise ProtocolError("malformed BEGIN_REQUEST")
            if self._requests:
                raise ProtocolError("a second request while one is open (multiplexing)")
            role, flags = _BEGIN_BODY.unpack(content)
            request = self.server.request_class(self, self._inputStreamClass, 0)
            # Buffered: flup then sends the headers and the body of a response (each
            # WSGI write) as one record, not two.
            request.stdout = fcgi_base.OutputStream(
                self, request, fcgi_base.FCGI_STDOUT, buffered=True
            )
            request.requestId, request.role, request.flags = request_id, role, flags
            request.aborted = False
            self._requests[request_id] = request
            self._params.clear()
            self._params_overflow = False
        elif kind == fcgi_base.FCGI_PARAMS:
            if request is None:
                raise ProtocolError("PARAMS without BEGIN_REQUEST")
            if content:
                if len(self._params) + len(content) > self.limits.max_fcgi_param_bytes:
                    self._params_overflow = True
                    self._params.clear()
                elif not self._params_overflow:
                    self._params += content
                return
            params = None
            if not self._params_overflow:
                params = decode_params(bytes(self._params), self.limits.max_fcgi_params)
            self._params.clear()
            if params is None:
                log.warning("FastCGI request with too many or too large parameters: 431")
                self.answer(request, "431 Request Header Fields Too Large", "headers too large")
                return
            request.params = params
            self.ready = request
        elif kind in (fcgi_base.FCGI_STDIN, fcgi_base.FCGI_DATA):
            if request is not None:  # else: the tail of a request already answered
                raise ProtocolError("STDIN before the PARAMS stream ended")
        elif kind == fcgi_base.FCGI_ABORT_REQUEST:
            if request is not None:
                self.answer(request, "503 Service Unavailable", "aborted")
        elif kind == fcgi_base.FCGI_GET_VALUES:
            self._answer_get_values(content)
        elif request_id == fcgi_base.FCGI_NULL_REQUEST_ID:
            self._do_unknown_type(self._record(kind, request_id, content))
        else:
            raise ProtocolError(f"unexpected record type {kind}")

    def _answer_get_values(self, content: bytes) -> None:
        # flup's own answer compares the names as bytes with str keys: always empty.
        names = decode_params(content, self.limits.max_fcgi_params) or {}
        capability = self.server.capability
        reply = b"".join(
            fcgi_base.encode_pair(name.encode("latin-1"), str(capability[name]).encode("latin-1"))
            for name in names
            if name in capability
        )
        self.writeRecord(self._record(fcgi_base.FCGI_GET_VALUES_RESULT, 0, reply))

    @staticmethod
    def _record(kind: int, request_id: int, content: bytes) -> Any:
        record = fcgi_base.Record(kind, request_id)
        record.contentData, record.contentLength = content, len(content)
        return record

    def process_input(self) -> None:
        """One record for the running request (flup's InputStream calls this for more
        body): from the buffer, else from the socket, waiting at most ``read_timeout``."""
        while True:
            try:
                record = self._next_record()
            except ProtocolError as exc:
                log.warning("malformed FastCGI record while reading a body: %s", exc)
                record = None
                self._end_input()
                return
            if record is not None:
                break
            try:
                data = self._sock.recv(_RECV_BYTES)
            except OSError:
                data = b""
            if not data:
                self._end_input()
                return
            self._buffer += data
        kind, request_id, content = record
        request = self._requests.get(request_id)
        if request is None:
            return
        if kind == fcgi_base.FCGI_STDIN:
            request.stdin.add_data(content)
        elif kind == fcgi_base.FCGI_DATA:
            request.data.add_data(content)
        elif kind == fcgi_base.FCGI_ABORT_REQUEST:
            request.aborted = True
            self._end_input()

    def _end_input(self) -> None:
        """The body will not come (timeout, close, garbage): end it; the app sees a short
        body (a 400), and the connection is closed after the response."""
        self._broken = True
        for request in self._requests.values():
            request.stdin.add_data(b"")
            request.data.add_data(b"")

    # -- answering and running --------------------------------------------------------

    def writeRecord(self, rec: Any) -> None:  # noqa: N802 - flup's name
        """Queue *rec*; send the queue with the request's END_REQUEST record.

        flup sends each record in three system calls (header, content, padding), and a
        response takes four records. Each call releases and retakes the GIL, which under
        load costs far more than the call itself: a whole response goes out in one.
        Output a servlet streams (WSGI ``write``) is pushed by :meth:`flush_output`;
        the queue is also sent whenever it passes :data:`_HELD_BYTES`.
        """
        content = rec.contentData[: rec.contentLength] if rec.contentLength else b""
        data = _record_bytes(rec.type, rec.requestId, content)
        with self._write_lock:
            if self._muted or self.closed:
                return
            self._held += data
            if (
                rec.type == fcgi_base.FCGI_END_REQUEST
                or rec.requestId == fcgi_base.FCGI_NULL_REQUEST_ID
                or len(self._held) >= _HELD_BYTES
            ):
                self._send_held()

    def flush_output(self) -> None:
        """Send what is queued now (a servlet streams its response)."""
        with self._write_lock:
            if not self._muted and not self.closed and self._held:
                self._send_held()

    def _send_held(self) -> None:
        """Send the queue: first straight to the (non-blocking) fd, which takes a whole
        response unless the peer is slow; ``sendall`` (bounded by the socket's timeout)
        sends what is left. ``sendall`` alone polls before every send."""
        data, self._held = self._held, b""
        try:
            sent = os.write(self._sock.fileno(), data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def answer(self, request: Any, status: str, text: str, extra: str = "") -> None:
        """Answer *request* with a small error response and end it (I/O thread)."""
        stdout = fcgi_base.OutputStream(self, request, fcgi_base.FCGI_STDOUT)
        self._quick_close = True  # on a Unix socket nothing sent is lost by closing
        try:
            stdout.write(_canned(status, text, extra))
            stdout.close()
            self.end_request(request)
        except OSError:
            self.close(drain=False)
        finally:
            self._quick_close = False
        if self.ready is request:
            self.ready = None

    def answer_late(self) -> int | None:
        """504 for the running request (called from the I/O thread); anything its
        servlet does later is dropped. Returns the connection's fd (a duplicate) to hand
        over to another worker when the request's input is complete, since closing it
        would race with the web server reusing it; else shuts it and returns None. The
        stuck thread is left with a dead socket: it can neither write nor read input."""
        running = self.running
        if running is None:
            return None
        request = running[0]
        with self._write_lock:
            if self._muted or self.closed:
                return None
            self._muted = True
            answered = not request.stdout.dataWritten
            reply = b""
            if answered:
                end = struct.pack(fcgi_base.FCGI_EndRequestBody, 0, 0)
                reply = b"".join(
                    _record_bytes(kind, request.requestId, payload)
                    for kind, payload in (
                        (fcgi_base.FCGI_STDOUT, _canned("504 Gateway Timeout", "timed out")),
                        (fcgi_base.FCGI_STDOUT, b""),
                        (fcgi_base.FCGI_END_REQUEST, end),
                    )
                )
            handed = None
            try:
                self._sock.sendall(reply)
                if answered and self._input_complete(request):
                    handed = os.dup(self._sock.fileno())
                else:
                    self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            live, self._sock = self._sock, _dead_socket()
            live.close()
            return handed

    def _input_complete(self, request: Any) -> bool:
        """True if nothing of *request* is still to come and nothing else is buffered:
        then the connection can go to another worker as it is."""
        stdin_ended = request.stdin._eof
        while True:
            try:
                record = self._next_record()
            except ProtocolError:
                return False
            if record is None:
                break
            kind, request_id, content = record
            if request_id != request.requestId or kind not in (
                fcgi_base.FCGI_STDIN,
                fcgi_base.FCGI_DATA,
            ):
                return False
            if kind == fcgi_base.FCGI_STDIN and not content:
                stdin_ended = True
        return stdin_ended and not self._buffer

    def run_ready(self) -> bool:
        """Run the ready request (pool thread); True if the connection stays open."""
        request, self.ready = self.ready, None
        self.running = (request, time.monotonic())
        _serving.connection = self
        try:
            request.run()  # flup: WSGI app, response records, END_REQUEST
        except OSError:
            self._broken = True
        finally:
            _serving.connection = None
            self.running = None
        if self._broken or self._muted:
            self.close(drain=False)
        return not self.closed

    def _cleanupSocket(self) -> None:  # noqa: N802 - flup's name
        """After the last response of a connection without FCGI_KEEP_CONN."""
        self.close(drain=not self._quick_close)

    def detach(self) -> int:
        """Give up this connection's fd (to hand it over) without touching the socket."""
        self.closed = True
        return self._sock.detach()

    def close(self, drain: bool = True) -> None:
        """Close; with *drain*, first read what the peer still sends (bounded), since
        unread input would turn the close into a reset that can lose our reply."""
        if self.closed:
            return
        self.closed = True
        if drain:
            try:
                self._sock.shutdown(socket.SHUT_WR)
                self._sock.settimeout(_CLOSE_DRAIN_SECONDS)
                deadline = time.monotonic() + _CLOSE_DRAIN_SECONDS
                while time.monotonic() < deadline and self._sock.recv(4096):
                    pass
            except OSError:
                pass
        self._sock.close()

    @property
    def idle(self) -> bool:
        """Nothing received of a next request: safe to hand over."""
        return not self._buffer and not self._requests and self.ready is None


class FastCGIServer:
    """Serve *app* over FastCGI on *listener* with a fixed pool of *threads*.

    ``serve(stop, tick)`` runs the I/O loop in the calling thread until ``stop`` is set,
    calling ``tick`` at least every ``tick_interval`` seconds (the worker's heartbeat);
    ``drain(timeout)`` then finishes what was received and hands idle connections to
    the master over *channel* (see handover.py), or closes them without one.
    """

    def __init__(
        self,
        app: WSGIApp,
        listener: socket.socket,
        threads: int,
        channel: socket.socket | None = None,
        limits: TransportLimits | None = None,
    ) -> None:
        self._server = _WSGIServer(app)
        self._listener = listener
        self._channel = channel
        self.limits = limits or TransportLimits()
        self._selector = selectors.DefaultSelector()
        # Pool threads register their connection again themselves (see _rewatch): held
        # by them for that, and by the I/O thread while it walks the selector's map.
        self._selector_lock = threading.Lock()
        # Idle pool threads, most recently idle last (it is handed the next request: its
        # stack and caches are warm). Appended by pool threads, popped by the I/O thread.
        self._idle: list[_PoolSlot] = []
        self._idle_lock = threading.Lock()  # orders a thread's return against stopping
        self._stopped = False
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._waiting: collections.deque[tuple[_Connection, float]] = collections.deque()
        self._dispatched: set[_Connection] = set()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._active = 0
        self._active_lock = threading.Lock()
        self._wake_pending = False
        self._accepting = False
        self._next_refusal_log = 0.0
        self._next_deadline_check = 0.0
        self._doomed = False  # a request outlived request_timeout: the master replaces us
        self._slots = [_PoolSlot() for _ in range(threads)]
        self._idle = list(self._slots)
        self._threads = [
            threading.Thread(target=self._work, args=(slot,), name=f"pyserv-{n}", daemon=True)
            for n, slot in enumerate(self._slots)
        ]

    @property
    def active(self) -> int:
        """Requests being run by a pool thread right now."""
        return self._active

    @property
    def connections(self) -> int:
        return len(self._dispatched) + len(self._waiting) + len(self._watched())

    def _watched(self) -> list[_Connection]:
        """The connections the selector watches now (a copy: pool threads add to it)."""
        with self._selector_lock:
            keys = list(self._selector.get_map().values())
        return [key.fileobj for key in keys if isinstance(key.fileobj, _Connection)]

    def wake(self) -> None:
        """Make the I/O loop look at its stop event now (safe from a signal handler)."""
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    # -- the I/O loop -----------------------------------------------------------------

    def serve(
        self, stop: threading.Event, tick: Callable[[], None], tick_interval: float = 0.5
    ) -> None:
        for thread in self._threads:
            thread.start()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        if self._channel is not None:
            self._selector.register(self._channel, selectors.EVENT_READ)
        self._accepting = True
        while not stop.is_set():
            self._loop_once(tick_interval)
            tick()
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self._listener)
        # The channel stays watched while we drain (see drain): the master may have sent
        # us connections just before it told us to stop.

    def _loop_once(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            item = key.fileobj
            if item is self._listener:
                self._accept()
            elif item is self._channel:
                self._adopt()
            elif item == self._wake_read:
                self._drain_wake_pipe()
            else:
                self._on_readable(item)
        self._take_back_returned()
        self._dispatch_waiting()
        self._enforce_deadlines()
        if self._doomed:
            self._stop_taking_work()

    def _stop_taking_work(self) -> None:
        """After a 504 this worker is about to be replaced (its stuck thread can only end
        with the process): its idle connections go to the other workers now."""
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self._listener)
        self._release_idle()

    def _accept(self) -> None:
        while self._accepting:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a connection: %s", exc.strerror)
                    return
                raise
            if self.connections >= self.limits.max_connections:
                self._refuse(sock)
                continue
            self._watch(_Connection(sock, self._server, self.limits))

    def _refuse(self, sock: socket.socket) -> None:
        sock.close()
        now = time.monotonic()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + 10.0
            log.warning("connection refused: %d open (max_connections)", self.connections)

    def _adopt(self) -> None:
        """Serve connections a retiring worker handed over (see handover.py)."""
        assert self._channel is not None
        for fd in handover.receive(self._channel):
            self._watch(_Connection(socket.socket(fileno=fd), self._server, self.limits))

    def _watch(self, connection: _Connection) -> None:
        self._selector.register(connection, selectors.EVENT_READ)

    def _on_readable(self, connection: _Connection) -> None:
        try:
            connection.receive()
        except EOFError:
            self._forget(connection)
            return
        except ProtocolError as exc:
            log.warning("malformed FastCGI input (%s): connection closed", exc)
            self._forget(connection)
            return
        except Exception:
            log.exception("FastCGI connection failed: closed")
            self._forget(connection)
            return
        if connection.closed:
            self._forget(connection)
        elif connection.ready is not None:
            self._selector.unregister(connection)
            self._waiting.append((connection, time.monotonic() + self.limits.queue_timeout))

    def _forget(self, connection: _Connection) -> None:
        if self._is_watched(connection):
            self._selector.unregister(connection)
        connection.close(drain=False)

    def _is_watched(self, connection: _Connection) -> bool:
        try:
            self._selector.get_key(connection)
        except KeyError:
            return False
        return True

    def _dispatch_waiting(self) -> None:
        while self._waiting and self._idle:
            connection, _ = self._waiting.popleft()
            with self._active_lock:
                self._active += 1
            self._dispatched.add(connection)
            slot = self._idle.pop()
            slot.connection = connection
            slot.wake.release()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        if now < self._next_deadline_check and not self._waiting:
            return
        self._next_deadline_check = now + _DEADLINE_CHECK_INTERVAL
        while self._waiting and self._waiting[0][1] <= now:
            connection, _ = self._waiting.popleft()
            log.warning(
                "all %d threads busy for %.1f s: 503", len(self._threads), self.limits.queue_timeout
            )
            connection.answer(
                connection.ready,
                "503 Service Unavailable",
                "server busy, try again",
                "Retry-After: 1\r\n",
            )
            self._back_to_idle(connection)
        for connection in self._watched():
            if (
                connection.partial_since
                and now - connection.partial_since > self.limits.read_timeout
            ):
                log.warning(
                    "incomplete FastCGI request for %.0f s: connection closed",
                    now - connection.partial_since,
                )
                self._forget(connection)
        for connection in list(self._dispatched):
            running = connection.running
            if running is not None and now - running[1] > self.limits.request_timeout:
                log.error(
                    "request running %.0f s (request_timeout): answered 504", now - running[1]
                )
                handed = connection.answer_late()
                if handed is not None:
                    self._hand_over([handed])
                self._doomed = True

    def _back_to_idle(self, connection: _Connection) -> None:
        """A connection whose request is done: parse what it already sent, then watch."""
        if connection.closed:
            return
        try:
            connection.parse()
        except ProtocolError as exc:
            log.warning("malformed FastCGI input (%s): connection closed", exc)
            connection.close(drain=False)
            return
        if connection.ready is not None:
            self._waiting.append((connection, time.monotonic() + self.limits.queue_timeout))
        else:
            self._watch(connection)

    def _work(self, slot: _PoolSlot) -> None:
        while True:
            slot.wake.acquire()  # until the I/O thread hands this thread a request
            connection, slot.connection = slot.connection, None
            if connection is None:
                return
            try:
                connection.run_ready()
            except Exception:
                log.exception("FastCGI connection failed")
                connection.close(drain=False)
            finally:
                with self._active_lock:
                    self._active -= 1
                with self._idle_lock:
                    stopped = self._stopped
                    if not stopped:  # idle before the wake-up, so it can be handed work
                        self._idle.append(slot)
                rewatched = not stopped and self._rewatch(connection)
                if not rewatched:
                    self._returned.put(connection)
                # Requests waiting for a thread: wake the I/O thread to hand one to this
                # thread. (It queues a request, then looks for an idle thread; this thread
                # became idle, then looks at the queue: one of the two sees the other.)
                if (not rewatched or self._waiting) and not self._wake_pending:
                    self._wake_pending = True  # one wake-up serves every returned thread
                    self.wake()
            if stopped:
                return

    def _rewatch(self, connection: _Connection) -> bool:
        """Watch *connection* again from its pool thread once its request is done, so
        that the I/O thread need not be woken for it: a wake-up costs a pipe write and
        read, a pass of the loop and a GIL hand-off per request. Only in the common
        case: what is buffered (the request's empty STDIN record) holds no next request.
        Else (a next request, malformed input, closed) return False, and
        :meth:`_back_to_idle` takes it back in the I/O thread."""
        if connection.closed:
            return False
        try:
            connection.parse()  # this thread still owns it
        except ProtocolError:
            return False  # _back_to_idle logs it and closes
        if connection.ready is not None:
            return False  # queued for a thread by the I/O thread
        try:
            with self._selector_lock:
                self._dispatched.discard(connection)
                self._watch(connection)
        except Exception:
            log.exception("FastCGI connection failed after its request: closed")
            connection.close(drain=False)
        return True

    def _drain_wake_pipe(self) -> None:
        # One read: wake-ups are single bytes, rarely more than one pending; if more than
        # this were, the pipe stays readable and the next select drains the rest.
        try:
            os.read(self._wake_read, 4096)
        except BlockingIOError:
            pass
        # After draining (a byte written meanwhile is gone): a connection returned
        # before this line is taken back by this loop pass, any later one wakes us.
        self._wake_pending = False

    def _take_back_returned(self) -> None:
        while True:
            try:
                connection = self._returned.get_nowait()
            except queue.Empty:
                return
            self._dispatched.discard(connection)
            self._back_to_idle(connection)

    # -- stopping ---------------------------------------------------------------------

    def _release_idle(self) -> None:
        """Hand idle connections to the master (or close them if there is no channel)."""
        idle = [connection for connection in self._watched() if connection.idle]
        for connection in idle:
            self._selector.unregister(connection)
        if self._channel is None:
            for connection in idle:
                connection.close(drain=False)
            return
        self._hand_over([connection.detach() for connection in idle])

    def _hand_over(self, fds: list[int]) -> None:
        """Send connection fds to the master for the other workers; close our copies."""
        if self._channel is not None and fds:
            unsent = handover.send(self._channel, fds)
            if unsent:
                log.warning("could not hand over %d connection(s): closing them", len(unsent))
        handover.close_all(fds)  # our copies: the master holds those sent

    def drain(self, timeout: float) -> int:
        """Finish requests already received, for up to *timeout*, releasing connections
        as they go idle; return how many were still running. Call after ``serve``."""
        deadline = time.monotonic() + timeout
        while True:
            self._release_idle()
            pending = self._active or self._waiting or self.connections
            if not pending or time.monotonic() >= deadline:
                break
            self._loop_once(0.02)
        busy = self._active
        if self._channel is not None:
            self._selector.unregister(self._channel)
            # A connection left unread in the channel would be closed with our process
            # while Apache writes a request on it. So: from now on the master's sends
            # fail (it picks another worker), and what it sent before goes back to it.
            self._channel.shutdown(socket.SHUT_RD)
            self._hand_over(handover.receive(self._channel))
        for connection in self._watched():
            self._selector.unregister(connection)
            connection.close(drain=False)
        with self._idle_lock:
            self._stopped = True  # a busy thread ends after its request
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.wake.release()  # connection None: stop
        return busy
