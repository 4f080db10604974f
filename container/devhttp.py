"""The development HTTP listener (``pyservd --http HOST:PORT``): never for production.

A threaded wsgiref server run by one supervised worker, on a socket the master bound,
serving the same apps as the FastCGI workers, so ``scripts/demo`` works where Apache is
missing. Same ``serve``/``drain`` interface as :class:`container.fcgi.FastCGIServer`.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass  # the access log is pyserv's


class DevHTTPServer:
    def __init__(self, app: Any, listener: socket.socket, threads: int) -> None:
        server = _ThreadingWSGIServer(
            listener.getsockname()[:2], _QuietHandler, bind_and_activate=False
        )
        server.socket.close()
        server.socket = listener
        server.server_name, server.server_port = "localhost", listener.getsockname()[1]
        server.setup_environ()
        server.set_app(app)
        self._server = server

    def serve(
        self, stop: threading.Event, tick: Callable[[], None], tick_interval: float = 0.5
    ) -> None:
        self._server.timeout = tick_interval
        while not stop.is_set():
            self._server.handle_request()
            tick()

    def wake(self) -> None:
        """Nothing to do: ``serve`` looks at its stop event every tick."""

    def drain(self, timeout: float) -> int:
        return 0
