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


# A CGI process pays for every module it imports, on every request: none of these is
# needed to serve a session request (re, secrets' random, logging...). hashlib and hmac
# are (with warnings, which hmac imports on some versions): the envelope's HMAC-SHA256
# is the standard library's, OpenSSL and all.
NOT_ON_THE_CGI_PATH = (
    "base64",
    "dataclasses",
    "email",
    "enum",
    "http",
    "importlib",
    "inspect",
    "logging",
    "pickle",
    "random",
    "re",
    "secrets",
    "threading",
    "traceback",
    "typing",
    "urllib",
    "wsgiref",
)

DIET_SERVLETS = """
class Count:
    def run(self, request, response):
        visits = self.session.get("visits", 0)
        self.session["visits"] = visits + 1
        response.write(f"{visits} previous visits\\n")
"""

DIET_SCRIPT = """
import sys
before = set(sys.modules)
sys.path[:0] = [{repo!r}, {apps!r}]
import pyserv
pyserv.cgimain({sessions!r}, "diet_servlets")
sys.stderr.write(" ".join(sorted(set(sys.modules) - before)))
"""


def test_a_session_request_imports_nothing_it_does_not_need(tmp_path):
    (tmp_path / "diet_servlets.py").write_text(DIET_SERVLETS)
    script = tmp_path / "diet.cgi"
    script.write_text(
        DIET_SCRIPT.format(repo=str(REPO), apps=str(tmp_path), sessions=str(tmp_path / "s"))
    )

    def imported(cookie: str = "") -> tuple[bytes, set[str]]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "/cgi-bin/diet.cgi",
            "PATH_INFO": "/Count",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "HTTP_COOKIE": cookie,
        }
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, timeout=20
        )
        assert result.returncode == 0, result.stderr
        modules = set(result.stderr.decode().split())
        return result.stdout, {name.partition(".")[0] for name in modules}

    imported()  # creates the secret (once per deployment: that may import more)
    first, new_session_modules = imported()
    cookie = re.search(rb"PYSERVSID=([^;\s]+)", first).group(1).decode()
    second, session_modules = imported(f"PYSERVSID={cookie}")

    assert b"0 previous visits" in first and b"1 previous visits" in second
    assert not new_session_modules & set(NOT_ON_THE_CGI_PATH)
    assert not session_modules & set(NOT_ON_THE_CGI_PATH)
