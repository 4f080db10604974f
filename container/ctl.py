"""``pyservctl``: operate pyservd — status and reload through its control socket, and
session maintenance done on the session directories themselves, so that it works with
the daemon stopped and, with ``--dir``, for CGI deployments without a pyservd config.

Output is for people; ``--json`` gives one JSON object for scripts. Errors are one line on
stderr. Exit codes: 0 ok; 1 the operation failed or found problems; 2 usage, bad path or
bad config; 3 pyservd is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from pyserv.secret import SecretError, secret_path
from pyserv.stores.base import BadEnvelope, StoreError, valid_session_id
from pyserv.stores.file import FileStore

from . import privileges, sessionadmin
from .config import Config, ConfigError, load
from .control import ask

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 2
EX_NOT_RUNNING = 3

DEFAULT_CONFIG = "/etc/pyserv/pyservd.conf"
RELOAD_WAIT = 75.0  # seconds; the master gives a reload's new workers 60 s to boot
RELOAD_POLL = 0.2
VALUE_WIDTH = 200


class CtlError(Exception):
    """Ends the command with one line on stderr and *code* as the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- the daemon: status and reload -----------------------------------------------------


def _load_config(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        raise CtlError(f"config: {exc}", EX_USAGE) from None


def _control_path(config: Config) -> str:
    path = config.server.control_socket
    if not path:
        raise CtlError(
            f"config: {config.path}: [pyservd] has no control socket: set control_socket",
            EX_USAGE,
        )
    return path


def _ask(path: str, command: str) -> dict[str, Any]:
    """One exchange with the master; CtlError with exit 3 if nothing listens at *path*."""
    try:
        reply = ask(path, {"command": command})
    except (FileNotFoundError, ConnectionRefusedError):
        raise CtlError(
            f"pyservd is not running (no control socket at {path})", EX_NOT_RUNNING
        ) from None
    except socket.timeout:
        raise CtlError(f"pyservd did not answer on {path} in time", EX_FAILED) from None
    except PermissionError:
        raise CtlError(
            f"{path}: permission denied (run as pyservd's user or root)", EX_FAILED
        ) from None
    except OSError as exc:
        raise CtlError(f"{path}: {exc.strerror or exc}", EX_FAILED) from None
    except ValueError:
        raise CtlError(f"{path}: pyservd's answer is not JSON", EX_FAILED) from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise CtlError(f"pyservd refused {command!r}: {error or reply!r}", EX_FAILED)
    return reply


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Workers (pid, requests, busy), uptime and the last reload's result."""
    reply = _ask(_control_path(_load_config(args.config)), "status")
    if args.json:
        _print_json(out, reply)
        return EX_OK
    print(
        f"pyservd {reply['pid']}: up {_duration(reply['uptime'])}, generation "
        f"{reply['generation']}, {reply['requests']} requests served",
        file=out,
    )
    reload_text = reply["last_reload"]
    if reply.get("reload_in_progress"):
        reload_text = f"in progress (previous: {reload_text})"
    print(f"last reload: {reload_text}", file=out)
    print(f"{'PID':>8}  {'GEN':>3}  {'PROTOCOL':<8}  {'STATE':<8}  {'REQUESTS':>8}  BUSY", file=out)
    for worker in reply["workers"]:
        line = (
            f"{worker['pid']:>8}  {worker['generation']:>3}  {worker['protocol']:<8}  "
            f"{worker['state']:<8}  {worker['requests']:>8}  {worker['busy']:>4}"
        )
        print(line + ("  retiring" if worker.get("retiring") else ""), file=out)
    return EX_OK


def cmd_reload(args: argparse.Namespace, out: TextIO) -> int:
    """Ask for a reload and, unless ``--no-wait``, wait until the new generation serves
    (or the master gives up on it): exit 0 only for a reload that took effect."""
    path = _control_path(_load_config(args.config))
    result = _ask(path, "reload")["reload"]
    status: dict[str, Any] = {}
    if result == "started" and not args.no_wait:
        deadline = time.monotonic() + RELOAD_WAIT
        while True:
            status = _ask(path, "status")
            if not status["reload_in_progress"]:
                result = status["last_reload"]
                break
            if time.monotonic() > deadline:
                raise CtlError(
                    f"reload still in progress after {RELOAD_WAIT:g} s: see pyservctl status",
                    EX_FAILED,
                )
            time.sleep(RELOAD_POLL)
    failed = result.startswith("failed")
    if args.json:
        _print_json(
            out,
            {
                "reload": result,
                "generation": status.get("generation"),
                "workers": [w["pid"] for w in status.get("workers", []) if not w["retiring"]],
            },
        )
    elif failed:
        print(f"pyservctl: reload {result}", file=sys.stderr)
    elif result == "started":
        print("reload started", file=out)
    else:
        workers = ", ".join(str(w["pid"]) for w in status["workers"] if not w["retiring"])
        print(f"reload {result}: generation {status['generation']}, workers {workers}", file=out)
    return EX_FAILED if failed else EX_OK


# -- sessions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One session directory to work on: a configured app's, or ``--dir``'s."""

    app: str | None
    store: FileStore
    pythonpath: tuple[str, ...] = ()  # the app's, for unpickling its classes in `show`

    @property
    def label(self) -> str:
        directory = self.store.directory
        return f"{self.app} ({directory})" if self.app else directory

    def describe(self) -> dict[str, Any]:
        return {"app": self.app, "directory": self.store.directory}


def _targets(args: argparse.Namespace) -> list[Target]:
    """The session directories the command works on; CtlError(2) if one is missing."""
    if args.dir is not None:
        if args.app is not None:
            raise CtlError("--app and --dir cannot be combined", EX_USAGE)
        directory = os.path.abspath(args.dir)
        secret = secret_path(args.secret_file, directory)
        targets = [Target(None, sessionadmin.open_store(directory, secret))]
    else:
        if args.secret_file is not None:
            raise CtlError(
                "--secret-file goes with --dir (else set secret_file in the config)", EX_USAGE
            )
        config = _load_config(args.config)
        apps = [a for a in config.apps if args.app in (None, a.name)]
        if not apps:
            known = ", ".join(a.name for a in config.apps)
            raise CtlError(f"{config.path}: no [app:{args.app}] (apps: {known})", EX_USAGE)
        for app in apps:
            if app.session_dir is None:
                raise CtlError(
                    f"{config.path}: [app:{app.name}] keeps its sessions in "
                    f"{app.session_store}, which expires them itself; pyservctl sessions "
                    "works on session directories (choose another app with --app)",
                    EX_USAGE,
                )
        targets = [
            Target(
                app.name,
                sessionadmin.open_store(
                    app.session_dir, secret_path(app.secret_file, app.session_dir)
                ),
                app.pythonpath,
            )
            for app in apps
        ]
    for target in targets:
        if not os.path.isdir(target.store.directory):
            raise CtlError(f"{target.store.directory}: no such session directory", EX_USAGE)
    _become_owner(targets)
    return targets


def _become_owner(targets: list[Target]) -> None:
    """Run as root, become the user who owns the session directories (the workers' user)
    before touching them: lock files and the quarantine directory we create must stay
    theirs, or the workers could no longer lock those sessions or move files aside."""
    if os.geteuid() != 0:
        return
    owners = {os.stat(t.store.directory).st_uid for t in targets}
    if len(owners) > 1:
        raise CtlError(
            "the session directories have different owners: choose one with --app", EX_USAGE
        )
    uid = owners.pop()
    if uid == 0:
        return
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise CtlError(
            f"{targets[0].store.directory}: owned by uid {uid}, which has no account", EX_USAGE
        ) from None
    privileges.drop_privileges(privileges.Identity(entry.pw_name, uid, entry.pw_gid))


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    """Live sessions and their bytes, expired ones awaiting gc, a histogram by idle time."""
    now = time.time()
    results = [(t, sessionadmin.stats(t.store.directory, now)) for t in _targets(args)]
    if args.json:
        apps = [
            {
                **target.describe(),
                "live": s.live,
                "live_bytes": s.live_bytes,
                "expired": s.expired,
                "expired_bytes": s.expired_bytes,
                "unreadable": s.unreadable,
                "quarantined": s.quarantined,
                "idle_histogram": s.histogram(),
            }
            for target, s in results
        ]
        _print_json(out, {"apps": apps})
        return EX_OK
    for target, s in results:
        print(target.label, file=out)
        print(f"  live         {s.live:>8}  {_bytes(s.live_bytes)}", file=out)
        print(f"  expired      {s.expired:>8}  {_bytes(s.expired_bytes)} (until gc)", file=out)
        print(f"  unreadable   {s.unreadable:>8}{_verify_hint(s.unreadable)}", file=out)
        print(f"  quarantined  {s.quarantined:>8}", file=out)
        print("  live sessions by idle time:", file=out)
        for bucket in s.histogram():
            print(f"    {bucket['idle']:<10} {bucket['count']:>8}", file=out)
    return EX_OK


def cmd_expire(args: argparse.Namespace, out: TextIO) -> int:
    """End the sessions idle longer than ``--idle`` minutes (in-use ones are skipped)."""
    idle = args.idle * 60
    return _report_removal(
        args, out, lambda store, now: sessionadmin.expire_idle(store, idle, now), "idle"
    )


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    """Remove expired sessions, exactly as the cron sweeper does."""
    return _report_removal(args, out, sessionadmin.collect_garbage, "expired")


def _report_removal(
    args: argparse.Namespace,
    out: TextIO,
    remove: Callable[[FileStore, float], sessionadmin.Removal],
    what: str,
) -> int:
    targets = _targets(args)
    now = time.time()
    results = [(t, remove(t.store, now)) for t in targets]
    if args.json:
        apps = [
            {**t.describe(), "removed": r.removed, "in_use": r.in_use, "unreadable": r.unreadable}
            for t, r in results
        ]
        _print_json(out, {"apps": apps})
        return EX_OK
    for target, r in results:
        line = f"{target.label}: removed {r.removed} {what} session(s)"
        if r.in_use:
            line += f"; {r.in_use} in use, skipped"
        if r.unreadable:
            line += f"; {r.unreadable} unreadable{_verify_hint(r.unreadable)}"
        print(line, file=out)
    return EX_OK


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    """Check every envelope; move the bad files to quarantine. Exit 1 if any was bad."""
    results = [(t, sessionadmin.verify(t.store)) for t in _targets(args)]
    if args.json:
        apps = [
            {
                **t.describe(),
                "checked": v.checked,
                "good": v.good,
                "bad": len(v.bad),
                "quarantined": [b.quarantined_to for b in v.bad if b.quarantined_to],
                "in_use": v.in_use,
                "problems": [
                    {"session": b.fingerprint, "reason": b.reason, "moved_to": b.quarantined_to}
                    for b in v.bad
                ],
            }
            for t, v in results
        ]
        _print_json(out, {"apps": apps})
    else:
        for target, v in results:
            print(f"{target.label}: {v.checked} checked, {v.good} good, {len(v.bad)} bad", file=out)
            for bad in v.bad:
                where = (
                    f"moved to {bad.quarantined_to}"
                    if bad.quarantined_to
                    else "in use, left in place (run verify again)"
                )
                print(f"  session {bad.fingerprint}: {bad.reason}; {where}", file=out)
    return EX_FAILED if any(v.bad for _, v in results) else EX_OK


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """One session's keys and pickled sizes; values only with ``--values``."""
    sid = args.id if args.id is not None else args.dashed_id
    if sid is None:
        raise CtlError("sessions show: give the session ID", EX_USAGE)
    if not valid_session_id(sid):
        raise CtlError("not a session id (expected 43 characters of A-Z a-z 0-9 _ -)", EX_USAGE)
    targets = _targets(args)
    for target in targets:
        try:
            view = sessionadmin.find_session(target.store, sid, target.pythonpath)
        except BadEnvelope as exc:
            raise CtlError(
                f"{target.label}: the session fails verification ({exc}); "
                "pyservctl sessions verify moves it aside",
                EX_FAILED,
            ) from None
        except sessionadmin.Unpicklable as exc:
            raise CtlError(
                f"{target.label}: the session verifies but cannot be unpickled here ({exc}); "
                "are the app's modules importable (pythonpath, PYTHONPATH)?",
                EX_FAILED,
            ) from None
        if view is not None:
            _print_session(args, out, target, view)
            return EX_OK
    searched = ", ".join(t.label for t in targets)
    raise CtlError(f"no such session in {searched}", EX_FAILED)


def _print_session(
    args: argparse.Namespace, out: TextIO, target: Target, view: sessionadmin.SessionView
) -> None:
    now = time.time()
    idle = max(now - view.mtime, 0.0)
    header = view.header
    expired = idle > header.idle_timeout
    keys = [
        {"key": _key_text(key), "size": size, **({"value": _value_text(v)} if args.values else {})}
        for key, size, v in view.items
    ]
    if args.json:
        _print_json(
            out,
            {
                **target.describe(),
                "session": view.fingerprint,
                "generation": header.generation,
                "created": header.created,
                "last_access": view.mtime,
                "idle_seconds": round(idle, 1),
                "timeout": header.timeout,
                "provisional_timeout": header.new_timeout or None,
                "idle_timeout": header.idle_timeout,
                "expired": expired,
                "bytes": view.size,
                "keys": keys,
            },
        )
        return
    state = "expired" if expired else f"expires in {_duration(header.idle_timeout - idle)}"
    if header.new_timeout:
        state += f"; provisional: {header.new_timeout} s until its cookie comes back"
    print(f"session {view.fingerprint} in {target.label}", file=out)
    print(f"  created      {_when(header.created, now)}", file=out)
    print(f"  last access  {_when(view.mtime, now)}", file=out)
    print(f"  timeout      {header.timeout} s ({state})", file=out)
    print(f"  generation   {header.generation}", file=out)
    print(f"  stored       {_bytes(view.size)}", file=out)
    width = max([len(k["key"]) for k in keys] + [3])
    print(f"  {'KEY':<{width}}  {'SIZE':>8}  VALUE", file=out)
    for k in keys:
        value = k["value"] if args.values else "*** (--values shows it)"
        print(f"  {k['key']:<{width}}  {k['size']:>8}  {value}", file=out)


# -- formatting --------------------------------------------------------------------------


def _print_json(out: TextIO, value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True), file=out)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _when(timestamp: float, now: float) -> str:
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{text} ({_duration(now - timestamp)} ago)"


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"


