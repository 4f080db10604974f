"""PyServ's CGI deployment (``pyserv.cgimain``) behind a real Apache with mod_cgid.

The layout mirrors the 2001 deployment: examples/testapp.cgi in ``www/cgi-bin`` imports
pyserv from ``../../lib`` and keeps its sessions in ``www/cgi-bin/sessions``.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from apache import (
    ApacheServer,
    HttpResponse,
    deploy_examples,
    http_get,
    install_cgi_script,
    script_alias_config,
)

pytestmark = pytest.mark.integration

COOKIE = "PYSERVSID"
TESTAPP = "/cgi-bin/testapp.cgi"
# PyServ's session ids are secrets.token_urlsafe(32): 256 random bits.
SESSION_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}\Z")

FAILAPP_CGI = """\
#!/usr/bin/env python3
import sys
sys.path.insert(0, '../../lib')
import pyserv
pyserv.cgimain('sessions', 'failapp')
"""
FAILAPP_MODULE = '''\
"""A servlet that fails after writing some output."""


class Boom:
    def run(self, request, response):
        response.write("partial output\\n")
        raise RuntimeError("secret detail")
'''


class SetCookie(NamedTuple):
    value: str
    attributes: dict[str, str]  # Lower-cased names; flags such as HttpOnly map to "".


def deploy(work_dir: Path) -> None:
    """Deploy the examples, plus failapp.cgi whose only servlet raises."""
    cgi_bin = deploy_examples(work_dir)
    install_cgi_script(cgi_bin, "failapp.cgi", FAILAPP_CGI)
    (cgi_bin / "failapp.py").write_text(FAILAPP_MODULE)
    (cgi_bin / "failapp.py").chmod(0o644)


@pytest.fixture
def server(apache_factory) -> ApacheServer:
    return apache_factory(
        ["cgid"],
        extra_config=script_alias_config("/cgi-bin/", Path("${WORK_DIR}/www/cgi-bin")),
        prepare=deploy,
    )


def get(server: ApacheServer, path: str, session_id: str | None = None) -> HttpResponse:
    headers = {"Cookie": f"{COOKIE}={session_id}"} if session_id is not None else {}
    return http_get(server.base_url + path, headers=headers)


def session_cookie(response: HttpResponse) -> SetCookie:
    """The response's one Set-Cookie header for the session, parsed."""
    headers = [
        value
        for value in response.headers.get_all("Set-Cookie", [])
        if value.startswith(f"{COOKIE}=")
    ]
    assert len(headers) == 1, f"expected one {COOKIE} Set-Cookie, got {headers}"
    pair, *attributes = (part.strip() for part in headers[0].split(";"))
    parsed: dict[str, str] = {}
    for attribute in attributes:
        name, _, value = attribute.partition("=")
        parsed[name.lower()] = value
    return SetCookie(pair[len(f"{COOKIE}=") :], parsed)


def previous_visits(server: ApacheServer, response: HttpResponse) -> int:
    """The visit count TestServlet reports, after checking the response is a success."""
    assert response.status == 200, (response.body, server.error_log_text())
    match = re.search(rb"^(\d+) previous visits$", response.body, re.MULTILINE)
    assert match, response.body
    return int(match.group(1))


def wait_for_log(server: ApacheServer, text: str, timeout: float = 5) -> str:
    """Apache's error log once it contains ``text``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while text not in (log := server.error_log_text()):
        assert time.monotonic() < deadline, f"{text!r} not in the error log:\n{log}"
        time.sleep(0.05)
    return log


def test_first_visit_gets_new_session(server: ApacheServer) -> None:
    response = get(server, f"{TESTAPP}/TestServlet")

    assert previous_visits(server, response) == 0
    assert response.body.startswith(b"Hi!\n")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    cookie = session_cookie(response)
    assert SESSION_ID_SHAPE.match(cookie.value), cookie
    assert cookie.attributes["path"] == TESTAPP
    assert "httponly" in cookie.attributes
    assert cookie.attributes["samesite"] == "Lax"


def test_session_counts_visits(server: ApacheServer) -> None:
    session_id = session_cookie(get(server, f"{TESTAPP}/TestServlet")).value

    counts = [
        previous_visits(server, get(server, f"{TESTAPP}/TestServlet", session_id)) for _ in range(3)
    ]

    assert counts == [1, 2, 3]


def test_request_repr_shows_query_string(server: ApacheServer) -> None:
    response = get(server, f"{TESTAPP}/TestServlet?blah=foo")

    assert response.status == 200, server.error_log_text()
    request_line = re.search(rb"^The request is: (.*)$", response.body, re.MULTILINE)
    assert request_line, response.body
    assert b"?blah=foo" in request_line.group(1)


@pytest.mark.parametrize("name", ["NoSuchServlet", "os", "__class__"])
def test_only_servlet_classes_are_reachable(server: ApacheServer, name: str) -> None:
    response = get(server, f"{TESTAPP}/{name}")

    assert response.status == 404, (response.body, server.error_log_text())


@pytest.mark.parametrize(
    "session_id",
    ["../../etc/passwd", secrets.token_urlsafe(32)],
    ids=["path-traversal", "unknown-well-formed"],
)
def test_unusable_session_cookie_starts_new_session(server: ApacheServer, session_id: str) -> None:
    response = get(server, f"{TESTAPP}/TestServlet", session_id)

    assert previous_visits(server, response) == 0
    fresh = session_cookie(response).value
    assert SESSION_ID_SHAPE.match(fresh), fresh
    assert fresh != session_id


def test_servlet_exception_is_500_with_request_id_and_logged_traceback(
    server: ApacheServer,
) -> None:
    response = get(server, "/cgi-bin/failapp.cgi/Boom")

    assert response.status == 500, (response.body, server.error_log_text())
    match = re.search(rb"Request id: <code>([0-9a-f]+)</code>", response.body)
    assert match, response.body
    for leak in (b"Traceback", b"RuntimeError", b"secret detail", b"partial output"):
        assert leak not in response.body
    request_id = match.group(1).decode()
    # mod_cgid copies the script's stderr to the error log as it arrives: wait for it.
    log = wait_for_log(server, "RuntimeError: secret detail")
    assert f"request_id={request_id}" in log
    assert "Traceback (most recent call last)" in log
