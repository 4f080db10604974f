"""Serve examples/ through a private Apache with mod_cgid until terminated (scripts/demo).

Usage: _demo.py WORK_DIR, an empty world-traversable directory that the caller removes.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

# The Apache harness of the integration tests, reused so the demo runs the same setup.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from apache import ApacheServer, deploy_examples, free_port, script_alias_config  # noqa: E402

PREFERRED_PORTS = range(8080, 8100)


def main(work_dir: Path) -> int:
    # SIGTERM (from scripts/demo's trap) unwinds like Ctrl-C, so Apache is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cgi_bin = deploy_examples(work_dir)
    server = ApacheServer(
        work_dir,
        ["cgid"],
        extra_config=script_alias_config("/cgi-bin/", cgi_bin),
        port=free_port(PREFERRED_PORTS),
    )
    with server:
        print(f"Open {server.base_url}/cgi-bin/testapp.cgi/TestServlet", flush=True)
        print(f"Apache's error log (servlet tracebacks): {server.error_log_path}", flush=True)
        status = server.wait()
    print(f"Apache exited with status {status}:\n{server.error_log_text()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
