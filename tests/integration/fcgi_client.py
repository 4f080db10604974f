"""A small FastCGI client for tests: exact, malformed and slow records to a Unix socket.

Speaks the web-server side of FastCGI 1.0 with the standard library only, so tests can
send what Apache would never send.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

VERSION = 1
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR = 1, 2, 3, 4, 5, 6, 7
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
RESPONDER, KEEP_CONN = 1, 1
HEADER = struct.Struct("!BBHHBx")
MAX_CONTENT = 65535


def record(kind: int, request_id: int, content: bytes = b"", version: int = VERSION) -> bytes:
    padding = -len(content) % 8
    return HEADER.pack(version, kind, request_id, len(content), padding) + content + b"\0" * padding


def encode_pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)

    return length(len(name)) + length(len(value)) + name + value


def stream(kind: int, request_id: int, data: bytes, chunk: int = MAX_CONTENT) -> bytes:
    """*data* as records of at most *chunk* bytes, then the empty end-of-stream record."""
    parts = [record(kind, request_id, data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(parts) + record(kind, request_id)


def cgi_params(path: str = "/testapp/Pid", method: str = "GET", **extra: str) -> dict[str, str]:
    params = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": path,
        "PATH_INFO": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }
    params.update(extra)
    return params


def request_bytes(
    params: dict[str, str],
    body: bytes = b"",
    request_id: int = 1,
    keep_conn: bool = True,
    params_chunk: int = MAX_CONTENT,
) -> bytes:
    encoded = b"".join(encode_pair(k.encode(), v.encode("latin-1")) for k, v in params.items())
    begin = struct.pack("!HB5x", RESPONDER, KEEP_CONN if keep_conn else 0)
    return (
        record(BEGIN_REQUEST, request_id, begin)
        + stream(PARAMS, request_id, encoded, params_chunk)
        + stream(STDIN, request_id, body)
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stderr: bytes = b""


class FastCGIClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, params: dict[str, str], body: bytes = b"", **options: object) -> Response:
        self.send(request_bytes(params, body, **options))  # type: ignore[arg-type]
        return self.read_response()

    def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the server")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_record(self) -> tuple[int, int, bytes]:
        _, kind, request_id, length, padding = HEADER.unpack(self._read_exactly(HEADER.size))
        content = self._read_exactly(length + padding)[:length]
        return kind, request_id, content

    def read_response(self) -> Response:
        stdout, stderr = b"", b""
        while True:
            kind, _, content = self.read_record()
            if kind == STDOUT:
                stdout += content
            elif kind == STDERR:
                stderr += content
            elif kind == END_REQUEST:
                break
        head, _, body = stdout.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(headers.get("status", "200").split()[0])
        return Response(status, headers, body, stderr)

    def closed_by_server(self, timeout: float) -> bool:
        """True if the server closes the connection within *timeout* seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except socket.timeout:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()
