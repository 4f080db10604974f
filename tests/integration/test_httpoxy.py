"""httpoxy: a client's ``Proxy:`` header must never become ``HTTP_PROXY``, which HTTP
libraries read as "send my requests through this proxy" — neither in the request environ
a servlet sees nor in ``os.environ``, for pyservd and for CGI.

Apache (2.4.25 and later) already drops the header for CGI and FastCGI, so the tests
through it show the deployed result; the tests past it (pyservd's development listener,
and a pyservd started with HTTP_PROXY in its environment) show PyServ's own defence. CGI
run with no web server in front is tests/test_cgi.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from apache import deploy_cgi_app, free_port, http_get, install_cgi_script, script_alias_config
from pyservd import Daemons, body_field, proxy_fcgi_apache_config, start_site, write_config

pytestmark = pytest.mark.integration

PROXY = {"Proxy": "http://evil.example:8080"}

MODULE = '''\
"""Reports HTTP_PROXY as the servlet can see it."""

import os


class Env:
    def run(self, request, response):
        response.write(f"environ={request.environ.get('HTTP_PROXY')!r}\\n")
        response.write(f"header={request.headers.get('Proxy')!r}\\n")
        response.write(f"os={os.environ.get('HTTP_PROXY')!r}\\n")
'''

CGI_SCRIPT = """\
#!/usr/bin/env python3
import sys
sys.path.insert(0, '../../lib')
import pyserv
pyserv.cgimain('sessions', 'envprobe')
"""


def probe_work_dir(daemons: Daemons) -> Path:
    work = daemons.work_dir()
    (work / "apps").mkdir(mode=0o755)
    (work / "apps" / "envprobe.py").write_text(MODULE)
    (work / "apps" / "envprobe.py").chmod(0o644)
    return work


def assert_no_proxy(body: bytes) -> None:
    for name in ("environ", "header", "os"):
        assert body_field(body, name) == "None", body


def test_proxy_header_reaches_no_servlet_of_pyservd_behind_apache(
    daemons: Daemons, apache_factory
) -> None:
    _, apache = start_site(
        daemons, apache_factory, app={"module": "envprobe"}, work_dir=probe_work_dir(daemons)
    )

    response = http_get(apache.base_url + "/testapp/Env", headers=PROXY)

    assert response.status == 200, response
    assert_no_proxy(response.body)


def test_proxy_header_reaches_no_cgi_servlet_behind_apache(apache_factory) -> None:
    def deploy(work_dir: Path) -> None:
        cgi_bin = deploy_cgi_app(work_dir)
        install_cgi_script(cgi_bin, "env.cgi", CGI_SCRIPT)
        (cgi_bin / "envprobe.py").write_text(MODULE)
        (cgi_bin / "envprobe.py").chmod(0o644)

    apache = apache_factory(
        ["cgid"],
        extra_config=script_alias_config("/cgi-bin/", Path("${WORK_DIR}/www/cgi-bin")),
        prepare=deploy,
    )

    response = http_get(apache.base_url + "/cgi-bin/env.cgi/Env", headers=PROXY)

    assert response.status == 200, (response, apache.error_log_text())
    assert_no_proxy(response.body)


def test_proxy_header_reaches_no_servlet_of_pyservd_without_apache(daemons: Daemons) -> None:
    config = write_config(probe_work_dir(daemons), app={"module": "envprobe"})
    port = free_port()
    daemons.start(config, args=("--http", f"127.0.0.1:{port}"))

    response = http_get(f"http://127.0.0.1:{port}/testapp/Env", headers=PROXY)

    assert response.status == 200, response
    assert_no_proxy(response.body)


def test_http_proxy_in_pyservds_own_environment_is_dropped_by_its_workers(
    daemons: Daemons, apache_factory
) -> None:
    work = probe_work_dir(daemons)
    config = write_config(work, app={"module": "envprobe"})
    daemon = daemons.start(config, env={"HTTP_PROXY": "http://evil.example:8080"})
    apache = apache_factory(
        ["proxy", "proxy_fcgi"], extra_config=proxy_fcgi_apache_config(daemon.socket)
    )

    response = http_get(apache.base_url + "/testapp/Env")

    assert response.status == 200, response
    assert_no_proxy(response.body)
