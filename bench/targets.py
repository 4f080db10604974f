"""The goals the figures are compared with. They steer work; nothing asserts them.

Each :class:`Target` is evaluated per connection count where that makes sense; a target
whose rows failed or were not measured is reported as not measured, never as met.
"""

from __future__ import annotations

from dataclasses import dataclass

from .run import Results
from .scale import label

SWEEP_LIMIT_SECONDS = 2.0


@dataclass(frozen=True)
class Target:
    goal: str
    figure: str  # what was measured, formatted
    met: bool | None  # None: not measured


def rate_ratio(results: Results, key: str, base: str, connections: int) -> float | None:
    """req/s of row *key* ÷ req/s of row *base*, at *connections*."""
    a, b = results.get(key, connections), results.get(base, connections)
    if a is None or b is None or not b.load.rate:
        return None
    return a.load.rate / b.load.rate


def _ratio_target(
    results: Results, key: str, base: str, minimum: float, connections: int, goal: str
) -> Target:
    ratio = rate_ratio(results, key, base, connections)
    figure = "not measured" if ratio is None else f"{ratio:.3g}×"
    return Target(
        f"{goal} ≥ {minimum:g}× ({connections} conn.)",
        figure,
        None if ratio is None else ratio >= minimum,
    )


def evaluate(results: Results) -> list[Target]:
    targets = []
    for connections in results.plan.connections:
        targets += [
            _ratio_target(
                results, "counter", "flup", 0.8, connections, "counter, one session ÷ bare flup"
            ),
            _ratio_target(
                results, "counter", "seed-cgi", 100, connections, "counter, one session ÷ seed CGI"
            ),
            _ratio_target(
                results, "new-session", "flup", 0.6, connections, "new session ÷ bare flup"
            ),
            _ratio_target(
                results, "pyserv-cgi", "hello-cgi", 0.8, connections, "PyServ CGI ÷ hello CGI"
            ),
        ]
    counter = results.get("counter", 16)
    targets.append(
        Target(
            "counter, one session: p99 ≤ 10 ms (16 conn.)",
            "not measured" if counter is None else f"{counter.load.p99_ms:.3g} ms",
            None if counter is None else counter.load.p99_ms <= 10,
        )
    )
    checked = [m for m in results.all_measurements() if m.check is not None]
    lost = sum(m.check.lost for m in checked if m.check is not None)
    targets.append(
        Target(
            "zero lost updates (every session row)",
            f"{lost} lost in {len(checked)} checks" if checked else "not measured",
            (lost == 0) if checked else None,
        )
    )
    targets += _stored_targets(results)
    targets.append(_sweep_target(results))
    return targets


def _sweep_target(results: Results) -> Target:
    """Both expired sweeps must be under the limit: sessions without lock files (never
    requested again) and, the realistic case, sessions whose lock file the sweeper must
    lock before it removes them."""
    goal = (
        f"sweep of {label(results.plan.sweep_count)} expired sessions < "
        f"{SWEEP_LIMIT_SECONDS:g} s (with and without lock files)"
    )
    sweeps = results.sweeps
    if sweeps is None:
        return Target(goal, "not measured", None)
    timings = (sweeps.expired_locked, sweeps.expired)
    return Target(
        goal,
        " / ".join(f"{t.seconds:.3g} s" for t in timings),
        all(t.seconds < SWEEP_LIMIT_SECONDS for t in timings),
    )


def _stored_targets(results: Results) -> list[Target]:
    """The most sessions stored costs within 10 % of the fewest, per request."""
    if len(results.stored) < 2:
        return [Target("most stored sessions within 10 % of 1k", "not measured", None)]
    fewest, most = results.stored[0], results.stored[-1]
    targets = []
    for small, large in zip(fewest.measurements, most.measurements):
        ratio = small.load.rate / large.load.rate if large.load.rate else float("inf")
        targets.append(
            Target(
                f"{label(most.stored)} stored within 10 % of {label(fewest.stored)} "
                f"({small.connections} conn.)",
                f"{(ratio - 1) * 100:+.1f} % per request",
                ratio <= 1.10,
            )
        )
    return targets
