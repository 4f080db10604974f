"""A retiring worker passes on every connection the master handed it, even one that was
still in its channel when it was told to stop: left there, it would be closed with the
process while Apache writes a request on it (a 503 during a reload)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from container import handover
from container.fcgi import FastCGIServer


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture
def retiring_server(tmp_path) -> Iterator[tuple[FastCGIServer, socket.socket]]:
    """A server that served and was told to stop, and the master's end of its channel."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "fcgi.sock"))
    listener.listen()
    master_end, worker_end = handover.channel_pair()
    server = FastCGIServer(hello, listener, threads=2, channel=worker_end)
    stop = threading.Event()
    serving = threading.Thread(target=server.serve, args=(stop, lambda: None, 0.05))
    serving.start()
    stop.set()
    server.wake()
    serving.join(5)
    assert not serving.is_alive()
    yield server, master_end
    for end in (master_end, worker_end, listener):
        end.close()


def test_a_connection_handed_over_just_before_the_stop_is_passed_back_on(
    retiring_server,
) -> None:
    server, master_end = retiring_server
    apache_side, pyserv_side = socket.socketpair()
    sent_inode = os.fstat(pyserv_side.fileno()).st_ino
    assert handover.send(master_end, [pyserv_side.fileno()]) == []
    pyserv_side.close()  # the master's copy; the one in flight is the worker's

    assert server.drain(timeout=2.0) == 0

    returned = handover.receive(master_end)
    try:
        assert [os.fstat(fd).st_ino for fd in returned] == [sent_inode]
    finally:
        handover.close_all(returned)
        apache_side.close()


def test_after_draining_the_channel_refuses_so_the_master_picks_another_worker(
    retiring_server,
) -> None:
    server, master_end = retiring_server
    server.drain(timeout=1.0)
    read_end, write_end = os.pipe()
    try:
        assert handover.send(master_end, [read_end]) == [read_end]
    finally:
        handover.close_all([read_end, write_end])
