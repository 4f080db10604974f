#!/usr/bin/env python3
"""The seed's 2001 session design as a CGI counter: the baseline PyServ replaced.

One process per request: the cookie names a file in SESSION_DIR; the script opens it,
takes an exclusive flock, unpickles the session dict, adds one to the visit counter,
pickles it back in place and lets close() drop the lock. Kept as plain as the original:
no signature, no expiry, no atomic replace; an unknown or missing cookie starts a
session under a fresh random id.
"""

import fcntl
import os
import pickle
import random
import sys
from http.cookies import SimpleCookie

SESSION_DIR = "seed-sessions"  # relative: Apache runs CGI scripts in their directory
COOKIE = "PYSERVSID"


def main():
    cookies = SimpleCookie(os.environ.get("HTTP_COOKIE", ""))
    sid = cookies[COOKIE].value if COOKIE in cookies else ""
    headers = "Content-Type: text/plain\r\n"
    if not (sid.isalnum() and os.path.exists(os.path.join(SESSION_DIR, sid))):
        sid = f"{random.SystemRandom().getrandbits(128):032x}"
        headers += f"Set-Cookie: {COOKIE}={sid}; path=/\r\n"
    if not os.path.isdir(SESSION_DIR):
        os.makedirs(SESSION_DIR, 0o700, exist_ok=True)
    fd = os.open(os.path.join(SESSION_DIR, sid), os.O_RDWR | os.O_CREAT, 0o600)
    with open(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        data = f.read()
        session = pickle.loads(data) if data else {}
        visits = session.get("visits", 0)
        session["visits"] = visits + 1
        f.seek(0)
        pickle.dump(session, f)
        f.truncate()
    sys.stdout.write(f"{headers}\r\nHi!\n\n{visits} previous visits\n")


if __name__ == "__main__":
    main()
