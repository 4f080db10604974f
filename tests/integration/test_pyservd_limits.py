"""pyservd's limits behind a real Apache (shipped conf/apache-proxy-fcgi.conf), and through
the development HTTP listener where Apache would have cleaned the request up first:
headers, parameters and bodies get 431/400/413 before or while they are read, a body that
ends before its Content-Length is a prompt 400, and the session limits hold (size, count,
provisional sessions)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from apache import free_port, http_request
from pyservd import (
    COOKIE,
    Daemons,
    Pyservd,
    body_number,
    get,
    session_id,
    start_site,
    write_config,
)

from pyserv.stores.base import HEADER_SIZE, Envelope, Header, read_header

pytestmark = pytest.mark.integration

LIMITS = {
    "max_body": "8K",
    "max_params": "10",
    "max_param_bytes": "4K",
    "max_header_bytes": "4K",
}

MODULE = '''\
"""Servlets that read what limits apply to."""


class Params:
    def run(self, request, response):
        response.write(f"params={len(list(request.params.allitems()))}\\n")


class Body:
    def run(self, request, response):
        response.write(f"length={len(request.body)}\\n")


class Grow:
    """Stores ?size= bytes in the session, and counts."""

    def run(self, request, response):
        self.session["blob"] = "x" * int(request.query.get("size", "0"))
        self.session["n"] = self.session.get("n", 0) + 1
        response.write(f"n={self.session['n']}\\n")


class Show:
    def run(self, request, response):
        response.write(f"n={self.session.get('n', 0)}\\n")
'''


def limits_site(daemons: Daemons, apache_factory, server=None, app=None):
    work = daemons.work_dir()
    (work / "apps").mkdir(mode=0o755)
    (work / "apps" / "limited.py").write_text(MODULE)
    (work / "apps" / "limited.py").chmod(0o644)
    return start_site(
        daemons,
        apache_factory,
        server={**LIMITS, **(server or {})},
        app={"module": "limited", **(app or {})},
        work_dir=work,
    )


def stored_header(daemon: Pyservd, sid: str) -> Header:
    path = daemon.work_dir / "sessions" / sid[:2] / f"{sid}.session"
    with open(path, "rb") as stream:
        return read_header(stream.read(HEADER_SIZE))


# -- request limits through Apache -----------------------------------------------------------


def chunked_post(port: int, path: str, body: bytes) -> bytes:
    """POST *body* with Transfer-Encoding: chunked, the body a moment after the headers:
    then mod_proxy_fcgi streams it on with no CONTENT_LENGTH. The answer (head and body)."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("GET", "/Params?" + "&".join(f"p{i}=1" for i in range(10)), None, {}, 200),
        ("GET", "/Params?" + "&".join(f"p{i}=1" for i in range(11)), None, {}, 400),
        ("GET", "/Params?q=" + "x" * 4100, None, {}, 400),
        ("POST", "/Params?a=1&b=2", "&".join(f"f{i}=1" for i in range(9)), FORM, 400),
        ("POST", "/Params", "f=" + "x" * 4100, FORM, 413),
        ("GET", "/Params", None, {f"X-Pad-{i}": "x" * 1000 for i in range(5)}, 431),
        ("POST", "/Body", "x" * 8192, {}, 200),
        ("POST", "/Body", "x" * 8193, {}, 413),
    ],
    ids=[
        "params-at-limit",
        "query-params-over",
        "query-bytes-over",
        "query-plus-form-params-over",
        "form-bytes-over",
        "header-bytes-over",
        "body-at-limit",
        "body-over",
    ],
)
def test_each_limit_has_its_status_through_apache(
    daemons: Daemons, apache_factory, method, path, body, headers, status
) -> None:
    _, apache = limits_site(daemons, apache_factory)

    response = http_request(method, apache.base_url + "/testapp" + path, body, headers)

    assert response.status == status, response


def test_chunked_body_without_content_length_is_read_whole_and_bounded_by_max_body(
    daemons: Daemons, apache_factory
) -> None:
    _, apache = limits_site(daemons, apache_factory)

    within = chunked_post(apache.port, "/testapp/Body", b"x" * 8000)
    over = chunked_post(apache.port, "/testapp/Body", b"x" * 9000)

    assert b"length=8000\n" in within, within
    assert over.startswith(b"HTTP/1.1 413 "), over


