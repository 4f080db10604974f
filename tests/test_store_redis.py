"""RedisStore against a real redis-server: the conformance suite, then what only a
networked store shared by processes and hosts can get wrong: fencing, exactness across
processes, cache coherence, TTLs, outages, AUTH and TLS."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from planted import malicious_payload, raw_envelope
from redis_server import RedisServer, free_port
from store_conformance import *  # noqa: F401,F403
from store_conformance import UnpickleCounter, load_locked, make_record

from container.cache import CachedStore
from pyserv.stores.base import (
    HEADER_SIZE,
    Envelope,
    LockTimeout,
    SessionConflict,
    SessionStore,
    SessionValueError,
    StoreUnavailable,
    new_session_id,
)
from pyserv.stores.redis import QUARANTINE_SECONDS, RedisStore

MAC_SIZE = hashlib.sha256().digest_size

# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def session_key() -> bytes:
    return os.urandom(32).hex().encode("ascii")


@pytest.fixture
def envelope(session_key: bytes) -> Envelope:
    return Envelope(lambda: session_key)


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    """A plain redis-py client on the shared server, to look behind the store's back."""
    import redis

    client = redis.Redis.from_url(redis_server.url, protocol=2)
    yield client
    client.close()


@pytest.fixture
def make_store(
    redis_server: RedisServer, redis_prefix: str, envelope: Envelope, raw: Any
) -> Iterator[Callable[..., RedisStore]]:
    """``make(url=shared server, **options)``: stores on this test's prefix, closed (and
    the prefix's keys on the shared server deleted) at teardown."""
    made: list[RedisStore] = []

    def make(url: str | None = None, **options: Any) -> RedisStore:
        options.setdefault("prefix", redis_prefix)
        store = RedisStore(url or redis_server.url, envelope, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    names = list(raw.scan_iter(match=redis_prefix + "*"))
    if names:
        raw.delete(*names)


@pytest.fixture
def store(make_store: Callable[..., RedisStore]) -> RedisStore:
    return make_store()


@pytest.fixture
def age_session(raw: Any, redis_prefix: str) -> Callable[[str, float], None]:
    """Make the session idle *seconds* longer: its TTL shrinks by that much (to expiry)."""

    def age(sid: str, seconds: float) -> None:
        key = redis_prefix + sid
        remaining = raw.pttl(key)
        assert remaining > 0, f"session key has no TTL: {remaining}"
        raw.pexpire(key, max(0, remaining - round(seconds * 1000)))

    return age


@pytest.fixture
def store_contents(raw: Any, redis_prefix: str) -> Callable[[], set[str]]:
    def contents() -> set[str]:
        return {name.decode() for name in raw.scan_iter(match=redis_prefix + "*")}

    return contents


def pttl(raw: Any, store: RedisStore, sid: str) -> int:
    return raw.pttl(store.prefix + sid)


def increment(store: SessionStore, sid: str, lock_timeout: float = 10.0) -> int:
    """One request: lock, load, add one to ``n``, save, release; returns what it read."""
    lock = store.lock(sid, lock_timeout)
    assert lock is not None
    try:
        record = store.load(sid)
        assert record is not None
        seen = record.data["n"]
        record.data["n"] = seen + 1
        store.save(record, time.time())
        return seen
    finally:
        lock.release()


def assert_unavailable_within(seconds: float, call: Callable[[], object]) -> str:
    """*call* raises StoreUnavailable within *seconds*; returns its message."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"{call} took {elapsed:.2f} s"
    return str(info.value)


# -- expiry: Redis's own, not a sweeper's ------------------------------------------


def test_idle_sessions_expire_by_themselves_and_sweep_has_nothing_to_do(
    store, age_session, store_contents
):
    expired = store.save(make_record({"v": "expired"}, timeout=60), time.time())
    live = store.save(make_record({"v": "live"}, timeout=60), time.time())
    age_session(expired.sid, 120)

    assert not any(expired.sid in name for name in store_contents())  # no sweep needed
    assert store.lock(expired.sid, 1.0) is None
    assert store.sweep(time.time()) == 0
    loaded = load_locked(store, live.sid)
    assert loaded is not None and loaded.data == {"v": "live"}


# -- keys, ids and counting ----------------------------------------------------------


def test_layout_is_a_hash_with_generation_timeout_and_envelope(store, raw):
    stored = store.save(make_record({"v": 1}, timeout=120), time.time())

    fields = raw.hgetall(store.prefix + stored.sid)

    assert set(fields) == {b"g", b"t", b"e"}
    assert (fields[b"g"], fields[b"t"]) == (b"1", b"120")
    assert store.envelope.open(stored.sid, fields[b"e"])[1] == {"v": 1}


@pytest.mark.parametrize(
    "sid", ["../../etc/passwd", "A" * 42, "A" * 44, "A" * 42 + ":", "A" * 42 + "*", ""]
)
def test_malformed_id_is_refused_before_reaching_redis(store, store_contents, sid):
    store.save(make_record({"v": 1}), time.time())
    before = store_contents()

    for call in (lambda: store.lock(sid, 1.0), lambda: store.load(sid), lambda: store.delete(sid)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        store.save(make_record({"v": 2}).replace(sid=sid), time.time())

    assert store_contents() == before


def test_count_counts_sessions_only_under_its_own_prefix(make_store, raw, redis_prefix):
    store = make_store(prefix=redis_prefix + "[a*?]\\:")  # glob characters are literal
    neighbour = make_store(prefix=redis_prefix + "[b]:")
    sessions = [store.save(make_record({"n": n}), time.time()) for n in range(3)]
    neighbour.save(make_record({"n": 9}), time.time())
    raw.hset(store.prefix + sessions[0].sid, "e", b"tampered")
    assert load_locked(store, sessions[0].sid) is None  # quarantined now
    held = store.lock(sessions[1].sid, 1.0)  # a lock key exists
    try:
        assert store.count() == 2
        assert neighbour.count() == 1
    finally:
        held.release()


def test_load_lock_save_and_release_send_one_command_each(store, monkeypatch):
    stored = store.save(make_record({"v": 1}), time.time())
    cached = load_locked(store, stored.sid)  # the scripts are known to Redis from here on
    sent: list[object] = []
    send = store._redis.execute_command

    def counting(*args: Any, **options: Any) -> Any:
        sent.append(args[0])
        return send(*args, **options)

    monkeypatch.setattr(store._redis, "execute_command", counting)

    def sends(step: Callable[[], Any]) -> tuple[list[object], Any]:
        del sent[:]
        result = step()
        return list(sent), result

    one = ["EVALSHA"]
    commands, held = sends(lambda: store.lock(stored.sid, 1.0))
    assert commands == one
    del sent[:]
    with pytest.raises(LockTimeout):
        store.lock(stored.sid, 0)  # busy in this process: queued here, Redis not asked
    assert sent == []
    assert sends(lambda: store.load(stored.sid, known=cached)) == (one, cached)
    commands, fresh = sends(lambda: store.load(stored.sid))
    assert commands == one and fresh is not cached
    assert sends(lambda: store.save(fresh, time.time()))[0] == one
    assert sends(held.release)[0] == one


# -- verification and quarantine -------------------------------------------------------


def tampered_flipped_byte(key: bytes, sid: str, marker: Path) -> bytes:
    """Correctly signed, then one payload byte flipped ("marker" -> "markes"): the pickle
    stays valid and would create a file, so only the signature check stops it."""
    blob = bytearray(raw_envelope(key, sid, malicious_payload(marker)))
    name = marker.name.encode()
    at = blob.rindex(name) + len(name) - 1
    assert at > HEADER_SIZE + MAC_SIZE
    blob[at] ^= 0x01
    return bytes(blob)


def tampered_swapped_payload(key: bytes, sid: str, marker: Path) -> bytes:
    genuine = raw_envelope(key, sid, pickle.dumps({"v": 1}, protocol=4))
    return genuine[: HEADER_SIZE + MAC_SIZE] + malicious_payload(marker)


def tampered_wrong_key(key: bytes, sid: str, marker: Path) -> bytes:
    return raw_envelope(b"0" * 64, sid, malicious_payload(marker))


def tampered_copied_from_other_id(key: bytes, sid: str, marker: Path) -> bytes:
    return raw_envelope(key, new_session_id(), malicious_payload(marker))


def quarantined(raw: Any, store: RedisStore) -> list[bytes]:
    return list(raw.scan_iter(match=store.prefix + "quarantine:*"))


@pytest.mark.parametrize(
    "tamper",
    [
        tampered_flipped_byte,
        tampered_swapped_payload,
        tampered_wrong_key,
        tampered_copied_from_other_id,
    ],
)
def test_planted_value_failing_verification_is_never_unpickled_and_is_quarantined(
    store, raw, session_key, tmp_path, caplog, tamper
):
    probe = tmp_path / "gadget-probe"
    pickle.loads(malicious_payload(probe))["x"].close()
    assert probe.exists()  # the gadget really creates its marker when unpickled
    marker = tmp_path / "unpickled-marker"
    stored = store.save(make_record({"v": 1}), time.time())
    key = store.prefix + stored.sid
    blob = tamper(session_key, stored.sid, marker)
    raw.hset(key, "e", blob)
    caplog.set_level(logging.WARNING, logger="pyserv.error")

    assert load_locked(store, stored.sid) is None

    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("unpickled-marke")]
    assert not raw.exists(key)
    (moved,) = quarantined(raw, store)
    assert raw.hget(moved, "e") == blob
    assert stored.sid.encode() not in moved
    assert store.fingerprint(stored.sid).encode() in moved
    assert QUARANTINE_SECONDS - 60 < raw.ttl(moved) <= QUARANTINE_SECONDS
    warnings = [
        r for r in caplog.records if r.name == "pyserv.error" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert store.fingerprint(stored.sid) in message
    assert stored.sid not in message
    assert store.lock(stored.sid, 1.0) is None


def plant_generation_hint_disagreeing(raw, store, sid, session_key):
    genuine = raw_envelope(session_key, sid, pickle.dumps({"v": 1}, protocol=4), generation=1)
    raw.hset(store.prefix + sid, mapping={"g": 7, "e": genuine})


def plant_no_envelope(raw, store, sid, session_key):
    raw.hdel(store.prefix + sid, "e")


def plant_garbage_timeout(raw, store, sid, session_key):
    raw.hset(store.prefix + sid, "t", "soon")


def plant_string_instead_of_hash(raw, store, sid, session_key):
    raw.set(store.prefix + sid, b"not a hash")


@pytest.mark.parametrize(
    "plant",
    [
        plant_generation_hint_disagreeing,
        plant_no_envelope,
        plant_garbage_timeout,
        plant_string_instead_of_hash,
    ],
)
def test_malformed_session_key_loads_as_absent_and_is_quarantined(
    store, raw, session_key, caplog, plant
):
    stored = store.save(make_record({"v": 1}), time.time())
    plant(raw, store, stored.sid, session_key)
    caplog.set_level(logging.WARNING, logger="pyserv.error")

    assert load_locked(store, stored.sid) is None

    assert not raw.exists(store.prefix + stored.sid)
    assert len(quarantined(raw, store)) == 1
    assert store.fingerprint(stored.sid) in caplog.text


def test_valid_signature_from_the_right_key_is_what_gets_unpickled(store, raw, session_key):
    """The control for the tampering tests: the same hand-built envelope, correctly
    signed for this id, does load, so the tests above fail for the right reason."""
    stored = store.save(make_record({"v": 1}), time.time())
    payload = pickle.dumps({"v": "hand-built"}, protocol=4)
    raw.hset(store.prefix + stored.sid, "e", raw_envelope(session_key, stored.sid, payload))

    loaded = load_locked(store, stored.sid)

    assert loaded is not None and loaded.data == {"v": "hand-built"}


def test_session_over_the_size_limit_is_refused_before_any_write(make_store, envelope, raw):
    envelope.max_bytes = 1000
    store = make_store()
    stored = store.save(make_record({"v": "small"}), time.time())
    before = raw.hgetall(store.prefix + stored.sid)
    lock = store.lock(stored.sid, 5.0)
    try:
        current = store.load(stored.sid)
        current.data["v"] = "x" * 2000
        with pytest.raises(SessionValueError, match=r"over max_session_bytes \(1000\)"):
            store.save(current, time.time())
    finally:
        lock.release()

    assert raw.hgetall(store.prefix + stored.sid) == before


# -- locks and fencing -------------------------------------------------------------------


def test_holder_whose_lease_ran_out_cannot_overwrite_a_newer_save(make_store):
    first, second = make_store(lock_lease=0.3), make_store()
    stored = first.save(make_record({"owner": "nobody"}), time.time())
    lock_a = first.lock(stored.sid, 1.0)
    assert lock_a is not None
    loaded_a = first.load(stored.sid)
    assert loaded_a is not None and loaded_a.generation == 1

    time.sleep(0.4)  # request A outlives its lease
    lock_b = second.lock(stored.sid, 0.1)
    assert lock_b is not None
    loaded_b = second.load(stored.sid)
    loaded_b.data["owner"] = "B"
    second.save(loaded_b, time.time())
    loaded_a.data["owner"] = "A"
    with pytest.raises(SessionConflict, match="stored generation 2, this request loaded 1"):
        first.save(loaded_a, time.time())
    lock_a.release()  # A's late release must not free B's lock
    with pytest.raises(LockTimeout):
        first.lock(stored.sid, 0.05)
    lock_b.release()

    final = load_locked(first, stored.sid)
    assert final is not None
    assert (final.data, final.generation) == ({"owner": "B"}, 2)


def test_waiter_gets_none_when_the_holder_deletes_the_session(store, store_contents):
    stored = store.save(make_record({"v": 1}), time.time())
    holder = store.lock(stored.sid, 5.0)
    results: list[object] = []

    def waiter() -> None:
        try:
            results.append(store.lock(stored.sid, 5.0))
        except BaseException as exc:  # reported to the test thread
            results.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        time.sleep(0.1)  # the waiter is polling now
        assert thread.is_alive()
        store.delete(stored.sid)
    finally:
        holder.release()
        thread.join(10.0)
    assert not thread.is_alive()

    assert results == [None]
    assert not any(stored.sid in name for name in store_contents())


def _increment_in_child(
    url: str, prefix: str, key: bytes, sid: str, times: int, start: Any
) -> None:
    """A process of its own: its own store and cache, as a pyservd worker has."""
    backend = RedisStore(url, Envelope(lambda: key), prefix=prefix)
    cached = CachedStore(backend, size=16)
    try:
        start.wait(30.0)
        for _ in range(times):
            # Polling is not fair: on a loaded machine one process may lose many rounds.
            increment(cached, sid, lock_timeout=60.0)
    finally:
        backend.close()


def test_increments_from_eight_processes_with_their_own_caches_are_exact(
    store, redis_server, session_key
):
    stored = store.save(make_record({"n": 0}), time.time())
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    args = (redis_server.url, store.prefix, session_key, stored.sid, 125, start)
    processes = [context.Process(target=_increment_in_child, args=args) for _ in range(8)]
    for process in processes:
        process.start()
    try:
        start.set()
        deadline = time.monotonic() + 120.0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5.0)

    assert [process.exitcode for process in processes] == [0] * 8
    final = load_locked(store, stored.sid)
    assert final is not None
    assert (final.data["n"], final.generation) == (1000, 1001)


def test_increments_from_threads_sharing_one_cached_store_are_exact(store):
    cached = CachedStore(store, size=16)
    stored = cached.save(make_record({"n": 0}), time.time())
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                increment(cached, stored.sid, lock_timeout=60.0)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)

    assert not errors
    final = load_locked(store, stored.sid)
    assert final is not None and final.data["n"] == 400


def test_two_hosts_with_caches_never_read_a_stale_session(make_store):
    host_a, host_b = CachedStore(make_store(), 16), CachedStore(make_store(), 16)
    stored = host_a.save(make_record({"n": 0, "probe": UnpickleCounter()}), time.time())
    UnpickleCounter.unpickled = 0

    seen = [increment((host_a, host_b)[i % 2], stored.sid) for i in range(20)]

    assert seen == list(range(20))
    # host_a's first read hit its cache (it had saved the session); every later read
    # followed the other host's write, so it came from Redis.
    assert UnpickleCounter.unpickled == 19
    assert increment(host_b, stored.sid) == 20  # host_b wrote last: its copy is current
    assert UnpickleCounter.unpickled == 19
    assert increment(host_a, stored.sid) == 21
    assert UnpickleCounter.unpickled == 20


# -- TTL --------------------------------------------------------------------------------


def test_ttl_is_the_idle_timeout_and_every_load_refreshes_it(store, raw, age_session):
    stored = store.save(make_record({"v": 1}, timeout=100), time.time())
    assert 95_000 < pttl(raw, store, stored.sid) <= 100_000

    age_session(stored.sid, 50)
    assert pttl(raw, store, stored.sid) <= 50_000
    loaded = load_locked(store, stored.sid)
    assert 95_000 < pttl(raw, store, stored.sid) <= 100_000

    age_session(stored.sid, 50)
    assert store.load(stored.sid, known=loaded) is loaded  # a cache hit refreshes too
    assert 95_000 < pttl(raw, store, stored.sid) <= 100_000


def test_provisional_session_has_the_shorter_ttl_until_confirmed(store, raw):
    record = make_record({"v": 1}, timeout=100).replace(new_timeout=30)
    stored = store.save(record, time.time())
    assert 25_000 < pttl(raw, store, stored.sid) <= 30_000

    loaded = load_locked(store, stored.sid)
    assert loaded is not None and loaded.new_timeout == 30
    assert 25_000 < pttl(raw, store, stored.sid) <= 30_000

    loaded.new_timeout = 0  # its cookie came back (SessionInterface does this)
    store.save(loaded, time.time())
    assert 95_000 < pttl(raw, store, stored.sid) <= 100_000


def test_expired_key_loads_as_none_and_a_late_save_does_not_recreate_it(store, raw, age_session):
    stored = store.save(make_record({"v": 1}, timeout=60), time.time())
    loaded = load_locked(store, stored.sid)
    age_session(stored.sid, 61)

    assert store.load(stored.sid) is None
    assert store.load(stored.sid, known=loaded) is None
    loaded.data["v"] = 2
    with pytest.raises(SessionConflict, match="expired or was invalidated"):
        store.save(loaded, time.time())
    assert not raw.exists(store.prefix + stored.sid)


# -- outages -----------------------------------------------------------------------------


def test_stopped_redis_makes_every_call_unavailable_and_the_same_store_recovers(
    redis_server_factory, make_store, caplog
):
    server = redis_server_factory()
    store = make_store(server.url, timeout=1.0)
    stored = store.save(make_record({"n": 0}), time.time())
    held = store.lock(stored.sid, 1.0)
    loaded = store.load(stored.sid)

    server.stop()
    caplog.set_level(logging.WARNING, logger="pyserv.error")
    held.release()  # never raises: the lock lapses with its lease
    assert "not released" in caplog.text
    calls = {
        "lock": lambda: store.lock(stored.sid, 5.0),
        "load": lambda: store.load(stored.sid),
        "save": lambda: store.save(loaded, time.time()),
        "save new": lambda: store.save(make_record({"n": 0}), time.time()),
        "delete": lambda: store.delete(stored.sid),
        "count": store.count,
        "ping": store.ping,
    }
    for name, call in calls.items():
        message = assert_unavailable_within(1.5, call)
        assert f"cannot reach Redis at 127.0.0.1:{server.port}/0" in message, name
        assert "\n" not in message

    server.restart()  # same port, empty database
    store.ping()
    fresh = store.save(make_record({"n": 0}), time.time())
    assert increment(store, fresh.sid) == 0
    assert increment(store, fresh.sid) == 1


def test_first_call_after_a_redis_restart_succeeds(redis_server_factory, make_store):
    """Pooled connections to the old process are noticed and replaced, not used."""
    server = redis_server_factory()
    store = make_store(server.url)
    store.save(make_record({"n": 0}), time.time())

    server.restart()  # while the store is idle: its pooled connection is now dead

    fresh = store.save(make_record({"n": 0}), time.time())
    assert increment(store, fresh.sid) == 0


def test_hung_redis_makes_calls_unavailable_within_the_timeout(redis_server_factory, make_store):
    server = redis_server_factory()
    store = make_store(server.url, timeout=0.5)
    stored = store.save(make_record({"n": 0}), time.time())

    os.kill(server.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        for call in (lambda: store.lock(stored.sid, 5.0), lambda: store.load(stored.sid)):
            message = assert_unavailable_within(1.5, call)  # no retries: 4 x 0.5 s would fail
            assert "no answer within 0.5 s" in message
    finally:
        os.kill(server.pid, signal.SIGCONT)

    # A command that timed out may still run once Redis resumes (here, a lock with a
    # token nobody holds, until its lease ends), so recovery is shown on another session.
    fresh = store.save(make_record({"n": 0}), time.time())
    assert increment(store, fresh.sid) == 0


def test_ping_of_a_closed_port_names_host_and_port(make_store):
    port = free_port()  # nothing listens there
    store = make_store(f"redis://127.0.0.1:{port}/3")

    message = assert_unavailable_within(1.5, store.ping)

    assert message.startswith(f"cannot reach Redis at 127.0.0.1:{port}/3: ")
    assert "refused" in message.lower()


@pytest.mark.parametrize(
    "make_it_refuse",
    [
        pytest.param(("REPLICAOF", "127.0.0.1", "1"), id="read-only replica"),
        pytest.param(("CONFIG", "SET", "maxmemory", "1"), id="out of memory"),
    ],
)
def test_redis_refusing_writes_is_unavailable(redis_server_factory, make_store, make_it_refuse):
    import redis

    server = redis_server_factory()
    store = make_store(server.url)
    stored = store.save(make_record({"n": 0}), time.time())
    loaded = load_locked(store, stored.sid)
    with redis.Redis.from_url(server.url, protocol=2) as admin:
        admin.execute_command(*make_it_refuse)

        message = assert_unavailable_within(1.5, lambda: store.save(loaded, time.time()))

    assert message.startswith(f"Redis at 127.0.0.1:{server.port}/0 refuses the command: ")
    assert "script" not in message  # the reason, not where in our Lua it surfaced


# -- AUTH and TLS ------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


def test_right_password_works_and_a_wrong_one_is_unavailable_without_showing_it(
    redis_server_factory, make_store
):
    server = redis_server_factory(password=PASSWORD)
    store = make_store(server.url, password=PASSWORD)
    stored = store.save(make_record({"n": 0}), time.time())
    assert increment(store, stored.sid) == 0

    wrong = make_store(server.url, password="not " + PASSWORD)
    message = assert_unavailable_within(1.5, wrong.ping)
    assert "password was refused" in message
    assert PASSWORD not in message
    message = assert_unavailable_within(1.5, lambda: wrong.load(stored.sid))
    assert PASSWORD not in message

    anonymous = make_store(server.url)
    message = assert_unavailable_within(1.5, anonymous.ping)
    assert "requires a password and none is configured" in message


def test_password_in_the_url_is_accepted_and_never_shown(redis_server_factory, make_store):
    server = redis_server_factory(password=PASSWORD)
    quoted = PASSWORD.replace(" ", "%20")
    make_store(f"redis://:{quoted}@127.0.0.1:{server.port}/0").ping()

    wrong = make_store(f"redis://:wrong{quoted}@127.0.0.1:{server.port}/0")
    message = assert_unavailable_within(1.5, wrong.ping)

    assert "wrong" not in message and quoted not in message
    assert f"127.0.0.1:{server.port}/0" in message


def test_rediss_url_talks_tls_to_a_server_with_a_trusted_certificate(
    redis_server_factory, make_store, monkeypatch
):
    server = redis_server_factory(tls=True)
    assert server.url.startswith("rediss://")
    untrusting = make_store(server.url)
    message = assert_unavailable_within(1.5, untrusting.ping)
    assert "certificate verify failed" in message

    monkeypatch.setenv("SSL_CERT_FILE", str(server.tls.ca))  # how a private CA is trusted
    store = make_store(server.url)
    stored = store.save(make_record({"n": 0}), time.time())

    assert increment(store, stored.sid) == 0
    plain = make_store(server.url.replace("rediss://", "redis://"))
    assert_unavailable_within(1.5, plain.ping)


# -- the optional dependency ---------------------------------------------------------------


def test_without_the_redis_package_the_error_says_how_to_install_it(monkeypatch, envelope):
    monkeypatch.setitem(sys.modules, "redis", None)

    with pytest.raises(ImportError, match=r"pip install 'pyserv\[redis\]'"):
        RedisStore("redis://127.0.0.1:6379/0", envelope, prefix="pyserv:test:")
