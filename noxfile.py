"""Unit tests on the oldest and newest supported Pythons (scripts/test runs these)."""

import nox

nox.options.sessions = ["unit"]


@nox.session(python=["3.9", "3.13"])
def unit(session: nox.Session) -> None:
    session.install(".[test,redis]")
    session.run(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests",
        "--ignore=tests/integration",
        *session.posargs,
    )
