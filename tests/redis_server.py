"""Run a private, throwaway redis-server for tests and scripts.

Each :class:`RedisServer` listens on 127.0.0.1 only, on a free port, with its config,
log and working directory in a directory of its own and persistence switched off, so
several can run side by side without touching a system-wide Redis. It is stopped by its
pid, never by name. :meth:`RedisServer.restart` brings it back on the same port, which is
how the tests simulate an outage.

No pytest at module level (only :func:`require_redis` imports it), so that scripts can
start a server too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

INSTALL_HINT = (
    "apt-get install redis-server and pip install 'pyserv[redis]' (scripts/test does both as root)"
)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServerError(RuntimeError):
    """redis-server could not be started."""


class TlsFiles(NamedTuple):
    """A server certificate, its key and the CA certificate clients verify it with."""

    cert: Path
    key: Path
    ca: Path


def redis_server_binary() -> str | None:
    """The redis-server executable on PATH, else Debian's, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def missing_requirements() -> list[str]:
    """What the Redis tests need and this machine lacks (empty when all is there)."""
    missing = []
    if redis_server_binary() is None:
        missing.append("redis-server")
    if importlib.util.find_spec("redis") is None:
        missing.append("the redis Python package")
    return missing


def require_redis() -> None:
    """Skip the calling test when redis-server or redis-py is missing; fail on CI.

    CI must not silently skip the Redis tests because of a broken setup.
    """
    import pytest  # Imported here so that scripts need no pytest.

    missing = missing_requirements()
    if not missing:
        return
    message = f"Redis tests need {' and '.join(missing)}: {INSTALL_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A port on 127.0.0.1 the kernel considers free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway self-signed certificate for *host* (an IP address), made with openssl.

    Raises RedisServerError if openssl is missing or fails.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RedisServerError("openssl not found: apt-get install openssl")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        f"/CN={host}",
        "-addext",
        f"subjectAltName=IP:{host}",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RedisServerError(f"openssl req failed: {result.stderr.strip()}")
    return TlsFiles(cert, key, cert)


class RedisServer:
    """One private redis-server on 127.0.0.1 (TLS only when *tls* is given).

    *password* sets ``requirepass``; it is written to the config file (0600), never put
    on the command line where ``ps`` would show it.
    """

    def __init__(
        self,
        work_dir: Path | str,
        port: int | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.password = password
        self.tls = tls
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the port is chosen by start()")
        return self._port

    @property
    def url(self) -> str:
        """The store URL of database 0 (no password in it)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RedisServerError("redis-server has not been started")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "redis.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> RedisServer:
        """Write the config, start redis-server and wait until it answers PING."""
        if self.running:
            raise RedisServerError("redis-server is already running")
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError(f"redis-server not found: {INSTALL_HINT}")
        if self._port is None:
            self._port = free_port()
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = self.work_dir / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as stream:
            stream.write(self._config())
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C meant for pytest does not reach it first.
            self._process = subprocess.Popen(
                [binary, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop redis-server by pid: SIGTERM, then SIGKILL if it lingers. Idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port (an empty database: no persistence)."""
        self.stop()
        self._process = None
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            'save ""',
            "appendonly no",
            f'dir "{self.work_dir}"',
            f'logfile "{self.log_path}"',
            "daemonize no",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f'tls-cert-file "{self.tls.cert}"',
                f'tls-key-file "{self.tls.key}"',
                f'tls-ca-cert-file "{self.tls.ca}"',
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f'requirepass "{self.password}"')
        return "\n".join(lines) + "\n"

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with status {self._process.returncode}:\n"
                    f"{self.log_text()[-2000:]}"
                )
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server did not answer on 127.0.0.1:{self.port} within "
                    f"{START_TIMEOUT:g} s:\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        """True once the server replies to PING (-NOAUTH counts: it is up)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.tls.ca))
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                        return _ping(sock)
                return _ping(raw)
        except (OSError, ssl.SSLError):
            return False


def _ping(sock: socket.socket) -> bool:
    sock.sendall(b"PING\r\n")
    reply = sock.recv(64)
    return reply.startswith((b"+PONG", b"-NOAUTH"))
