"""Request over plain WSGI environ dicts: paths, query, forms, uploads, limits, cookies."""

from __future__ import annotations

import io
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from pyserv.errors import BadRequestKeyError, HTTPError
from pyserv.request import Request, RequestLimits, check_limits

BOUNDARY = "----pyservboundary7MA4YWxkTrZu0gW"


def make_environ(**overrides: Any) -> dict[str, Any]:
    """A minimal valid WSGI environ; keyword arguments replace or add keys."""
    environ: dict[str, Any] = {"SCRIPT_NAME": "", "PATH_INFO": "/", "REMOTE_ADDR": "127.0.0.1"}
    environ.update(overrides)
    setup_testing_defaults(environ)
    return environ


def body_environ(body: bytes, content_type: str = "", **overrides: Any) -> dict[str, Any]:
    """An environ carrying *body* with a matching Content-Length."""
    return make_environ(
        REQUEST_METHOD="POST",
        CONTENT_TYPE=content_type,
        CONTENT_LENGTH=str(len(body)),
        **{"wsgi.input": io.BytesIO(body)},
        **overrides,
    )


def multipart_body(*parts: tuple[str, str | None, bytes]) -> bytes:
    """Encode (name, filename or None, content) parts as multipart/form-data."""
    out = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode())
        if filename is not None:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + content + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


def multipart_request(body: bytes, limits: RequestLimits | None = None) -> Request:
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    return Request(body_environ(body, content_type), limits)


