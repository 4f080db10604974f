"""The WSGI core end to end: sessions and cookies, error pages, streaming, concurrency."""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import types
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from wsgiref.util import setup_testing_defaults

import pytest

from pyserv.application import Application, AppSettings
from pyserv.errors import HTTPError
from pyserv.request import RequestLimits

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT_NAME = "/cgi-bin/testapp.cgi"
SID = r"[A-Za-z0-9_-]{43}"
SESSION_COOKIE = re.compile(rf"PYSERVSID=({SID}); Path=([^;]*); HttpOnly; SameSite=Lax\Z")


@dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    environ: dict[str, Any]
    events: list[tuple[Any, ...]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.getall(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def session_id(self) -> str | None:
        for value in self.getall("Set-Cookie"):
            match = re.match(rf"PYSERVSID=({SID});", value)
            if match:
                return match.group(1)
        return None

    @property
    def request_id(self) -> str:
        return self.environ["pyserv.request_id"]


def call(
    app: Application,
    servlet_path: str,
    *,
    method: str = "GET",
    sid: str | None = None,
    script_name: str = SCRIPT_NAME,
    **overrides: Any,
) -> Result:
    """Run one request through *app* as a WSGI server would; record what it sends.

    ``events`` lists ("start", status, headers) and ("write", chunk) in order; the same
    list is in the environ as ``test.events`` so that a servlet can look at it.
    """
    events: list[tuple[Any, ...]] = []
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": servlet_path,
        "REMOTE_ADDR": "192.0.2.1",
        "wsgi.input": io.BytesIO(),
        "test.events": events,
    }
    if sid is not None:
        environ["HTTP_COOKIE"] = f"PYSERVSID={sid}"
    environ.update(overrides)
    setup_testing_defaults(environ)

    def start_response(status, headers, exc_info=None):
        events.append(("start", status, list(headers)))
        return lambda chunk: events.append(("write", chunk))

    returned = b"".join(app(environ, start_response))
    starts = [event for event in events if event[0] == "start"]
    assert len(starts) == 1, f"start_response called {len(starts)} times"
    _, status, headers = starts[0]
    return Result(int(status.split()[0]), headers, returned, environ, events)


def session_files(session_dir: Path) -> list[Path]:
    return sorted(session_dir.rglob("*.session")) if session_dir.exists() else []


def all_files(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(path for path in directory.rglob("*") if path.is_file())


def servlet_module(*classes: type) -> types.ModuleType:
    """A fresh module defining a subclass of each of *classes*, under the same name."""
    module = types.ModuleType(f"app_servlets_{uuid.uuid4().hex}")
    for cls in classes:
        setattr(module, cls.__name__, type(cls.__name__, (cls,), {"__module__": module.__name__}))
    return module


@pytest.fixture
def session_dir(tmp_path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def make_app(session_dir) -> Iterator[Callable[..., Application]]:
    """Return ``make(*servlet_classes, **settings)``: an Application serving those classes."""
    apps: list[Application] = []

    def make(*classes: type, **settings: Any) -> Application:
        module = servlet_module(*classes)
        app = Application(
            AppSettings(
                name="testapp", module=module.__name__, session_dir=str(session_dir), **settings
            ),
            module=module,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def seed_app(session_dir, monkeypatch) -> Iterator[Application]:
    """The 2001 TestServlet from examples/thisapp.py, as the seed deployed it."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    app = Application(AppSettings(name="testapp", module="thisapp", session_dir=str(session_dir)))
    yield app
    app.close()


def visits(result: Result) -> int:
    match = re.search(r"^(\d+) previous visits$", result.text, re.MULTILINE)
    assert match, result.text
    return int(match.group(1))


# -- the seed servlet and its session cookie -------------------------------------------


def test_first_request_sets_an_httponly_lax_session_cookie_for_the_script_path(seed_app):
    result = call(seed_app, "/TestServlet")

    assert result.status == 200
    assert result.text.startswith("Hi!\n")
    assert visits(result) == 0
    cookie = SESSION_COOKIE.match(result.header("Set-Cookie") or "")
    assert cookie, result.header("Set-Cookie")
    assert cookie.group(2) == SCRIPT_NAME
    assert result.header("Cache-Control") == "private, no-store"
    assert result.header("Vary") == "Cookie"
    assert result.header("Content-Type") == "text/plain; charset=utf-8"
    assert result.header("Content-Length") == str(len(result.body))


def test_visit_counter_rises_with_the_cookie_and_the_cookie_is_not_sent_again(seed_app):
    first = call(seed_app, "/TestServlet")
    sid = first.session_id
    assert sid is not None

    second = call(seed_app, "/TestServlet", sid=sid)
    third = call(seed_app, "/TestServlet", sid=sid)

    assert [visits(first), visits(second), visits(third)] == [0, 1, 2]
    assert second.getall("Set-Cookie") == []
    assert third.getall("Set-Cookie") == []
    assert second.header("Vary") == "Cookie"


def test_request_without_the_cookie_starts_a_new_session(seed_app):
    first = call(seed_app, "/TestServlet")
    call(seed_app, "/TestServlet", sid=first.session_id)

    fresh = call(seed_app, "/TestServlet")

    assert visits(fresh) == 0
    assert fresh.session_id not in (None, first.session_id)


def test_seed_servlet_shows_the_query_in_the_request_repr(seed_app):
    result = call(seed_app, "/TestServlet", QUERY_STRING="blah=foo")

    assert f"{SCRIPT_NAME}/TestServlet?blah=foo" in result.text


def test_session_cookie_is_secure_over_https(seed_app):
    result = call(seed_app, "/TestServlet", **{"wsgi.url_scheme": "https"})

    attributes = (result.header("Set-Cookie") or "").split("; ")
    assert "Secure" in attributes
    assert "HttpOnly" in attributes


def test_session_cookie_is_not_secure_over_http(seed_app):
    result = call(seed_app, "/TestServlet", **{"wsgi.url_scheme": "http"})

    assert "Secure" not in (result.header("Set-Cookie") or "").split("; ")


def test_head_on_the_seed_servlet_has_content_length_but_no_body(seed_app):
    result = call(seed_app, "/TestServlet", method="HEAD")

    assert result.status == 200
    assert result.body == b""
    assert int(result.header("Content-Length") or 0) > len("Hi!\n")


# -- servlets used by several tests ------------------------------------------------------


class Counter:
    """Counts in the session; ``?fail=1`` raises after counting, ``?bad=…`` stores junk."""

    def run(self, request, response):
        count = self.session.get("count", 0) + 1
        self.session["count"] = count
        if request.query.get("fail"):
            raise RuntimeError("secret detail")
        if request.query.get("bad") == "lambda":
            self.session["bad"] = lambda: None
        elif request.query.get("bad") == "lock":
            self.session["bad"] = threading.Lock()
        response.write(f"count={count} bad={'bad' in self.session}")


# -- lazy sessions ----------------------------------------------------------------------


def test_servlet_that_never_touches_the_session_sets_no_cookie_and_writes_no_file(
    make_app, session_dir
):
    class Static:
        def run(self, request, response):
            response.write("static")

    result = call(make_app(Static), "/Static")

    assert result.status == 200
    assert result.body == b"static"
    assert result.getall("Set-Cookie") == []
    assert result.getall("Vary") == []
    assert result.getall("Cache-Control") == []
    assert all_files(session_dir) == []


class Reader:
    def run(self, request, response):
        response.write(f"visits={self.session.get('visits', 0)}")


def test_servlet_that_only_reads_the_session_sets_no_cookie_and_stores_no_session(
    make_app, session_dir
):
    result = call(make_app(Reader), "/Reader")

    assert result.status == 200
    assert result.body == b"visits=0"
    assert result.getall("Set-Cookie") == []
    assert result.header("Vary") == "Cookie"
    assert session_files(session_dir) == []


def test_servlet_that_only_reads_the_session_writes_no_file_at_all(make_app, session_dir):
    result = call(make_app(Reader), "/Reader")

    assert result.status == 200
    assert all_files(session_dir) == []  # not even the secret: nothing was stored


def test_servlet_that_only_reads_the_session_works_when_the_secret_cannot_be_created(
    make_app, tmp_path
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    app = make_app(Reader, secret_file=str(blocker / "secret"))

    result = call(app, "/Reader")

    assert result.status == 200
    assert result.body == b"visits=0"


def test_unusable_secret_file_is_a_clean_500_with_the_request_id(make_app, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    app = make_app(Counter, secret_file=str(blocker / "secret"))

    with caplog.at_level(logging.ERROR, logger="pyserv.error"):
        result = call(app, "/Counter")

    assert result.status == 500
    assert result.request_id in result.text
    assert result.getall("Set-Cookie") == []
    assert any(
        result.request_id in record.getMessage() and "secret" in record.getMessage()
        for record in caplog.records
    )


# -- errors ---------------------------------------------------------------------------


def test_servlet_exception_is_a_500_showing_only_the_request_id(make_app, caplog):
    app = make_app(Counter)

    with caplog.at_level(logging.ERROR, logger="pyserv.error"):
        result = call(app, "/Counter", QUERY_STRING="fail=1")

    assert result.status == 500
    assert result.request_id in result.text
    assert "secret detail" not in result.text
    assert "Traceback" not in result.text
    records = [record for record in caplog.records if record.name == "pyserv.error"]
    assert len(records) == 1
    record = records[0]
    assert result.request_id in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    formatted = logging.Formatter().format(record)
    assert "Traceback" in formatted
    assert "secret detail" in formatted


def test_request_ids_differ_between_requests(make_app):
    app = make_app(Counter)

    ids = {call(app, "/Counter", QUERY_STRING="fail=1").request_id for _ in range(3)}

    assert len(ids) == 3


def test_new_session_changed_before_an_exception_is_not_stored(make_app, session_dir):
    result = call(make_app(Counter), "/Counter", QUERY_STRING="fail=1")

    assert result.status == 500
    assert result.getall("Set-Cookie") == []
    assert session_files(session_dir) == []


def test_session_changes_before_an_exception_are_discarded(make_app):
    app = make_app(Counter)
    first = call(app, "/Counter")
    sid = first.session_id
    assert first.text == "count=1 bad=False"

    failed = call(app, "/Counter", sid=sid, QUERY_STRING="fail=1")
    after = call(app, "/Counter", sid=sid)

    assert failed.status == 500
    assert after.text == "count=2 bad=False"


@pytest.mark.parametrize("kind", ["lambda", "lock"])
def test_unpicklable_session_value_is_a_500_naming_the_key_and_keeps_the_old_session(
    make_app, caplog, kind
):
    app = make_app(Counter)
    sid = call(app, "/Counter").session_id

    with caplog.at_level(logging.ERROR, logger="pyserv.error"):
        failed = call(app, "/Counter", sid=sid, QUERY_STRING=f"bad={kind}")
    after = call(app, "/Counter", sid=sid)

    assert failed.status == 500
    assert failed.request_id in failed.text
    messages = [r.getMessage() for r in caplog.records if r.name == "pyserv.error"]
    assert len(messages) == 1
    assert "'bad'" in messages[0]
    assert failed.request_id in messages[0]
    assert after.status == 200
    assert after.text == "count=2 bad=False"


def test_unpicklable_value_in_a_new_session_is_a_500_without_cookie_or_file(make_app, session_dir):
    result = call(make_app(Counter), "/Counter", QUERY_STRING="bad=lock")

    assert result.status == 500
    assert result.getall("Set-Cookie") == []
    assert session_files(session_dir) == []


def test_http_error_raised_by_a_servlet_answers_with_its_status(make_app):
    class Forbidden:
        def run(self, request, response):
            self.session["tried"] = True
            response.write("partial output")
            raise HTTPError(403, "not yours")

    result = call(make_app(Forbidden), "/Forbidden")

    assert result.status == 403
    assert "not yours" in result.text
    assert "partial output" not in result.text
    assert result.getall("Set-Cookie") == []


def test_proxy_header_never_reaches_the_servlet(make_app):
    class Env:
        def run(self, request, response):
            response.write(
                f"proxy={request.environ.get('HTTP_PROXY')!r} "
                f"header={request.headers.get('Proxy')!r} "
                f"other={request.headers.get('X-Other')!r}"
            )

    result = call(make_app(Env), "/Env", HTTP_PROXY="http://evil:8080", HTTP_X_OTHER="kept")

    assert result.text == "proxy=None header=None other='kept'"


# -- status codes without a body -----------------------------------------------------


@pytest.mark.parametrize("status", [204, 304])
def test_response_without_body_status_has_no_content_length_and_no_body(make_app, status):
    class Empty:
        def run(self, request, response):
            response.status = status
            response.write("dropped")

    result = call(make_app(Empty), "/Empty")

    assert result.status == status
    assert result.getall("Content-Length") == []
    assert result.body == b""


# -- streaming --------------------------------------------------------------------------


def test_flush_sends_headers_and_session_cookie_then_streams_the_body(make_app, session_dir):
    seen_at_flush: list[Any] = []

    class Streamer:
        def run(self, request, response):
            self.session["step"] = "flushed"
            response.headers.set("X-Early", "yes")
            response.write("first ")
            response.flush()
            events = request.environ["test.events"]
            seen_at_flush.append((list(events), len(session_files(session_dir))))
            response.write("second ")
            response.write(b"third")

    class Show:
        def run(self, request, response):
            response.write(self.session.get("step", "none"))

    app = make_app(Streamer, Show)
    result = call(app, "/Streamer")

    assert result.status == 200
    assert result.body == b""  # everything went through the write callable
    writes = [event[1] for event in result.events if event[0] == "write"]
    assert writes == [b"first ", b"second ", b"third"]
    assert result.events[0][0] == "start"
    assert result.header("X-Early") == "yes"
    assert result.header("Cache-Control") == "private, no-store"
    assert result.getall("Content-Length") == []
    assert SESSION_COOKIE.match(result.header("Set-Cookie") or "")
    (events_at_flush, files_at_flush) = seen_at_flush[0]
    assert [event[0] for event in events_at_flush] == ["start", "write"]
    assert files_at_flush == 1
    assert call(app, "/Show", sid=result.session_id).body == b"flushed"


def test_headers_cannot_change_after_flush(make_app):
    errors: list[str] = []

    class Late:
        def run(self, request, response):
            response.flush()
            for change in (
                lambda: response.headers.set("X-Late", "1"),
                lambda: setattr(response, "status", 500),
                lambda: response.set_cookie("late", "1"),
            ):
                try:
                    change()
                except RuntimeError as exc:
                    errors.append(str(exc))
            response.write("body")

    result = call(make_app(Late), "/Late")

    assert result.status == 200
    assert result.header("X-Late") is None
    assert len(errors) == 3


def test_exception_after_flush_does_not_produce_an_error_page(make_app, caplog):
    class Breaks:
        def run(self, request, response):
            response.write("partial")
            response.flush()
            raise RuntimeError("late failure")

    with caplog.at_level(logging.ERROR, logger="pyserv.error"):
        result = call(make_app(Breaks), "/Breaks")

    assert result.status == 200
    writes = [event[1] for event in result.events if event[0] == "write"]
    assert writes == [b"partial"]
    assert result.body == b""
    assert any(record.exc_info and record.exc_info[0] is RuntimeError for record in caplog.records)


def test_head_with_flush_sends_no_body(make_app):
    class Streamer:
        def run(self, request, response):
            response.write("one")
            response.flush()
            response.write("two")

    result = call(make_app(Streamer), "/Streamer", method="HEAD")

    assert result.status == 200
    assert [event for event in result.events if event[0] == "write"] == []
    assert result.body == b""


# -- concurrency ----------------------------------------------------------------------


def test_two_users_hitting_the_same_servlet_at_the_same_moment_never_see_each_others_session(
    make_app,
):
    barrier = threading.Barrier(2)

    class Login:
        def run(self, request, response):
            self.session["user"] = request.query["user"]

    class Echo:
        def run(self, request, response):
            user = self.session.get("user")
            barrier.wait(timeout=10)  # both requests are inside run() now
            self.session["seen"] = user
            response.write(str(user))

    class Seen:
        def run(self, request, response):
            response.write(str(self.session.get("seen")))

    app = make_app(Login, Echo, Seen)
    sids = {
        user: call(app, "/Login", QUERY_STRING=f"user={user}").session_id
        for user in ("alice", "bob")
    }
    assert None not in sids.values()

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {user: pool.submit(call, app, "/Echo", sid=sid) for user, sid in sids.items()}
        results = {user: future.result(timeout=30) for user, future in futures.items()}

    assert {user: (r.status, r.text) for user, r in results.items()} == {
        "alice": (200, "alice"),
        "bob": (200, "bob"),
    }
    assert {user: call(app, "/Seen", sid=sid).text for user, sid in sids.items()} == {
        "alice": "alice",
        "bob": "bob",
    }


def test_twenty_users_making_twenty_requests_each_count_exactly_twenty(make_app):
    users, requests_each = 20, 20

    class Count:
        def run(self, request, response):
            count = self.session.get("count", 0) + 1
            self.session["count"] = count
            response.write(str(count))

    app = make_app(Count)
    start = threading.Barrier(users)

    def user_session() -> tuple[str, list[str]]:
        start.wait(timeout=30)
        first = call(app, "/Count")
        sid = first.session_id
        assert sid is not None
        bodies = [first.text]
        for _ in range(requests_each - 1):
            result = call(app, "/Count", sid=sid)
            assert result.status == 200
            bodies.append(result.text)
        return sid, bodies

    with ThreadPoolExecutor(max_workers=users) as pool:
        futures = [pool.submit(user_session) for _ in range(users)]
        outcomes = [future.result(timeout=120) for future in futures]

    expected = [str(n) for n in range(1, requests_each + 1)]
    assert [bodies for _, bodies in outcomes] == [expected] * users
    sids = [sid for sid, _ in outcomes]
    assert len(set(sids)) == users
    finals = [call(app, "/Count", sid=sid).text for sid in sids]
    assert finals == [str(requests_each + 1)] * users


# -- limits checked before dispatch --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"HTTP_X_PAD": "x" * 200}, 431),
        ({"QUERY_STRING": "a&b&c&d"}, 400),
        ({"CONTENT_LENGTH": "12x"}, 400),
        ({"CONTENT_LENGTH": "1001"}, 413),
    ],
    ids=["headers", "params", "malformed-length", "body"],
)
def test_request_over_a_limit_is_refused_before_the_servlet_runs(make_app, overrides, status):
    ran = []

    class Record:
        def run(self, request, response):
            ran.append(True)

    limits = RequestLimits(max_header_bytes=150, max_params=3, max_body=1000)

    result = call(make_app(Record, limits=limits), "/Record", method="POST", **overrides)

    assert result.status == status
    assert ran == []


def test_request_ids_are_unique_across_threads_and_forked_workers():
    from pyserv.application import new_request_id

    seen: list[str] = []

    def take() -> None:
        seen.extend(new_request_id() for _ in range(1000))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 8000
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in seen)

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker forked from a master that made ids
        os.write(writer, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    os.close(writer)
    assert child_id[:8] != seen[0][:8]  # its own prefix
