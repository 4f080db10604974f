"""A bare flup WSGI hello world on a Unix socket: the floor under pyservd (our flup).

Usage: python flup_hello.py SOCKET. flup's own threaded WSGIServer, debug off; the socket
is created 0660 (the benchmark hands its group to Apache's user). flup stops on SIGTERM,
SIGINT or SIGHUP.

One setting departs from flup's defaults. Its thread pool counts a thread as idle until
that thread takes a job, so when several connections arrive at once (mod_proxy_fcgi
opening its pool), a connection can be queued behind threads that reused connections hold
for ever, and its requests hang. Keeping SPARE_THREADS idle threads (at least the
benchmark's connections) makes the floor measure flup's request path, not that race,
which is one reason container/fcgi.py has its own I/O loop.
"""

import sys

from flup.server.fcgi import WSGIServer

BODY = b"Hello, world!\n"
SPARE_THREADS = 32


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


if __name__ == "__main__":
    WSGIServer(
        hello,
        bindAddress=sys.argv[1],
        umask=0o117,
        debug=False,
        minSpare=SPARE_THREADS,
        maxSpare=SPARE_THREADS,
    ).run()
