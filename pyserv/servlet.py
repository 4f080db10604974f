"""The optional servlet base class and the context servlets are initialised with.

A servlet is any class with ``run(self, request, response)``. Subclassing
:class:`Servlet` adds method dispatch: ``do_GET``, ``do_POST``… found by name, HEAD
answered by ``do_GET`` (the body is dropped), OPTIONS and 405 answered from the set of
methods the class defines, with an ``Allow`` header.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import HTTPError
from .request import Request
from .response import Response
from .session import SessionAttribute

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    import logging
    from typing import Any, ClassVar

    from .errors import LazyLogger


class ServletContext:
    """What ``init(context)`` receives: the app's identity, settings and a shared dict."""

    def __init__(
        self,
        app_name: str,
        mount: str,
        module: str,
        settings: Mapping[str, Any],
        log: LazyLogger | logging.Logger,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self.app_name = app_name
        self.mount = mount
        self.module = module
        self.settings = settings
        self.log = log
        self.attributes: dict[str, Any] = {} if attributes is None else attributes

    def __repr__(self) -> str:
        return f"<ServletContext {self.app_name!r} module={self.module!r} mount={self.mount!r}>"


class Servlet:
    """Base class with per-method handlers; instances live as long as the worker.

    ``init(context)`` runs once before the first request, ``destroy()`` at shutdown.
    Handlers may run concurrently in several threads: keep per-request state in locals
    and per-user state in ``self.session``.
    """

    session = SessionAttribute()
    allowed_methods: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        methods = {name[3:] for name in dir(cls) if name.startswith("do_") and name[3:].isupper()}
        if "GET" in methods:
            methods.add("HEAD")
        cls.allowed_methods = frozenset(methods | {"OPTIONS"})

    def init(self, context: ServletContext) -> None:
        """Called once, before the first request; an exception fails start-up."""

    def destroy(self) -> None:
        """Called once at shutdown."""

    def run(self, request: Request, response: Response) -> None:
        method = request.method
        handler = getattr(self, f"do_{method}", None) if method.isupper() else None
        if handler is None and method == "HEAD":
            handler = getattr(self, "do_GET", None)
        if handler is not None:
            handler(request, response)
        elif method == "OPTIONS":
            response.status = 204
            response.headers.set("Allow", self._allow_header())
        else:
            raise HTTPError(405, f"{method} not allowed", headers=[("Allow", self._allow_header())])

    def _allow_header(self) -> str:
        return ", ".join(sorted(self.allowed_methods))