# -- what Apache would not let through: the development listener -----------------------------


def raw_http(port: int, head: bytes, body: bytes = b"", half_close: bool = True) -> bytes:
    """Send *head* and *body* on a fresh connection, close our side, read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.fixture
def http_daemon(daemons: Daemons) -> tuple[Pyservd, int]:
    work = daemons.work_dir()
    (work / "apps").mkdir(mode=0o755)
    (work / "apps" / "limited.py").write_text(MODULE)
    (work / "apps" / "limited.py").chmod(0o644)
    config = write_config(work, server=LIMITS, app={"module": "limited"})
    port = free_port()
    return daemons.start(config, args=("--http", f"127.0.0.1:{port}")), port


def test_body_shorter_than_its_content_length_is_a_prompt_400(http_daemon) -> None:
    _, port = http_daemon
    head = (
        b"POST /testapp/Body HTTP/1.0\r\nHost: x\r\nContent-Length: 100\r\n"
        b"Content-Type: application/octet-stream\r\n"
    )

    started = time.monotonic()
    answer = raw_http(port, head, b"only ten b")

    assert answer.startswith(b"HTTP/1.0 400 "), answer
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b"+10"])
def test_malformed_content_length_is_a_400(http_daemon, value: bytes) -> None:
    _, port = http_daemon
    head = b"POST /testapp/Params HTTP/1.0\r\nHost: x\r\nContent-Length: " + value + b"\r\n"

    answer = raw_http(port, head, b"0123456789")

    assert answer.startswith(b"HTTP/1.0 400 "), answer


# -- session limits --------------------------------------------------------------------------


def test_session_over_max_session_bytes_is_500_and_the_stored_one_is_kept(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = limits_site(daemons, apache_factory, app={"max_session_bytes": "2K"})
    sid = session_id(get(apache.base_url, "/testapp/Grow?size=100"))
    stored = daemon.work_dir / "sessions" / sid[:2] / f"{sid}.session"
    before = stored.read_bytes()

    too_big = get(apache.base_url, "/testapp/Grow?size=5000", sid)

    assert too_big.status == 500
    assert stored.read_bytes() == before
    assert body_number(get(apache.base_url, "/testapp/Show", sid).body, "n") == 1
    log = daemon.log_text()
    assert "over max_session_bytes (2048)" in log and "session is 50" in log


def test_max_sessions_refuses_new_sessions_only(daemons: Daemons, apache_factory) -> None:
    # One worker: each worker counts on its own (see SessionCounter), so with several
    # the limit may be overshot by what the others create within a few seconds.
    _, apache = limits_site(
        daemons, apache_factory, server={"workers": "1"}, app={"max_sessions": "3"}
    )
    sids = [session_id(get(apache.base_url, "/testapp/Grow")) for _ in range(3)]

    refused = get(apache.base_url, "/testapp/Grow")

    assert refused.status == 503
    assert refused.headers["Retry-After"] == "60"
    assert COOKIE not in (refused.headers.get("Set-Cookie") or "")
    for sid in sids:
        again = get(apache.base_url, "/testapp/Grow", sid)
        assert again.status == 200 and body_number(again.body, "n") == 2
    assert get(apache.base_url, "/testapp/Params").status == 200  # no session needed


def test_new_session_is_provisional_until_its_cookie_comes_back(
    daemons: Daemons, apache_factory
) -> None:
    daemon, apache = limits_site(
        daemons, apache_factory, app={"session_timeout": "3600", "new_session_timeout": "60"}
    )
    sid = session_id(get(apache.base_url, "/testapp/Grow"))
    assert stored_header(daemon, sid).idle_timeout == 60

    assert get(apache.base_url, "/testapp/Show", sid).status == 200

    header = stored_header(daemon, sid)
    assert (header.timeout, header.new_timeout, header.idle_timeout) == (3600, 0, 3600)
    key = (daemon.work_dir / "sessions" / ".secret").read_bytes().strip()
    blob = Path(daemon.work_dir / "sessions" / sid[:2] / f"{sid}.session").read_bytes()
    assert Envelope(lambda: key).open(sid, blob)[1]["n"] == 1
