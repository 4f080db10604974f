"""``pyserv-sessions sweep DIR``: remove expired sessions, for cron in CGI deployments.

Reads only file headers and times (never unpickles, needs no secret); skips sessions that
a request holds locked; only one sweep runs per directory at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .stores.base import Envelope
from .stores.file import FileStore


def _no_secret() -> bytes:
    raise RuntimeError("sweeping needs no secret")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyserv-sessions", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="remove expired sessions from DIR")
    sweep.add_argument("directory", metavar="DIR", help="the session directory")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.directory):
        print(f"pyserv-sessions: {args.directory}: not a directory", file=sys.stderr)
        return 2
    store = FileStore(args.directory, Envelope(_no_secret))
    try:
        removed = store.sweep(time.time())
    except OSError as exc:
        print(f"pyserv-sessions: {args.directory}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"removed {removed} expired session(s) from {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
