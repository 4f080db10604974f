"""Sessions as a servlet and a browser see them, through the WSGI Application."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from pyserv import Application, AppSettings
from pyserv.stores.base import HEADER_SIZE, Header, new_session_id, read_header

SERVLETS = """
import json
import threading
import time

from pyserv import HTTPError, Servlet

entered = threading.Event()
gate = threading.Event()


def describe(session):
    return json.dumps({
        "id": session.id,
        "is_new": session.is_new,
        "created": session.created,
        "last_access": session.last_access,
        "timeout": session.timeout,
        "data": dict(session),
    })


class Read(Servlet):
    def do_GET(self, request, response):
        response.write(describe(self.session))


class Increment(Servlet):
    def do_GET(self, request, response):
        self.session["n"] = self.session.get("n", 0) + 1
        response.write(describe(self.session))


class Untouched(Servlet):
    def do_GET(self, request, response):
        response.write("no session here")


class ShortTimeout(Servlet):
    def do_GET(self, request, response):
        self.session.timeout = 1
        self.session["n"] = self.session.get("n", 0) + 1
        response.write(describe(self.session))


class SlowIncrement(Servlet):
    def do_GET(self, request, response):
        n = self.session.get("n", 0)
        time.sleep(float(request.query["sleep"]))
        self.session["n"] = n + 1
        response.write(describe(self.session))


class Hold(Servlet):
    def do_GET(self, request, response):
        self.session["held"] = True
        entered.set()
        gate.wait(10)
        response.write(describe(self.session))


class Invalidate(Servlet):
    def do_GET(self, request, response):
        self.session.invalidate()
        response.write("bye")


class Rotate(Servlet):
    def do_GET(self, request, response):
        self.session.rotate()
        self.session["n"] = self.session.get("n", 0) + 1
        response.write("rotated")


class FailAfterWrite(Servlet):
    def do_GET(self, request, response):
        self.session["n"] = 999
        raise RuntimeError("the servlet failed after changing the session")


class HugeTimeout(Servlet):
    def do_GET(self, request, response):
        self.session["n"] = 1
        self.session.timeout = 2 ** 32  # more than the envelope's 32-bit field holds
        response.write("stored")


class RefuseAfterWrite(Servlet):
    def do_GET(self, request, response):
        self.session["n"] = 999
        raise HTTPError(409, "refused after changing the session")


class Grow(Servlet):
    def do_GET(self, request, response):
        self.session["blob"] = "x" * int(request.query["size"])
        response.write(describe(self.session))


class LongTimeout(Servlet):
    def do_GET(self, request, response):
        self.session.timeout = 86400
        self.session["n"] = self.session.get("n", 0) + 1
        response.write(describe(self.session))
"""


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def session_cookies(self) -> list[str]:
        return [v for v in self.header_values("Set-Cookie") if v.startswith("PYSERVSID=")]

    @property
    def new_sid(self) -> str | None:
        """The id a Set-Cookie gives the client, if any."""
        cookies = self.session_cookies()
        assert len(cookies) <= 1, cookies
        return cookies[0].split(";")[0].split("=", 1)[1] if cookies else None

    @property
    def json(self) -> dict[str, Any]:
        assert self.status == 200, (self.status, self.body)
        return json.loads(self.body)


def call(app: Application, servlet: str, cookie: str | None = None, query: str = "") -> Reply:
    environ: dict[str, Any] = {"PATH_INFO": f"/{servlet}", "QUERY_STRING": query}
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return Reply(int(seen["status"].split()[0]), list(seen["headers"]), body)


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    return tmp_path / "srv" / "www" / "sessions"


@pytest.fixture
def make_app(tmp_path: Path, session_dir: Path, monkeypatch):
    modules = tmp_path / "modules"
    modules.mkdir()
    monkeypatch.syspath_prepend(str(modules))

    def make(**settings: Any) -> Application:
        name = f"session_app_{uuid.uuid4().hex}"
        (modules / f"{name}.py").write_text(SERVLETS)
        app = Application(
            AppSettings(name="t", module=name, session_dir=str(session_dir), **settings)
        )
        monkeypatch.setitem(sys.modules, name, app.module)  # forgotten again at teardown
        return app

    return make


def session_file(session_dir: Path, sid: str) -> Path:
    return session_dir / sid[:2] / f"{sid}.session"


def session_files(session_dir: Path) -> list[Path]:
    return sorted(session_dir.rglob("*.session")) if session_dir.exists() else []


def snapshot_outside(root: Path, excluded: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under *root* but outside *excluded*, with what would show a change."""
    found = {}
    for path in root.rglob("*"):
        if path == excluded or excluded in path.parents:
            continue
        info = path.lstat()
        found[str(path.relative_to(root))] = (path.is_dir(), info.st_size, info.st_mtime_ns)
    return found


