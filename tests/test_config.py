"""pyservd's config: the example file loads; every problem is one line naming where."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from container.cli import main
from container.config import EX_CONFIG, ConfigError, ListenAddress, load

REPO = Path(__file__).resolve().parents[1]

GOOD = """
[pyservd]
listen = unix:/tmp/x/pyservd.sock
workers = 3
max_body = 2M

[app:testapp]
mount = /testapp
module = thisapp
pythonpath = ../examples
session_dir = sessions
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conf" / "pyservd.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_example_config_loads_with_its_documented_values():
    config = load(str(REPO / "conf" / "pyservd.conf"))
    assert config.server.listen == ListenAddress("unix", path="/run/pyserv/pyservd.sock")
    assert config.server.workers == 2 and config.server.threads == 16
    assert config.server.socket_mode == 0o660
    assert config.server.max_body == 10 * 1024 * 1024
    (app,) = config.apps
    assert (app.name, app.mount, app.module) == ("testapp", "/testapp", "thisapp")
    assert app.pythonpath == (str(REPO / "examples"),)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = load(write(tmp_path, GOOD))
    assert config.apps[0].session_dir == str(tmp_path / "conf" / "sessions")
    assert config.apps[0].pythonpath == (str(tmp_path / "examples"),)
    assert config.server.max_body == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen = 127.0.0.1:9000", ListenAddress("tcp", host="127.0.0.1", port=9000)),
        ("listen = [::1]:9000", ListenAddress("tcp", host="::1", port=9000)),
        ("listen = fd", ListenAddress("fd")),
    ],
)
def test_listen_forms(tmp_path, text, expected):
    config = load(write(tmp_path, GOOD.replace("listen = unix:/tmp/x/pyservd.sock", text)))
    assert config.server.listen == expected


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("workers = 3", "workers = abc", "[pyservd] workers = 'abc': expected a whole number"),
        ("workers = 3", "wrokers = 3", "[pyservd] unknown key 'wrokers'"),
        ("max_body = 2M", "max_body = lots", "[pyservd] max_body = 'lots': expected a size"),
        ("listen = unix:/tmp/x/pyservd.sock", "listen = here", "[pyservd] listen = 'here'"),
        ("listen = unix:/tmp/x/pyservd.sock", "", "[pyservd] listen is required"),
        ("mount = /testapp", "mount = testapp", "[app:testapp] mount = 'testapp'"),
        ("module = thisapp", "module = this-app", "[app:testapp] module = 'this-app'"),
        ("[app:testapp]", "[application]", "unknown section [application]"),
    ],
)
def test_each_problem_is_one_line_naming_file_section_and_key(tmp_path, replace, by, expected):
    path = write(tmp_path, GOOD.replace(replace, by))
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(path) and expected in message
    assert "\n" not in message


def test_two_apps_on_one_mount_or_session_dir_are_refused(tmp_path):
    second = GOOD + "\n[app:other]\nmount = /testapp\nmodule = other\nsession_dir = s2\n"
    with pytest.raises(ConfigError, match=r"\[app:other\] mount = '/testapp': already used"):
        load(write(tmp_path, second))


def test_check_exits_0_for_a_good_config_and_78_with_one_line_otherwise(tmp_path, capsys):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "thisapp_cfgtest.py").write_text(
        "class A:\n    def run(s, q, r): pass\n"
    )
    good = write(tmp_path, GOOD.replace("module = thisapp", "module = thisapp_cfgtest"))
    assert main(["--config", good, "--check"]) == 0
    bad = write(tmp_path, GOOD.replace("module = thisapp", "module = no_such_module_here"))
    assert main(["--config", bad, "--check"]) == EX_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "[app:testapp] module = 'no_such_module_here': cannot import" in err[0]


def test_unreadable_or_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.conf"))
    path = write(tmp_path, "no section header\n")
    with pytest.raises(ConfigError, match="not a valid INI file"):
        load(path)
    assert os.path.exists(path)


