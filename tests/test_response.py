"""Response: body encoding, header validation, cookies, redirects and status."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import pytest

from pyserv.response import Response

DEFAULT_COOKIE_ATTRIBUTES = "Path=/; HttpOnly; SameSite=Lax"


def cookie_attributes(header: str) -> dict[str, str]:
    """The attributes of a Set-Cookie value after the name=value pair, by name."""
    attributes = {}
    for part in header.split("; ")[1:]:
        name, _, value = part.partition("=")
        attributes[name] = value
    return attributes


# -- body -----------------------------------------------------------------------------


def test_default_content_type_is_utf8_plain_text():
    response = Response()

    assert response.content_type == "text/plain; charset=utf-8"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.status == 200
    assert response.status_line == "200 OK"


def test_write_str_is_utf8_encoded():
    response = Response()

    response.write("Hi ")
    response.write("café ☕")

    assert response.body == "Hi café ☕".encode()


def test_write_bytes_like_passes_through_unchanged():
    response = Response()

    response.write(b"\x00\xff")
    response.write(bytearray(b"\xfe"))
    response.write(memoryview(b"\x01"))

    assert response.body == b"\x00\xff\xfe\x01"


@pytest.mark.parametrize("value", [42, 1.5, None, ["list"]])
def test_write_of_something_not_str_or_bytes_is_a_type_error(value):
    response = Response()

    with pytest.raises(TypeError, match=type(value).__name__):
        response.write(value)

    assert response.body == b""


# -- headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("ok\r\nSet-Cookie: evil=1", id="crlf"),
        pytest.param("ok\nSet-Cookie: evil=1", id="lf"),
        pytest.param("ok\rSet-Cookie: evil=1", id="cr"),
        pytest.param("ok\0evil", id="nul"),
    ],
)
@pytest.mark.parametrize("operation", ["set", "add", "setitem"])
def test_cr_lf_or_nul_in_header_value_is_rejected_naming_the_header(operation, value):
    response = Response()
    before = response.headers.items()

    with pytest.raises(ValueError, match="X-Custom"):
        if operation == "setitem":
            response.headers["X-Custom"] = value
        else:
            getattr(response.headers, operation)("X-Custom", value)

    assert "X-Custom" not in response.headers
    assert response.headers.items() == before


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("X-Evil\r\nSet-Cookie", id="crlf"),
        pytest.param("X-Evil\nSet-Cookie", id="lf"),
        pytest.param("X-Evil\rSet-Cookie", id="cr"),
        pytest.param("X-Evil\0", id="nul"),
    ],
)
def test_cr_lf_or_nul_in_header_name_is_rejected_naming_the_header(name):
    response = Response()
    before = response.headers.items()

    with pytest.raises(ValueError) as caught:
        response.headers.add(name, "value")

    assert repr(name) in str(caught.value)
    assert response.headers.items() == before


@pytest.mark.parametrize(
    "name", ["", "X Custom", "X:Custom", "X-Caf\u00e9", "(comment)", "a/b", 'X-"Q"']
)
def test_header_name_that_is_not_a_token_is_rejected(name):
    response = Response()
    before = response.headers.items()

    with pytest.raises(ValueError, match="header name"):
        response.headers.set(name, "value")

    assert response.headers.items() == before


def test_header_value_that_is_not_latin1_is_rejected():
    response = Response()

    with pytest.raises(ValueError, match="X-Custom"):
        response.headers.set("X-Custom", "snow \u2603")

    assert "X-Custom" not in response.headers


def test_header_value_that_is_not_str_is_a_type_error():
    response = Response()

    with pytest.raises(TypeError, match="X-Count"):
        response.headers.set("X-Count", 3)


def test_header_set_replaces_case_insensitively_and_add_appends():
    response = Response()

    response.headers.set("X-One", "a")
    response.headers.set("x-one", "b")
    response.headers.add("X-Many", "1")
    response.headers.add("X-Many", "2")

    assert response.headers.getall("X-ONE") == ["b"]
    assert response.headers.getall("x-many") == ["1", "2"]


# -- cookies --------------------------------------------------------------------------


def test_set_cookie_defaults_to_root_path_httponly_and_samesite_lax():
    response = Response()

    response.set_cookie("sid", "abc123")

    assert response.headers.getall("Set-Cookie") == [f"sid=abc123; {DEFAULT_COOKIE_ATTRIBUTES}"]


def test_set_cookie_secure_flag_and_path():
    response = Response()

    response.set_cookie("sid", "abc", path="/cgi-bin/testapp.cgi", secure=True)

    header = response.headers["Set-Cookie"]
    assert header.startswith("sid=abc; ")
    attributes = cookie_attributes(header)
    assert attributes["Path"] == "/cgi-bin/testapp.cgi"
    assert "Secure" in attributes
    assert "HttpOnly" in attributes


def test_set_cookie_without_httponly_and_with_strict_samesite():
    response = Response()

    response.set_cookie("pref", "dark", httponly=False, samesite="Strict")

    attributes = cookie_attributes(response.headers["Set-Cookie"])
    assert "HttpOnly" not in attributes
    assert attributes["SameSite"] == "Strict"


def test_set_cookie_max_age_also_sets_expires_that_far_ahead():
    response = Response()
    before = time.time()

    response.set_cookie("sid", "abc", max_age=3600)

    attributes = cookie_attributes(response.headers["Set-Cookie"])
    assert attributes["Max-Age"] == "3600"
    expires = parsedate_to_datetime(attributes["Expires"]).timestamp()
    assert before + 3600 - 2 <= expires <= time.time() + 3600 + 1
    assert attributes["Expires"].endswith(" GMT")


def test_set_cookie_without_max_age_is_a_session_cookie():
    response = Response()

    response.set_cookie("sid", "abc")

    attributes = cookie_attributes(response.headers["Set-Cookie"])
    assert "Max-Age" not in attributes
    assert "Expires" not in attributes


@pytest.mark.parametrize("value", ["a;b", "a b", 'a"b', "a,b", "a\\b", "caf\u00e9", "a\r\nb"])
def test_invalid_cookie_value_is_rejected(value):
    response = Response()

    with pytest.raises(ValueError, match="sid"):
        response.set_cookie("sid", value)

    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("name", ["", "a b", "a;b", "a=b", "a\r\nb"])
def test_invalid_cookie_name_is_rejected(name):
    response = Response()

    with pytest.raises(ValueError):
        response.set_cookie(name, "value")

    assert "Set-Cookie" not in response.headers


def test_cookie_path_with_a_semicolon_is_rejected():
    response = Response()

    with pytest.raises(ValueError, match="Path"):
        response.set_cookie("sid", "abc", path="/app; Domain=evil.example")

    assert "Set-Cookie" not in response.headers


def test_invalid_samesite_is_rejected():
    response = Response()

    with pytest.raises(ValueError, match="SameSite"):
        response.set_cookie("sid", "abc", samesite="lax; Secure")

    assert "Set-Cookie" not in response.headers


def test_oversized_cookie_is_rejected():
    response = Response()

    with pytest.raises(ValueError, match="sid"):
        response.set_cookie("sid", "a" * 5000)

    assert "Set-Cookie" not in response.headers


def test_setting_the_same_cookie_twice_keeps_one_header_with_the_last_value():
    response = Response()

    response.set_cookie("sid", "first")
    response.set_cookie("sid", "second")

    assert response.headers.getall("Set-Cookie") == [f"sid=second; {DEFAULT_COOKIE_ATTRIBUTES}"]


def test_cookies_of_other_names_or_paths_are_kept():
    response = Response()

    response.set_cookie("sid", "root")
    response.set_cookie("sid", "app", path="/app")
    response.set_cookie("sid2", "other")
    response.set_cookie("sid", "root-again")

    assert sorted(response.headers.getall("Set-Cookie")) == sorted(
        [
            "sid=app; Path=/app; HttpOnly; SameSite=Lax",
            f"sid2=other; {DEFAULT_COOKIE_ATTRIBUTES}",
            f"sid=root-again; {DEFAULT_COOKIE_ATTRIBUTES}",
        ]
    )


def test_delete_cookie_sends_an_empty_value_with_max_age_zero_and_a_past_expiry():
    response = Response()

    response.delete_cookie("sid", path="/app")

    header = response.headers["Set-Cookie"]
    assert header.startswith("sid=; ")
    attributes = cookie_attributes(header)
    assert attributes["Max-Age"] == "0"
    assert parsedate_to_datetime(attributes["Expires"]).timestamp() < time.time()
    assert attributes["Path"] == "/app"


def test_delete_cookie_replaces_an_earlier_set_of_the_same_cookie():
    response = Response()

    response.set_cookie("sid", "abc")
    response.delete_cookie("sid")

    headers = response.headers.getall("Set-Cookie")
    assert len(headers) == 1
    assert headers[0].startswith("sid=; Max-Age=0; ")


# -- redirect and status ----------------------------------------------------------------


def test_redirect_defaults_to_303_with_location():
    response = Response()

    response.redirect("/app/Next?x=1")

    assert response.status == 303
    assert response.status_line == "303 See Other"
    assert response.headers["Location"] == "/app/Next?x=1"


def test_redirect_with_an_explicit_3xx_status():
    response = Response()

    response.redirect("https://example.org/", status=301)

    assert response.status == 301
    assert response.headers["Location"] == "https://example.org/"


@pytest.mark.parametrize("status", [200, 299, 400, 404, 500])
def test_redirect_with_a_status_that_is_not_3xx_is_rejected(status):
    response = Response()

    with pytest.raises(ValueError, match="3xx"):
        response.redirect("/next", status=status)

    assert response.status == 200
    assert "Location" not in response.headers


@pytest.mark.parametrize("url", ["/next\r\nSet-Cookie: evil=1", "/next\nX: y", "/next\0"])
def test_redirect_url_with_cr_lf_or_nul_is_rejected(url):
    response = Response()

    with pytest.raises(ValueError, match="Location"):
        response.redirect(url)

    assert response.status == 200
    assert "Location" not in response.headers


@pytest.mark.parametrize("status", [99, 600, 0, -200, "200", 200.0, True, None])
def test_invalid_status_is_rejected(status):
    response = Response()

    with pytest.raises(ValueError, match="status"):
        response.status = status

    assert response.status == 200


@pytest.mark.parametrize(("status", "line"), [(100, "100 Continue"), (404, "404 Not Found")])
def test_valid_status_sets_the_status_line(status, line):
    response = Response()

    response.status = status

    assert response.status == status
    assert response.status_line == line


def test_unknown_status_in_range_has_a_generic_reason():
    response = Response()

    response.status = 599

    assert response.status_line == "599 Unknown"


def test_flush_outside_a_request_is_a_runtime_error():
    response = Response()
    response.write("buffered")

    with pytest.raises(RuntimeError, match="outside a request"):
        response.flush()

    assert response.streaming is False
    assert response.body == b"buffered"
