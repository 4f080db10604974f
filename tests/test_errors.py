"""HTTPError and the error pages."""

from __future__ import annotations

import pytest

from pyserv.errors import HTTPError, error_response


@pytest.mark.parametrize("status", [200, 302, 399, 600, 0])
def test_http_error_status_outside_4xx_and_5xx_is_rejected(status):
    with pytest.raises(ValueError, match=str(status)):
        HTTPError(status)


@pytest.mark.parametrize("status", [400, 404, 503, 599])
def test_http_error_keeps_a_4xx_or_5xx_status(status):
    assert HTTPError(status).status == status


def test_http_error_str_shows_status_reason_and_message():
    assert str(HTTPError(404, "no such servlet")) == "404 Not Found: no such servlet"
    assert str(HTTPError(403)) == "403 Forbidden"


def test_to_response_carries_the_status_and_an_html_page():
    response = HTTPError(404, "no such servlet").to_response()

    assert response.status == 404
    assert response.status_line == "404 Not Found"
    assert response.content_type == "text/html; charset=utf-8"
    body = response.body.decode()
    assert "Not Found" in body
    assert "no such servlet" in body


def test_to_response_escapes_the_message():
    response = HTTPError(400, "<script>alert('x')</script> & more").to_response()

    body = response.body.decode()
    assert "<script>" not in body
    assert "&lt;script&gt;" in body
    assert "&amp; more" in body


def test_to_response_shows_the_request_id():
    response = HTTPError(500).to_response("4f2a9c01d3e5b678")

    assert "4f2a9c01d3e5b678" in response.body.decode()


def test_error_page_without_request_id_does_not_mention_one():
    assert "Request id" not in HTTPError(500).to_response().body.decode()


def test_to_response_includes_the_extra_headers():
    error = HTTPError(405, "no", headers=[("Allow", "GET, HEAD"), ("X-Reason", "test")])

    response = error.to_response()

    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["X-Reason"] == "test"


def test_error_response_escapes_the_request_id():
    response = error_response(500, "", "<b>id</b>")

    body = response.body.decode()
    assert "<b>" not in body
    assert "&lt;b&gt;id&lt;/b&gt;" in body
