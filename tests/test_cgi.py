"""``pyserv.cgimain`` as a real CGI process: hostile request data, with no web server in
front to clean it up (tests/integration/test_cgi_apache.py runs it behind Apache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SERVLETS = """
import os


class Env:
    def run(self, request, response):
        response.write(f"environ={request.environ.get('HTTP_PROXY')!r}\\n")
        response.write(f"os={os.environ.get('HTTP_PROXY')!r}\\n")


class Body:
    def run(self, request, response):
        response.write(f"length={len(request.body)}\\n")


class Untouched:
    def run(self, request, response):
        response.write("ran\\n")
"""

SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {apps!r}]
import pyserv
pyserv.cgimain({sessions!r}, "cgi_servlets", max_header_bytes=2048, max_body=1000)
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    (tmp_path / "cgi_servlets.py").write_text(SERVLETS)
    path = tmp_path / "app.cgi"
    path.write_text(
        textwrap.dedent(
            SCRIPT.format(repo=str(REPO), apps=str(tmp_path), sessions=str(tmp_path / "s"))
        )
    )
    return path


def run_cgi(
    script: Path, servlet: str, stdin: bytes = b"", **environ: str
) -> tuple[int, bytes, float]:
    """Run *script* once as Apache would: (status, body, seconds it took)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/cgi-bin/app.cgi",
        "PATH_INFO": f"/{servlet}",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        **environ,
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=20,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    match = re.match(rb"Status: (\d+)", head)
    assert match, (result.stdout, result.stderr)
    return int(match.group(1)), body, time.monotonic() - started


def test_proxy_variable_reaches_neither_the_request_nor_os_environ(script):
    status, body, _ = run_cgi(script, "Env", HTTP_PROXY="http://evil:8080")

    assert status == 200
    assert body == b"environ=None\nos=None\n"


def test_content_length_longer_than_the_body_is_a_400_at_end_of_input_not_a_hang(script):
    status, _, seconds = run_cgi(
        script, "Body", stdin=b"0123456789", REQUEST_METHOD="POST", CONTENT_LENGTH="100"
    )

    assert status == 400
    assert seconds < 10


@pytest.mark.parametrize("content_length", ["abc", "-5", "1e2", "10 "])
def test_malformed_content_length_is_a_400_even_if_the_servlet_never_reads(script, content_length):
    status, body, _ = run_cgi(
        script, "Untouched", stdin=b"x", REQUEST_METHOD="POST", CONTENT_LENGTH=content_length
    )

    assert status == 400
    assert b"ran" not in body


def test_cgimain_limits_apply_before_the_servlet_runs(script):
    headers = {f"HTTP_X_PAD_{n}": "x" * 500 for n in range(5)}
    assert run_cgi(script, "Untouched", **headers)[0] == 431
    status, _, _ = run_cgi(
        script, "Untouched", stdin=b"x" * 2000, REQUEST_METHOD="POST", CONTENT_LENGTH="2000"
    )
    assert status == 413
