"""Fixtures shared by the unit tests: private redis-servers on loopback ports.

One server serves a whole test session (each test gets its own key prefix, so tests
never see each other's keys); tests that stop, restart or reconfigure Redis start their
own through ``redis_server_factory``. Every server is stopped by pid at teardown.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, make_tls_files, require_redis

# Signature of the redis_server_factory fixture's function; see its docstring.
RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session's tests (skipped, or failed on CI, if absent)."""
    require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis-shared")) as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"pyserv-test:{secrets.token_hex(6)}:"


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[RedisServerFactory]:
    """Yield ``start(*, password=None, tls=False)``: a started server of this test's own.

    With *tls* it serves TLS only, with a throwaway self-signed certificate for
    127.0.0.1 (``server.tls.ca`` is what clients must trust).
    """
    require_redis()
    with contextlib.ExitStack() as cleanup:
        started = 0

        def start(*, password: str | None = None, tls: bool = False) -> RedisServer:
            nonlocal started
            started += 1
            work_dir = tmp_path / f"redis-{started}"
            tls_files = make_tls_files(work_dir / "tls") if tls else None
            server = RedisServer(work_dir, password=password, tls=tls_files)
            cleanup.callback(server.stop)
            return server.start()

        yield start
