"""Passing open web-server connections between processes (SCM_RIGHTS).

Closing an idle ``enablereuse`` connection races with Apache picking it for its next
request (it checks the socket, then writes; mod_proxy_fcgi does not retry), and that
request fails. So a worker that retires never closes its idle connections: it sends them
to the master over its channel, and the master passes them on to a worker of the
current generation, which serves them as if it had accepted them. Apache sees nothing.
"""

from __future__ import annotations

import os
import socket

MAX_FDS_PER_MESSAGE = 64  # the kernel allows 253


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end): datagrams, so each message arrives whole."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    master.setblocking(False)
    worker.setblocking(False)
    return master, worker


def send(channel: socket.socket, fds: list[int]) -> list[int]:
    """Send *fds* (the caller closes its copies afterwards); return those not sent."""
    for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        batch = fds[start : start + MAX_FDS_PER_MESSAGE]
        try:
            socket.send_fds(channel, [b"c"], batch)
        except OSError:  # peer gone, or its queue is full
            return fds[start:]
    return []


def receive(channel: socket.socket) -> list[int]:
    """Every fd waiting on *channel* now (empty if none)."""
    received: list[int] = []
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 16, MAX_FDS_PER_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return received
        except OSError:
            return received
        if not fds:
            return received
        received.extend(fds)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
