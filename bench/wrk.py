"""Run wrk against one URL for a bounded time and read back its figures.

wrk's own summary is made for people; a small Lua ``done()`` hook prints the exact
counts and latency percentiles (in microseconds) on one tagged line instead, so nothing
depends on wrk's unit formatting. wrk's CPU time is read from the kernel's accounting of
reaped children (``RUSAGE_CHILDREN``) around the run: wrk is the only child this process
reaps meanwhile, since Apache and the daemons outlive every load.
"""

from __future__ import annotations

import resource
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

WRK = "/usr/bin/wrk"
MARKER = "BENCH-RESULT"
REQUEST_TIMEOUT = "5s"  # wrk counts a request unanswered for this long as a timeout
GRACE_SECONDS = 30.0  # beyond -d before wrk itself is killed

REPORTER_LUA = f"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("{MARKER} %d %d %d %d %d %d %d %.0f %.0f %.0f %.0f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


class WrkError(RuntimeError):
    """wrk failed or printed no result line."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. ``requests`` counts every complete response, errors included."""

    requests: int
    seconds: float
    connect_errors: int
    read_errors: int
    write_errors: int
    non_2xx: int  # responses whose status is not 2xx or 3xx
    timeouts: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    cpu_seconds: float  # wrk's own user + system time

    @property
    def answered(self) -> int:
        """Responses with a 2xx/3xx status: the requests the server really served."""
        return self.requests - self.non_2xx

    @property
    def rate(self) -> float:
        """Requests per second, over wrk's own measured duration."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return (
            self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.non_2xx
            + self.timeouts
        )

    def describe_errors(self) -> str:
        """The error count with its kinds, e.g. ``2 (1 read, 1 5xx)``: a read error is a
        connection closed without an answer, a timeout no answer within REQUEST_TIMEOUT."""
        kinds = [
            (self.connect_errors, "connect"),
            (self.read_errors, "read"),
            (self.write_errors, "write"),
            (self.non_2xx, "4xx/5xx"),
            (self.timeouts, "timeout"),
        ]
        found = [f"{count} {kind}" for count, kind in kinds if count]
        return f"{self.errors} ({', '.join(found)})" if found else "0"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    url: str,
    *,
    connections: int,
    seconds: float,
    headers: Sequence[str] = (),
    script: str = "",
    script_args: Sequence[str] = (),
) -> WrkResult:
    """Load *url* with *connections* keep-alive connections for *seconds*.

    *headers* are ``Name: value`` lines sent with every request; *script* is extra Lua
    run before the reporter. One wrk thread per connection up to two (this machine's
    cores are shared with Apache and the application).
    """
    threads = max(1, min(2, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as lua:
        lua.write(script + REPORTER_LUA)
        lua.flush()
        command = [
            WRK,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={REQUEST_TIMEOUT}",
            "--latency",
            "-s",
            lua.name,
        ]
        for header in headers:
            command += ["-H", header]
        command.append(url)
        if script_args:
            command += ["--", *script_args]
        before = _children_cpu()
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=seconds + GRACE_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise WrkError(f"wrk did not finish within {seconds + GRACE_SECONDS:g} s") from exc
        cpu = _children_cpu() - before
    return _parse(completed, cpu)


def _parse(completed: subprocess.CompletedProcess[str], cpu: float) -> WrkResult:
    for line in completed.stdout.splitlines():
        if line.startswith(MARKER + " "):
            fields = line.split()[1:]
            (requests, micros, connect, read, write, status, timeouts) = map(int, fields[:7])
            p50, p99, mean, maximum = (float(value) / 1000 for value in fields[7:])
            return WrkResult(
                requests,
                micros / 1e6,
                connect,
                read,
                write,
                status,
                timeouts,
                p50,
                p99,
                mean,
                maximum,
                cpu,
            )
    raise WrkError(
        f"wrk exited with {completed.returncode} and no result:\n"
        f"{completed.stdout}{completed.stderr}"
    )
