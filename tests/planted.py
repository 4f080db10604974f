"""What an attacker could plant in a session store, for the tests that prove it is never
unpickled: a pickle whose unpickling creates a marker file, and envelopes built by hand
from the documented format (``header | HMAC-SHA256 | pickle``), signed with any key."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import time
from pathlib import Path

from pyserv.stores.base import pack_header


class CreatesFile:
    """Unpickling this opens (creates) a file: proof that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_payload(marker: Path) -> bytes:
    """A session dict whose unpickling creates *marker*."""
    return pickle.dumps({"x": CreatesFile(str(marker))}, protocol=4)


def raw_envelope(
    key: bytes,
    sid: str,
    payload: bytes,
    *,
    generation: int = 1,
    created: float | None = None,
    timeout: int = 3600,
) -> bytes:
    """An envelope for *sid* signed with *key*, built without the store's code."""
    header = pack_header(generation, time.time() if created is None else created, timeout)
    mac = hmac.new(key, header + sid.encode("ascii") + payload, hashlib.sha256).digest()
    return header + mac + payload
