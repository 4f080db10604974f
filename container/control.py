"""The control socket: how ``pyservctl`` asks the running master for status or a reload.

A Unix stream socket created 0600 (only the daemon's user, and root, may connect). One
request per connection: a JSON object on one line, e.g. ``{"command": "status"}``; one
JSON object back, then close. The master serves it from its own loop, without threads:
the socket is non-blocking and each exchange is bounded by a short timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Callable

log = logging.getLogger("pyserv.error")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST_BYTES = 4096
EXCHANGE_TIMEOUT = 1.0


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        try:
            os.unlink(path)  # ours from an earlier run: the listening socket proved that
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        self._sock.listen(8)
        self._sock.setblocking(False)
        self._identity = (os.stat(path).st_dev, os.stat(path).st_ino)

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve_pending(self) -> None:
        """Answer every client waiting now (called when the socket is readable)."""
        while True:
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with client:
                client.settimeout(EXCHANGE_TIMEOUT)
                try:
                    self._exchange(client)
                except OSError as exc:
                    log.warning("control socket: %s", exc)

    def _exchange(self, client: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
            chunk = client.recv(MAX_REQUEST_BYTES)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            reply = self._handler(request)
        except ValueError as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        client.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
        try:
            found = os.stat(self.path)
            if (found.st_dev, found.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass


def ask(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send *request* to the daemon at *path*; OSError if it is not running."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
