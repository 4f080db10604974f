"""Run a private, throwaway Apache httpd for integration tests and the demo.

Each ``ApacheServer`` owns one work directory under /tmp holding its generated
httpd.conf, logs, runtime files and document root, so several instances can
run side by side without touching the system-wide Apache setup.

Debian's apache2 refuses to run its workers as root, so they run as www-data:
everything the workers read or execute must live under a world-traversable
directory, never under /root or a repository checkout that may sit there.
"""

from __future__ import annotations

import functools
import http.client
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

APACHE_USER = "www-data"
MODULE_DIRS = (Path("/usr/lib/apache2/modules"), Path("/usr/lib64/httpd/modules"))
# Modules every instance needs: access control, MIME types, logging, privilege
# dropping to APACHE_USER, SetEnv/PassEnv, (Script)Alias and DirectoryIndex.
BASE_MODULES = ("authz_core", "mime", "log_config", "unixd", "env", "alias", "dir")
INSTALL_HINT = (
    "Apache not installed: run scripts/test as root (it installs apache2 and "
    "libapache2-mod-fcgid with apt), or apt-get install apache2 libapache2-mod-fcgid"
)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]


class ApacheError(RuntimeError):
    """Apache could not be started or is misconfigured."""


class HttpResponse(NamedTuple):
    """What http_request returns; unpacks as (status, headers, body)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


def apache_binary() -> str | None:
    """Return the Apache executable: Debian's /usr/sbin/apache2, else apache2/httpd on PATH."""
    if os.access("/usr/sbin/apache2", os.X_OK):
        return "/usr/sbin/apache2"
    return shutil.which("apache2") or shutil.which("httpd")


def apache_version() -> tuple[int, int, int]:
    """Return the (major, minor, patch) version reported by ``apache2 -v``."""
    binary = apache_binary()
    if binary is None:
        raise ApacheError(INSTALL_HINT)
    output = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout
    for word in output.split():
        if word.startswith("Apache/"):
            major, minor, patch = word[len("Apache/") :].split(".")[:3]
            return int(major), int(minor), int(patch)
    raise ApacheError(f"cannot parse the output of {binary} -v: {output!r}")


@functools.cache
def compiled_in_modules(binary: str) -> frozenset[str]:
    """Names of the modules built into ``binary`` (Debian: log_config, unixd...), from -l."""
    output = subprocess.run([binary, "-l"], capture_output=True, text=True, check=True).stdout
    words = output.split()
    return frozenset(w[len("mod_") : -len(".c")] for w in words if w.startswith("mod_"))


def module_path(name: str) -> Path | None:
    """Return the shared object of module ``name`` (e.g. "cgid"), or None if not installed."""
    for directory in MODULE_DIRS:
        candidate = directory / f"mod_{name}.so"
        if candidate.is_file():
            return candidate
    return None


def missing_requirements(modules: Iterable[str] = (), mpm: str = "event") -> list[str]:
    """Describe what is missing to run Apache with ``modules``; empty when all is there."""
    binary = apache_binary()
    if binary is None:
        return ["the apache2/httpd executable"]
    return [
        f"mod_{name}.so"
        for name in _modules_to_load(binary, modules, mpm)
        if module_path(name) is None
    ]


def require_apache(modules: Iterable[str] = (), mpm: str = "event") -> None:
    """Skip the calling test when Apache or a module is missing; fail instead on CI.

    CI must not silently skip the integration tests because of a broken setup.
    """
    import pytest  # Imported here so that scripts/_demo.py does not need pytest.

    missing = missing_requirements(modules, mpm)
    if not missing:
        return
    message = f"{INSTALL_HINT} (missing: {', '.join(missing)})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def world_traversable(directory: Path) -> bool:
    """Whether any user can enter ``directory``: it and all its parents have the o+x bit."""
    return all(os.stat(path).st_mode & stat.S_IXOTH for path in (directory, *directory.parents))


def world_readable_python() -> str:
    """Return a Python interpreter that Apache's workers (www-data) can execute.

    The interpreter running the tests often lives in a private home directory
    (pyenv in /root), which www-data cannot even traverse.
    """
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not candidate:
            continue
        real = Path(os.path.realpath(candidate))
        if not real.is_file():
            continue
        mode = os.stat(real).st_mode
        if mode & stat.S_IROTH and mode & stat.S_IXOTH and world_traversable(real.parent):
            return str(real)
    raise ApacheError(
        f"no Python interpreter executable by {APACHE_USER}: {sys.executable} is not "
        "world-readable and /usr/bin/python3 is missing (apt-get install python3)"
    )


