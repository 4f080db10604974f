"""``pyservd --reload`` (development): replace the workers when code or config changes.

The master polls modification times of the config file and of the ``.py`` files under
each app's ``pythonpath`` (it never imports app code), and on a change reloads exactly
as on HUP: a new generation of workers imports the new code, and the old one is retired
once it has booted. Sessions live in the store, so they survive.
"""

from __future__ import annotations

import os

from .config import Config

MAX_FILES = 10_000  # a pythonpath that is a whole filesystem is a mistake, not a project


def _watched_files(config: Config) -> list[str]:
    files = [config.path]
    for app in config.apps:
        for directory in app.pythonpath:
            for root, dirs, names in os.walk(directory):
                dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
                files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
                if len(files) > MAX_FILES:
                    return files
    return files


def snapshot(config: Config) -> dict[str, int]:
    """{path: mtime_ns} of everything that a change should reload for."""
    times = {}
    for path in _watched_files(config):
        try:
            times[path] = os.stat(path).st_mtime_ns
        except OSError:
            continue
    return times


class ChangeWatcher:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._times = snapshot(config)

    def changed(self, config: Config) -> list[str]:
        """Paths added, removed or modified since the last call (for *config* now)."""
        times = snapshot(config)
        changes = sorted(
            path
            for path in times.keys() | self._times.keys()
            if times.get(path) != self._times.get(path)
        )
        self._times = times
        return changes