def _verify_hint(count: int) -> str:
    return " (pyservctl sessions verify moves them aside)" if count else ""


def _key_text(key: object) -> str:
    return key if isinstance(key, str) else repr(key)


def _value_text(value: object) -> str:
    text = repr(value)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes (a number), not {text!r}") from None
    if not 0 <= value < 10**8:
        raise argparse.ArgumentTypeError(f"expected minutes >= 0, not {text!r}")
    return value


# -- command line ------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """--config and --json, accepted before or after the command (SUPPRESS below the top
    level, so that a subcommand does not reset what was given before it)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG if top else argparse.SUPPRESS,
        help=f"pyservd's configuration (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="one JSON object on stdout, for scripts",
    )


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app", metavar="NAME", default=argparse.SUPPRESS, help="only this app (default: all)"
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="a session directory without a pyservd config (CGI deployments)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="with --dir: the session key file (default DIR/.secret)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyservctl",
        description="Operate pyservd and its session directories.",
        epilog="exit codes: 0 ok, 1 failed or problems found, 2 usage, path or config, "
        "3 pyservd not running",
    )
    _add_common(parser, top=True)
    parser.set_defaults(app=None, dir=None, secret_file=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser("status", help="workers, uptime, last reload")
    status.set_defaults(run=cmd_status)
    reload = commands.add_parser("reload", help="replace the workers by a new generation")
    reload.add_argument(
        "--no-wait", action="store_true", help="return once started, not once it took effect"
    )
    reload.set_defaults(run=cmd_reload)

    sessions = commands.add_parser("sessions", help="inspect and clean session directories")
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = actions.add_parser("stats", help="live count, bytes, histogram by idle time")
    stats.set_defaults(run=cmd_stats)
    expire = actions.add_parser("expire", help="end sessions idle longer than --idle")
    expire.add_argument("--idle", metavar="MINUTES", type=_minutes, required=True)
    expire.set_defaults(run=cmd_expire)
    show = actions.add_parser("show", help="one session's keys and sizes")
    show.add_argument("id", metavar="ID", nargs="?", help="the session id (the cookie's value)")
    show.add_argument("--id", dest="dashed_id", help=argparse.SUPPRESS)  # see _quote_ids
    show.add_argument("--values", action="store_true", help="show repr() of each value")
    show.set_defaults(run=cmd_show)
    verify = actions.add_parser("verify", help="check every envelope, quarantine bad files")
    verify.set_defaults(run=cmd_verify)
    gc = actions.add_parser("gc", help="remove expired sessions (as the sweeper does)")
    gc.set_defaults(run=cmd_gc)

    for sub in (status, reload, sessions, stats, expire, show, verify, gc):
        _add_common(sub, top=False)
    for sub in (sessions, stats, expire, show, verify, gc):
        _add_session_options(sub)
    return parser


def _quote_ids(argv: Sequence[str]) -> list[str]:
    """Pass a session id that begins with "-" (one in 64 do) as ``--id=ID``, else argparse
    takes it for an option. No option looks like an id (43 characters), and nothing
    after ``--`` is touched."""
    quoted = list(argv)
    for index, arg in enumerate(quoted):
        if arg == "--":
            break
        if arg.startswith("-") and valid_session_id(arg):
            quoted[index] = f"--id={arg}"
    return quoted


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_quote_ids(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    try:
        return args.run(args, sys.stdout)
    except CtlError as exc:
        print(f"pyservctl: {exc}", file=sys.stderr)
        return exc.code
    except SecretError as exc:
        print(f"pyservctl: {exc}", file=sys.stderr)
        return EX_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pyservctl: {where}{exc.strerror or exc}", file=sys.stderr)
        return EX_FAILED
    except StoreError as exc:  # e.g. StoreUnavailable: a read-only or full directory
        print(f"pyservctl: {exc}", file=sys.stderr)
        return EX_FAILED


if __name__ == "__main__":
    sys.exit(main())
