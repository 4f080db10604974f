"""Serve examples/ with pyservd behind a private Apache until terminated (scripts/demo).

Usage: _demo.py WORK_DIR, an empty world-traversable directory that the caller removes.
pyservd runs with conf/pyservd.conf, its paths moved into WORK_DIR; Apache on 127.0.0.1
includes conf/apache-proxy-fcgi.conf and, beside it, serves the 2001 CGI deployment.
Without Apache, pyservd serves through its development HTTP listener instead.
As root, pyservd's workers run as www-data (pyservd refuses to run servlets as root),
from copies in WORK_DIR that www-data can read, as the integration tests run it.
"""

from __future__ import annotations

import configparser
import grp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The Apache harness of the integration tests, reused so the demo runs the same setup.
sys.path.insert(0, str(REPO / "tests" / "integration"))
from apache import (  # noqa: E402
    ApacheServer,
    apache_binary,
    deploy_examples,
    free_port,
    script_alias_config,
)
from pyservd import WORKER_USER, daemon_runtime  # noqa: E402

PREFERRED_PORTS = range(8080, 8100)


def write_config(work_dir: Path) -> Path:
    """conf/pyservd.conf with the socket, sessions and modules moved for this demo."""
    config = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    config.read(REPO / "conf" / "pyservd.conf")
    config["pyservd"]["listen"] = f"unix:{work_dir / 'pyservd.sock'}"
    config["pyservd"]["access_log"] = "-"
    config["pyservd"]["pidfile"] = str(work_dir / "pyservd.pid")
    try:
        grp.getgrnam("www-data")
        config["pyservd"]["socket_group"] = "www-data"  # Apache's workers connect
    except KeyError:
        pass
    config["app:testapp"]["session_dir"] = str(work_dir / "sessions")
    config["app:testapp"]["pythonpath"] = str(REPO / "examples")
    if WORKER_USER is not None:  # root: the workers drop to www-data, who must read the app
        config["pyservd"]["user"] = WORKER_USER
        apps = work_dir / "apps"
        apps.mkdir(mode=0o755)
        shutil.copy(REPO / "examples" / "thisapp.py", apps / "thisapp.py")
        os.chmod(apps / "thisapp.py", 0o644)
        config["app:testapp"]["pythonpath"] = str(apps)
    path = work_dir / "pyservd.conf"
    with open(path, "w") as stream:
        config.write(stream)
    return path


def wait_until_connectable(address: str | tuple[str, int], daemon: subprocess.Popen) -> None:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and daemon.poll() is None:
        with socket.socket(family) as probe:
            if probe.connect_ex(address) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("pyservd did not start; see its log above")


def main(work_dir: Path) -> int:
    # SIGTERM (from scripts/demo's trap) unwinds like Ctrl-C, so both are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = write_config(work_dir)
    python, pythonpath = daemon_runtime(work_dir)
    command = [python, "-m", "container.cli", "--config", str(config)]
    http_port = None
    if apache_binary() is None:
        http_port = free_port(PREFERRED_PORTS)
        command += ["--http", f"127.0.0.1:{http_port}"]
    environ = dict(os.environ, PYTHONPATH=pythonpath)
    daemon = subprocess.Popen(command, cwd=pythonpath, env=environ)
    try:
        if http_port is not None:
            wait_until_connectable(("127.0.0.1", http_port), daemon)
            print(
                "Apache is not installed: serving through pyservd's development HTTP "
                "listener (run scripts/demo as root to have Apache installed)."
            )
            print(f"Open http://127.0.0.1:{http_port}/testapp/TestServlet", flush=True)
            return daemon.wait()
        wait_until_connectable(str(work_dir / "pyservd.sock"), daemon)
        cgi_bin = deploy_examples(work_dir)
        apache_config = (
            f"Define PYSERV_SOCKET {work_dir / 'pyservd.sock'}\n"
            f"Include {REPO / 'conf' / 'apache-proxy-fcgi.conf'}\n"
            + script_alias_config("/cgi-bin/", cgi_bin)
        )
        server = ApacheServer(
            work_dir,
            ["proxy", "proxy_fcgi", "cgid"],
            extra_config=apache_config,
            port=free_port(PREFERRED_PORTS),
        )
        with server:
            print(f"Open {server.base_url}/testapp/TestServlet   (pyservd behind Apache)")
            print(f"     {server.base_url}/cgi-bin/testapp.cgi/TestServlet   (the CGI way)")
            print("Ctrl-C stops both.", flush=True)
            while daemon.poll() is None and server.running:
                time.sleep(0.5)
        print("pyservd or Apache stopped; shutting the demo down", file=sys.stderr)
        return 1
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