def test_limits_have_safe_defaults(tmp_path):
    config = load(write(tmp_path, GOOD))
    server, (app,) = config.server, config.apps

    assert (server.max_params, server.max_param_bytes, server.max_header_bytes) == (
        1000,
        1024 * 1024,
        64 * 1024,
    )
    assert (app.max_session_bytes, app.max_sessions, app.new_session_timeout) == (
        1024 * 1024,
        0,
        300,
    )


def test_limits_reach_the_application_built_from_the_config(tmp_path):
    from container.apps import build_application

    limits = "max_params = 50\nmax_param_bytes = 64K\nmax_header_bytes = 8K\n"
    session = "max_session_bytes = 100K\nmax_sessions = 5000\nnew_session_timeout = 120\n"
    text = GOOD.replace("max_body = 2M\n", "max_body = 2M\n" + limits)
    text = text.replace("pythonpath = ../examples", f"pythonpath = {REPO / 'examples'}")
    config = load(write(tmp_path, text + session))

    application = build_application(config.apps[0], config)

    settings = application.settings
    assert (settings.limits.max_body, settings.limits.max_params) == (2 * 1024 * 1024, 50)
    assert (settings.limits.max_param_bytes, settings.limits.max_header_bytes) == (65536, 8192)
    assert (settings.max_session_bytes, settings.max_sessions) == (100 * 1024, 5000)
    assert settings.new_session_timeout == 120
    assert application.store.envelope.max_bytes == 100 * 1024
    assert application.sessions.max_sessions == 5000


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_params = 0", "[pyservd] max_params = '0': expected a whole number >= 1"),
        ("max_header_bytes = lots", "[pyservd] max_header_bytes = 'lots': expected a size"),
    ],
)
def test_bad_limit_is_one_line_naming_the_key(tmp_path, line, expected):
    path = write(tmp_path, GOOD.replace("max_body = 2M", line))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert expected in str(caught.value)


REDIS_APP = GOOD.replace(
    "session_dir = sessions",
    "session_store = redis://127.0.0.1:6379/2\nsecret_file = keys/session.key",
)


def test_redis_store_takes_a_url_a_shared_key_file_and_a_route(tmp_path):
    text = REDIS_APP + "session_store_password_file = redis.pass\nsession_route = host-a\n"
    (app,) = load(write(tmp_path, text)).apps
    assert app.session_store == "redis://127.0.0.1:6379/2"
    assert app.session_dir is None
    assert app.secret_file == str(tmp_path / "conf" / "keys" / "session.key")
    assert app.session_store_password_file == str(tmp_path / "conf" / "redis.pass")
    assert app.session_route == "host-a"


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("secret_file = keys/session.key", "", "secret_file is required with session_store"),
        (
            "secret_file = keys/session.key",
            "secret_file = k\nsession_dir = s",
            "session_dir is for session_store = file",
        ),
        ("redis://127.0.0.1:6379/2", "memcached://x", "expected file, redis://HOST:PORT/DB"),
        ("redis://127.0.0.1:6379/2", "redis://:hunter2@127.0.0.1/0", "does not belong in the URL"),
        ("secret_file = keys/session.key", "secret_file = k\nsession_route = a.b", "route name"),
    ],
)
def test_redis_store_problems_are_one_line(tmp_path, replace, by, expected):
    path = write(tmp_path, REDIS_APP.replace(replace, by))
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(path) and expected in message and "\n" not in message
    assert "hunter2" not in message


def test_file_store_needs_a_session_dir_and_no_redis_password(tmp_path):
    with pytest.raises(ConfigError, match=r"\[app:testapp\] session_dir is required"):
        load(write(tmp_path, GOOD.replace("session_dir = sessions", "")))
    with_password = GOOD + "session_store_password_file = p\n"
    with pytest.raises(ConfigError, match="session_store_password_file is for session_store"):
        load(write(tmp_path, with_password))
