"""The facts about this machine and these versions that a report's figures depend on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata

import pyserv

from .harness import REPO, apache_version, redis_server_binary, world_readable_python
from .wrk import WRK


def _first_line(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    output = (completed.stdout or completed.stderr).strip()
    return output.splitlines()[0] if output else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    with open("/proc/meminfo") as stream:
        kib = int(stream.readline().split()[1])
    return f"{kib / 1024 / 1024:.1f} GiB"


def _os_release() -> str:
    try:
        with open("/etc/os-release") as stream:
            for line in stream:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _redis() -> str:
    """redis-server's version (``redis-server --version``) and redis-py's."""
    binary = redis_server_binary()
    line = _first_line([binary, "--version"]) if binary else "not installed"
    match = re.search(r"\bv=(\S+)", line)
    try:
        client = f"redis-py {metadata.version('redis')}"
    except metadata.PackageNotFoundError:
        client = "redis-py not installed"
    return f"{match.group(1) if match else line} (redis-server), {client}"


def _commit() -> str:
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    return f"{commit} (with uncommitted changes)" if status.strip() else commit


def describe(daemon_python: str) -> list[tuple[str, str]]:
    """(what, value) pairs for the report's machine table; *daemon_python* is the
    interpreter pyservd and flup ran on."""
    cgi_python = world_readable_python()
    return [
        ("cores", f"{os.cpu_count()} × {_cpu_model()}"),
        ("memory", _memory()),
        ("system", f"{_os_release()}, Linux {platform.release()}"),
        ("Python (pyservd, flup)", f"{_first_line([daemon_python, '-V'])} ({daemon_python})"),
        ("Python (CGI, mod_fcgid)", f"{_first_line([cgi_python, '-V'])} ({cgi_python})"),
        ("Apache", "{}.{}.{}, event MPM".format(*apache_version())),
        ("flup", metadata.version("flup")),
        ("wrk", _first_line([WRK, "-v"]).split(" [")[0]),
        ("Redis", _redis()),
        ("PyServ", f"{pyserv.__version__}, commit {_commit()}"),
    ]