class CountingInput(io.BytesIO):
    """A wsgi.input that records how many bytes were read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


# -- paths and method -----------------------------------------------------------------


def test_method_path_script_name_and_path_info_come_from_the_environ():
    request = Request(
        make_environ(
            REQUEST_METHOD="POST",
            SCRIPT_NAME="/cgi-bin/testapp.cgi",
            PATH_INFO="/TestServlet/extra",
        )
    )

    assert request.method == "POST"
    assert request.script_name == "/cgi-bin/testapp.cgi"
    assert request.path_info == "/TestServlet/extra"
    assert request.path == "/cgi-bin/testapp.cgi/TestServlet/extra"


def test_utf8_path_is_decoded_from_its_wsgi_latin1_form():
    request = Request(make_environ(PATH_INFO="/caf\xc3\xa9"))

    assert request.path_info == "/café"


def test_invalid_utf8_in_the_path_is_a_400():
    with pytest.raises(HTTPError) as caught:
        Request(make_environ(PATH_INFO="/caf\xe9"))

    assert caught.value.status == 400


def test_invalid_utf8_in_the_script_name_is_a_400():
    with pytest.raises(HTTPError) as caught:
        Request(make_environ(SCRIPT_NAME="/\xff\xfe"))

    assert caught.value.status == 400


# -- query ----------------------------------------------------------------------------


def test_query_get_gives_the_first_value_and_getall_every_value_in_order():
    request = Request(make_environ(QUERY_STRING="a=1&b=2&a=3&empty="))

    assert request.query.get("a") == "1"
    assert request.query["a"] == "1"
    assert request.query.getall("a") == ["1", "3"]
    assert request.query.getall("b") == ["2"]
    assert request.query["empty"] == ""
    assert request.query.get("missing") is None
    assert request.query.get("missing", "default") == "default"
    assert request.query.getall("missing") == []


def test_query_values_are_percent_decoded_as_utf8():
    request = Request(make_environ(QUERY_STRING="name=caf%C3%A9&sp=a+b"))

    assert request.query["name"] == "café"
    assert request.query["sp"] == "a b"


def test_missing_query_key_raises_bad_request_key_error_that_is_a_400_and_a_key_error():
    request = Request(make_environ(QUERY_STRING="a=1"))

    with pytest.raises(BadRequestKeyError) as caught:
        request.query["missing"]

    assert isinstance(caught.value, HTTPError)
    assert isinstance(caught.value, KeyError)
    assert caught.value.status == 400
    assert caught.value.key == "missing"


def test_missing_query_key_can_be_caught_as_a_plain_key_error():
    request = Request(make_environ(QUERY_STRING=""))

    with pytest.raises(KeyError):
        request.query["missing"]


@pytest.mark.parametrize(
    "query_string",
    [
        pytest.param("a=\xff", id="raw-byte-ff"),
        pytest.param("a=caf\xe9", id="raw-latin1-e-acute"),
        pytest.param("a=%FF", id="percent-ff"),
        pytest.param("%C3=x", id="truncated-sequence-in-name"),
    ],
)
def test_invalid_utf8_in_the_query_string_is_a_400(query_string):
    request = Request(make_environ(QUERY_STRING=query_string))

    with pytest.raises(HTTPError) as caught:
        _ = request.query

    assert caught.value.status == 400


def test_too_many_query_fields_is_a_400():
    request = Request(make_environ(QUERY_STRING="a=1&b=2&c=3&d=4"), RequestLimits(max_params=3))

    with pytest.raises(HTTPError) as caught:
        _ = request.query

    assert caught.value.status == 400


# -- urlencoded and multipart forms ---------------------------------------------------


def test_urlencoded_body_is_parsed_into_form():
    body = b"name=caf%C3%A9&tag=a&tag=b"
    request = Request(body_environ(body, "application/x-www-form-urlencoded; charset=utf-8"))

    assert request.form["name"] == "café"
    assert request.form.getall("tag") == ["a", "b"]
    assert len(request.files) == 0


def test_urlencoded_content_type_is_matched_case_insensitively():
    request = Request(body_environ(b"a=1", "Application/X-WWW-Form-URLEncoded"))

    assert request.form["a"] == "1"


def test_body_of_another_content_type_gives_an_empty_form_and_keeps_the_body():
    request = Request(body_environ(b'{"a": 1}', "application/json"))

    assert len(request.form) == 0
    assert request.body == b'{"a": 1}'


def test_too_many_urlencoded_fields_is_a_400():
    body = b"a=1&b=2&c=3&d=4"
    request = Request(
        body_environ(body, "application/x-www-form-urlencoded"), RequestLimits(max_params=3)
    )

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 400


def test_urlencoded_body_over_the_form_memory_limit_is_a_413():
    body = b"a=" + b"x" * 200
    request = Request(
        body_environ(body, "application/x-www-form-urlencoded"),
        RequestLimits(max_param_bytes=100),
    )

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 413


def test_invalid_utf8_in_an_urlencoded_body_is_a_400():
    request = Request(body_environ(b"a=\xff\xfe", "application/x-www-form-urlencoded"))

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 400


def test_multipart_field_goes_to_form_and_upload_to_files():
    body = multipart_body(
        ("title", None, "caf\u00e9".encode()),
        ("upload", "notes.txt", b"file contents\x00\xff"),
    )
    request = multipart_request(body)
    try:
        assert request.form["title"] == "café"
        assert "upload" not in request.form
        upload = request.files["upload"]
        assert upload.filename == "notes.txt"
        assert upload.content_type == "application/octet-stream"
        assert upload.raw == b"file contents\x00\xff"
    finally:
        request.close()


def test_large_upload_is_spooled_to_a_temp_file_and_removed_by_close():
    content = bytes(range(256)) * 1024  # 256 KiB, over multipart's 64 KiB spool size
    request = multipart_request(multipart_body(("upload", "big.bin", content)))
    try:
        upload = request.files["upload"]
        assert not upload.is_buffered()
        assert upload.size == len(content)
        spooled = upload.file
        assert not isinstance(spooled, io.BytesIO)
        spooled.seek(0)
        assert spooled.read() == content
    finally:
        request.close()

    assert upload.file is None
    assert spooled.closed


def test_large_field_without_filename_is_spooled_and_listed_in_files():
    content = b"x" * (200 * 1024)
    request = multipart_request(multipart_body(("blob", None, content)))
    try:
        assert "blob" not in request.form
        assert not request.files["blob"].is_buffered()
    finally:
        request.close()


def test_close_removes_every_upload():
    body = multipart_body(("a", "a.bin", b"1" * 100_000), ("b", "b.bin", b"2" * 100_000))
    request = multipart_request(body)
    uploads = [request.files["a"], request.files["b"]]

    request.close()

    assert [upload.file for upload in uploads] == [None, None]


def test_too_many_multipart_parts_is_a_400():
    body = multipart_body(*[(f"f{i}", None, b"v") for i in range(5)])
    request = multipart_request(body, RequestLimits(max_params=3))
    try:
        with pytest.raises(HTTPError) as caught:
            _ = request.form
        assert caught.value.status == 400
    finally:
        request.close()


def test_multipart_without_boundary_is_a_400():
    request = Request(body_environ(b"whatever", "multipart/form-data"))

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 400


def test_malformed_multipart_body_is_a_400():
    body = f"--{BOUNDARY}\r\nno headers, never terminated".encode()
    request = multipart_request(body)
    try:
        with pytest.raises(HTTPError) as caught:
            _ = request.form
        assert caught.value.status == 400
    finally:
        request.close()


def test_params_combine_query_then_form():
    request = Request(
        body_environ(
            b"a=form&b=form-only",
            "application/x-www-form-urlencoded",
            QUERY_STRING="a=query&c=query-only",
        )
    )

    assert request.params.getall("a") == ["query", "form"]
    assert request.params["a"] == "query"
    assert request.params["b"] == "form-only"
    assert request.params["c"] == "query-only"


# -- body limits ----------------------------------------------------------------------


def test_content_length_over_max_body_is_a_413_without_reading():
    stream = CountingInput(b"x" * 1000)
    environ = make_environ(REQUEST_METHOD="POST", CONTENT_LENGTH="1000", **{"wsgi.input": stream})
    request = Request(environ, RequestLimits(max_body=100))

    with pytest.raises(HTTPError) as caught:
        _ = request.body

    assert caught.value.status == 413
    assert stream.bytes_read == 0


def test_content_length_at_max_body_is_read_whole():
    request = Request(body_environ(b"x" * 100), RequestLimits(max_body=100))

    assert request.body == b"x" * 100


def test_unsized_terminated_body_over_the_limit_is_a_413_while_reading():
    stream = CountingInput(b"x" * 10_000)
    environ = make_environ(
        REQUEST_METHOD="POST", **{"wsgi.input": stream, "wsgi.input_terminated": True}
    )
    request = Request(environ, RequestLimits(max_body=100))

    with pytest.raises(HTTPError) as caught:
        _ = request.body

    assert caught.value.status == 413
    assert 100 < stream.bytes_read <= 101  # stopped one byte past the limit


def test_unsized_terminated_body_under_the_limit_is_read_whole():
    environ = make_environ(
        REQUEST_METHOD="POST",
        **{"wsgi.input": io.BytesIO(b"chunked body"), "wsgi.input_terminated": True},
    )
    request = Request(environ, RequestLimits(max_body=100))

    assert request.body == b"chunked body"


def test_body_shorter_than_its_content_length_is_a_400():
    environ = make_environ(
        REQUEST_METHOD="POST", CONTENT_LENGTH="100", **{"wsgi.input": io.BytesIO(b"short")}
    )
    request = Request(environ)

    with pytest.raises(HTTPError) as caught:
        _ = request.body

    assert caught.value.status == 400


def test_only_content_length_bytes_are_read_from_a_longer_input():
    environ = make_environ(
        REQUEST_METHOD="POST", CONTENT_LENGTH="3", **{"wsgi.input": io.BytesIO(b"abcdef")}
    )

    assert Request(environ).body == b"abc"


@pytest.mark.parametrize("content_length", ["abc", "-1", "1e3", "\u00b2", "+5", "0x10", "5 "])
def test_malformed_content_length_is_a_400(content_length):
    environ = make_environ(
        REQUEST_METHOD="POST",
        CONTENT_LENGTH=content_length,
        **{"wsgi.input": io.BytesIO(b"x" * 2000)},
    )
    request = Request(environ)

    with pytest.raises(HTTPError) as caught:
        _ = request.body

    assert caught.value.status == 400


def test_no_content_length_and_not_input_terminated_means_an_empty_body():
    stream = CountingInput(b"data the server did not frame")
    environ = make_environ(REQUEST_METHOD="POST", **{"wsgi.input": stream})

    assert Request(environ).body == b""
    assert stream.bytes_read == 0


# -- cookies --------------------------------------------------------------------------


def test_malformed_cookies_are_skipped_and_the_session_cookie_survives():
    header = 'other=a"b; broken; =x; PYSERVSID=abc; x="quoted"'
    request = Request(make_environ(HTTP_COOKIE=header))

    assert request.cookies["PYSERVSID"] == "abc"
    assert request.cookies["x"] == "quoted"
    assert "broken" not in request.cookies
    assert "" not in request.cookies


def test_duplicate_cookie_names_are_all_kept_in_order():
    request = Request(make_environ(HTTP_COOKIE="PYSERVSID=first; other=1; PYSERVSID=second"))

    assert request.cookies.getall("PYSERVSID") == ["first", "second"]
    assert request.cookies["PYSERVSID"] == "first"


def test_no_cookie_header_gives_no_cookies():
    assert len(Request(make_environ()).cookies) == 0


# -- headers and the rest ---------------------------------------------------------------


def test_headers_are_case_insensitive_and_include_content_type():
    request = Request(
        make_environ(
            HTTP_USER_AGENT="pytest-agent/1.0",
            CONTENT_TYPE="text/plain",
            HTTP_X_FORWARDED_FOR="10.0.0.1",
        )
    )

    assert request.headers["user-agent"] == "pytest-agent/1.0"
    assert request.headers["User-Agent"] == "pytest-agent/1.0"
    assert request.headers["USER-AGENT"] == "pytest-agent/1.0"
    assert request.headers["x-forwarded-for"] == "10.0.0.1"
    assert request.headers["content-type"] == "text/plain"
    assert "Content-Type" in list(request.headers)
    assert "content-type" in request.headers
    assert "accept-language" not in request.headers
    assert request.headers.get("accept-language") is None


def test_missing_header_raises_key_error():
    with pytest.raises(KeyError):
        Request(make_environ()).headers["user-agent"]


def test_remote_addr_comes_from_the_environ():
    assert Request(make_environ(REMOTE_ADDR="192.0.2.7")).remote_addr == "192.0.2.7"


def test_is_secure_follows_wsgi_url_scheme():
    assert Request(make_environ(**{"wsgi.url_scheme": "https"})).is_secure is True
    assert Request(make_environ(**{"wsgi.url_scheme": "http"})).is_secure is False


def test_repr_shows_method_path_and_query():
    request = Request(
        make_environ(
            SCRIPT_NAME="/cgi-bin/testapp.cgi",
            PATH_INFO="/TestServlet",
            QUERY_STRING="blah=foo",
        )
    )

    text = repr(request)

    assert "GET" in text
    assert "/cgi-bin/testapp.cgi/TestServlet?blah=foo" in text


# -- limits checked before dispatch ---------------------------------------------------


def test_request_within_every_limit_passes_the_pre_dispatch_check():
    environ = make_environ(
        QUERY_STRING="a=1&b=2", CONTENT_LENGTH="100", HTTP_X_PAD="x" * 100, HTTP_COOKIE="c=1"
    )

    check_limits(environ, RequestLimits(max_params=2, max_body=100, max_header_bytes=200))


def test_headers_over_max_header_bytes_are_a_431_counting_names_and_values():
    environ = {"HTTP_X_A": "x" * 40, "HTTP_X_B": "y" * 40, "SERVER_NAME": "not a header"}

    check_limits(environ, RequestLimits(max_header_bytes=96))  # 8 + 40, twice
    with pytest.raises(HTTPError) as caught:
        check_limits(environ, RequestLimits(max_header_bytes=95))

    assert caught.value.status == 431


@pytest.mark.parametrize(
    ("query_string", "limits"),
    [
        ("a=1&b=2&c=3&d=4", RequestLimits(max_params=3)),
        ("&&&&", RequestLimits(max_params=3)),  # empty fields count: parse_qsl counts them
        ("a=" + "x" * 100, RequestLimits(max_param_bytes=100)),
    ],
    ids=["too-many-fields", "too-many-empty-fields", "too-many-bytes"],
)
def test_query_string_over_a_parameter_limit_is_a_400_before_dispatch(query_string, limits):
    with pytest.raises(HTTPError) as caught:
        check_limits(make_environ(QUERY_STRING=query_string), limits)

    assert caught.value.status == 400


@pytest.mark.parametrize("content_length", ["abc", "-1", "1e3", "\u00b2", "+5", " 5", "9" * 19])
def test_malformed_content_length_is_a_400_before_dispatch(content_length):
    with pytest.raises(HTTPError) as caught:
        check_limits(make_environ(CONTENT_LENGTH=content_length), RequestLimits())

    assert caught.value.status == 400


def test_content_length_over_max_body_is_a_413_before_dispatch():
    with pytest.raises(HTTPError) as caught:
        check_limits(make_environ(CONTENT_LENGTH="101"), RequestLimits(max_body=100))

    assert caught.value.status == 413


def test_query_and_form_fields_share_one_parameter_budget():
    environ = body_environ(b"c=3&d=4", "application/x-www-form-urlencoded", QUERY_STRING="a=1&b=2")
    within = Request(dict(environ, **{"wsgi.input": io.BytesIO(b"c=3&d=4")}))
    assert len(within.params) == 4

    request = Request(environ, RequestLimits(max_params=3))
    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 400


def test_query_string_bytes_count_against_the_form_data_budget():
    environ = body_environ(b"b=" + b"y" * 40, "application/x-www-form-urlencoded")
    environ["QUERY_STRING"] = "a=" + "x" * 60
    request = Request(environ, RequestLimits(max_param_bytes=100))

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 413  # the body is what went over


def test_multipart_parts_share_the_parameter_budget_with_the_query():
    body = multipart_body(("a", None, b"1"), ("b", None, b"2"))
    environ = body_environ(body, f"multipart/form-data; boundary={BOUNDARY}", QUERY_STRING="q=1")
    request = Request(environ, RequestLimits(max_params=2))
    try:
        with pytest.raises(HTTPError) as caught:
            _ = request.form
        assert caught.value.status == 400
    finally:
        request.close()


def test_uploads_spooled_before_a_limit_is_hit_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    content = b"z" * (200 * 1024)  # spooled to a temp file
    body = multipart_body(("big", "big.bin", content), *[(f"f{i}", None, b"v") for i in range(3)])
    request = multipart_request(body, RequestLimits(max_params=2))

    with pytest.raises(HTTPError) as caught:
        _ = request.form

    assert caught.value.status == 400
    assert list(tmp_path.iterdir()) == []
