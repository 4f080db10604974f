"""The configured applications as one WSGI callable, routed by mount.

Used by workers (after fork, so that a reload imports fresh code), by the development
HTTP listener and by ``pyservd --check``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any, Callable

from pyserv.application import Application, AppSettings
from pyserv.errors import error_response
from pyserv.request import RequestLimits

from .cache import CachedStore
from .config import AppConfig, Config, ConfigError
from .stores import build_store


def import_module(app: AppConfig, config_path: str) -> Any:
    """Import *app*'s module (its pythonpath first); ConfigError in one line on failure."""
    for directory in reversed(app.pythonpath):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        return importlib.import_module(app.module)
    except Exception as exc:
        raise ConfigError(
            f"{config_path}: [app:{app.name}] module = {app.module!r}: cannot import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def build_application(app: AppConfig, config: Config) -> Application:
    settings = AppSettings(
        name=app.name,
        module=app.module,
        session_dir=app.session_dir,
        mount=app.mount,
        session_timeout=app.session_timeout,
        session_cookie=app.session_cookie,
        secret_file=app.secret_file,
        session_fsync=app.session_fsync,
        session_lock_timeout=app.session_lock_timeout,
        max_session_bytes=app.max_session_bytes,
        max_sessions=app.max_sessions,
        new_session_timeout=app.new_session_timeout,
        session_route=app.session_route,
        limits=RequestLimits(
            max_body=config.server.max_body,
            max_params=config.server.max_params,
            max_param_bytes=config.server.max_param_bytes,
            max_header_bytes=config.server.max_header_bytes,
        ),
    )
    return Application(
        settings,
        store=CachedStore(build_store(app, config), app.session_cache_size),
        module=import_module(app, config.path),
    )


class Router:
    """Sends each request to the application whose mount prefixes its path."""

    def __init__(self, applications: Iterable[Application]) -> None:
        # Longest mount first, so /a/b wins over /a.
        self.applications = sorted(
            applications, key=lambda a: len(a.settings.mount or ""), reverse=True
        )

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        for application in self.applications:
            if application.serves(environ):
                return application(environ, start_response)
        response = error_response(404, "no application is mounted here")
        start_response(response.status_line, response.headers.items())
        return [response.body]

    def load_servlets(self) -> None:
        for application in self.applications:
            application.load_servlets()

    def close(self) -> None:
        for application in self.applications:
            application.close()

    def stores(self) -> list[Any]:
        return [application.store for application in self.applications]


def build_router(config: Config) -> Router:
    return Router(build_application(app, config) for app in config.apps)
