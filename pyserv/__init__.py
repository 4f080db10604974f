"""PyServ: servlets for Python, with sessions managed for you.

Public names: :class:`Servlet`, :class:`HTTPError`, :func:`cgimain`,
:class:`Application` (the WSGI core) and :class:`AppSettings`. They are imported on first
use, so a CGI process that only needs ``cgimain`` does not pay for the rest.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

_EXPORTS = {
    "Application": "application",
    "AppSettings": "application",
    "HTTPError": "errors",
    "Servlet": "servlet",
    "ServletContext": "servlet",
    "cgimain": "cgi",
    "Request": "request",
    "Response": "response",
    "Session": "session",
}
__all__ = [
    "AppSettings",
    "Application",
    "HTTPError",
    "Request",
    "Response",
    "Servlet",
    "ServletContext",
    "Session",
    "cgimain",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any

    from .application import Application, AppSettings
    from .cgi import cgimain
    from .errors import HTTPError
    from .request import Request
    from .response import Response
    from .servlet import Servlet, ServletContext
    from .session import Session


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyserv' has no attribute {name!r}")
    qualified = f"{__name__}.{module}"
    __import__(qualified)  # not importlib.import_module: importlib costs CGI its import
    value = getattr(sys.modules[qualified], name)
    globals()[name] = value
    return value
