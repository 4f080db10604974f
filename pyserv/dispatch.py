"""URL → servlet: which names are servlets, and one instance per servlet class.

A name is a servlet if it matches ``^[A-Za-z][A-Za-z0-9_]*$`` and names a class defined
in the app's module itself (``cls.__module__`` is that module) with a ``run`` method;
if the module lists ``__servlets__``, only those names. Anything else — ``os``, ``sys``,
functions, constants, imported classes, ``_private``, ``__class__`` — is not found.
"""

from __future__ import annotations

from _thread import allocate_lock  # threading.Lock, without importing threading (CGI)
from types import ModuleType

from .servlet import ServletContext
from .session import SessionAttribute

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any

_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_NAME_CHARS = _LETTERS | frozenset("0123456789_")


def _servlet_name(name: str) -> bool:
    """An ASCII identifier (a letter, then letters, digits, underscores): no dots, no
    dunders first. Sets, not a regex: a CGI process need not import ``re``."""
    return name[:1] in _LETTERS and _NAME_CHARS.issuperset(name)


_SESSION_ATTRIBUTE = SessionAttribute()
_MISSING = object()


class ServletSetupError(Exception):
    """A servlet class cannot be used as written (the message says why)."""


class Dispatcher:
    """Finds servlets by name and keeps one long-lived instance of each. Thread-safe."""

    def __init__(self, module: ModuleType, context: ServletContext) -> None:
        self.module = module
        self.context = context
        self._instances: dict[str, Any] = {}
        self._lock = allocate_lock()
        self._allowed = getattr(module, "__servlets__", None)

    def servlet_class(self, name: str) -> type | None:
        if not _servlet_name(name):
            return None
        if self._allowed is not None and name not in self._allowed:
            return None
        candidate = self.module.__dict__.get(name)
        if (
            isinstance(candidate, type)
            and candidate.__module__ == self.module.__name__
            and callable(getattr(candidate, "run", None))
        ):
            return candidate
        return None

    def servlet_names(self) -> list[str]:
        return sorted(name for name in vars(self.module) if self.servlet_class(name))

    def find(self, name: str) -> Any | None:
        """The instance serving *name*, created (and ``init``-ed) on first use; or None."""
        instance = self._instances.get(name)
        if instance is not None:
            return instance
        cls = self.servlet_class(name)
        if cls is None:
            return None
        with self._lock:
            instance = self._instances.get(name)
            if instance is None:
                instance = self._instantiate(cls)
                self._instances[name] = instance
        return instance

    def load_all(self) -> None:
        """Create and ``init`` every servlet now (a daemon does this before serving)."""
        for name in self.servlet_names():
            self.find(name)

    def destroy_all(self) -> None:
        with self._lock:
            instances, self._instances = list(self._instances.values()), {}
        for instance in instances:
            destroy = getattr(instance, "destroy", None)
            if callable(destroy):
                destroy()

    def _instantiate(self, cls: type) -> Any:
        attribute = getattr(cls, "session", _MISSING)
        if attribute is _MISSING:
            cls.session = _SESSION_ATTRIBUTE  # plain classes get per-request self.session
        elif not isinstance(attribute, SessionAttribute):
            raise ServletSetupError(
                f"{cls.__module__}.{cls.__qualname__} defines 'session' itself; "
                "that name is reserved for the per-request session"
            )
        instance = cls()
        init = getattr(instance, "init", None)
        if callable(init):
            init(self.context)
        return instance
