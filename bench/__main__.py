"""``python -m bench [--quick] [--seconds N] [--output FILE]``: run, print, write the report;
``python -m bench --profile ROW [--connections N]``: profile one row instead.

Needs root (Apache drops to www-data; sockets are handed to its group), Apache with
mod_proxy_fcgi, mod_proxy_balancer, mod_cgid and mod_fcgid, wrk and redis-server;
``scripts/bench`` installs what is missing. Exit status: 0 when every row ran (missed
targets included), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import machine, profile, report, targets
from .harness import REPO
from .rows import ROWS
from .run import Plan, run

DEFAULT_OUTPUT = REPO / "docs" / "benchmarks.rst"


def _say_since(start: float):  # noqa: ANN202 - a Say
    def say(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark PyServ and its peers through one private Apache with wrk "
        "and write the report.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s a row, 100k stored sessions (development)"
    )
    parser.add_argument("--seconds", type=float, help="seconds of load per row (default 10)")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"report file (default {DEFAULT_OUTPUT.relative_to(REPO)})",
    )
    parser.add_argument(
        "--profile",
        metavar="ROW",
        help="instead of the benchmark, profile ROW's application with py-spy "
        "(rows: " + ", ".join(row.key for row in ROWS) + ")",
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="with --profile: connections (16)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: Apache's workers run as www-data and must reach the sockets")
    # Unwind on TERM and HUP as on Ctrl-C, so that every process started is stopped.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: sys.exit(128 + number))
    if args.profile:
        try:
            found = profile.profile_row(
                args.profile,
                connections=args.connections,
                seconds=args.seconds or 10.0,
            )
        except profile.ProfileError as exc:
            parser.error(str(exc))
        print(profile.render(found))
        return 0
    plan = Plan.make(quick=args.quick, seconds=args.seconds)
    say = _say_since(time.monotonic())
    results = run(plan, say)
    text = report.render(
        results, targets.evaluate(results), machine.describe(results.daemon_python)
    )
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    say(f"report written to {args.output}")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