# -- hostile cookies ------------------------------------------------------------------------

FORGED = "forgedForgedForgedForgedForgedForgedForged"[:43].ljust(43, "A")
HOSTILE_COOKIES = {
    "forged well-formed unknown id": f"PYSERVSID={FORGED}",
    "quoted forged id": f'PYSERVSID="{FORGED}"',
    "overlong id": f"PYSERVSID={FORGED * 100}",
    "one character too many": f"PYSERVSID={FORGED}A",
    "NUL inside": f"PYSERVSID={FORGED[:20]}\x00{FORGED[21:]}",
    "NUL appended": f"PYSERVSID={FORGED}\x00",
    "non-ASCII UTF-8 bytes": "PYSERVSID=" + ("é" * 43).encode("utf-8").decode("latin-1"),
    "non-ASCII of id length": "PYSERVSID=" + "\xe9" * 43,
    "path traversal": "PYSERVSID=../../etc/passwd",
    "path traversal of id length": "PYSERVSID=" + ("../" * 15)[:43],
    "encoded traversal": "PYSERVSID=%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "empty value": "PYSERVSID=",
    "ten duplicates": "; ".join([f"PYSERVSID={FORGED}"] * 10),
    "ten different forged ids": "; ".join(f"PYSERVSID={new_session_id()}" for _ in range(10)),
}


@pytest.mark.parametrize("cookie", list(HOSTILE_COOKIES.values()), ids=list(HOSTILE_COOKIES))
def test_hostile_cookie_is_treated_exactly_as_no_cookie(make_app, tmp_path, session_dir, cookie):
    for decoy in (tmp_path / "etc" / "passwd", tmp_path / "srv" / "etc" / "passwd"):
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_text("root:x:0:0::/root:/bin/sh\n")
    app = make_app()
    baseline = call(app, "Increment")
    before = snapshot_outside(tmp_path, session_dir)

    reply = call(app, "Increment", cookie=cookie)

    assert reply.status == 200
    assert reply.json["is_new"] is True
    assert reply.json["data"] == {"n": 1}
    assert sorted(k.lower() for k, _ in reply.headers) == sorted(
        k.lower() for k, _ in baseline.headers
    )
    sid = reply.new_sid
    assert sid is not None and sid == reply.json["id"]
    assert sid not in cookie and sid != baseline.new_sid
    assert snapshot_outside(tmp_path, session_dir) == before
    assert session_files(session_dir) == sorted(
        [session_file(session_dir, baseline.new_sid), session_file(session_dir, sid)]
    )


@pytest.mark.parametrize("first", [FORGED, "../../etc/passwd", ""])
def test_second_cookie_of_the_same_name_naming_our_live_session_is_used(make_app, first):
    app = make_app()
    live = call(app, "Increment").new_sid

    reply = call(app, "Increment", cookie=f"PYSERVSID={first}; other=1; PYSERVSID={live}")

    assert reply.status == 200
    assert reply.json["id"] == live
    assert reply.json["is_new"] is False
    assert reply.json["data"] == {"n": 2}
    assert reply.session_cookies() == []


