"""Whom a worker runs as, and whether its session directories are safe to use.

Started as root, pyservd must be told whom to run servlets as (``user`` in ``[pyservd]``)
and refuses to start without it: a servlet is application code, and root would let any
bug in it own the machine. The master keeps root, as gunicorn's does, because it needs it
for the life of the daemon: each worker it forks (at start, on reload, to replace one
that died) drops privileges itself, and the master reopens its log files on USR1. It
never imports a servlet module, opens a session or reads a request.

Each worker, before it imports a servlet module or touches a session, in this order:

1. checks every app's session directory (created 0700 for the user if missing): it must
   be owned by that user and writable by nobody else, or a local user could plant or
   swap session files, which the workers trust once signed;
2. drops privileges: supplementary groups (``initgroups``), then gid, then uid, since
   after ``setuid`` nothing else may be changed; then checks that root cannot come back;
3. checks as that user that each directory is writable (not on a read-only file system)
   and that the session key can be read or created.

A failure is one line naming the path and what to do; the worker exits with
``EXIT_BOOT_FAILED``, so pyservd exits 78 at start and keeps the old workers on reload.
Started as another user, pyservd runs as that user: ``user`` may then only name it.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
from dataclasses import dataclass

from pyserv.secret import secret_path

from .config import AppConfig, Config, ConfigError

_LAX_BITS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Identity:
    """The account workers run as."""

    name: str
    uid: int
    gid: int


def worker_identity(config: Config) -> Identity | None:
    """The account to switch to, None to stay as we are; ConfigError when not allowed."""
    user = config.server.user
    euid = os.geteuid()
    if euid == 0:
        if user is None:
            raise ConfigError(
                f"{config.path}: [pyservd] user is not set and pyservd runs as root: "
                "set user = the account that owns the session directories (e.g. www-data); "
                "servlets never run as root"
            )
        entry = pwd.getpwnam(user)
        if entry.pw_uid == 0:
            raise ConfigError(
                f"{config.path}: [pyservd] user = {user!r}: servlets never run as root; "
                "name an unprivileged account"
            )
        return Identity(user, entry.pw_uid, entry.pw_gid)
    if user is not None and pwd.getpwnam(user).pw_uid != euid:
        current = _user_name(euid)
        raise ConfigError(
            f"{config.path}: [pyservd] user = {user!r}: pyservd runs as {current!r}, not "
            "root, and cannot switch users; start it as root or remove user"
        )
    return None


def enter_worker(config: Config) -> None:
    """Check the session directories, drop privileges, check again as the worker's user.

    Call in the worker process before anything imports a servlet module or opens a
    session. Raises ConfigError (one line) on any problem.
    """
    identity = worker_identity(config)
    uid = identity.uid if identity is not None else os.geteuid()
    gid = identity.gid if identity is not None else os.getegid()
    for app in config.apps:
        if app.session_dir is not None:
            _prepare_session_dir(config, app, uid, gid)
    if identity is not None:
        drop_privileges(identity)
    for app in config.apps:
        _check_usable(config, app)


def drop_privileges(identity: Identity) -> None:
    """Become *identity* for good: groups, gid, uid, in the only order that works."""
    os.initgroups(identity.name, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel guarantees this
        raise RuntimeError("privileges could not be dropped: setuid(0) succeeded")


def _prepare_session_dir(config: Config, app: AppConfig, uid: int, gid: int) -> None:
    path = app.session_dir
    where = f"{config.path}: [app:{app.name}] session_dir = {path!r}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)  # parents: the default mode
        guard = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot create its parent: {exc.strerror}; create it (mode 0700, "
            f"owned by {_user_name(uid)})"
        ) from None
    try:
        # Workers start together: one creates and chowns, the others must not see the
        # directory in between (owned by root, they would refuse it).
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot create it: {exc.strerror}; create it (mode 0700, owned by "
                f"{_user_name(uid)})"
            ) from None
        else:
            if os.geteuid() == 0:
                os.chown(path, uid, gid)
        info = os.stat(path)
    finally:
        os.close(guard)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{where}: not a directory")
    if info.st_uid != uid:
        raise ConfigError(
            f"{where}: owned by {_user_name(info.st_uid)!r}, not by {_user_name(uid)!r}, "
            f"whom the workers run as: chown {_user_name(uid)} {path}"
        )
    if info.st_mode & _LAX_BITS:
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            f"{where}: writable by group or others (mode {mode:04o}), who could plant or "
            f"replace sessions: chmod 0700 {path}"
        )


def _check_usable(config: Config, app: AppConfig) -> None:
    """As the workers' user: the session directory (if any) and the key are usable."""
    path = app.session_dir
    if path is not None:
        where = f"{config.path}: [app:{app.name}] session_dir = {path!r}"
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise ConfigError(f"{where}: on a read-only file system: sessions cannot be stored")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: not writable by {_user_name(os.geteuid())!r}")
    _check_secret(config, app)


def _check_secret(config: Config, app: AppConfig) -> None:
    secret = secret_path(app.secret_file, app.session_dir)
    if os.path.exists(secret):
        if not os.access(secret, os.R_OK):
            raise ConfigError(
                f"{config.path}: [app:{app.name}] session key {secret!r}: not readable by "
                f"{_user_name(os.geteuid())!r}: chown it to that user (mode 0600)"
            )
    elif not os.access(os.path.dirname(secret) or ".", os.W_OK | os.X_OK):
        raise ConfigError(
            f"{config.path}: [app:{app.name}] session key {secret!r}: missing, and "
            f"{_user_name(os.geteuid())!r} cannot create it there: create it (64 hex "
            "characters, mode 0600, owned by that user) or set secret_file elsewhere"
        )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
