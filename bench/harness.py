"""The tests' harness (tests/integration, tests/redis_server.py), imported, not copied.

The benchmark deploys exactly what the integration tests deploy: the private Apache of
``apache.py``, pyservd as run by ``pyservd.py``, the www-data-readable mod_fcgid layout
of ``test_pyservd_fcgid.py``, the balancer's modules and shared key of
``test_balancer.py``, and the private redis-server of ``redis_server.py``. Those modules
import each other by bare name, so their directories go on ``sys.path`` here, once,
before they are imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]

from apache import (  # noqa: E402
    APACHE_USER,
    ApacheServer,
    apache_version,
    deploy_examples,
    free_port,
    http_get,
    install_cgi_script,
    make_work_dir,
    script_alias_config,
    world_readable_python,
)
from pyservd import (  # noqa: E402
    COOKIE,
    WORKER_USER,
    Daemons,
    Pyservd,
    child_pids,
    daemon_runtime,
    proxy_fcgi_apache_config,
    session_id,
    wait_until,
    write_config,
)
from redis_server import RedisServer, redis_server_binary  # noqa: E402
from test_balancer import BALANCER_MODULES, write_secret  # noqa: E402
from test_pyservd_fcgid import daemon_pids  # noqa: E402
from test_pyservd_fcgid import deploy as deploy_fcgid  # noqa: E402

__all__ = [
    "APACHE_USER",
    "BALANCER_MODULES",
    "COOKIE",
    "WORKER_USER",
    "REPO",
    "ApacheServer",
    "Daemons",
    "Pyservd",
    "RedisServer",
    "apache_version",
    "child_pids",
    "daemon_pids",
    "daemon_runtime",
    "deploy_examples",
    "deploy_fcgid",
    "free_port",
    "http_get",
    "install_cgi_script",
    "make_work_dir",
    "proxy_fcgi_apache_config",
    "redis_server_binary",
    "script_alias_config",
    "session_id",
    "wait_until",
    "world_readable_python",
    "write_config",
    "write_secret",
]