def make_work_dir(prefix: str = "pyserv-apache-") -> Path:
    """Create a fresh world-traversable directory under /tmp for one Apache instance.

    /tmp is used explicitly because TMPDIR may point somewhere www-data cannot reach.
    """
    work_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    work_dir.chmod(0o755)
    return work_dir


def free_port(preferred: Iterable[int] = ()) -> int:
    """Return the first of ``preferred`` ports free on 127.0.0.1, else one the kernel picks."""
    for port in (*preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ApacheError("cannot bind any port on 127.0.0.1")


def script_alias_config(url_path: str, directory: Path) -> str:
    """Return config mapping ``url_path`` (e.g. "/cgi-bin/") to CGI scripts in ``directory``."""
    return (
        f'ScriptAlias {url_path} "{directory}/"\n'
        f'<Directory "{directory}">\n'
        "    Require all granted\n"
        "</Directory>\n"
    )


def _module_list(modules: Iterable[str], mpm: str) -> list[str]:
    """The MPM, the base modules and ``modules``, each once, in load order."""
    return list(dict.fromkeys([f"mpm_{mpm}", *BASE_MODULES, *modules]))


def _modules_to_load(binary: str, modules: Iterable[str], mpm: str) -> list[str]:
    """The modules of _module_list that need a LoadModule line, i.e. are not built in."""
    built_in = compiled_in_modules(binary)
    return [name for name in _module_list(modules, mpm) if name not in built_in]


class ApacheServer:
    """One private Apache instance listening on 127.0.0.1, configured from scratch.

    ``extra_config`` is appended to the generated httpd.conf; it may refer to the
    work directory as ``${WORK_DIR}``.
    """

    def __init__(
        self,
        work_dir: Path | str,
        modules: Iterable[str] = (),
        mpm: str = "event",
        extra_config: str = "",
        port: int | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.mpm = mpm
        self.modules = _module_list(modules, mpm)
        self.extra_config = extra_config
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.work_dir / "httpd.conf"

    @property
    def error_log_path(self) -> Path:
        return self.work_dir / "logs" / "error.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise ApacheError("the port is chosen by start()")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ApacheError("Apache has not been started")
        return self._process.pid

    def error_log_text(self) -> str:
        """Return Apache's error log, where CGI scripts' stderr also ends up."""
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> ApacheServer:
        """Write httpd.conf, start Apache and wait until it answers HTTP requests."""
        if self._process is not None:
            raise ApacheError("Apache is already started")
        binary = apache_binary()
        missing = missing_requirements(self.modules, self.mpm)
        if binary is None or missing:
            raise ApacheError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        if not world_traversable(self.work_dir):
            raise ApacheError(f"{APACHE_USER} cannot traverse {self.work_dir}: chmod o+x it")
        if self._port is None:
            self._port = free_port()
        for name in ("htdocs", "logs", "run"):
            (self.work_dir / name).mkdir(mode=0o755, exist_ok=True)
        self.conf_path.write_text(self._config(binary))
        with open(self.work_dir / "logs" / "console.log", "wb") as console:
            # A new session puts Apache and all its children in their own process
            # group: stop() can signal them all, and Ctrl-C does not reach them.
            self._process = subprocess.Popen(
                [binary, "-f", str(self.conf_path), "-DFOREGROUND"],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Apache and its children: SIGTERM, then SIGKILL if it lingers. Idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
        # Children that outlived the parent (e.g. a CGI script) share its process group.
        self._signal_group(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        """Block until Apache exits, for as long as that takes; return its exit status."""
        if self._process is None:
            raise ApacheError("Apache has not been started")
        return self._process.wait()

    def __enter__(self) -> ApacheServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _signal_group(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def _config(self, binary: str) -> str:
        work = self.work_dir
        mime_types = "/etc/mime.types" if Path("/etc/mime.types").is_file() else os.devnull
        lines = [
            f'Define WORK_DIR "{work}"',
            f'ServerRoot "{work}"',
            f"Listen 127.0.0.1:{self.port}",
            "ServerName 127.0.0.1",
            f'PidFile "{work}/run/httpd.pid"',
            f'DefaultRuntimeDir "{work}/run"',
            *(
                f"LoadModule {name}_module {module_path(name)}"
                for name in _modules_to_load(binary, self.modules, self.mpm)
            ),
            f"User {APACHE_USER}",
            f"Group {APACHE_USER}",
            "LogLevel warn",
            f'ErrorLog "{work}/logs/error.log"',
            'LogFormat "%h %l %u %t \\"%r\\" %>s %b" common',
            f'CustomLog "{work}/logs/access.log" common',
            f'TypesConfig "{mime_types}"',
            "<Directory />",
            "    AllowOverride None",
            "    Require all denied",
            "</Directory>",
            f'DocumentRoot "{work}/htdocs"',
            f'<Directory "{work}/htdocs">',
            "    Require all granted",
            "</Directory>",
        ]
        if "cgid" in self.modules:
            lines.append(f'ScriptSock "{work}/run/cgid.sock"')
        if "fcgid" in self.modules:
            lines.append(f'FcgidIPCDir "{work}/run/fcgid"')
            lines.append(f'FcgidProcessTableFile "{work}/run/fcgid_shm"')
        lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _wait_until_serving(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ApacheError(self._failure(f"Apache exited with {self._process.returncode}"))
            try:
                http_get(self.base_url + "/", timeout=1)
            except OSError:
                time.sleep(0.05)
                continue
            if self._cgid_ready():
                return
            time.sleep(0.02)
        raise ApacheError(self._failure(f"Apache did not answer within {START_TIMEOUT} s"))

    def _cgid_ready(self) -> bool:
        """mod_cgid's daemon binds its socket as root and then gives it to the User: a
        CGI request before that is refused (EACCES, a 503), so wait for the hand-over."""
        if "cgid" not in self.modules:
            return True
        user = pwd.getpwnam(APACHE_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
        owners = []
        for path in (self.work_dir / "run").glob("cgid.sock*"):  # the daemon's pid is appended
            try:
                owners.append(path.stat().st_uid)
            except FileNotFoundError:
                pass
        return user in owners

    def _failure(self, what: str) -> str:
        console = (self.work_dir / "logs" / "console.log").read_text(errors="replace")
        error_log_tail = "\n".join(self.error_log_text().splitlines()[-20:])
        return (
            f"{what} (config {self.conf_path}).\n"
            f"Console output:\n{console}\nError log tail:\n{error_log_tail}"
        )


def http_request(
    method: str,
    url: str,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10,
) -> HttpResponse:
    """Send one request; redirects are not followed and 4xx/5xx are returned, not raised."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs are supported: {url}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return HttpResponse(response.status, response.msg, response.read())
    finally:
        connection.close()


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 10
) -> HttpResponse:
    """GET ``url``; see http_request."""
    return http_request("GET", url, headers=headers, timeout=timeout)


def deploy_cgi_app(work_dir: Path) -> Path:
    """Lay out PyServ for CGI as the 2001 deployment did, and return its cgi-bin directory.

    ``<work>/lib`` holds copies of the repository's ``pyserv`` package and of its
    ``multipart`` dependency, which CGI scripts in ``<work>/www/cgi-bin`` put on
    sys.path as ``../../lib`` (CGI scripts run in their own directory).
    The lib copy is byte-compiled by the interpreter the scripts run with, as an install
    should be: www-data cannot write ``__pycache__`` there, and without it every CGI
    process would compile PyServ anew. The cgi-bin directory belongs to Apache's user, so
    that pyserv can create its ``sessions`` directory there.
    """
    import multipart  # pyserv's dependency; imported here so that a missing one is clear.

    lib = work_dir / "lib"
    shutil.copytree(
        REPO_ROOT / "pyserv",
        lib / "pyserv",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copy(multipart.__file__, lib / "multipart.py")
    subprocess.run(
        [world_readable_python(), "-m", "compileall", "-q", str(lib)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cgi_bin = work_dir / "www" / "cgi-bin"
    cgi_bin.mkdir(parents=True)
    for path in (work_dir / "www", cgi_bin, lib, *lib.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if os.geteuid() == 0:  # Otherwise Apache runs as the current user, who owns it already.
        user = pwd.getpwnam(APACHE_USER)
        os.chown(cgi_bin, user.pw_uid, user.pw_gid)
    return cgi_bin


def install_cgi_script(cgi_bin: Path, name: str, source: str) -> Path:
    """Write an executable CGI script whose shebang runs a Python www-data can execute."""
    first_line, _, rest = source.partition("\n")
    if not first_line.startswith("#!"):
        raise ValueError(f"{name} does not start with a #! line")
    script = cgi_bin / name
    script.write_text(f"#!{world_readable_python()}\n{rest}")
    script.chmod(0o755)
    return script


def deploy_examples(work_dir: Path) -> Path:
    """Deploy examples/testapp.cgi and examples/thisapp.py; return the cgi-bin directory."""
    cgi_bin = deploy_cgi_app(work_dir)
    examples = REPO_ROOT / "examples"
    install_cgi_script(cgi_bin, "testapp.cgi", (examples / "testapp.cgi").read_text())
    shutil.copy(examples / "thisapp.py", cgi_bin / "thisapp.py")
    (cgi_bin / "thisapp.py").chmod(0o644)
    return cgi_bin
