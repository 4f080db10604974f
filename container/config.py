"""pyservd's INI file → typed, validated, immutable settings.

One table (:data:`SETTINGS`) declares every key: section, converter, default, help.
Converters take the raw string and raise :class:`ValueError` with what was expected;
:func:`load` turns that into one line naming file, section, key and value. Unknown
sections and keys are errors. Relative paths are relative to the config file.
"""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import re
from dataclasses import dataclass, fields
from typing import Any, Callable

EX_CONFIG = 78  # sysexits.h: configuration error


class ConfigError(Exception):
    """A configuration problem, as one line that says where and what to do."""


@dataclass(frozen=True)
class ListenAddress:
    kind: str  # "unix", "tcp" or "fd"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return "fd"


# -- converters: str -> value, ValueError("expected ...") -------------------------------


def _integer(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < minimum:
            raise ValueError(f"expected a whole number >= {minimum}")
        return int(text)

    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected seconds (a number)") from None
    if not 0 < value < 10**7:
        raise ValueError("expected seconds (a number > 0)")
    return value


def _size(text: str) -> int:
    match = re.fullmatch(r"([0-9]+)\s*([KMG]?)", text.upper())
    if not match:
        raise ValueError("expected a size such as 10M, 512K or 1048576")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " ")


def _mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError("expected an octal file mode such as 0660")
    return int(text, 8)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no")


def _listen(text: str) -> ListenAddress:
    if text == "fd":
        return ListenAddress("fd")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError("expected an absolute socket path after unix:")
        return ListenAddress("unix", path=path)
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text)
    if match:
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if 0 < port < 65536:
            return ListenAddress("tcp", host=host, port=port)
    raise ValueError("expected unix:/path/to/socket, HOST:PORT, [IPv6]:PORT or fd")


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text in ("", "off", "none") else convert(text)


def _group(text: str) -> str:
    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError("expected an existing group name") from None
    return text


def _user(text: str) -> str:
    try:
        pwd.getpwnam(text)
    except KeyError:
        raise ValueError("expected an existing user name") from None
    return text


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("expected debug, info, warning, error or critical")
    return text.lower()


def _log_target(text: str) -> str | None:
    return None if text == "off" else text  # "-" is stderr; paths are resolved later


def _mount(text: str) -> str:
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+|/", text):
        raise ValueError("expected a URL path such as /testapp (no trailing slash)")
    return text


