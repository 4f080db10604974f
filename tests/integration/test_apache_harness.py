"""Prove that the private Apache harness serves files and CGI scripts, and stops cleanly."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from apache import (
    ApacheError,
    ApacheServer,
    apache_version,
    http_get,
    make_work_dir,
    require_apache,
    script_alias_config,
)

pytestmark = pytest.mark.integration

CGI_SCRIPT = """\
#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
printf 'hello from %s\\n' "$SCRIPT_NAME"
"""


def write_static_file(work_dir: Path) -> None:
    (work_dir / "htdocs").mkdir(mode=0o755)
    (work_dir / "htdocs" / "hello.txt").write_bytes(b"Hello, static world!\n")


def write_cgi_script(work_dir: Path) -> None:
    cgi_bin = work_dir / "cgi-bin"
    cgi_bin.mkdir(mode=0o755)
    (cgi_bin / "hello.cgi").write_text(CGI_SCRIPT)
    (cgi_bin / "hello.cgi").chmod(0o755)


def test_serves_static_file(apache_factory) -> None:
    server = apache_factory(prepare=write_static_file)

    status, headers, body = http_get(server.base_url + "/hello.txt")

    assert status == 200
    assert body == b"Hello, static world!\n"
    assert headers["Content-Type"] == "text/plain"
    version = ".".join(map(str, apache_version()))
    assert headers["Server"].startswith(f"Apache/{version}")


@pytest.mark.parametrize("mpm", ["event", "prefork"])
def test_runs_cgi_script_with_mod_cgid(apache_factory, mpm: str) -> None:
    server = apache_factory(
        ["cgid"],
        mpm=mpm,
        extra_config=script_alias_config("/cgi-bin/", Path("${WORK_DIR}/cgi-bin")),
        prepare=write_cgi_script,
    )

    status, _, body = http_get(server.base_url + "/cgi-bin/hello.cgi")

    assert status == 200, server.error_log_text()
    assert body == b"hello from /cgi-bin/hello.cgi\n"


@pytest.mark.parametrize("modules", [["fcgid"], ["proxy", "proxy_fcgi"], ["cgid", "fcgid"]])
def test_starts_with_fastcgi_modules(apache_factory, modules: list[str]) -> None:
    server = apache_factory(modules)

    assert http_get(server.base_url + "/").status == 404
    log = server.error_log_text()
    assert "resuming normal operations" in log
    assert not re.search(r":(emerg|alert|crit|error)\]", log), log


def test_stop_kills_apache_and_frees_port(apache_factory) -> None:
    server = apache_factory()
    assert http_get(server.base_url + "/").status == 404

    server.stop()
    server.stop()  # Idempotent.

    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_module_skips_test_but_fails_on_ci(monkeypatch, ci: str, outcome: type) -> None:
    require_apache()  # What is tested is a missing module, not a missing Apache.
    monkeypatch.setenv("CI", ci)

    with pytest.raises(outcome, match=r"Apache not installed: .*mod_no_such_module\.so"):
        require_apache(["no_such_module"])


def test_start_failure_reports_apache_error() -> None:
    require_apache()
    work_dir = make_work_dir()
    server = ApacheServer(work_dir, extra_config="NoSuchDirective on")
    try:
        with pytest.raises(ApacheError, match="Invalid command 'NoSuchDirective'"):
            server.start()
        with pytest.raises(ProcessLookupError):
            os.kill(server.pid, 0)
    finally:
        server.stop()
        shutil.rmtree(work_dir)
