"""Where the application's time goes under one row's load: py-spy on its processes.

``scripts/bench --profile ROW [--connections N]`` starts the site and ROW's backend,
loads it with wrk as a measurement does, and meanwhile samples every thread of every
application process with py-spy (non-blocking: the processes are not paused). It prints
the application's user and system CPU per request (from /proc), then shares of the
samples: where threads run (CPU) and where they wait (latency).

py-spy's own idle detection does not work everywhere (on this project's VMs a thread
blocked in C, on a lock or in ``epoll``, is reported as running), so a sample
counts as waiting when its innermost Python frame is one of :data:`WAIT_SITES`, functions
whose only slow step is a blocking call. Time in system calls that release the GIL
(``open``, ``rename``) stays in the CPU share, under the function that made the call.

CGI scripts live too briefly to attach to: profile their start-up with
``python -X importtime`` instead. For the Redis row, redis-server's CPU is in the per-request
figures, but py-spy samples only the Python processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import cpu, wrk
from .harness import COOKIE
from .rows import ROWS, Row, new_session
from .site import Site

RATE = 250  # samples per second and process
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
# (function, file) whose time, as the innermost Python frame, is waiting.
WAIT_SITES = frozenset(
    {
        ("FastCGIServer._work", "container/fcgi.py"),  # its slot's lock: no request yet
        ("EpollSelector.select", "selectors.py"),  # the I/O thread between events
        ("Arbiter._read_signals", "container/arbiter.py"),  # the master's select()
        ("Condition.wait", "threading.py"),
        ("Event.wait", "threading.py"),
        ("Thread._wait_for_tstate_lock", "threading.py"),
        ("KeyedLocks.acquire", "pyserv/stores/keyed.py"),  # the session, in this process
        ("_flock_until", "pyserv/stores/file.py"),  # the session, in another process
        ("RedisStore._take", "pyserv/stores/redis.py"),  # its sleep: another process holds it
        ("ThreadPool._worker", "flup/server/threadpool.py"),  # flup: no job yet
        ("InputStream._waitForData", "flup/server/fcgi_base.py"),  # flup: next record
        ("Connection._recvall", "flup/server/fcgi_base.py"),
        ("ThreadedServer.run", "flup/server/threadedserver.py"),  # flup: accept loop
    }
)


class ProfileError(RuntimeError):
    """The row cannot be profiled (unknown, CGI) or py-spy is missing."""


@dataclass(frozen=True)
class Samples:
    """Stacks aggregated: ``total`` samples, by innermost function and by function or
    file appearing anywhere in the stack (inclusive)."""

    total: int
    self_time: Counter[str]
    inclusive: Counter[str]
    files: Counter[str]


@dataclass(frozen=True)
class Profile:
    running: Samples
    waiting: Samples
    requests: int
    user_seconds: float  # the application's CPU time during the sampling
    system_seconds: float


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame)
        frames.append((match["function"], match["file"]) if match else (frame, "?"))
    return frames


def _aggregate(stacks: list[tuple[list[tuple[str, str]], int]]) -> Samples:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for frames, count in stacks:
        self_time["{} ({})".format(*frames[-1])] += count
        for name in {f"{function} ({file})" for function, file in frames}:
            inclusive[name] += count
        for file in {file for _, file in frames}:
            files[file] += count
    return Samples(sum(count for _, count in stacks), self_time, inclusive, files)


def parse(lines: Iterable[str]) -> tuple[Samples, Samples]:
    """Aggregate py-spy's raw output (``frame;frame;... count``): (running, waiting)."""
    running, waiting = [], []
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if stack and count_text.isdigit():
            frames = _frames(stack)
            (waiting if frames[-1] in WAIT_SITES else running).append((frames, int(count_text)))
    return _aggregate(running), _aggregate(waiting)


def py_spy() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if found is None:
        raise ProfileError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def render(profile: Profile, top: int = 15) -> str:
    def block(title: str, samples: Samples, counter: Counter[str]) -> list[str]:
        lines = [title]
        for name, count in counter.most_common(top):
            lines.append(f"  {100 * count / samples.total:5.1f} %  {name}")
        return lines

    requests = max(profile.requests, 1)
    lines = [
        f"{profile.requests} requests; application CPU per request: "
        f"user {profile.user_seconds / requests * 1e6:.0f} µs, "
        f"system {profile.system_seconds / requests * 1e6:.0f} µs",
    ]
    for name, samples in (("running (CPU)", profile.running), ("waiting", profile.waiting)):
        lines.append(f"\n== Samples {name}: {samples.total}")
        if samples.total:
            lines += block("Innermost function:", samples, samples.self_time)
            lines += block("Inclusive, functions:", samples, samples.inclusive)
            lines += block("Inclusive, files:", samples, samples.files)
    return "\n".join(lines)


def find_row(key: str) -> Row:
    for row in ROWS:
        if row.key == key:
            return row
    raise ProfileError(f"no row {key!r}; rows: {', '.join(r.key for r in ROWS)}")


def profile_row(key: str, *, connections: int, seconds: float) -> Profile:
    """Load row *key* for *seconds* while py-spy samples the application's processes."""
    row = find_row(key)
    spy = py_spy()
    with Site() as site, site.serve(row.backend) as serving:
        if serving.app_cpu not in ("roots", "apache-tree"):
            raise ProfileError(f"{key}: CGI processes are too short-lived for py-spy")
        url = site.base_url + row.path
        headers = []
        if row.session == "reused":
            headers.append(f"Cookie: {COOKIE}={new_session(url)}")
        wrk.run(url, connections=connections, seconds=row.warmup, headers=headers)
        pids = cpu.application_pids(
            site.apache_pid, serving.app_roots(), app_in_apache=serving.app_cpu == "apache-tree"
        )
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as directory:
            outputs = [Path(directory) / f"{pid}.txt" for pid in pids]
            samplers = [
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(max(1, round(seconds))),
                        "--rate",
                        str(RATE),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--idle",  # every thread; WAIT_SITES tells waiting from running
                        "--output",
                        str(output),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for pid, output in zip(pids, outputs)
            ]
            before = cpu.user_system(pids)
            try:
                load = wrk.run(url, connections=connections, seconds=seconds, headers=headers)
            finally:
                for sampler in samplers:
                    try:
                        sampler.wait(timeout=seconds + 30)
                    except subprocess.TimeoutExpired:
                        sampler.kill()
                        sampler.wait()
            after = cpu.user_system(pids)
            lines: list[str] = []
            for output in outputs:
                if output.exists():
                    lines += output.read_text().splitlines()
    running, waiting = parse(lines)
    return Profile(running, waiting, load.requests, after[0] - before[0], after[1] - before[1])