def _module(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", text):
        raise ValueError("expected a Python module name such as thisapp")
    return text


def _cookie_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("expected a cookie name of letters, digits, _ and -")
    return text


_REDIS_URL = re.compile(
    r"rediss?://(?:[^@/]*@)?(\[[0-9a-fA-F:.]+\]|[^:/@\[\]]+)(?::[0-9]{1,5})?(?:/[0-9]+)?/?"
)


def _session_store(text: str) -> str:
    if re.match(r"rediss?://[^@/]*:[^@/]*@", text):
        raise ValueError(
            "a password does not belong in the URL (config dumps and logs show it): "
            "put it in session_store_password_file"
        )
    if text == "file" or _REDIS_URL.fullmatch(text):
        return text
    raise ValueError("expected file, redis://HOST:PORT/DB or rediss://HOST:PORT/DB")


def _route(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", text):
        raise ValueError("expected a route name of 1 to 32 letters, digits, _ and -")
    return text


def _paths(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(os.pathsep) if part)


@dataclass(frozen=True)
class Setting:
    section: str  # "pyservd" or "app"
    key: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    is_path: bool = False


_REQUIRED = object()

SETTINGS: tuple[Setting, ...] = (
    Setting("pyservd", "listen", _listen, _REQUIRED, "unix:/path, HOST:PORT or fd (mod_fcgid)"),
    Setting("pyservd", "socket_mode", _mode, 0o660, "mode of the Unix socket"),
    Setting("pyservd", "socket_group", _optional(_group), None, "group of the Unix socket"),
    Setting("pyservd", "user", _optional(_user), None, "user to run as when started as root"),
    Setting("pyservd", "workers", _integer(1), 2, "worker processes"),
    Setting("pyservd", "threads", _integer(1), 16, "request threads per worker"),
    Setting(
        "pyservd",
        "request_timeout",
        _seconds,
        30.0,
        "seconds before a request's worker is replaced",
    ),
    Setting(
        "pyservd",
        "read_timeout",
        _seconds,
        30.0,
        "seconds an incomplete request or a stalled body may take before its connection is closed",
    ),
    Setting(
        "pyservd",
        "max_connections",
        _integer(1),
        1024,
        "open connections per worker (more: refused)",
    ),
    Setting("pyservd", "graceful_timeout", _seconds, 10.0, "seconds to finish requests on stop"),
    Setting(
        "pyservd", "max_requests", _integer(0), 0, "recycle a worker after N requests (0 = never)"
    ),
    Setting(
        "pyservd",
        "pidfile",
        _optional(str),
        None,
        "file to write the master's pid to",
        is_path=True,
    ),
    Setting(
        "pyservd",
        "control_socket",
        _optional(str),
        None,
        "pyservctl's socket (0600); default pyservd.ctl beside a unix: listen socket",
        is_path=True,
    ),
    Setting("pyservd", "error_log", str, "-", "error log path, - for stderr", is_path=True),
    Setting("pyservd", "access_log", _log_target, None, "access log path, - or off", is_path=True),
    Setting("pyservd", "log_level", _log_level, "info", "error log level"),
    Setting("pyservd", "max_body", _size, 10 * 1024 * 1024, "largest request body (413 beyond)"),
    Setting(
        "pyservd",
        "max_params",
        _integer(1),
        1000,
        "query string fields plus form fields or parts per request (400 beyond)",
    ),
    Setting(
        "pyservd",
        "max_param_bytes",
        _size,
        1024 * 1024,
        "query string plus form data held in memory (400 for the query, 413 for a body)",
    ),
    Setting(
        "pyservd",
        "max_header_bytes",
        _size,
        64 * 1024,
        "request header names and values together (431 beyond)",
    ),
    Setting("app", "mount", _mount, _REQUIRED, "URL path the app is served under"),
    Setting("app", "module", _module, _REQUIRED, "module defining the servlet classes"),
    Setting("app", "pythonpath", _paths, (), "directories prepended to sys.path", is_path=True),
    Setting(
        "app",
        "session_store",
        _session_store,
        "file",
        "where sessions live: file (session_dir), redis://HOST:PORT/DB or rediss://…",
    ),
    Setting(
        "app",
        "session_dir",
        _optional(str),
        None,
        "directory of session files (session_store = file)",
        is_path=True,
    ),
    Setting(
        "app",
        "session_store_password_file",
        _optional(str),
        None,
        "file holding the Redis password (session_store = redis://…)",
        is_path=True,
    ),
    Setting(
        "app",
        "session_route",
        _optional(_route),
        None,
        "route appended to session cookies (.ROUTE) for mod_proxy_balancer stickysession",
    ),
    Setting("app", "session_timeout", _integer(1), 3600, "idle seconds before a session expires"),
    Setting("app", "session_cookie", _cookie_name, "PYSERVSID", "session cookie name"),
    Setting(
        "app",
        "secret_file",
        _optional(str),
        None,
        "session key file (created 0600); default <session_dir>/.secret",
        is_path=True,
    ),
    Setting("app", "session_cache_size", _integer(0), 10000, "sessions kept in memory per worker"),
    Setting("app", "session_fsync", _boolean, False, "fsync every session write"),
    Setting(
        "app",
        "session_lock_timeout",
        _seconds,
        10.0,
        "seconds to wait for a busy session (503 beyond)",
    ),
    Setting(
        "app",
        "max_session_bytes",
        _size,
        1024 * 1024,
        "largest session, pickled (a bigger one is not stored: 500)",
    ),
    Setting(
        "app",
        "max_sessions",
        _integer(0),
        0,
        "stored sessions; beyond, a request creating one gets 503 (0 = unlimited)",
    ),
    Setting(
        "app",
        "new_session_timeout",
        _integer(0),
        300,
        "idle seconds of a new session until its cookie comes back (0 = session_timeout)",
    ),
)


@dataclass(frozen=True)
class ServerConfig:
    listen: ListenAddress
    socket_mode: int
    socket_group: str | None
    user: str | None
    workers: int
    threads: int
    request_timeout: float
    read_timeout: float
    max_connections: int
    graceful_timeout: float
    max_requests: int
    pidfile: str | None
    control_socket: str | None
    error_log: str
    access_log: str | None
    log_level: str
    max_body: int
    max_params: int
    max_param_bytes: int
    max_header_bytes: int


@dataclass(frozen=True)
class AppConfig:
    name: str
    mount: str
    module: str
    pythonpath: tuple[str, ...]
    session_store: str
    session_dir: str | None
    session_store_password_file: str | None
    session_route: str | None
    session_timeout: int
    session_cookie: str
    secret_file: str | None
    session_cache_size: int
    session_fsync: bool
    session_lock_timeout: float
    max_session_bytes: int
    max_sessions: int
    new_session_timeout: int


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    apps: tuple[AppConfig, ...]

    def dump(self) -> str:
        """Every setting as sorted ``section.key = value`` lines (``pyservd --check -v``)."""
        lines = [f"pyservd.{f.name} = {getattr(self.server, f.name)}" for f in fields(self.server)]
        for app in self.apps:
            lines += [f"app:{app.name}.{f.name} = {getattr(app, f.name)}" for f in fields(app)]
        return "\n".join(sorted(lines))


def _section_values(
    path: str, parser: configparser.ConfigParser, section: str, kind: str
) -> dict[str, Any]:
    base = os.path.dirname(os.path.abspath(path))
    table = {s.key: s for s in SETTINGS if s.section == kind}
    raw = dict(parser.items(section, raw=True))
    unknown = sorted(set(raw) - set(table))
    if unknown:
        known = ", ".join(sorted(table))
        raise ConfigError(f"{path}: [{section}] unknown key {unknown[0]!r} (known: {known})")
    values: dict[str, Any] = {}
    for key, setting in table.items():
        if key not in raw:
            if setting.default is _REQUIRED:
                raise ConfigError(f"{path}: [{section}] {key} is required ({setting.help})")
            values[key] = setting.default
            continue
        text = raw[key].strip()
        try:
            value = setting.convert(text)
        except ValueError as exc:
            shown = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", text)  # never a password
            raise ConfigError(f"{path}: [{section}] {key} = {shown!r}: {exc}") from None
        if setting.is_path and value not in (None, "-"):
            if isinstance(value, tuple):
                value = tuple(os.path.normpath(os.path.join(base, p)) for p in value)
            else:
                value = os.path.normpath(os.path.join(base, value))
        values[key] = value
    return values


def load(path: str) -> Config:
    """Read and validate *path*; raise :class:`ConfigError` with one line on any problem."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\x00"
    )
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a valid INI file: {first_line}") from None
    server = None
    apps = []
    for section in parser.sections():
        if section == "pyservd":
            values = _section_values(path, parser, section, "pyservd")
            if values["control_socket"] is None and values["listen"].kind == "unix":
                directory = os.path.dirname(values["listen"].path)
                values["control_socket"] = os.path.join(directory, "pyservd.ctl")
            server = ServerConfig(**values)
        elif section.startswith("app:") and re.fullmatch(r"[A-Za-z0-9_.-]+", section[4:]):
            values = _section_values(path, parser, section, "app")
            apps.append(AppConfig(name=section[4:], **values))
        else:
            raise ConfigError(
                f"{path}: unknown section [{section}] (expected [pyservd], [app:NAME])"
            )
    if server is None:
        raise ConfigError(f"{path}: missing section [pyservd]")
    if not apps:
        raise ConfigError(f"{path}: no [app:NAME] section: nothing to serve")
    _check_apps(path, apps)
    return Config(os.path.abspath(path), server, tuple(apps))


def _check_apps(path: str, apps: list[AppConfig]) -> None:
    seen_mounts: dict[str, str] = {}
    seen_dirs: dict[str, str] = {}
    for app in apps:
        _check_store(path, app)
        for seen, value, what in (
            (seen_mounts, app.mount, "mount"),
            (seen_dirs, app.session_dir, "session_dir"),
        ):
            if value is None:
                continue
            if value in seen:
                raise ConfigError(
                    f"{path}: [app:{app.name}] {what} = {value!r}: already used by "
                    f"[app:{seen[value]}]"
                )
            seen[value] = app.name


def _check_store(path: str, app: AppConfig) -> None:
    """The keys each kind of session store needs, and no keys of another kind."""
    where = f"{path}: [app:{app.name}]"
    if app.session_store == "file":
        if app.session_dir is None:
            raise ConfigError(f"{where} session_dir is required (directory of session files)")
        if app.session_store_password_file is not None:
            raise ConfigError(
                f"{where} session_store_password_file is for session_store = redis://…"
            )
        return
    if app.session_dir is not None:
        raise ConfigError(
            f"{where} session_dir is for session_store = file; sessions are in {app.session_store}"
        )
    if app.secret_file is None:
        raise ConfigError(
            f"{where} secret_file is required with session_store = {app.session_store}: "
            "every host must sign sessions with the same key file"
        )
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        reason = (
            "the redis package is not installed (pip install 'pyserv[redis]')"
            if exc.name == "redis"
            else f"cannot import redis: {exc}"
        )
        raise ConfigError(f"{where} session_store = {app.session_store}: {reason}") from None