def test_forged_session_id_is_not_adopted(make_app, session_dir):
    app = make_app()
    chosen = new_session_id()  # well-formed, the attacker's pick

    first = call(app, "Increment", cookie=f"PYSERVSID={chosen}")
    second = call(app, "Increment", cookie=f"PYSERVSID={chosen}")

    assert first.new_sid not in (None, chosen)
    assert second.new_sid not in (None, chosen, first.new_sid)
    assert second.json["data"] == {"n": 1}
    assert not session_file(session_dir, chosen).exists()
    assert not any(chosen in str(path) for path in session_dir.rglob("*"))
    assert call(app, "Increment", cookie=f"PYSERVSID={first.new_sid}").json["data"] == {"n": 2}


def test_session_is_lazy_no_file_and_no_cookie_until_written(make_app, session_dir):
    app = make_app()

    untouched = call(app, "Untouched")
    read_only = call(app, "Read")

    for reply in (untouched, read_only):
        assert reply.status == 200
        assert reply.header_values("Set-Cookie") == []
    assert read_only.json["is_new"] is True
    assert session_files(session_dir) == []
    written = call(app, "Increment")
    assert written.new_sid == written.json["id"]
    assert session_files(session_dir) == [session_file(session_dir, written.new_sid)]


def test_session_cookie_is_httponly_lax_and_secure_over_https(make_app):
    app = make_app()
    plain = call(app, "Increment").session_cookies()[0]
    environ_https = {"PATH_INFO": "/Increment", "wsgi.url_scheme": "https", "HTTPS": "on"}
    setup_testing_defaults(environ_https)
    seen: dict[str, Any] = {}
    app(environ_https, lambda status, headers, exc=None: seen.update(headers=headers))
    secure = [v for k, v in seen["headers"] if k.lower() == "set-cookie"][0]

    for cookie in (plain, secure):
        attributes = [part.strip() for part in cookie.split(";")]
        assert "HttpOnly" in attributes and "SameSite=Lax" in attributes
        assert "Path=/" in attributes
    assert "Secure" not in [p.strip() for p in plain.split(";")]
    assert "Secure" in [p.strip() for p in secure.split(";")]


def test_session_reports_id_is_new_created_last_access_and_timeout(make_app):
    app = make_app(session_timeout=1234)
    before = time.time()
    first = call(app, "Increment")
    after = time.time()
    time.sleep(0.05)
    second_started = time.time()
    second = call(app, "Read", cookie=f"PYSERVSID={first.new_sid}")

    one, two = first.json, second.json
    assert one["id"] == first.new_sid and two["id"] == first.new_sid
    assert one["is_new"] is True and two["is_new"] is False
    assert before <= one["created"] <= after
    assert two["created"] == one["created"]
    assert two["last_access"] >= second_started > one["last_access"]
    assert one["timeout"] == two["timeout"] == 1234
    assert second.session_cookies() == []


def test_per_session_timeout_expires_and_the_session_never_comes_back(make_app, session_dir):
    app = make_app()
    sid = call(app, "ShortTimeout").new_sid
    soon = call(app, "Read", cookie=f"PYSERVSID={sid}").json
    assert soon["id"] == sid and soon["timeout"] == 1 and soon["data"] == {"n": 1}

    time.sleep(1.2)
    late = call(app, "Increment", cookie=f"PYSERVSID={sid}")

    assert late.json["is_new"] is True
    assert late.new_sid not in (None, sid)
    assert late.json["data"] == {"n": 1}
    assert not session_file(session_dir, sid).exists()
    again = call(app, "Read", cookie=f"PYSERVSID={sid}").json
    assert again["is_new"] is True and again["id"] != sid
    assert not session_file(session_dir, sid).exists()


def test_write_finishing_after_the_session_expired_does_not_resurrect_it(make_app, session_dir):
    app = make_app()
    sid = call(app, "ShortTimeout").new_sid

    slow = call(app, "SlowIncrement", cookie=f"PYSERVSID={sid}", query="sleep=1.3")

    assert slow.status == 503
    assert slow.session_cookies() == []
    path = session_file(session_dir, sid)
    if path.exists():  # left for the next load or sweep, but not rewritten
        _, data = app.store.envelope.open(sid, path.read_bytes())
        assert data == {"n": 1}
    after = call(app, "Read", cookie=f"PYSERVSID={sid}").json
    assert after["is_new"] is True and after["id"] != sid
    assert not path.exists()


