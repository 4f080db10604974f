"""Response: status, validated headers, cookies and a buffered body.

The body is buffered by default, so an exception late in a servlet still becomes a clean
500 page; ``flush()`` opts in to streaming. Header names and values are checked as they
are set: CR, LF or NUL (header injection) raises ValueError naming the header, so the
traceback points at the servlet line that did it and nothing bad reaches the wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .errors import reason_phrase

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Callable, Union

    Body = Union[str, bytes, bytearray, memoryview]

# Character sets, not regexes: a CGI process that never imports re saves a few ms.
# RFC 9110 token characters.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 6265 cookie-octet: no CTLs, whitespace, DQUOTE, comma, semicolon or backslash.
_COOKIE_VALUE = frozenset(map(chr, range(0x21, 0x7F))) - frozenset('",;\\')
# Path and Domain: printable ASCII and space, no semicolon.
_COOKIE_ATTRIBUTE = frozenset(map(chr, range(0x20, 0x7F))) - {";"}

MAX_COOKIE_BYTES = 4096

DEFAULT_CONTENT_TYPE = "text/plain; charset=utf-8"


def _is_token(text: str) -> bool:
    return text != "" and _TOKEN.issuperset(text)


def check_header(name: str, value: str) -> None:
    """Raise ValueError unless *name* is a token and *value* is safe latin-1 text."""
    if not isinstance(name, str) or not _is_token(name):
        raise ValueError(f"invalid response header name {name!r}")
    if not isinstance(value, str):
        raise TypeError(f"response header {name!r}: value must be str, not {type(value).__name__}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"response header {name!r}: value contains CR, LF or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"response header {name!r}: value is not latin-1 text") from None


class ResponseHeaders:
    """Ordered (name, value) pairs; names compare case-insensitively.

    ``headers[name] = value`` and ``set`` replace, ``add`` appends (for Set-Cookie).
    After the headers have been sent (``response.flush()``), changes raise RuntimeError.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._sent = False

    def _check_open(self) -> None:
        if self._sent:
            raise RuntimeError("response headers were already sent by response.flush()")

    def add(self, name: str, value: str) -> None:
        check_header(name, value)
        self._check_open()
        self._items.append((name, value))

    def set(self, name: str, value: str) -> None:
        check_header(name, value)
        self._check_open()
        self.remove(name)
        self._items.append((name, value))

    def remove(self, name: str) -> None:
        self._check_open()
        lower = name.lower()
        self._items = [item for item in self._items if item[0].lower() != lower]

    def get(self, name: str, default: str | None = None) -> str | None:
        lower = name.lower()
        for key, value in self._items:
            if key.lower() == lower:
                return value
        return default

    def getall(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self._items if key.lower() == lower]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    __setitem__ = set
    __delitem__ = remove

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._items!r})"


