"""Whom workers run as, and the session-directory checks they make before serving.

The real privilege drop and the read-only file systems need root and are tested with a
real pyservd in tests/integration/test_pyservd_privileges.py and test_pyservd_faults.py;
here the rules, with the process's identity faked where it matters.
"""

from __future__ import annotations

import os
import pwd
import stat
import textwrap
from pathlib import Path

import pytest

from container import privileges
from container.config import Config, ConfigError, load

CONFIG = """
[pyservd]
listen = unix:/tmp/x/pyservd.sock
{user}

[app:testapp]
mount = /testapp
module = thisapp
session_dir = {sessions}
"""


def make_config(tmp_path: Path, user: str | None = None) -> Config:
    path = tmp_path / "pyservd.conf"
    user_line = f"user = {user}" if user else ""
    path.write_text(textwrap.dedent(CONFIG.format(user=user_line, sessions=tmp_path / "sessions")))
    return load(str(path))


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def test_root_without_user_is_refused_naming_the_key_and_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    with pytest.raises(ConfigError) as caught:
        privileges.worker_identity(make_config(tmp_path))

    message = str(caught.value)
    assert "[pyservd] user is not set and pyservd runs as root" in message
    assert "set user =" in message and "\n" not in message


def test_root_with_user_drops_to_that_account(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    identity = privileges.worker_identity(make_config(tmp_path, "nobody"))

    assert identity == privileges.Identity("nobody", nobody().pw_uid, nobody().pw_gid)


def test_user_root_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    with pytest.raises(ConfigError, match=r"user = 'root': servlets never run as root"):
        privileges.worker_identity(make_config(tmp_path, "root"))


def test_not_root_runs_as_itself_and_user_may_only_name_itself(tmp_path, monkeypatch):
    me = nobody().pw_uid
    monkeypatch.setattr(os, "geteuid", lambda: me)

    assert privileges.worker_identity(make_config(tmp_path)) is None
    assert privileges.worker_identity(make_config(tmp_path, "nobody")) is None
    with pytest.raises(ConfigError, match=r"user = 'root': pyservd runs as 'nobody', not root"):
        privileges.worker_identity(make_config(tmp_path, "root"))


# -- the session directory ----------------------------------------------------------------


def prepare(config: Config, uid: int | None = None) -> None:
    """The check a worker makes before dropping to *uid* (default: us)."""
    privileges._prepare_session_dir(
        config, config.apps[0], os.getuid() if uid is None else uid, os.getgid()
    )


def test_missing_session_directory_is_created_0700(tmp_path):
    config = make_config(tmp_path)

    prepare(config)

    info = os.stat(tmp_path / "sessions")
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
def test_group_or_world_writable_session_directory_is_refused_naming_it(tmp_path, mode):
    config = make_config(tmp_path)
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    sessions.chmod(mode)

    with pytest.raises(ConfigError) as caught:
        prepare(config)

    message = str(caught.value)
    assert f"session_dir = '{sessions}'" in message
    assert f"(mode {mode:04o})" in message and f"chmod 0700 {sessions}" in message


def test_group_readable_session_directory_is_accepted(tmp_path):
    (tmp_path / "sessions").mkdir(mode=0o750)

    prepare(make_config(tmp_path))


def test_session_directory_of_another_owner_is_refused_naming_it(tmp_path):
    config = make_config(tmp_path)
    sessions = tmp_path / "sessions"
    sessions.mkdir(mode=0o700)
    other = nobody()

    with pytest.raises(ConfigError) as caught:
        prepare(config, uid=other.pw_uid)

    message = str(caught.value)
    assert f"session_dir = '{sessions}'" in message
    assert "not by 'nobody'" in message and f"chown nobody {sessions}" in message


def test_session_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "sessions").write_text("")

    with pytest.raises(ConfigError, match="not a directory"):
        prepare(make_config(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a directory for another user needs root")
def test_as_root_a_missing_session_directory_is_created_for_the_worker_user(tmp_path):
    config = make_config(tmp_path, "nobody")

    prepare(config, uid=nobody().pw_uid)

    assert os.stat(tmp_path / "sessions").st_uid == nobody().pw_uid


def test_unreadable_session_key_is_refused_naming_the_file(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    prepare(config)
    key = tmp_path / "sessions" / ".secret"
    key.write_text("k" * 64)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(key) else real_access(path, mode)
    )

    with pytest.raises(ConfigError, match=rf"session key '{key}': not readable"):
        privileges._check_usable(config, config.apps[0])
