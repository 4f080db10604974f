"""Fixtures running private Apache instances and pyservd daemons for the integration
tests; everything they start is stopped by pid at teardown."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from apache import ApacheServer, make_work_dir, require_apache
from pyservd import Daemons

# Signature of the apache_factory fixture's function; see its docstring.
ApacheFactory = Callable[..., ApacheServer]


@pytest.fixture
def apache_factory() -> Iterator[ApacheFactory]:
    """Yield ``start(modules=(), *, mpm="event", extra_config="", prepare=None)``.

    Each call starts an Apache in its own fresh work directory under /tmp and
    returns it. ``prepare(work_dir)`` runs before Apache starts, to put content
    in place; ``extra_config`` may refer to that directory as ``${WORK_DIR}``.
    The test is skipped (failed on CI) when Apache or a module is missing.
    At teardown every server is stopped by pid and its directory removed.
    """
    with contextlib.ExitStack() as cleanup:

        def start(
            modules: Iterable[str] = (),
            *,
            mpm: str = "event",
            extra_config: str = "",
            prepare: Callable[[Path], object] | None = None,
        ) -> ApacheServer:
            modules = list(modules)
            require_apache(modules, mpm)
            work_dir = make_work_dir()
            cleanup.callback(shutil.rmtree, work_dir)
            server = ApacheServer(work_dir, modules, mpm, extra_config)
            cleanup.callback(server.stop)
            if prepare is not None:
                prepare(work_dir)
            return server.start()

        yield start


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """A :class:`pyservd.Daemons`: ``daemons.start(config)``; all stopped at teardown."""
    with Daemons() as started:
        yield started
