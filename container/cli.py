"""``pyservd``: command line → validated config → the arbiter (or a check)."""

from __future__ import annotations

import argparse
import sys

import pyserv

from .config import EX_CONFIG, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyservd",
        description="PyServ's FastCGI daemon: serves servlets behind Apache.",
    )
    parser.add_argument("--config", metavar="FILE", help="the INI configuration file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the config and import every app's module, then exit "
        "(0 = good, 78 = one line saying what is wrong)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="with --check: print every setting"
    )
    parser.add_argument(
        "--http", metavar="HOST:PORT", help="also serve plain HTTP on HOST:PORT (development only)"
    )
    parser.add_argument(
        "--reload",
        action="store_true",
        help="replace the workers when the config or the apps' code changes (development)",
    )
    parser.add_argument("--version", action="version", version=f"pyservd {pyserv.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.config:
        print("pyservd: --config FILE is required", file=sys.stderr)
        return 2
    try:
        config = load(args.config)
        if args.check:
            from .apps import import_module

            for app in config.apps:
                import_module(app, config.path)
            if args.verbose:
                print(config.dump())
            print(f"{config.path}: OK ({len(config.apps)} app(s))")
            return 0
        http = _parse_http(args.http) if args.http else None
    except ConfigError as exc:
        print(f"pyservd: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    from .arbiter import Arbiter

    return Arbiter(config, http=http, reload=args.reload).run()


def _parse_http(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


if __name__ == "__main__":
    sys.exit(main())
