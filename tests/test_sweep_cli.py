"""``pyserv-sessions sweep DIR``: in-process through ``main()`` and as a real command."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from planted import CreatesFile, malicious_payload, raw_envelope

import pyserv
from pyserv.secret import load_or_create_secret
from pyserv.stores.base import Envelope, SessionRecord, new_session_id
from pyserv.stores.file import FileStore
from pyserv.sweep import main

REPO_ROOT = Path(pyserv.__file__).resolve().parent.parent


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "session.key"


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def store(session_dir: Path, secret_file: Path) -> FileStore:
    store = FileStore(str(session_dir), Envelope(lambda: load_or_create_secret(str(secret_file))))
    store.ensure_directory()
    return store


def add_session(store: FileStore, *, idle: float, timeout: int = 60) -> Path:
    """A stored session last used *idle* seconds ago; returns its file."""
    now = time.time()
    record = SessionRecord(new_session_id(), {"v": 1}, 0, now, now, timeout)
    store.save(record, now)
    path = Path(store.directory) / record.sid[:2] / f"{record.sid}.session"
    when = now - idle
    os.utime(path, (when, when))
    return path


def add_malicious_session(store: FileStore, marker: Path, *, idle: float) -> Path:
    """An expired session, correctly signed, whose unpickling would create *marker*."""
    sid = new_session_id()
    blob = raw_envelope(
        store.envelope.key, sid, malicious_payload(marker), created=time.time() - idle, timeout=60
    )
    path = Path(store.directory) / sid[:2] / f"{sid}.session"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(blob)
    when = time.time() - idle
    os.utime(path, (when, when))
    return path


def run_command(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "pyserv.sweep", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_sweep_removes_expired_keeps_live_and_reports_the_count(store, session_dir, capsys):
    expired = [add_session(store, idle=120) for _ in range(2)]
    live = add_session(store, idle=10)
    live_mtime = live.stat().st_mtime_ns

    code = main(["sweep", str(session_dir)])

    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"\bremoved 2 expired session", out), out
    assert not any(path.exists() for path in expired)
    assert live.exists()
    assert live.stat().st_mtime_ns == live_mtime  # looking is not an access


def test_sweep_with_nothing_to_do_reports_zero(store, session_dir, capsys):
    live = add_session(store, idle=0)

    assert main(["sweep", str(session_dir)]) == 0

    assert re.search(r"\bremoved 0 expired session", capsys.readouterr().out)
    assert live.exists()


def test_sweep_command_in_a_subprocess_removes_expired_and_skips_locked(store, session_dir):
    expired = add_session(store, idle=120)
    busy = add_session(store, idle=120)
    live = add_session(store, idle=10)
    lock = store.lock(busy.stem, 5.0)  # a request in this process is using it
    assert lock is not None
    try:
        result = run_command("sweep", str(session_dir))
    finally:
        lock.release()

    assert result.returncode == 0, result.stderr
    assert re.search(r"\bremoved 1 expired session", result.stdout), result.stdout
    assert not expired.exists()
    assert busy.exists()
    assert live.exists()


def test_sweep_needs_no_secret(store, session_dir, secret_file):
    expired = add_session(store, idle=120)
    secret_file.unlink()

    assert main(["sweep", str(session_dir)]) == 0

    assert not expired.exists()
    assert not secret_file.exists()
    assert not (session_dir / ".secret").exists()


@pytest.mark.parametrize("kind", ["regular file", "missing path"])
def test_sweep_of_a_non_directory_exits_2_with_a_clear_message(tmp_path, capsys, kind):
    target = tmp_path / "not-a-dir"
    if kind == "regular file":
        target.write_text("x")

    code = main(["sweep", str(target)])
    result = run_command("sweep", str(target))

    assert code == 2
    err = capsys.readouterr().err
    assert f"{target}: not a directory" in err
    assert result.returncode == 2
    assert f"{target}: not a directory" in result.stderr
    assert result.stdout == ""


def test_sweep_without_a_directory_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep"])

    assert exit_info.value.code == 2
    assert "DIR" in capsys.readouterr().err


def test_sweep_never_unpickles(store, session_dir, tmp_path):
    probe = tmp_path / "gadget-probe"  # the gadget works when it is unpickled
    pickle.loads(pickle.dumps(CreatesFile(str(probe)))).close()
    assert probe.exists()
    marker_in_process = tmp_path / "marker-in-process"
    marker_command = tmp_path / "marker-command"
    first = add_malicious_session(store, marker_in_process, idle=120)

    assert main(["sweep", str(session_dir)]) == 0
    second = add_malicious_session(store, marker_command, idle=120)
    result = run_command("sweep", str(session_dir))

    assert result.returncode == 0, result.stderr
    assert not first.exists() and not second.exists()
    assert not marker_in_process.exists()
    assert not marker_command.exists()
