"""systemd integration without libsystemd: sd_notify, the watchdog and socket activation.

All of it is a no-op outside systemd. Notification failures are logged at debug level
and never raised: a daemon must not die because its supervisor is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pyserv.error")

SD_LISTEN_FDS_START = 3


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, trusted only if LISTEN_PID is ours.

    See sd_listen_fds(3). The variables are removed so that children do not see them.
    """
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    return [
        socket.socket(fileno=fd)
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    ]


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to NOTIFY_SOCKET; False if not under systemd or it failed.

    See sd_notify(3).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", assignments, exc)
        return False
    return True


def monotonic_usec() -> str:
    """MONOTONIC_USEC=… for RELOADING=1 (CLOCK_MONOTONIC, as systemd reads it)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked.

    See sd_watchdog_enabled(3).
    """
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000
