"""The session secret: read from a key file, created 0600 on first use if missing.

Creation is race-free across processes (write a temp file, then ``os.link`` it into
place), so many CGI processes starting at once agree on one key.
"""

from __future__ import annotations

import os
import stat

MIN_KEY_BYTES = 32


class SecretError(Exception):
    """The key file cannot be read or created; the message says what to configure."""


def secret_path(secret_file: str | None, session_dir: str | None) -> str:
    """The key file an application uses: *secret_file*, else ``<session_dir>/.secret``.

    The one rule, for the applications and for every tool that must read their key.
    """
    if secret_file is not None:
        return secret_file
    if session_dir is None:
        raise ValueError("set secret_file: there is no session_dir to keep the key in")
    return os.path.join(session_dir, ".secret")


def load_or_create_secret(path: str) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    import secrets  # once per deployment: a CGI process that only reads the key skips it

    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temp = f"{path}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as stream:
                stream.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
            try:
                os.link(temp, path)
            except FileExistsError:
                pass  # another process won the race; use its key
        finally:
            os.unlink(temp)
        return _read(path)
    except OSError as exc:
        raise SecretError(
            f"cannot create the session secret file {path!r}: {exc.strerror}; "
            "set secret_file to a writable path or create the file (mode 0600)"
        ) from None


def read_secret(path: str) -> bytes:
    """The key in *path*, never created: for tools, where a new key would make every
    stored session invalid. A missing file is a :class:`SecretError` naming it."""
    try:
        return _read(path)
    except FileNotFoundError:
        raise SecretError(
            f"no session secret file {path!r} (it is created when the first session is "
            "stored; point secret_file at the right one)"
        ) from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            key = stream.read().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretError(f"cannot read the session secret file {path!r}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"session secret file {path!r} is readable by others: chmod 600 {path}")
    if len(key) < MIN_KEY_BYTES:
        raise SecretError(
            f"session secret file {path!r} holds {len(key)} bytes, need at least {MIN_KEY_BYTES}"
        )
    return key
