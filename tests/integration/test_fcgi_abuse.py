"""Hostile FastCGI input sent straight to pyservd's socket (no Apache in between):
malformed and split records, too many parameters, half-open and slow connections, a
saturated thread pool, a servlet that never returns. After each phase the worker's
threads and file descriptors are back at their baseline."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fcgi_client import (
    BEGIN_REQUEST,
    GET_VALUES,
    GET_VALUES_RESULT,
    PARAMS,
    STDIN,
    FastCGIClient,
    cgi_params,
    encode_pair,
    record,
    request_bytes,
    stream,
)
from pyservd import Daemons, Pyservd, wait_until, write_config

pytestmark = pytest.mark.integration

ABUSE_MODULE = '''\
"""Servlets for the abuse suite."""

import os
import time


class Echo:
    def run(self, request, response):
        big = request.headers.get("X-Big", "")
        response.write(f"big={len(big)} ok={big == 'x' * len(big)} body={len(request.body)}\\n")


class Count:
    def run(self, request, response):
        count = self.session.get("count", 0)
        self.session["count"] = count + 1
        response.write(f"count={count}\\n")


class Spin:
    def run(self, request, response):
        self.session["count"] = -1
        while True:
            pass


class Sleep:
    def run(self, request, response):
        time.sleep(float(request.query.get("seconds", "1")))
        response.write("slept\\n")
'''


@pytest.fixture
def daemon() -> Iterator[Pyservd]:
    with Daemons() as daemons:
        work = daemons.work_dir()
        config = write_config(
            work,
            server={"workers": "1", "threads": "2", "read_timeout": "2", "request_timeout": "3"},
            app={"module": "abuse"},
        )
        (work / "apps" / "abuse.py").write_text(ABUSE_MODULE)
        yield daemons.start(config)


def worker_usage(daemon: Pyservd) -> tuple[int, int]:
    """(threads, open fds) of the single worker."""
    (pid,) = daemon.workers()
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line for line in status.splitlines() if line.startswith("Threads:"))[8:])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def settles_at(daemon: Pyservd, baseline: tuple[int, int], timeout: float = 6.0) -> None:
    wait_until(lambda: worker_usage(daemon) == baseline, timeout, f"usage back to {baseline}")


def echo(daemon: Pyservd, **extra: str) -> int:
    client = FastCGIClient(str(daemon.socket))
    try:
        response = client.request(cgi_params("/testapp/Echo", **extra))
    finally:
        client.close()
    return response.status


def test_a_normal_request_through_the_raw_client(daemon: Pyservd) -> None:
    client = FastCGIClient(str(daemon.socket))
    first = client.request(cgi_params("/testapp/Echo"), request_id=1)
    second = client.request(cgi_params("/testapp/Echo"), request_id=2)  # same connection
    client.close()
    assert (first.status, second.status) == (200, 200)
    assert first.body == b"big=0 ok=True body=0\n"


def test_pipelined_requests_on_one_connection_are_each_answered(daemon: Pyservd) -> None:
    client = FastCGIClient(str(daemon.socket))
    try:
        # The second request is buffered while the first runs: the I/O thread takes the
        # connection back and queues it; the third comes after, on the watched connection.
        client.send(
            request_bytes(cgi_params("/testapp/Sleep", QUERY_STRING="seconds=0.2"), request_id=1)
            + request_bytes(cgi_params("/testapp/Echo"), request_id=2)
        )
        first, second = client.read_response(), client.read_response()
        third = client.request(cgi_params("/testapp/Echo"), request_id=3)
    finally:
        client.close()
    assert (first.status, second.status, third.status) == (200, 200, 200)
    assert (first.body, second.body) == (b"slept\n", b"big=0 ok=True body=0\n")


def test_more_kept_alive_connections_than_threads_are_all_served(daemon: Pyservd) -> None:
    """6 connections, 2 threads: requests queue for a thread that a finished one frees."""
    baseline = worker_usage(daemon)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def client_run() -> None:
        try:
            client = FastCGIClient(str(daemon.socket))
            try:
                for n in range(1, 6):
                    params = cgi_params("/testapp/Sleep", QUERY_STRING="seconds=0.01")
                    statuses.append(client.request(params, request_id=n).status)
            finally:
                client.close()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client_run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert not errors
    assert statuses == [200] * 30
    settles_at(daemon, baseline)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bad version", record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1), version=2)),
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("short BEGIN_REQUEST body", record(BEGIN_REQUEST, 1, b"\0\1")),
        ("BEGIN_REQUEST with id 0", record(BEGIN_REQUEST, 0, struct.pack("!HB5x", 1, 1))),
        ("PARAMS without BEGIN_REQUEST", record(PARAMS, 7, encode_pair(b"A", b"b"))),
        (
            "name-value longer than its stream",
            record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1))
            + record(PARAMS, 1, b"\x7f\x7fshort")
            + record(PARAMS, 1),
        ),
        (
            "second request while one is open",
            record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1))
            + record(BEGIN_REQUEST, 2, struct.pack("!HB5x", 1, 1)),
        ),
        (
            "STDIN before PARAMS ended",
            record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1)) + record(STDIN, 1, b"body"),
        ),
    ],
)
def test_malformed_input_closes_the_connection_promptly_with_one_log_line(
    daemon: Pyservd, name: str, data: bytes
) -> None:
    baseline = worker_usage(daemon)
    client = FastCGIClient(str(daemon.socket))
    client.send(data)
    assert client.closed_by_server(1.5), f"{name}: connection left open"
    client.close()
    assert daemon.log_text().count("malformed FastCGI input") == 1
    assert echo(daemon) == 200  # the worker serves on
    settles_at(daemon, baseline)


def test_a_name_value_pair_split_across_params_records_arrives_whole(daemon: Pyservd) -> None:
    big = "x" * 60_000  # split below: mid-pair and mid-length, under max_header_bytes
    client = FastCGIClient(str(daemon.socket))
    params = cgi_params("/testapp/Echo", HTTP_X_BIG=big)
    client.send(request_bytes(params, params_chunk=7_001))  # split mid-pair, mid-length
    response = client.read_response()
    client.close()
    assert response.status == 200
    assert response.body == b"big=60000 ok=True body=0\n"


@pytest.mark.parametrize(
    ("what", "extra"),
    [
        ("200,000 parameters", {f"HTTP_X_{n}": "v" for n in range(200_000)}),
        ("1,500 parameters", {f"HTTP_X_{n}": "v" for n in range(1_500)}),
        ("one 300 KB header", {"HTTP_X_BIG": "x" * 300_000}),
    ],
)
def test_too_many_or_too_large_parameters_get_431_promptly(
    daemon: Pyservd, what: str, extra: dict[str, str]
) -> None:
    baseline = worker_usage(daemon)
    client = FastCGIClient(str(daemon.socket))
    started = time.monotonic()
    response = client.request(cgi_params("/testapp/Echo", **extra))
    assert response.status == 431, what
    assert time.monotonic() - started < 2
    assert client.request(cgi_params("/testapp/Echo"), request_id=2).status == 200
    client.close()
    settles_at(daemon, baseline)


def test_300_half_open_connections_do_not_delay_a_normal_request(daemon: Pyservd) -> None:
    baseline = worker_usage(daemon)
    idle, partial = [], []
    for n in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket))
        if n % 2:  # half send nothing, half a record cut short
            sock.sendall(record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1))[:11])
            partial.append(sock)
        else:
            idle.append(sock)
    try:
        started = time.monotonic()
        assert echo(daemon) == 200
        assert time.monotonic() - started < 1.0
        # read_timeout = 2: the incomplete requests are closed, the idle ones stay
        time.sleep(3.0)
        for sock in partial:
            sock.settimeout(0.5)
            assert sock.recv(1) == b""  # closed by the server
        assert "incomplete FastCGI request" in daemon.log_text()
    finally:
        for sock in idle + partial:
            sock.close()
    settles_at(daemon, baseline)


def test_a_body_that_stalls_is_cut_at_read_timeout_with_400(daemon: Pyservd) -> None:
    baseline = worker_usage(daemon)
    client = FastCGIClient(str(daemon.socket))
    params = cgi_params("/testapp/Echo", method="POST", CONTENT_LENGTH="100")
    encoded = b"".join(encode_pair(k.encode(), v.encode()) for k, v in params.items())
    client.send(
        record(BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1))
        + stream(PARAMS, 1, encoded)
        + record(STDIN, 1, b"only ten b")
    )  # ... and the other 90 bytes never come
    started = time.monotonic()
    response = client.read_response()
    client.close()
    assert response.status == 400
    assert 1.5 < time.monotonic() - started < 4
    assert echo(daemon) == 200
    settles_at(daemon, baseline)


def test_lying_content_length_is_400_never_a_hang(daemon: Pyservd) -> None:
    client = FastCGIClient(str(daemon.socket))
    params = cgi_params("/testapp/Echo", method="POST", CONTENT_LENGTH="1000")
    response = client.request(params, body=b"short body")  # STDIN ends after 10 bytes
    assert response.status == 400
    bad = cgi_params("/testapp/Echo", method="POST", CONTENT_LENGTH="12abc")
    assert client.request(bad, body=b"x", request_id=2).status == 400
    client.close()


def test_a_saturated_pool_answers_503_promptly_then_recovers(daemon: Pyservd) -> None:
    answers = []

    def sleep() -> None:
        client = FastCGIClient(str(daemon.socket))
        try:
            answers.append(client.request(cgi_params("/testapp/Sleep", QUERY_STRING="seconds=2.5")))
        finally:
            client.close()

    sleepers = [threading.Thread(target=sleep) for _ in range(2)]  # threads = 2
    for thread in sleepers:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert echo(daemon) == 503
    assert time.monotonic() - started < 2.0  # queue_timeout, not the sleepers' 2.5 s
    for thread in sleepers:
        thread.join(10)
    assert [a.status for a in answers] == [200, 200]  # the running ones were not hurt
    assert echo(daemon) == 200


def test_a_servlet_that_never_returns_is_cut_at_request_timeout(daemon: Pyservd) -> None:
    client = FastCGIClient(str(daemon.socket))
    first = client.request(cgi_params("/testapp/Count"))
    cookie = first.headers["set-cookie"].split(";")[0]
    client.close()
    (stuck_worker,) = daemon.workers()

    spinning = FastCGIClient(str(daemon.socket))
    started = time.monotonic()
    cut = spinning.request(cgi_params("/testapp/Spin", HTTP_COOKIE=cookie))
    spinning.close()
    assert cut.status == 504
    assert time.monotonic() - started < 4.5  # request_timeout = 3

    wait_until(lambda: daemon.workers() not in ([], [stuck_worker]), 5, "a new worker")
    after = FastCGIClient(str(daemon.socket))
    again = after.request(cgi_params("/testapp/Count", HTTP_COOKIE=cookie))
    after.close()
    assert again.status == 200 and again.body == b"count=1\n"  # unchanged, unlocked


def test_get_values_is_answered(daemon: Pyservd) -> None:
    client = FastCGIClient(str(daemon.socket))
    client.send(record(GET_VALUES, 0, encode_pair(b"FCGI_MPXS_CONNS", b"")))
    kind, _, content = client.read_record()
    client.close()
    assert kind == GET_VALUES_RESULT and b"FCGI_MPXS_CONNS" in content
