"""The integration tests' harness (tests/integration), imported rather than copied.

The benchmark deploys exactly what the integration tests deploy: the private Apache of
``apache.py``, pyservd as run by ``pyservd.py`` and the www-data-readable mod_fcgid layout
of ``test_pyservd_fcgid.py``. Those modules import each other by bare name, so their
directory goes on ``sys.path`` here, once, before they are imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from apache import (  # noqa: E402
    APACHE_USER,
    ApacheServer,
    apache_version,
    deploy_examples,
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
from test_pyservd_fcgid import daemon_pids  # noqa: E402
from test_pyservd_fcgid import deploy as deploy_fcgid  # noqa: E402

__all__ = [
    "APACHE_USER",
    "COOKIE",
    "WORKER_USER",
    "REPO",
    "ApacheServer",
    "Daemons",
    "Pyservd",
    "apache_version",
    "child_pids",
    "daemon_pids",
    "daemon_runtime",
    "deploy_examples",
    "deploy_fcgid",
    "http_get",
    "install_cgi_script",
    "make_work_dir",
    "proxy_fcgi_apache_config",
    "script_alias_config",
    "session_id",
    "wait_until",
    "world_readable_python",
    "write_config",
]
