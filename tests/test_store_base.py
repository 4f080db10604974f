"""The envelope's format and the session ids, checked against the standard library."""

from __future__ import annotations

import base64
import hashlib
import hmac

from pyserv.stores.base import (
    Envelope,
    SessionRecord,
    new_session_id,
    read_header,
    valid_session_id,
)


def test_sealed_envelope_is_signed_with_hmac_sha256_over_header_id_and_payload() -> None:
    key = b"k" * 32
    sid = "A" * 43
    blob = Envelope(lambda: key).seal(SessionRecord(sid, {"visits": 1}, 3, 1.0, 1.0, 60))
    header = read_header(blob)
    mac, payload = blob[header.size : header.size + 32], blob[header.size + 32 :]
    expected = hmac.new(key, blob[: header.size] + sid.encode() + payload, hashlib.sha256)
    assert mac == expected.digest()


def test_new_session_ids_are_256_random_bits_in_url_safe_base64() -> None:
    ids = {new_session_id() for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert valid_session_id(sid)
        raw = base64.urlsafe_b64decode(sid + "=")
        assert len(raw) == 32 and base64.urlsafe_b64encode(raw).decode() == sid + "="
