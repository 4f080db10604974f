"""The Servlet base class: method dispatch, HEAD/OPTIONS/405, init and destroy."""

from __future__ import annotations

import io
import threading
import types
import uuid
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

import pyserv
from pyserv.application import AppSettings
from pyserv.errors import HTTPError
from pyserv.request import Request
from pyserv.response import Response

ALLOW = "GET, HEAD, OPTIONS, POST"


def servlet_module(*classes: type) -> types.ModuleType:
    """A fresh module defining a subclass of each of *classes*, under the same name."""
    module = types.ModuleType(f"servlets_{uuid.uuid4().hex}")
    for cls in classes:
        setattr(module, cls.__name__, type(cls.__name__, (cls,), {"__module__": module.__name__}))
    return module


def make_app(tmp_path, *classes: type, mount: str | None = None) -> pyserv.Application:
    module = servlet_module(*classes)
    settings = AppSettings(
        name="testapp",
        module=module.__name__,
        session_dir=str(tmp_path / "sessions"),
        mount=mount,
    )
    return pyserv.Application(settings, module=module)


def call(app, path: str, method: str = "GET", **overrides: Any):
    """Run one request; return (status line, headers dict, body bytes)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "wsgi.input": io.BytesIO(),
    }
    environ.update(overrides)
    setup_testing_defaults(environ)
    started = []

    def start_response(status, headers, exc_info=None):
        started.append((status, headers))
        return lambda chunk: None

    body = b"".join(app(environ, start_response))
    assert len(started) == 1
    status, headers = started[0]
    return status, dict(headers), body


class Greeter(pyserv.Servlet):
    def do_GET(self, request, response):
        response.headers.set("X-Handler", "do_GET")
        response.write("hello from GET")

    def do_POST(self, request, response):
        response.headers.set("X-Handler", "do_POST")
        response.write("hello from POST")


def direct_request(method: str) -> Request:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": "/Greeter"}
    setup_testing_defaults(environ)
    return Request(environ)


# -- method dispatch, called directly -------------------------------------------------


def test_get_runs_do_get():
    response = Response()

    Greeter().run(direct_request("GET"), response)

    assert response.headers["X-Handler"] == "do_GET"
    assert response.body == b"hello from GET"


def test_post_runs_do_post():
    response = Response()

    Greeter().run(direct_request("POST"), response)

    assert response.body == b"hello from POST"


def test_head_runs_do_get():
    response = Response()

    Greeter().run(direct_request("HEAD"), response)

    assert response.headers["X-Handler"] == "do_GET"


def test_options_answers_204_with_the_allowed_methods():
    response = Response()

    Greeter().run(direct_request("OPTIONS"), response)

    assert response.status == 204
    assert response.headers["Allow"] == ALLOW
    assert response.body == b""


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "get", "Get", "post"])
def test_method_without_handler_is_a_405_with_allow(method):
    with pytest.raises(HTTPError) as caught:
        Greeter().run(direct_request(method), Response())

    assert caught.value.status == 405
    assert ("Allow", ALLOW) in caught.value.headers


def test_allowed_methods_of_a_servlet_without_do_get_has_no_head():
    class PostOnly(pyserv.Servlet):
        def do_POST(self, request, response):
            pass

    assert PostOnly.allowed_methods == frozenset({"POST", "OPTIONS"})
    with pytest.raises(HTTPError) as caught:
        PostOnly().run(direct_request("HEAD"), Response())
    assert caught.value.status == 405


def test_allowed_methods_include_inherited_handlers():
    class MoreGreeter(Greeter):
        def do_DELETE(self, request, response):
            pass

    assert MoreGreeter.allowed_methods == frozenset({"GET", "HEAD", "OPTIONS", "POST", "DELETE"})


# -- method dispatch, through the application -------------------------------------------


def test_get_through_the_application_runs_do_get(tmp_path):
    status, headers, body = call(make_app(tmp_path, Greeter), "/Greeter")

    assert status == "200 OK"
    assert headers["X-Handler"] == "do_GET"
    assert body == b"hello from GET"


def test_head_through_the_application_drops_the_body_but_keeps_content_length(tmp_path):
    status, headers, body = call(make_app(tmp_path, Greeter), "/Greeter", method="HEAD")

    assert status == "200 OK"
    assert headers["X-Handler"] == "do_GET"
    assert body == b""
    assert headers["Content-Length"] == str(len(b"hello from GET"))


def test_options_through_the_application_is_204_with_allow(tmp_path):
    status, headers, body = call(make_app(tmp_path, Greeter), "/Greeter", method="OPTIONS")

    assert status == "204 No Content"
    assert headers["Allow"] == ALLOW
    assert body == b""


@pytest.mark.parametrize("method", ["DELETE", "get"])
def test_unhandled_method_through_the_application_is_405_with_allow(tmp_path, method):
    status, headers, _ = call(make_app(tmp_path, Greeter), "/Greeter", method=method)

    assert status == "405 Method Not Allowed"
    assert headers["Allow"] == ALLOW


# -- init and destroy -----------------------------------------------------------------


def test_init_runs_exactly_once_before_first_use_under_concurrent_first_requests(tmp_path):
    threads_count = 8
    contexts: list[pyserv.ServletContext] = []
    init_lock = threading.Lock()

    class Counted(pyserv.Servlet):
        def init(self, context):
            with init_lock:
                contexts.append(context)
            threading.Event().wait(0.2)  # a slow init widens any race
            self.ready = True

        def do_GET(self, request, response):
            response.write("ready" if getattr(self, "ready", False) else "not ready")

    app = make_app(tmp_path, Counted, mount="/testapp")
    barrier = threading.Barrier(threads_count)
    results: list[Any] = [None] * threads_count

    def hit(index: int) -> None:
        barrier.wait(timeout=10)
        results[index] = call(app, "/Counted", SCRIPT_NAME="/testapp")

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert [(status, body) for status, _, body in results] == [("200 OK", b"ready")] * threads_count
    assert len(contexts) == 1
    context = contexts[0]
    assert isinstance(context, pyserv.ServletContext)
    assert context.app_name == "testapp"
    assert context.mount == "/testapp"


def test_init_is_not_called_again_on_later_requests(tmp_path):
    calls = []

    class Once(pyserv.Servlet):
        def init(self, context):
            calls.append(context)

        def do_GET(self, request, response):
            response.write("ok")

    app = make_app(tmp_path, Once)
    for _ in range(3):
        assert call(app, "/Once")[0] == "200 OK"

    assert len(calls) == 1


def test_destroy_is_called_on_application_close(tmp_path):
    destroyed = []

    class Finite(pyserv.Servlet):
        def do_GET(self, request, response):
            response.write("ok")

        def destroy(self):
            destroyed.append(self)

    app = make_app(tmp_path, Finite)
    call(app, "/Finite")
    assert destroyed == []

    app.close()

    assert len(destroyed) == 1
    assert isinstance(destroyed[0], Finite)
