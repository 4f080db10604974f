"""The access log: Apache combined format plus duration, request id and a session hash."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from container import logs
from container.config import load
from pyserv import Application, AppSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def access_log(tmp_path):
    config = tmp_path / "pyservd.conf"
    config.write_text(
        "[pyservd]\nlisten = unix:/tmp/unused.sock\nerror_log = error.log\n"
        "access_log = access.log\n\n[app:a]\nmount = /a\nmodule = thisapp\nsession_dir = s\n"
    )
    logs.setup(load(str(config)).server)
    yield tmp_path / "access.log"
    for name in ("pyserv", "pyserv.access"):
        for handler in list(logging.getLogger(name).handlers):
            logging.getLogger(name).removeHandler(handler)
            handler.close()


def call(app, cookie=None):
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/a",
        "PATH_INFO": "/TestServlet",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_USER_AGENT": 'curl "7"',
        "wsgi.input": None,
        "wsgi.url_scheme": "http",
    }
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    seen = {}

    def start_response(status, headers):
        seen["headers"] = headers
        return lambda data: None

    b"".join(app(environ, start_response))
    return seen["headers"]


def test_access_line_is_combined_format_with_duration_request_id_and_hashed_session(
    access_log, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("thisapp", None)
    app = logs.access_logged(
        Application(AppSettings(name="a", module="thisapp", session_dir=str(tmp_path / "s")))
    )
    headers = call(app)
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    call(app, cookie)
    first, second = access_log.read_text().splitlines()
    pattern = (
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET /a/TestServlet\?x=1 HTTP/1\.1" 200 \d+ "-" "curl \\"7\\"" '
        r"duration_ms=\d+ request_id=[0-9a-f]{16} session=([0-9a-f]{12})$"
    )
    hashes = [re.match(pattern, line).group(1) for line in (first, second)]
    assert hashes[0] == hashes[1]  # the same session, recognisable across lines
    assert cookie.split("=", 1)[1] not in access_log.read_text()  # never the raw id