def test_invalidate_deletes_the_file_and_sends_a_cookie_deletion(make_app, session_dir):
    app = make_app()
    sid = call(app, "Increment").new_sid
    assert session_file(session_dir, sid).exists()

    reply = call(app, "Invalidate", cookie=f"PYSERVSID={sid}")

    assert reply.status == 200
    (deletion,) = reply.session_cookies()
    assert deletion.startswith("PYSERVSID=;")
    assert "Max-Age=0" in deletion
    assert not session_file(session_dir, sid).exists()
    assert not (session_dir / sid[:2] / f"{sid}.lock").exists()
    after = call(app, "Read", cookie=f"PYSERVSID={sid}").json
    assert after["is_new"] is True and after["id"] != sid


def test_rotate_keeps_data_under_a_new_id_and_retires_the_old(make_app, session_dir):
    app = make_app()
    first = call(app, "Increment")
    old = first.new_sid

    rotated = call(app, "Rotate", cookie=f"PYSERVSID={old}")

    assert rotated.status == 200
    new = rotated.new_sid
    assert new not in (None, old)
    assert not session_file(session_dir, old).exists()
    now = call(app, "Read", cookie=f"PYSERVSID={new}").json
    assert now["is_new"] is False and now["data"] == {"n": 2}
    assert now["created"] == first.json["created"]
    stale = call(app, "Read", cookie=f"PYSERVSID={old}").json
    assert stale["is_new"] is True and stale["id"] not in (old, new)


@pytest.mark.parametrize("servlet, status", [("FailAfterWrite", 500), ("RefuseAfterWrite", 409)])
def test_exception_discards_session_changes(make_app, session_dir, servlet, status):
    app = make_app()
    sid = call(app, "Increment").new_sid

    failed = call(app, servlet, cookie=f"PYSERVSID={sid}")
    failed_new = call(app, servlet)

    assert failed.status == failed_new.status == status
    assert failed.session_cookies() == failed_new.session_cookies() == []
    assert call(app, "Read", cookie=f"PYSERVSID={sid}").json["data"] == {"n": 1}
    assert session_files(session_dir) == [session_file(session_dir, sid)]


def test_session_timeout_beyond_the_storable_range_is_an_error_page_not_a_crash(
    make_app, session_dir
):
    app = make_app()

    reply = call(app, "HugeTimeout")  # an exception escaping the WSGI callable fails here

    assert reply.status == 500
    assert reply.session_cookies() == []
    assert session_files(session_dir) == []


def test_request_waiting_on_a_locked_session_gets_503_with_retry_after(make_app):
    app = make_app(session_lock_timeout=0.3)
    sid = call(app, "Increment").new_sid
    cookie = f"PYSERVSID={sid}"
    held: list[Reply] = []
    holder = threading.Thread(target=lambda: held.append(call(app, "Hold", cookie=cookie)))
    holder.start()
    try:
        assert app.module.entered.wait(5.0)
        started = time.monotonic()
        waiting = call(app, "Increment", cookie=cookie)
        elapsed = time.monotonic() - started
    finally:
        app.module.gate.set()
        holder.join(10.0)
    assert not holder.is_alive()

    assert waiting.status == 503
    assert waiting.header_values("Retry-After") == ["1"]
    assert waiting.session_cookies() == []
    assert 0.25 <= elapsed < 3.0
    assert held[0].status == 200
    assert call(app, "Read", cookie=cookie).json["data"] == {"n": 1, "held": True}


def test_expiry_is_checked_on_load(make_app, session_dir):
    app = make_app(session_timeout=60)
    sid = call(app, "Increment").new_sid
    path = session_file(session_dir, sid)
    idle_since = time.time() - 61
    os.utime(path, (idle_since, idle_since))

    reply = call(app, "Increment", cookie=f"PYSERVSID={sid}")

    assert reply.json["is_new"] is True
    assert reply.new_sid not in (None, sid)
    assert reply.json["data"] == {"n": 1}
    assert not path.exists()
    assert not re.search(sid, " ".join(str(p) for p in session_dir.rglob("*")))


