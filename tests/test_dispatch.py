"""URL → servlet, through the Application, with real servlet modules on a temp path."""

from __future__ import annotations

import importlib
import io
import logging
import sys
import textwrap
import uuid
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from pyserv.application import Application, AppSettings
from pyserv.dispatch import ServletSetupError

SERVLETS = """
import json
import os
import sys
from collections import OrderedDict
from threading import Thread
from wsgiref.handlers import CGIHandler

VERSION = "1.0"


def helper(request, response):
    response.write("a function, not a servlet")


class TestServlet:
    def run(self, request, response):
        response.write(
            f"servlet={request.servlet_name}|extra={request.extra_path}|"
            f"script={request.script_name}|path_info={request.path_info}"
        )


class Other:
    def run(self, request, response):
        response.write("other")


class _Private:
    def run(self, request, response):
        response.write("private")


class NoRun:
    pass


class RunNotCallable:
    run = "not a method"
"""


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    """Return ``make(source, **settings)``: an Application over a fresh module file."""
    modules_dir = tmp_path / "modules"
    modules_dir.mkdir()
    monkeypatch.syspath_prepend(str(modules_dir))
    names: list[str] = []

    def make(source: str = SERVLETS, **settings: Any) -> Application:
        name = f"dispatch_servlets_{uuid.uuid4().hex}"
        (modules_dir / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        return Application(
            AppSettings(
                name="testapp",
                module=name,
                session_dir=str(tmp_path / "sessions"),
                **settings,
            )
        )

    yield make
    for name in names:
        sys.modules.pop(name, None)


def call(app: Application, path_info: str, script_name: str = "/testapp", **overrides: Any):
    """Run one GET; return (status code, body text)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path_info,
        "wsgi.input": io.BytesIO(),
    }
    environ.update(overrides)
    setup_testing_defaults(environ)
    started = []

    def start_response(status, headers, exc_info=None):
        started.append(status)
        return lambda chunk: None

    body = b"".join(app(environ, start_response))
    return int(started[0].split()[0]), body.decode()


def test_class_defined_in_the_module_is_found_by_name(make_app):
    status, body = call(make_app(), "/TestServlet")

    assert status == 200
    assert body.startswith("servlet=TestServlet|extra=|")


def test_second_class_defined_in_the_module_is_found(make_app):
    assert call(make_app(), "/Other") == (200, "other")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/os", id="imported-module-os"),
        pytest.param("/sys", id="imported-module-sys"),
        pytest.param("/json", id="imported-module-json"),
        pytest.param("/OrderedDict", id="imported-class"),
        pytest.param("/Thread", id="imported-class-with-run"),
        pytest.param("/CGIHandler", id="imported-handler-with-run"),
        pytest.param("/helper", id="function"),
        pytest.param("/VERSION", id="constant"),
        pytest.param("/_Private", id="private-class"),
        pytest.param("/__class__", id="dunder-class"),
        pytest.param("/__dict__", id="dunder-dict"),
        pytest.param("/__builtins__", id="dunder-builtins"),
        pytest.param("/__loader__", id="dunder-loader"),
        pytest.param("/NoRun", id="class-without-run"),
        pytest.param("/RunNotCallable", id="class-with-non-callable-run"),
        pytest.param("/testservlet", id="case-differs-lower"),
        pytest.param("/TESTSERVLET", id="case-differs-upper"),
        pytest.param("/Test%53ervlet", id="percent-encoded-literal"),
        pytest.param("/Missing", id="no-such-name"),
        pytest.param("", id="empty-path"),
        pytest.param("/", id="root"),
        pytest.param("//TestServlet", id="empty-first-segment"),
        pytest.param("TestServlet", id="no-leading-slash"),
        pytest.param("/TestServlet.py", id="dot-suffix"),
    ],
)
def test_names_that_are_not_servlets_are_404(make_app, path):
    status, body = call(make_app(), path)

    assert status == 404
    assert "servlet=" not in body


def test_servlets_list_hides_classes_not_in_it(make_app):
    app = make_app(
        """
        __servlets__ = ["A"]

        class A:
            def run(self, request, response):
                response.write("A")

        class B:
            def run(self, request, response):
                response.write("B")
        """
    )

    assert call(app, "/A") == (200, "A")
    assert call(app, "/B")[0] == 404


def test_servlets_list_does_not_admit_an_imported_class(make_app):
    app = make_app(
        """
        from collections import OrderedDict

        __servlets__ = ["OrderedDict"]
        """
    )

    assert call(app, "/OrderedDict")[0] == 404


def test_servlet_class_imported_from_another_module_is_404(make_app):
    library = make_app(
        """
        class Shared:
            def run(self, request, response):
                response.write("shared")
        """
    )
    app = make_app(f"from {library.module.__name__} import Shared\n")

    assert call(library, "/Shared") == (200, "shared")
    assert call(app, "/Shared")[0] == 404


def test_extra_path_is_what_follows_the_servlet_name(make_app):
    status, body = call(make_app(), "/TestServlet/extra/path")

    assert status == 200
    assert "servlet=TestServlet|extra=extra/path|" in body


def test_trailing_slash_gives_an_empty_extra_path(make_app):
    status, body = call(make_app(), "/TestServlet/")

    assert status == 200
    assert "|extra=|" in body


def test_utf8_extra_path_is_decoded_once_from_its_wsgi_form(make_app):
    status, body = call(make_app(), "/TestServlet/caf\xc3\xa9")

    assert status == 200
    assert "|extra=café|" in body


def test_invalid_utf8_in_the_path_is_a_400(make_app):
    status, _ = call(make_app(), "/TestServlet/caf\xe9")

    assert status == 400


OWN_SESSION = """
class Owns:
    {definition}

    def run(self, request, response):
        response.write("ran")
"""


@pytest.mark.parametrize(
    "definition",
    [
        pytest.param("session = {}", id="dict"),
        pytest.param("session = 'mine'", id="str"),
        pytest.param("session = property(lambda self: 1)", id="property"),
        pytest.param("session = staticmethod(lambda: 1)", id="staticmethod"),
        pytest.param("session = None", id="none"),
    ],
)
def test_plain_class_defining_session_itself_is_a_500_and_logged(make_app, caplog, definition):
    app = make_app(OWN_SESSION.format(definition=definition))

    with caplog.at_level(logging.ERROR, logger="pyserv.error"):
        status, body = call(app, "/Owns")

    assert status == 500
    assert "ran" not in body
    setup_errors = [
        record
        for record in caplog.records
        if record.name == "pyserv.error"
        and record.exc_info
        and record.exc_info[0] is ServletSetupError
    ]
    assert len(setup_errors) == 1
    assert "session" in str(setup_errors[0].exc_info[1])


def test_mount_splits_a_whole_path_sent_as_script_name(make_app):
    app = make_app(mount="/testapp")

    status, body = call(app, "", script_name="/testapp/TestServlet/x")

    assert status == 200
    assert body == "servlet=TestServlet|extra=x|script=/testapp|path_info=/TestServlet/x"


def test_mount_leaves_a_split_path_as_it_is(make_app):
    app = make_app(mount="/testapp")

    status, body = call(app, "/TestServlet/x", script_name="/testapp")

    assert status == 200
    assert body == "servlet=TestServlet|extra=x|script=/testapp|path_info=/TestServlet/x"


def test_mount_does_not_match_a_longer_first_segment(make_app):
    app = make_app(mount="/testapp")

    status, body = call(app, "", script_name="/testapp2/TestServlet")

    assert status == 404
    assert "servlet=" not in body


def test_without_mount_script_name_is_trusted(make_app):
    status, body = call(make_app(), "/TestServlet/x", script_name="/cgi-bin/testapp.cgi")

    assert status == 200
    assert "|script=/cgi-bin/testapp.cgi|" in body


def test_one_instance_serves_every_request_to_a_servlet(make_app):
    app = make_app(
        """
        class Counter:
            def __init__(self):
                self.calls = 0

            def run(self, request, response):
                self.calls += 1
                response.write(str(self.calls))
        """
    )

    bodies = [call(app, "/Counter")[1] for _ in range(3)]

    assert bodies == ["1", "2", "3"]
