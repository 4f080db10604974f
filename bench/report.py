"""The report: reStructuredText, printed by ``scripts/bench`` and written to
docs/benchmarks.rst. Only formatting lives here; every figure comes from
:class:`bench.run.Results` and :mod:`bench.targets`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from .rows import Measurement
from .run import Results
from .scale import label
from .targets import Target, rate_ratio

NOISY_CORES = 0.5  # *other* CPU above this: the row was disturbed (marked "!")

RATIOS = (
    ("PyServ counter, one session ÷ bare flup", "counter", "flup"),
    ("PyServ counter, new session ÷ bare flup", "new-session", "flup"),
    ("PyServ without session ÷ bare flup", "no-session", "flup"),
    ("PyServ counter ÷ seed CGI", "counter", "seed-cgi"),
    ("PyServ CGI ÷ hello CGI", "pyserv-cgi", "hello-cgi"),
    ("PyServ counter: workers = 1 ÷ workers = 2", "workers-1", "counter"),
    ("PyServ counter: no enablereuse ÷ enablereuse=on", "no-reuse", "counter"),
    ("PyServ counter: mod_fcgid ÷ mod_proxy_fcgi", "fcgid", "counter"),
    ("PyServ counter: Redis, two daemons ÷ file store", "redis", "counter"),
    ("bare flup ÷ Apache static file", "flup", "static"),
)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An RST simple table (every first cell must be non-empty)."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(headers), rule, *(line(row) for row in rows), rule])


def _heading(text: str, underline: str = "-") -> str:
    return f"{text}\n{underline * len(text)}"


def _check(measurement: Measurement) -> str:
    check = measurement.check
    if check is None:
        return "—"
    if check.lost:
        return f"**LOST {check.lost}**"
    return f"ok (+{check.in_flight} in flight)" if check.in_flight else "ok"


def _cores(seconds: float, measurement: Measurement) -> str:
    return f"{seconds / measurement.load.seconds:.2f}" if measurement.load.seconds else "—"


def _noisy(measurement: Measurement) -> bool:
    seconds = measurement.load.seconds
    return bool(seconds) and measurement.cpu.other / seconds >= NOISY_CORES


def _measurement_cells(measurement: Measurement) -> list[str]:
    load, split = measurement.load, measurement.cpu
    approx = "≈" if split.app_by_difference else ""
    return [
        f"{load.rate:,.0f}",
        f"{load.p50_ms:.2f}",
        f"{load.p99_ms:.2f}",
        load.describe_errors(),
        _cores(split.apache, measurement),
        approx + _cores(split.app, measurement),
        _cores(split.wrk, measurement),
        _cores(split.other, measurement) + ("!" if _noisy(measurement) else ""),
        approx + f"{measurement.app_micros_per_request / 1000:.2f}",
        "—" if measurement.save_micros is None else f"{measurement.save_micros:,.0f}",
        _check(measurement),
    ]


MEASUREMENT_HEADERS = [
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "Apache",
    "app",
    "wrk",
    "other",
    "app ms/req",
    "save µs",
    "counter check",
]


def _rows_section(results: Results) -> list[str]:
    parts = [_heading("Rows")]
    for connections in results.plan.connections:
        rows = [
            [m.row.label, *_measurement_cells(m)]
            for m in results.measurements
            if m.connections == connections
        ]
        plural = "s" if connections > 1 else ""
        parts += [
            f"**{connections} connection{plural}**",
            table(["Row", *MEASUREMENT_HEADERS], rows),
        ]
    return parts


def _ratios_section(results: Results) -> list[str]:
    rows = []
    for text, key, base in RATIOS:
        cells = []
        for connections in results.plan.connections:
            ratio = rate_ratio(results, key, base, connections)
            cells.append("—" if ratio is None else f"{ratio:.3g}×")
        rows.append([text, *cells])
    headers = ["Ratio of req/s", *(f"{c} conn." for c in results.plan.connections)]
    return [_heading("Ratios"), table(headers, rows)]


def _scale_section(results: Results) -> list[str]:
    parts = [_heading("Scale")]
    if results.stored:
        fewest = results.stored[0]
        rows = []
        for step in results.stored:
            for measurement, base in zip(step.measurements, fewest.measurements):
                cost = base.load.rate / measurement.load.rate if measurement.load.rate else 0
                rows.append(
                    [
                        label(step.stored),
                        str(measurement.connections),
                        *_measurement_cells(measurement),
                        f"{(cost - 1) * 100:+.1f} %",
                    ]
                )
        writes = ", ".join(f"{label(s.stored)}: {s.write_seconds:.0f} s" for s in results.stored)
        settles = ", ".join(f"{label(s.stored)}: {s.settle_seconds:.0f} s" for s in results.stored)
        parts += [
            textwrap.fill(
                "The reused-session counter with other live sessions stored beside its own, "
                f"written in the store's format (time to write them: {writes}). The daemon "
                "is restarted after each fill, and measured once it has been idle for 6 s, "
                "past its workers' start-up sweep of the directory (wait from start: "
                f"{settles}). The workers sweep again every 60 s, during the rows too.",
                width=92,
            ),
            table(
                ["Stored", "conn.", *MEASUREMENT_HEADERS, "time/req vs first"],
                rows,
            ),
        ]
    if results.sweeps is not None:
        sweeps = results.sweeps
        parts.append(
            table(
                ["Sweep (FileStore.sweep)", "sessions", "removed", "wall s", "CPU s"],
                [
                    [
                        what,
                        label(t.stored),
                        str(t.removed),
                        f"{t.seconds:.2f}",
                        f"{t.cpu_seconds:.2f}",
                    ]
                    for what, t in (
                        ("all live", sweeps.live),
                        ("all expired, no lock files", sweeps.expired),
                        ("all expired, each locked once", sweeps.expired_locked),
                    )
                ],
            )
        )
    if results.memory is not None:
        memory = results.memory
        parts.append(
            table(
                ["Worker memory (VmRSS)", "value"],
                [
                    ["cache size (session_cache_size)", str(memory.cache_size)],
                    ["requests answered (one per session)", str(memory.answered)],
                    ["one session cached", f"{memory.baseline_kib / 1024:.1f} MiB"],
                    [f"{memory.cache_size} sessions cached", f"{memory.filled_kib / 1024:.1f} MiB"],
                    ["per cached session", f"{memory.per_session_bytes:,.0f} bytes"],
                    ["same worker throughout", "yes" if memory.same_worker else "no"],
                ],
            )
        )
    return parts


def _targets_section(targets: list[Target]) -> list[str]:
    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("met" if met else "**missed**")

    rows = [[t.goal, t.figure, verdict(t.met)] for t in targets]
    return [
        _heading("Targets"),
        "They steer the work; nothing asserts them.",
        table(["Target", "measured", "verdict"], rows),
    ]


def _bullets(items: Sequence[str]) -> str:
    return "\n".join(
        textwrap.fill(item, width=92, initial_indent="- ", subsequent_indent="  ") for item in items
    )


def _method(results: Results) -> list[str]:
    plan = results.plan
    if plan.quick:
        mode = (
            f"A **quick** run: {plan.seconds:g} s a row, {label(plan.stored_counts[-1])} "
            "stored sessions at most where a full run stores 1M"
        )
    else:
        mode = f"A full run: {plan.seconds:g} s a row"
    connections = " and ".join(str(c) for c in plan.connections)
    return [
        _heading("Method"),
        _bullets(
            [
                f"{mode}; {results.elapsed / 60:.1f} minutes in all. Before it started, the "
                f"machine was already busy on {results.background_cores:.2f} cores: figures "
                "from a shared machine are noisy, and the *other* column shows by how much.",
                "Every row goes through the same private Apache on 127.0.0.1 (event MPM, "
                "access log on, ``MaxKeepAliveRequests 0``), loaded by wrk over "
                f"{connections} keep-alive connections (one wrk thread per connection, two "
                "at most) after a 1 s warm-up (3 s for mod_fcgid, which starts its processes "
                "on demand). Latency percentiles are wrk's (``--latency``).",
                "pyservd runs with the settings of conf/pyservd.conf (workers, threads, "
                "session cache) behind the shipped conf/apache-proxy-fcgi.conf; each variant "
                "changes one thing. mod_fcgid runs it with conf/apache-fcgid.conf, whose "
                "FcgidMaxProcessesPerClass 4 is fewer than 16 connections: mod_fcgid sends "
                "each process one request at a time, and a request that finds every process "
                "busy waits, checking again once a second, which is that row's p99 (and any "
                "timeout) at 16 connections (see the sizing note in the config). The counter "
                "is the integration tests' servlet ``probe.Count`` (read the session, +1, "
                "write); PyServ CGI runs examples/testapp.cgi (``TestServlet``). pyservd, "
                "flup and the CGI scripts run on the Python given under Machine.",
                "The Redis row: two pyservd with those settings, each on its own TCP port, "
                "share one ``secret_file`` and keep sessions in one private redis-server "
                "(127.0.0.1, no persistence; version under Machine), behind the shipped "
                "conf/apache-balancer.conf (byrequests) mounted at /redis/. The daemons have "
                "``session_route`` a and b, but wrk's cookie is the bare session id, "
                "without a route, so the balancer sends the requests to the daemons in turn "
                "(each response re-issues the cookie with its daemon's route; wrk ignores "
                "it); the row fails unless both daemons answer. Its *app* CPU includes "
                "redis-server's.",
                "The bare flup peer keeps 32 spare threads (bench/peers/flup_hello.py): with "
                "flup's defaults, a burst of new proxy connections can leave one queued "
                "behind threads held by reused connections, and its requests hang.",
                "CPU is in cores (CPU seconds ÷ wall seconds), from /proc before and after "
                "each load: Apache's processes, the application's (pyservd or flup with "
                "their children, or mod_fcgid's daemons) and wrk's; *other* is the rest of "
                "the machine's busy time (kernel threads, the benchmark, anything else); "
                f"a row where it reaches {NOISY_CORES:g} core is marked ! as disturbed. "
                "≈: CGI scripts are reaped by the kernel, not by Apache, so their time is "
                "taken by difference (machine − Apache − wrk) and includes *other*.",
                "Counter check: the server's counter increase (for a new session per "
                "request, the sessions stored) against the responses wrk counted; up to one "
                "more per connection is a request still in flight when wrk stopped. Fewer "
                "is a lost update, flagged **LOST**.",
                "*save µs* (and *save a session file* under Machine) is the cost of "
                "writing a new file into place (new temp file, write, ``os.replace``) timed "
                "alone, in the row's session directory just before its load: every new "
                "session pays it in the kernel (an update overwrites the session's spare "
                "file and swaps it in, which costs no new file), and on this VM's shared "
                "disk it varies widely with the directory and the moment.",
                "To see where an application's time goes under a row's load, run "
                "``scripts/bench --profile ROW [--connections N]`` (py-spy; ROW is a key of "
                "bench/rows.py, e.g. ``counter``).",
                "Webware for Python 3 is not measured: it is pip-installable, but serving it "
                "needs an application directory and an adapter set up for it, which is not "
                "trivial.",
            ]
        ),
    ]


def render(results: Results, targets: list[Target], machine: list[tuple[str, str]]) -> str:
    when = results.started.strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        _heading("Benchmarks", "="),
        f"Written by ``scripts/bench{' --quick' if results.plan.quick else ''}`` on {when}. "
        "Figures from one machine: compare rows with each other, not across machines.",
        _heading("Machine"),
        table(
            ["What", "Version or size"],
            [
                *([k, v] for k, v in machine),
                *(
                    [f"save a session file ({where})", f"{micros:,.0f} µs"]
                    for where, micros in results.replace_micros.items()
                ),
            ],
        ),
        *_method(results),
        *_targets_section(targets),
        *_rows_section(results),
        *_ratios_section(results),
        *_scale_section(results),
    ]
    if results.failures:
        parts += [
            _heading("Failures"),
            "\n".join(f"- {failure}" for failure in results.failures),
        ]
    return "\n\n".join(parts) + "\n"