# -- limits: session size, session count, provisional sessions -------------------------------


def stored_header(session_dir: Path, sid: str) -> Header:
    with open(session_file(session_dir, sid), "rb") as stream:
        return read_header(stream.read(HEADER_SIZE))


def age(session_dir: Path, sid: str, seconds: float) -> None:
    """Make *sid* look idle for *seconds* (its file's mtime is its last access)."""
    when = time.time() - seconds
    os.utime(session_file(session_dir, sid), (when, when))


def test_session_over_max_session_bytes_is_a_500_and_the_stored_session_is_unchanged(
    make_app, session_dir, caplog
):
    app = make_app(max_session_bytes=1000)
    sid = call(app, "Grow", query="size=100").new_sid
    before = session_file(session_dir, sid).read_bytes()

    reply = call(app, "Grow", cookie=f"PYSERVSID={sid}", query="size=5000")

    assert reply.status == 500
    assert session_file(session_dir, sid).read_bytes() == before
    assert call(app, "Read", cookie=f"PYSERVSID={sid}").json["data"] == {"blob": "x" * 100}
    message = next(r.getMessage() for r in caplog.records if "max_session_bytes" in r.getMessage())
    assert re.search(r"session is 50\d\d bytes pickled, over max_session_bytes \(1000\)", message)


def test_new_session_over_max_session_bytes_stores_nothing_and_sets_no_cookie(
    make_app, session_dir
):
    reply = call(make_app(max_session_bytes=1000), "Grow", query="size=5000")

    assert reply.status == 500
    assert reply.session_cookies() == []
    assert session_files(session_dir) == []


def test_max_sessions_refuses_new_sessions_with_503_and_existing_ones_keep_working(
    make_app, session_dir, monkeypatch
):
    monkeypatch.setattr("pyserv.session.COUNT_TTL", 0.5)
    app = make_app(max_sessions=2)
    first = call(app, "Increment").new_sid
    call(app, "Increment")

    refused = call(app, "Increment")

    assert refused.status == 503
    assert refused.header_values("Retry-After") == ["60"]
    assert refused.session_cookies() == []
    assert len(session_files(session_dir)) == 2
    assert call(app, "Increment", cookie=f"PYSERVSID={first}").json["data"] == {"n": 2}
    assert call(app, "Untouched").status == 200  # no session, nothing to refuse
    assert call(app, "Invalidate", cookie=f"PYSERVSID={first}").status == 200
    time.sleep(0.6)  # the count is cached for COUNT_TTL: then the freed place is seen
    assert call(app, "Increment").status == 200


def test_max_sessions_counts_sessions_this_process_created_since_the_last_count(make_app):
    app = make_app(max_sessions=3)
    statuses = [call(app, "Increment").status for _ in range(5)]  # within one count's life

    assert statuses == [200, 200, 200, 503, 503]


def test_new_session_is_provisional_and_expires_after_new_session_timeout(make_app, session_dir):
    app = make_app(session_timeout=3600, new_session_timeout=60)
    sid = call(app, "Increment").new_sid

    header = stored_header(session_dir, sid)
    assert (header.timeout, header.new_timeout, header.idle_timeout) == (3600, 60, 60)
    age(session_dir, sid, 61)
    reply = call(app, "Read", cookie=f"PYSERVSID={sid}")
    assert reply.json["is_new"] is True and reply.json["id"] != sid
    assert not session_file(session_dir, sid).exists()


def test_cookie_coming_back_confirms_the_session_even_on_a_read(make_app, session_dir):
    app = make_app(session_timeout=3600, new_session_timeout=60)
    sid = call(app, "Increment").new_sid

    read = call(app, "Read", cookie=f"PYSERVSID={sid}")

    assert read.json["id"] == sid and read.json["timeout"] == 3600
    header = stored_header(session_dir, sid)
    assert (header.timeout, header.new_timeout, header.generation) == (3600, 0, 2)
    age(session_dir, sid, 61)
    assert call(app, "Read", cookie=f"PYSERVSID={sid}").json["data"] == {"n": 1}
    assert stored_header(session_dir, sid).generation == 2  # confirmed once, not again


