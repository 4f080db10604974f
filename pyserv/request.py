"""Request: a read-only view of one WSGI environ.

Everything is parsed on first use and cached: the query string on first ``query``, the
body on first ``form``/``files``/``body``. Limits (:class:`RequestLimits`) are enforced
while reading, so an oversized or lying body is never buffered whole. What the environ
alone shows is checked before any servlet runs (:func:`check_limits`). One status per
kind of problem (raised as :class:`~pyserv.errors.HTTPError`): 413 when the body is over
a limit, 431 when the headers are, 400 for too many parameters, an over-long query
string, or anything malformed, undecodable or shorter than its Content-Length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from .errors import BadRequestKeyError, HTTPError
from .frozen import Frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import IO, Any


def _valid_content_length(raw: str) -> bool:
    """1 to 18 ASCII digits (what fits an int64). String methods, not a regex: a CGI
    process that never imports ``re`` saves a few milliseconds."""
    return len(raw) <= 18 and raw.isascii() and raw.isdigit()


_CHUNK = 64 * 1024


class RequestLimits(Frozen):
    """Request limits (pyservd's ``[pyservd]`` keys of the same names); each maps to one
    status when exceeded. Parameters are the query string's fields plus the body's
    (urlencoded fields or multipart parts): one budget for both, so splitting them
    between URL and body gains nothing. Immutable."""

    __slots__ = ("max_body", "max_params", "max_param_bytes", "max_header_bytes")

    def __init__(
        self,
        max_body: int = 10 * 1024 * 1024,  # bytes of body -> 413
        max_params: int = 1000,  # query fields + form fields/parts -> 400
        max_param_bytes: int = 1024 * 1024,  # query string (-> 400) + form data in memory (-> 413)
        max_header_bytes: int = 64 * 1024,  # HTTP_* names + values in the environ -> 431
    ) -> None:
        self.max_body = max_body
        self.max_params = max_params
        self.max_param_bytes = max_param_bytes
        self.max_header_bytes = max_header_bytes


def _field_count(query_string: str) -> int:
    """Fields in a query string, counted as ``parse_qsl`` counts them (separators)."""
    return query_string.count("&") + 1 if query_string else 0


def check_limits(environ: Mapping[str, Any], limits: RequestLimits) -> None:
    """Refuse what the environ alone shows to be over a limit or malformed, before any
    servlet runs (a servlet that never reads its body or query is protected too).

    The body itself is checked while it is read (:class:`BodyStream`).
    """
    header_bytes = sum(
        len(key) + len(value)
        for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
    )
    if header_bytes > limits.max_header_bytes:
        raise HTTPError(431, f"request headers over {limits.max_header_bytes} bytes")
    query_string = environ.get("QUERY_STRING") or ""
    if len(query_string) > limits.max_param_bytes:
        raise HTTPError(400, f"query string over {limits.max_param_bytes} bytes")
    if _field_count(query_string) > limits.max_params:
        raise HTTPError(400, f"more than {limits.max_params} parameters")
    raw = environ.get("CONTENT_LENGTH") or ""
    if raw and not _valid_content_length(raw):
        raise HTTPError(400, "malformed Content-Length")
    if raw and int(raw) > limits.max_body:
        raise HTTPError(413, f"request body over {limits.max_body} bytes")


class MultiDict(Mapping[str, "Any"]):
    """A multi-valued mapping: ``[]`` and ``get`` give the first value, ``getall`` all.

    An uncaught missing key under ``[]`` is a 400 (:class:`BadRequestKeyError`).
    """

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        self._lists: dict[str, list[Any]] = {}
        for key, value in pairs:
            self._lists.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> Any:
        values = self._lists.get(key)
        if not values:
            raise BadRequestKeyError(key)
        return values[0]

    def get(self, key: str, default: Any = None) -> Any:
        values = self._lists.get(key)
        return values[0] if values else default

    def getall(self, key: str) -> list[Any]:
        return list(self._lists.get(key, ()))

    getlist = getall

    def allitems(self) -> Iterator[tuple[str, Any]]:
        for key, values in self._lists.items():
            for value in values:
                yield key, value

    def __iter__(self) -> Iterator[str]:
        return iter(self._lists)

    def __len__(self) -> int:
        return len(self._lists)

    def __repr__(self) -> str:
        return f"MultiDict({list(self.allitems())!r})"


class EnvironHeaders(Mapping[str, str]):
    """Case-insensitive, read-only request headers over the environ (``HTTP_*``)."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._environ = environ

    @staticmethod
    def _key(name: str) -> str:
        key = name.upper().replace("-", "_")
        return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key

    def __getitem__(self, name: str) -> str:
        value = self._environ.get(self._key(name))
        if not value:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        for key, value in self._environ.items():
            if key.startswith("HTTP_"):
                key = key[5:]
            elif key not in ("CONTENT_TYPE", "CONTENT_LENGTH") or not value:
                continue
            yield key.replace("_", "-").title()

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


def parse_cookies(header: str) -> MultiDict:
    """Parse a Cookie header leniently: a malformed pair is skipped, never fatal.

    ``http.cookies.SimpleCookie`` drops every cookie after one it cannot parse, so a
    broken cookie of another application on the same host would lose our session.
    """
    pairs = []
    for chunk in header.split(";"):
        name, sep, value = chunk.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        pairs.append((name, value))
    return MultiDict(pairs)


def wsgi_to_text(value: str, what: str) -> str:
    """Undo PEP 3333's latin-1 transport of bytes and decode them as UTF-8, else 400."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise HTTPError(400, f"{what} is not valid UTF-8") from None


class BodyStream:
    """The request body, bounded by Content-Length and by the app's body limit.

    A body that ends before its Content-Length is a 400 (the client lied or went away);
    one larger than the limit is a 413, detected while reading when no length was sent.
    """

    def __init__(self, environ: Mapping[str, Any], limit: int) -> None:
        raw = environ.get("CONTENT_LENGTH") or ""
        if raw and not _valid_content_length(raw):
            raise HTTPError(400, "malformed Content-Length")
        self._input: IO[bytes] | None = environ.get("wsgi.input")
        self._limit = limit
        self._length: int | None = int(raw) if raw else None
        if self._length is None and not environ.get("wsgi.input_terminated"):
            self._length = 0  # PEP 3333: no Content-Length means no body to read
        if self._length is not None and self._length > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        if self._input is None:
            return b""
        if self._length is not None:
            remaining = self._length - self._read
        else:
            remaining = self._limit + 1 - self._read
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        chunks = []
        while size > 0:
            chunk = self._input.read(min(size, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            self._read += len(chunk)
        data = b"".join(chunks)
        if self._length is None and self._read > self._limit:
            raise HTTPError(413, f"request body over {self._limit} bytes")
        if size > 0 and self._length is not None:
            raise HTTPError(400, "request body shorter than its Content-Length")
        return data


class Request:
    """One HTTP request, as servlets see it. Not thread-safe (one request, one thread).

    ``path_info`` is the path inside the app (``/TestServlet/extra``), ``script_name`` the
    app's mount, ``extra_path`` what follows the servlet name (``extra``). All are text
    decoded exactly once.
    """

    def __init__(
        self,
        environ: dict[str, Any],
        limits: RequestLimits | None = None,
        *,
        request_id: str = "",
    ) -> None:
        self.environ = environ
        self.limits = limits or RequestLimits()
        self.request_id = request_id
        self.method: str = environ.get("REQUEST_METHOD", "GET")
        self.script_name = wsgi_to_text(environ.get("SCRIPT_NAME", ""), "the request path")
        self.path_info = wsgi_to_text(environ.get("PATH_INFO", ""), "the request path")
        self.query_string: str = environ.get("QUERY_STRING", "")
        self.servlet_name = ""
        self.extra_path = ""
        self.headers = EnvironHeaders(environ)
        self._query: MultiDict | None = None
        self._form: MultiDict | None = None
        self._files: MultiDict | None = None
        self._cookies: MultiDict | None = None
        self._stream: BodyStream | None = None
        self._body: bytes | None = None

    @property
    def path(self) -> str:
        return self.script_name + self.path_info

    @property
    def remote_addr(self) -> str:
        return self.environ.get("REMOTE_ADDR", "")

    @property
    def is_secure(self) -> bool:
        return self.environ.get("wsgi.url_scheme") == "https"

    @property
    def content_type(self) -> str:
        return self.environ.get("CONTENT_TYPE", "")

    @property
    def cookies(self) -> MultiDict:
        if self._cookies is None:
            self._cookies = parse_cookies(self.environ.get("HTTP_COOKIE", ""))
        return self._cookies

    @property
    def query(self) -> MultiDict:
        if self._query is None:
            text = wsgi_to_text(self.query_string, "the query string")
            self._query = MultiDict(self._parse_urlencoded(text, self.limits.max_params))
        return self._query

    @property
    def form(self) -> MultiDict:
        """Fields of a urlencoded or multipart body (uploads are in ``files``)."""
        if self._form is None:
            self._parse_form()
        assert self._form is not None
        return self._form

    @property
    def files(self) -> MultiDict:
        """Uploaded files: ``multipart.MultipartPart`` objects, spooled to temp files when
        large (``.filename``, ``.content_type``, ``.file``, ``.save_as(path)``)."""
        if self._files is None:
            self._parse_form()
        assert self._files is not None
        return self._files

    @property
    def params(self) -> MultiDict:
        """Query and form fields together, query first."""
        return MultiDict([*self.query.allitems(), *self.form.allitems()])

    @property
    def stream(self) -> BodyStream:
        """The raw body as a bounded stream; use either this or ``body``/``form``."""
        if self._stream is None:
            self._stream = BodyStream(self.environ, self.limits.max_body)
        return self._stream

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = self.stream.read()
        return self._body

    def _parse_urlencoded(self, text: str, max_fields: int) -> list[tuple[str, str]]:
        if not text:
            return []
        from urllib.parse import parse_qsl  # ~2 ms for a CGI process: only with parameters

        try:
            return parse_qsl(
                text,
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=max_fields,
            )
        except UnicodeDecodeError:
            raise HTTPError(400, "form data is not valid UTF-8") from None
        except ValueError:
            raise HTTPError(400, f"more than {self.limits.max_params} parameters") from None

    def _form_budget(self) -> tuple[int, int]:
        """(fields, bytes) the body may still use after the query string."""
        return (
            max(self.limits.max_params - _field_count(self.query_string), 0),
            max(self.limits.max_param_bytes - len(self.query_string), 0),
        )

    def _parse_form(self) -> None:
        mimetype, _, options = self.content_type.partition(";")
        mimetype = mimetype.strip().lower()
        self._form, self._files = MultiDict(), MultiDict()
        if mimetype == "application/x-www-form-urlencoded":
            max_fields, max_bytes = self._form_budget()
            data = self.stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPError(413, "form data too large")
            text = wsgi_to_text(data.decode("latin-1"), "form data")
            self._form = MultiDict(self._parse_urlencoded(text, max_fields))
        elif mimetype == "multipart/form-data":
            self._parse_multipart(options)

    def _parse_multipart(self, options: str) -> None:
        import multipart  # only requests with uploads pay for this import

        _, params = multipart.parse_options_header("x/x;" + options)
        boundary = params.get("boundary")
        if not boundary:
            raise HTTPError(400, "multipart body without a boundary")
        max_fields, max_bytes = self._form_budget()
        parser = multipart.MultipartParser(
            self.stream,
            boundary,
            part_limit=max_fields,
            memory_limit=max_bytes,
            disk_limit=self.limits.max_body,
        )
        fields, files = [], []
        try:
            for part in parser:
                if part.filename is not None or not part.is_buffered():
                    files.append((part.name, part))
                else:
                    fields.append((part.name, part.value))
        except BaseException as exc:
            for _, part in files:  # close() will not see them: remove their temp files now
                part.close()
            if isinstance(exc, multipart.ParserLimitReached):
                if "segment count" in str(exc):  # multipart's words for part_limit
                    raise HTTPError(400, f"more than {self.limits.max_params} parameters") from None
                raise HTTPError(413, f"multipart body: {exc}") from None
            if isinstance(exc, (multipart.MultipartError, UnicodeDecodeError)):
                raise HTTPError(400, f"malformed multipart body: {exc}") from None
            raise
        self._form, self._files = MultiDict(fields), MultiDict(files)

    def close(self) -> None:
        """Remove spooled uploads; called by the application after the response."""
        for _, part in (self._files or MultiDict()).allitems():
            part.close()

    def __repr__(self) -> str:
        query = f"?{self.query_string}" if self.query_string else ""
        return f"<Request {self.method} {self.path + query!r} from {self.remote_addr or '?'}>"
