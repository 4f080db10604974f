"""Each application's session store, built from its config.

``session_store = file`` keeps sessions in ``session_dir``; ``redis://HOST:PORT/DB`` (or
``rediss://``) keeps them in Redis, shared by every pyservd host. Workers build their
stores after fork; the master only checks, before the first workers start, that a Redis
store can be reached, so that a daemon started while Redis is down says so and exits
instead of serving 503s.
"""

from __future__ import annotations

from pyserv.secret import load_or_create_secret, secret_path
from pyserv.stores.base import Envelope, SessionStore, StoreUnavailable

from .config import AppConfig, Config, ConfigError

EX_UNAVAILABLE = 69  # sysexits.h: a service we need is down (systemd may restart us)
LOCK_LEASE_MARGIN = 10.0  # seconds a Redis lock outlives request_timeout


def build_store(app: AppConfig, config: Config) -> SessionStore:
    """The store *app* uses, its key read (or created) when a session is first used."""
    key_file = secret_path(app.secret_file, app.session_dir)
    envelope = Envelope(lambda: load_or_create_secret(key_file), max_bytes=app.max_session_bytes)
    if app.session_store == "file":
        from pyserv.stores.file import FileStore

        assert app.session_dir is not None  # config.load checks it
        store = FileStore(app.session_dir, envelope, fsync=app.session_fsync)
        store.ensure_directory()
        return store
    from pyserv.stores.redis import RedisStore

    return RedisStore(
        app.session_store,
        envelope,
        prefix=f"pyserv:{app.name}:",
        password=_read_password(app, config),
        lock_lease=config.server.request_timeout + LOCK_LEASE_MARGIN,
    )


def check_reachable(config: Config) -> None:
    """Raise StoreUnavailable (one line naming the app) if a Redis store cannot be used.

    ConfigError if a password file cannot be read.
    """
    for app in config.apps:
        if app.session_store == "file":
            continue
        store = build_store(app, config)
        try:
            store.ping()
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"{config.path}: [app:{app.name}] session_store = {app.session_store}: {exc}"
            ) from None
        finally:
            store.close()


def _read_password(app: AppConfig, config: Config) -> str | None:
    path = app.session_store_password_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"{config.path}: [app:{app.name}] session_store_password_file = {path!r}: "
            f"cannot read: {reason}"
        ) from None