class Response:
    """What a servlet writes to. Not thread-safe: one response belongs to one request.

    ``write(str)`` encodes UTF-8, ``write(bytes)`` passes bytes through. Until
    ``flush()`` everything is buffered and can still be replaced by an error page.
    """

    charset = "utf-8"

    def __init__(self) -> None:
        self._status = 200
        self.headers = ResponseHeaders()
        self.headers.set("Content-Type", DEFAULT_CONTENT_TYPE)
        self._chunks: list[bytes] = []
        self._start: Callable[[Response], Callable[[bytes], object]] | None = None
        self._write_through: Callable[[bytes], object] | None = None

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
            raise ValueError(f"invalid HTTP status {value!r}: expected an int from 100 to 599")
        self.headers._check_open()
        self._status = value

    @property
    def status_line(self) -> str:
        return f"{self._status} {reason_phrase(self._status)}"

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @content_type.setter
    def content_type(self, value: str) -> None:
        self.headers.set("Content-Type", value)

    @property
    def streaming(self) -> bool:
        """True once ``flush()`` has sent the headers."""
        return self._write_through is not None

    def write(self, data: Body) -> None:
        if isinstance(data, str):
            chunk = data.encode(self.charset)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            chunk = bytes(data)
        else:
            raise TypeError(f"response.write() takes str or bytes, not {type(data).__name__}")
        if self._write_through is not None:
            if chunk:
                self._write_through(chunk)
        else:
            self._chunks.append(chunk)

    @property
    def body(self) -> bytes:
        """The buffered body (empty once streaming)."""
        return b"".join(self._chunks)

    def flush(self) -> None:
        """Send the headers and what is buffered now; later writes go straight out.

        This commits the response: the session is saved at this point, and status,
        headers and session can no longer change.
        """
        if self._write_through is None:
            if self._start is None:
                raise RuntimeError("response.flush() outside a request")
            self._write_through = self._start(self)
            self.headers._sent = True
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            if chunk:
                self._write_through(chunk)

    def redirect(self, url: str, status: int = 303) -> None:
        if not 300 <= status <= 399:
            raise ValueError(f"redirect status must be 3xx, not {status}")
        self.headers.set("Location", url)
        self.status = status

    def set_cookie(
        self,
        name: str,
        value: str,
        *,
        max_age: int | None = None,
        expires: float | None = None,
        path: str = "/",
        domain: str | None = None,
        secure: bool = False,
        httponly: bool = True,
        samesite: str | None = "Lax",
    ) -> None:
        """Add a Set-Cookie header, replacing an earlier one for the same name and path.

        *expires* is a Unix time; *max_age* also sets Expires for old clients.
        Raises ValueError for a value that is not a valid cookie or a cookie over 4 KiB.
        """
        if not _is_token(name):
            raise ValueError(f"invalid cookie name {name!r}")
        if not _COOKIE_VALUE.issuperset(value):
            raise ValueError(f"cookie {name!r}: value has characters not allowed in a cookie")
        parts = [f"{name}={value}"]
        if max_age is not None:
            parts.append(f"Max-Age={int(max_age)}")
            expires = time.time() + int(max_age) if expires is None else expires
        if expires is not None:
            from email.utils import formatdate  # costs a CGI process ~5 ms: only when needed

            parts.append(f"Expires={formatdate(expires, usegmt=True)}")
        for attribute, text in (("Path", path), ("Domain", domain)):
            if text is not None:
                if not _COOKIE_ATTRIBUTE.issuperset(text):
                    raise ValueError(f"cookie {name!r}: invalid {attribute} {text!r}")
                parts.append(f"{attribute}={text}")
        if secure:
            parts.append("Secure")
        if httponly:
            parts.append("HttpOnly")
        if samesite is not None:
            if samesite not in ("Lax", "Strict", "None"):
                raise ValueError(f"cookie {name!r}: SameSite must be Lax, Strict or None")
            parts.append(f"SameSite={samesite}")
        header = "; ".join(parts)
        if len(header) > MAX_COOKIE_BYTES:
            raise ValueError(f"cookie {name!r} is {len(header)} bytes, over {MAX_COOKIE_BYTES}")
        self._drop_cookie(name, path)
        self.headers.add("Set-Cookie", header)

    def delete_cookie(self, name: str, *, path: str = "/", domain: str | None = None) -> None:
        self.set_cookie(name, "", max_age=0, expires=0, path=path, domain=domain)

    def _drop_cookie(self, name: str, path: str | None) -> None:
        prefix = f"{name}="
        suffix = f"; Path={path}" if path is not None else None
        kept = [
            (key, value)
            for key, value in self.headers.items()
            if not (
                key.lower() == "set-cookie"
                and value.startswith(prefix)
                and (suffix is None or f"{suffix};" in f"{value};")
            )
        ]
        if len(kept) != len(self.headers):
            self.headers._check_open()
            self.headers._items = kept

    def __repr__(self) -> str:
        return f"<Response {self.status_line}>"