def test_timeout_a_servlet_sets_on_a_new_session_applies_once_it_is_confirmed(
    make_app, session_dir
):
    app = make_app(session_timeout=3600, new_session_timeout=60)
    sid = call(app, "LongTimeout").new_sid
    assert stored_header(session_dir, sid).idle_timeout == 60

    assert call(app, "Read", cookie=f"PYSERVSID={sid}").json["timeout"] == 86400

    assert stored_header(session_dir, sid).idle_timeout == 86400


def test_new_session_timeout_zero_or_not_shorter_turns_provisional_sessions_off(
    make_app, session_dir
):
    for settings in ({"new_session_timeout": 0}, {"new_session_timeout": 7200}):
        app = make_app(session_timeout=3600, **settings)
        sid = call(app, "Increment").new_sid
        header = stored_header(session_dir, sid)
        assert (header.new_timeout, header.idle_timeout) == (0, 3600), settings


# -- session_route: a routing hint for sticky balancers, never part of the id --------------


def cookie_value(reply: Reply) -> str | None:
    return reply.new_sid


def test_route_is_appended_to_the_cookie_of_a_new_session(make_app, session_dir):
    app = make_app(session_route="a")
    value = cookie_value(call(app, "Increment"))
    sid, _, route = value.partition(".")
    assert route == "a"
    assert session_file(session_dir, sid).exists()  # stored under the bare id

    again = call(app, "Increment", cookie=f"PYSERVSID={value}")
    assert again.json["data"] == {"n": 2}
    assert again.new_sid is None  # same route: nothing to re-issue


def test_session_arriving_with_another_hosts_route_is_served_and_rerouted(make_app):
    host_a, host_b = make_app(session_route="a"), make_app(session_route="b")
    value = cookie_value(call(host_a, "Increment"))
    sid = value.split(".")[0]

    failed_over = call(host_b, "Increment", cookie=f"PYSERVSID={value}")
    assert failed_over.json["data"] == {"n": 2} and failed_over.json["id"] == sid
    assert failed_over.new_sid == f"{sid}.b"

    read_only = call(host_b, "Read", cookie=f"PYSERVSID={sid}.a")  # not modified: re-routed too
    assert read_only.json["data"] == {"n": 2}
    assert read_only.new_sid == f"{sid}.b"


def test_route_is_never_trusted_as_part_of_the_id(make_app, session_dir):
    app = make_app(session_route="a")
    sid = cookie_value(call(app, "Increment")).split(".")[0]
    for forged in (f"{sid}x.a", f"{sid}/../x.a", f".a{sid}"):
        reply = call(app, "Read", cookie=f"PYSERVSID={forged}")
        assert reply.json["is_new"] and reply.new_sid is None


def test_untouched_new_session_gets_no_routed_cookie(make_app):
    app = make_app(session_route="a")
    assert call(app, "Read").new_sid is None
    assert call(app, "Untouched").new_sid is None


# -- a store that cannot be reached: 503, nothing minted -----------------------------------


def test_unreachable_store_answers_503_and_mints_no_session(make_app, session_dir, monkeypatch):
    from pyserv.stores.base import StoreUnavailable

    app = make_app()
    sid = call(app, "Increment").new_sid

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused")

    store = app.sessions.store
    for method in ("lock", "load", "save"):
        monkeypatch.setattr(store, method, down)
    with_cookie = call(app, "Increment", cookie=f"PYSERVSID={sid}")
    assert with_cookie.status == 503 and with_cookie.header_values("Retry-After") == ["1"]
    assert with_cookie.session_cookies() == []
    without_cookie = call(app, "Increment")
    assert without_cookie.status == 503 and without_cookie.session_cookies() == []
    assert call(app, "Untouched").status == 200

    monkeypatch.undo()
    assert call(app, "Increment", cookie=f"PYSERVSID={sid}").json["data"] == {"n": 2}
