"""CPU time of Apache, of the application and of the whole machine, from /proc.

A row's CPU split is the difference of two :class:`CpuSample` taken around its load.

- Apache: user + system time of every ``apache2`` process in Apache's process tree.
- The application: every other process in that tree (mod_fcgid's daemons, CGI scripts
  still running) plus the trees of the application's own roots (pyservd, flup), with the
  time of their reaped children.
- The machine: busy jiffies of /proc/stat, so that what nobody above accounts for
  (the benchmark itself, the kernel's softirqs, anything else running) shows as "other".

CGI scripts are the exception: mod_cgid lets the kernel reap them (SIGCHLD ignored), so
their time reaches no parent's counters and exists only in the machine's total. For such
rows the application's time is taken *by difference* (machine − Apache − wrk), which also
absorbs any other load on the machine; the report marks those figures.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICK = float(os.sysconf("SC_CLK_TCK"))
APACHE_NAMES = frozenset({"apache2", "httpd"})


@dataclass(frozen=True)
class _Process:
    ppid: int
    name: str
    own: float  # utime + stime, seconds
    reaped: float  # cutime + cstime: children it has waited for


def _processes() -> dict[int, _Process]:
    table: dict[int, _Process] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rpartition(")")[2].split()
            utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
            table[int(entry.name)] = _Process(
                int(fields[1]), name, (utime + stime) / TICK, (cutime + cstime) / TICK
            )
    return table


def _tree(table: dict[int, _Process], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.ppid, []).append(pid)
    members, pending = set(), [root]
    while pending:
        pid = pending.pop()
        if pid in table and pid not in members:
            members.add(pid)
            pending.extend(children.get(pid, ()))
    return members


def _machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as stream:
        fields = [int(value) for value in stream.readline().split()[1:]]
    # user nice system idle iowait irq softirq [steal: the hypervisor's, not ours]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / TICK


@dataclass(frozen=True)
class CpuSample:
    apache: float
    app: float
    machine: float


def sample(
    apache_pid: int, app_roots: Iterable[int] = (), *, app_in_apache: bool = False
) -> CpuSample:
    """CPU seconds used so far by Apache's tree, the application and the machine.

    *app_in_apache*: the non-Apache processes under Apache are the application
    (mod_fcgid's daemons); otherwise they are not counted (idle ones from other rows).
    """
    table = _processes()
    apache = app = 0.0
    in_apache = _tree(table, apache_pid)
    for pid in in_apache:
        process = table[pid]
        if process.name in APACHE_NAMES:
            apache += process.own  # its reaped children: see the module docstring
        elif app_in_apache:
            app += process.own + process.reaped
    for root in app_roots:
        for pid in _tree(table, root) - in_apache:
            app += table[pid].own + table[pid].reaped
    return CpuSample(apache, app, _machine_busy())


def application_pids(
    apache_pid: int, app_roots: Iterable[int] = (), *, app_in_apache: bool = False
) -> list[int]:
    """The application's live processes, as :func:`sample` counts them."""
    table = _processes()
    in_apache = _tree(table, apache_pid)
    pids: set[int] = set()
    if app_in_apache:
        pids |= {pid for pid in in_apache if table[pid].name not in APACHE_NAMES}
    for root in app_roots:
        pids |= _tree(table, root) - in_apache
    return sorted(pids)


def user_system(pids: Iterable[int]) -> tuple[float, float]:
    """Seconds of user and of system CPU used so far by *pids* (threads included)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            user += int(fields[11]) / TICK
            system += int(fields[12]) / TICK
    return user, system


@dataclass(frozen=True)
class CpuSplit:
    """CPU seconds spent during one load, by whom."""

    apache: float
    app: float
    wrk: float
    other: float
    app_by_difference: bool  # app = machine − Apache − wrk (CGI rows)

    @classmethod
    def between(
        cls, before: CpuSample, after: CpuSample, wrk: float, *, app_by_difference: bool
    ) -> CpuSplit:
        apache = after.apache - before.apache
        machine = after.machine - before.machine
        if app_by_difference:
            app = max(0.0, machine - apache - wrk)
        else:
            app = after.app - before.app
        other = max(0.0, machine - apache - app - wrk)
        return cls(apache, app, wrk, other, app_by_difference)


def resident_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB (resident memory, shared pages included)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def machine_cores_busy(seconds: float) -> float:
    """How many cores the machine keeps busy over the next *seconds* (the background
    load a run starts on: other users of a shared machine show up here)."""
    before = _machine_busy()
    time.sleep(seconds)
    return (_machine_busy() - before) / seconds


def wait_until_idle(
    roots: Callable[[], list[int]],
    *,
    quiet: float = 6.0,
    threshold: float = 0.05,
    limit: float = 600.0,
    interval: float = 0.5,
) -> float:
    """Wait until the process trees of *roots* have used less than *threshold* cores for
    *quiet* seconds in a row; return the seconds waited (TimeoutError after *limit*).

    A daemon's start-up work (imports, ``init()``, a first sweep of its sessions a few
    seconds later) is over once it has been quiet for longer than that delay.
    """

    def used() -> float:
        table = _processes()
        members = set().union(*(_tree(table, root) for root in roots()))
        return sum(table[pid].own + table[pid].reaped for pid in members)

    started = quiet_since = time.monotonic()
    last = used()
    while True:
        time.sleep(interval)
        now, current = time.monotonic(), used()
        if (current - last) / interval > threshold:
            quiet_since = now
        last = current
        if now - quiet_since >= quiet:
            return now - started
        if now - started > limit:
            raise TimeoutError(f"still busy after {limit:g} s")
