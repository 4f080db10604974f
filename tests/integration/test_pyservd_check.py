"""``pyservd --check``: a good config passes, each kind of mistake is one line and exit 78."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from apache import REPO_ROOT
from pyservd import Daemons, write_config

pytestmark = pytest.mark.integration

EX_CONFIG = 78


@pytest.fixture
def work_dir() -> Iterator[Path]:
    with Daemons() as daemons:
        yield daemons.work_dir()


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "container.cli", "--config", str(config), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_good_config_passes(work_dir: Path) -> None:
    config = write_config(work_dir)

    result = check(config)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{config}: OK" in result.stdout


@pytest.mark.parametrize(
    ("server", "app", "expected"),
    [
        ({"worker_count": "2"}, {}, ["[pyservd]", "'worker_count'"]),
        ({"workers": "abc"}, {}, ["[pyservd]", "workers", "'abc'", "expected a whole number"]),
        ({}, {"module": "no_such_module"}, ["[app:testapp]", "module", "'no_such_module'"]),
    ],
    ids=["unknown-key", "bad-value", "missing-module"],
)
def test_mistake_is_one_line_naming_file_section_and_key(
    work_dir: Path, server: dict[str, str], app: dict[str, str], expected: list[str]
) -> None:
    config = write_config(work_dir, server, app)

    result = check(config)

    assert result.returncode == EX_CONFIG, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0]
    for part in expected:
        assert part in lines[0], lines[0]


def test_unknown_section_is_one_line_naming_file_and_section(work_dir: Path) -> None:
    config = write_config(work_dir)
    config.write_text(config.read_text() + "\n[aplication:other]\nmount = /other\n")

    result = check(config)

    assert result.returncode == EX_CONFIG, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0]
    assert "[aplication:other]" in lines[0]
