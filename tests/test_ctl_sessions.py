"""``pyservctl sessions …`` on real session directories built with the store itself."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from planted import malicious_payload, raw_envelope

from container.ctl import main
from pyserv.secret import load_or_create_secret
from pyserv.stores.base import Envelope, SessionRecord, new_session_id
from pyserv.stores.file import FileStore

HOUR = 3600


class Site:
    """A pyservd config with apps whose session directories hold real sessions."""

    def __init__(
        self, root: Path, apps: tuple[str, ...] = ("testapp",), pythonpath: str = ""
    ) -> None:
        self.root = root
        self.config = root / "pyservd.conf"
        sections = [f"[pyservd]\nlisten = unix:{root}/run/pyservd.sock\n"]
        self.stores: dict[str, FileStore] = {}
        for name in apps:
            directory = root / name / "sessions"
            sections.append(
                f"[app:{name}]\nmount = /{name}\nmodule = probe\nsession_dir = {directory}\n"
                + (f"pythonpath = {pythonpath}\n" if pythonpath else "")
            )
            secret = str(directory / ".secret")
            store = FileStore(str(directory), Envelope(lambda s=secret: load_or_create_secret(s)))
            store.ensure_directory()
            assert store.envelope.key  # creates the secret, as the first request would
            self.stores[name] = store
        self.config.write_text("\n".join(sections))

    def store(self, app: str = "testapp") -> FileStore:
        return self.stores[app]


def add_session(
    store: FileStore, *, idle: float, timeout: int = HOUR, data: dict[str, Any] | None = None
) -> str:
    """Store a session last used *idle* seconds ago; return its id."""
    now = time.time()
    record = SessionRecord(new_session_id(), data or {"v": 1}, 0, now - idle, now, timeout)
    store.save(record, now)
    age(store, record.sid, idle)
    return record.sid


def session_file(store: FileStore, sid: str) -> Path:
    return Path(store.directory) / sid[:2] / f"{sid}.session"


def age(store: FileStore, sid: str, idle: float) -> None:
    when = time.time() - idle
    os.utime(session_file(store, sid), (when, when))


def add_malicious_session(
    store: FileStore, marker: Path, *, key: bytes | None = None, idle: float = 0
) -> str:
    """A session whose unpickling would create *marker*, signed with *key* (default the
    store's own key, i.e. a record that verifies)."""
    sid = new_session_id()
    blob = raw_envelope(
        key or store.envelope.key, sid, malicious_payload(marker), created=time.time() - idle
    )
    path = session_file(store, sid)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(blob)
    path.chmod(0o600)
    age(store, sid, idle)
    return sid


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(capsys, *args, "--json")
    assert err == ""
    assert code in (0, 1)
    return json.loads(out)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# -- stats -----------------------------------------------------------------------------


def test_stats_counts_live_and_expired_and_buckets_live_ones_by_idle_time(site, capsys) -> None:
    store = site.store()
    for idle in (5, 30, 120, 600, 2000):
        add_session(store, idle=idle)
    add_session(store, idle=5 * HOUR, timeout=24 * HOUR)
    add_session(store, idle=2 * HOUR)  # expired, not yet swept
    files = sorted(Path(store.directory).glob("*/*.session"))
    sizes = {p.stat().st_size for p in files}
    assert len(sizes) == 1  # same data, so the same envelope size
    size = sizes.pop()

    report = run_json(capsys, "--config", str(site.config), "sessions", "stats")

    (app,) = report["apps"]
    assert app["app"] == "testapp" and app["directory"] == store.directory
    assert (app["live"], app["expired"], app["unreadable"]) == (6, 1, 0)
    assert (app["live_bytes"], app["expired_bytes"]) == (6 * size, size)
    histogram = {b["idle"]: b["count"] for b in app["idle_histogram"]}
    assert histogram == {
        "< 1 min": 2,
        "1-5 min": 1,
        "5-15 min": 1,
        "15-60 min": 1,
        "1-4 h": 0,
        "4-24 h": 1,
        ">= 1 day": 0,
    }
    assert app["idle_histogram"][3] == {
        "idle": "15-60 min",
        "from_seconds": 900,
        "to_seconds": 3600,
        "count": 1,
    }


def test_stats_text_shows_the_same_numbers_as_json(site, capsys) -> None:
    for idle in (10, 400, 400, 3 * HOUR):
        add_session(site.store(), idle=idle)
    report = run_json(capsys, "sessions", "stats", "--config", str(site.config))["apps"][0]

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "stats")

    assert (code, err) == (0, "")
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert lines["live"][1] == str(report["live"]) == "3"
    assert lines["expired"][1] == str(report["expired"]) == "1"
    assert any(line.split() == ["5-15", "min", "2"] for line in out.splitlines())


def test_stats_of_all_apps_or_one(tmp_path, capsys) -> None:
    site = Site(tmp_path, apps=("one", "two"))
    add_session(site.store("one"), idle=1)
    add_session(site.store("two"), idle=1)
    add_session(site.store("two"), idle=1)

    everything = run_json(capsys, "--config", str(site.config), "sessions", "stats")
    only_two = run_json(capsys, "--config", str(site.config), "sessions", "stats", "--app", "two")

    assert [(a["app"], a["live"]) for a in everything["apps"]] == [("one", 1), ("two", 2)]
    assert [(a["app"], a["live"]) for a in only_two["apps"]] == [("two", 2)]


# -- expire ----------------------------------------------------------------------------


def test_expire_removes_only_sessions_idle_longer_than_given(site, capsys) -> None:
    store = site.store()
    recent = add_session(store, idle=10 * 60)
    old = [add_session(store, idle=40 * 60), add_session(store, idle=50 * 60)]

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "expire", "--idle", "30")

    assert (code, err) == (0, "")
    assert "removed 2 idle session(s)" in out
    assert session_file(store, recent).exists()
    assert not any(session_file(store, sid).exists() for sid in old)
    assert not any(session_file(store, sid).with_suffix(".lock").exists() for sid in old)


def test_expire_skips_a_locked_session_and_reports_it(site, capsys) -> None:
    store = site.store()
    busy = add_session(store, idle=40 * 60)
    idle = add_session(store, idle=40 * 60)
    request = FileStore(store.directory, store.envelope)  # another process's view
    held = request.lock(busy, 1.0)
    assert held is not None
    try:
        report = run_json(
            capsys, "--config", str(site.config), "sessions", "expire", "--idle", "30"
        )
        code, out, _ = run(
            capsys, "--config", str(site.config), "sessions", "expire", "--idle", "30"
        )
    finally:
        held.release()

    assert report["apps"][0]["removed"] == 1 and report["apps"][0]["in_use"] == 1
    assert code == 0 and "1 in use, skipped" in out
    assert session_file(store, busy).exists()
    assert not session_file(store, idle).exists()


def test_expire_rejects_a_negative_idle_time(site, capsys) -> None:
    code, _, err = run(capsys, "--config", str(site.config), "sessions", "expire", "--idle", "-5")
    assert code == 2 and "expected minutes" in err


# -- show ------------------------------------------------------------------------------


def test_show_lists_keys_and_pickled_sizes_with_values_masked(site, capsys) -> None:
    data = {"user": "alice-secret-name", "cart": list(range(50))}
    sid = add_session(site.store(), idle=60, data=data)

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "show", sid)

    assert (code, err) == (0, "")
    assert site.store().fingerprint(sid) in out
    assert "alice-secret-name" not in out and "[0, 1, 2" not in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if "***" in line}
    assert rows == {k: str(len(pickle.dumps(v))) for k, v in data.items()}


def test_show_values_prints_repr_truncated_to_200_characters(site, capsys) -> None:
    data = {"user": "alice", "big": "x" * 1000}
    sid = add_session(site.store(), idle=60, data=data)

    report = run_json(capsys, "--config", str(site.config), "sessions", "show", sid, "--values")
    code, out, _ = run(capsys, "--config", str(site.config), "sessions", "show", "--values", sid)

    values = {k["key"]: k["value"] for k in report["keys"]}
    assert values["user"] == "'alice'"
    assert len(values["big"]) == 200 and values["big"].startswith("'xxx")
    assert {k["key"]: k["size"] for k in report["keys"]} == {
        k: len(pickle.dumps(v)) for k, v in data.items()
    }
    assert report["session"] == site.store().fingerprint(sid)
    assert report["expired"] is False and report["timeout"] == HOUR
    assert code == 0 and "'alice'" in out


def test_show_does_not_touch_the_last_access_time(site, capsys) -> None:
    sid = add_session(site.store(), idle=600)
    before = session_file(site.store(), sid).stat().st_mtime

    assert run(capsys, "--config", str(site.config), "sessions", "show", sid)[0] == 0

    assert session_file(site.store(), sid).stat().st_mtime == before


def test_show_searches_every_app(tmp_path, capsys) -> None:
    site = Site(tmp_path, apps=("one", "two"))
    add_session(site.store("one"), idle=1)
    sid = add_session(site.store("two"), idle=1, data={"where": "two"})

    report = run_json(capsys, "--config", str(site.config), "sessions", "show", sid)

    assert report["app"] == "two" and [k["key"] for k in report["keys"]] == ["where"]


@pytest.mark.parametrize("prefix", ["-", "--", "-h", "--values"])
def test_show_takes_an_id_that_begins_with_a_dash(site, capsys, prefix) -> None:
    store = site.store()
    sid = (prefix + new_session_id())[:43]
    now = time.time()
    store.save(SessionRecord(sid, {"dashed": 1}, 0, now, now, HOUR), now)

    report = run_json(capsys, "--config", str(site.config), "sessions", "show", sid)
    code, out, _ = run(
        capsys, "--config", str(site.config), "--json", "sessions", "show", "--", sid
    )
    after_dashes = json.loads(out)

    assert [k["key"] for k in report["keys"]] == ["dashed"]
    assert code == 0 and report == {**after_dashes, "idle_seconds": report["idle_seconds"]}


def test_show_unpickles_the_apps_classes_from_its_pythonpath(tmp_path, capsys, monkeypatch):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "shopcart.py").write_text(
        "class Cart:\n"
        "    def __init__(self, items):\n"
        "        self.items = items\n"
        "    def __repr__(self):\n"
        "        return f'Cart({self.items!r})'\n"
    )
    monkeypatch.syspath_prepend(str(apps))
    import shopcart  # the app's module, importable only until the patches below

    without = Site(tmp_path / "without")
    with_path = Site(tmp_path / "with", pythonpath=str(apps))
    sids = [
        add_session(site.store(), idle=1, data={"cart": shopcart.Cart([1, 2])})
        for site in (without, with_path)
    ]
    monkeypatch.delitem(sys.modules, "shopcart")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(apps)])

    code, out, err = run(capsys, "--config", str(without.config), "sessions", "show", sids[0])
    assert code == 1 and out == ""
    assert "verifies but cannot be unpickled here (ModuleNotFoundError" in err
    assert "fails verification" not in err

    report = run_json(
        capsys, "--config", str(with_path.config), "sessions", "show", sids[1], "--values"
    )
    assert report["keys"][0]["value"] == "Cart([1, 2])"
    assert str(apps) not in sys.path


def test_show_unknown_id_exits_1_with_a_clear_message(site, capsys) -> None:
    add_session(site.store(), idle=1)
    unknown = new_session_id()

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "show", unknown)

    assert code == 1 and out == ""
    assert err == f"pyservctl: no such session in testapp ({site.store().directory})\n"


@pytest.mark.parametrize("bad_id", ["abc", "../../etc/passwd", "x" * 42 + "/"])
def test_show_malformed_id_exits_2(site, capsys, bad_id) -> None:
    code, out, err = run(capsys, "--config", str(site.config), "sessions", "show", bad_id)

    assert code == 2 and out == ""
    assert err.startswith("pyservctl: not a session id") and err.count("\n") == 1


def test_show_missing_secret_names_the_file_and_does_not_create_it(tmp_path, capsys) -> None:
    directory = tmp_path / "sessions"
    store = FileStore(str(directory), Envelope(lambda: b"k" * 64))
    store.ensure_directory()
    sid = add_session(store, idle=1)
    secret = directory / ".secret"

    code, _, err = run(capsys, "sessions", "show", sid, "--dir", str(directory))

    assert code == 2 and str(secret) in err and err.count("\n") == 1
    assert not secret.exists()


def test_show_of_a_tampered_session_exits_1_without_unpickling(site, capsys, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    sid = add_malicious_session(site.store(), marker, key=b"w" * 64)

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "show", sid)

    assert code == 1 and out == "" and "fails verification" in err
    assert not marker.exists()


# -- verify ----------------------------------------------------------------------------


def test_verify_quarantines_tampered_and_wrongly_keyed_files_without_unpickling(
    site, capsys, tmp_path
) -> None:
    store = site.store()
    marker = tmp_path / "unpickled"
    good = add_session(store, idle=1)
    tampered = add_malicious_session(store, marker)
    path = session_file(store, tampered)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # flip one bit in the pickle
    path.write_bytes(bytes(blob))
    wrong_key = add_malicious_session(store, marker, key=b"k" * 64)
    fingerprints = {store.fingerprint(tampered), store.fingerprint(wrong_key)}

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "verify")

    assert (code, err) == (1, "")
    assert not marker.exists()
    assert "3 checked, 1 good, 2 bad" in out
    quarantine = Path(store.directory) / "quarantine"
    moved = sorted(quarantine.iterdir())
    assert len(moved) == 2
    assert {p.name.split("-")[0] for p in moved} == fingerprints
    for target in moved:
        assert f"moved to {target}" in out
    assert session_file(store, good).exists()
    assert not session_file(store, tampered).exists()
    assert not session_file(store, wrong_key).exists()
    assert tampered not in out and wrong_key not in out and good not in out

    again = run_json(capsys, "--config", str(site.config), "sessions", "verify")
    assert again["apps"][0]["checked"] == 1 and again["apps"][0]["bad"] == 0


def test_verify_json_lists_the_quarantine_targets(site, capsys, tmp_path) -> None:
    store = site.store()
    add_session(store, idle=1)
    bad = add_malicious_session(store, tmp_path / "unpickled", key=b"k" * 64)

    code, out, _ = run(capsys, "--config", str(site.config), "sessions", "verify", "--json")

    app = json.loads(out)["apps"][0]
    assert code == 1
    assert (app["checked"], app["good"], app["bad"], app["in_use"]) == (2, 1, 1, 0)
    (target,) = app["quarantined"]
    assert Path(target).parent == Path(store.directory) / "quarantine" and Path(target).exists()
    assert app["problems"] == [
        {
            "session": store.fingerprint(bad),
            "reason": "signature does not match",
            "moved_to": target,
        }
    ]
    assert not (tmp_path / "unpickled").exists()


def test_verify_leaves_a_bad_file_in_use_and_reports_it(site, capsys, tmp_path) -> None:
    store = site.store()
    bad = add_malicious_session(store, tmp_path / "unpickled", key=b"k" * 64)
    held = FileStore(store.directory, store.envelope).lock(bad, 1.0)
    assert held is not None
    try:
        code, out, _ = run(capsys, "--config", str(site.config), "sessions", "verify")
    finally:
        held.release()

    assert code == 1 and "in use, left in place" in out
    assert session_file(store, bad).exists()


def test_verify_does_not_unpickle_even_a_correctly_signed_record(site, capsys, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    add_malicious_session(site.store(), marker)

    code, out, _ = run(capsys, "--config", str(site.config), "sessions", "verify")

    assert code == 0 and "1 checked, 1 good, 0 bad" in out
    assert not marker.exists()


def test_verify_needs_the_secret_and_says_which_file(tmp_path, capsys) -> None:
    directory = tmp_path / "sessions"
    store = FileStore(str(directory), Envelope(lambda: b"k" * 64))
    store.ensure_directory()
    add_session(store, idle=1)

    code, out, err = run(capsys, "sessions", "verify", "--dir", str(directory))

    assert code == 2 and out == ""
    assert str(directory / ".secret") in err and err.count("\n") == 1
    assert not (directory / ".secret").exists()


# -- gc --------------------------------------------------------------------------------


def test_gc_removes_expired_sessions_and_nothing_else(site, capsys, tmp_path) -> None:
    store = site.store()
    live = [add_session(store, idle=60), add_session(store, idle=30 * 60)]
    expired = [add_session(store, idle=2 * HOUR), add_session(store, idle=90, timeout=60)]
    marker = tmp_path / "unpickled"
    expired.append(add_malicious_session(store, marker, idle=2 * HOUR))

    code, out, err = run(capsys, "--config", str(site.config), "sessions", "gc")

    assert (code, err) == (0, "")
    assert "removed 3 expired session(s)" in out
    assert all(session_file(store, sid).exists() for sid in live)
    assert not any(session_file(store, sid).exists() for sid in expired)
    assert not marker.exists()


def test_a_provisional_session_expires_after_its_shorter_idle_timeout(site, capsys) -> None:
    store = site.store()
    now = time.time()
    record = SessionRecord(new_session_id(), {"v": 1}, 0, now, now, HOUR, new_timeout=60)
    store.save(record, now)
    age(store, record.sid, 120)

    stats = run_json(capsys, "--config", str(site.config), "sessions", "stats")
    gc = run_json(capsys, "--config", str(site.config), "sessions", "gc")

    assert (stats["apps"][0]["live"], stats["apps"][0]["expired"]) == (0, 1)
    assert gc["apps"][0]["removed"] == 1


def test_gc_reports_an_expired_session_in_use(site, capsys) -> None:
    store = site.store()
    busy = add_session(store, idle=2 * HOUR)
    add_session(store, idle=2 * HOUR)
    held = FileStore(store.directory, store.envelope).lock(busy, 1.0)
    assert held is not None
    try:
        report = run_json(capsys, "--config", str(site.config), "sessions", "gc")
    finally:
        held.release()

    assert (report["apps"][0]["removed"], report["apps"][0]["in_use"]) == (1, 1)
    assert session_file(store, busy).exists()


# -- --dir mode, options, errors -------------------------------------------------------


def test_dir_mode_works_without_any_config(tmp_path, capsys) -> None:
    directory = tmp_path / "cgi-sessions"
    key_file = tmp_path / "keys" / "session.key"
    store = FileStore(str(directory), Envelope(lambda: load_or_create_secret(str(key_file))))
    store.ensure_directory()
    sid = add_session(store, idle=60, data={"n": 1})
    add_session(store, idle=2 * HOUR)
    missing_config = str(tmp_path / "no-such.conf")
    common = ("--config", missing_config, "--dir", str(directory))

    stats = run_json(capsys, "sessions", "stats", *common)
    show = run_json(capsys, "sessions", "show", sid, *common, "--secret-file", str(key_file))
    verify = run_json(capsys, "sessions", "verify", *common, "--secret-file", str(key_file))
    gc = run_json(capsys, "sessions", "gc", *common)

    assert stats["apps"] == [{**stats["apps"][0], "app": None, "directory": str(directory)}]
    assert (stats["apps"][0]["live"], stats["apps"][0]["expired"]) == (1, 1)
    assert [k["key"] for k in show["keys"]] == ["n"]
    assert (verify["apps"][0]["checked"], verify["apps"][0]["bad"]) == (2, 0)
    assert gc["apps"][0]["removed"] == 1


def test_options_are_accepted_before_or_after_the_command(site, capsys) -> None:
    add_session(site.store(), idle=1)
    config = str(site.config)

    before = run_json(capsys, "--config", config, "sessions", "stats")
    after = run_json(capsys, "sessions", "stats", "--config", config)
    between = run_json(capsys, "sessions", "--config", config, "--app", "testapp", "stats")

    assert before == after == between


def test_bad_config_exits_2_with_one_line(tmp_path, capsys) -> None:
    config = tmp_path / "pyservd.conf"
    config.write_text("[pyservd]\nlisten = unix:/tmp/x.sock\nworkers = many\n")

    code, out, err = run(capsys, "--config", str(config), "sessions", "stats")

    assert code == 2 and out == ""
    assert err == (
        f"pyservctl: config: {config}: [pyservd] workers = 'many': expected a whole number >= 1\n"
    )


def test_missing_config_exits_2_with_one_line(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "nope.conf"), "sessions", "gc")
    assert code == 2
    assert (
        err
        == f"pyservctl: config: {tmp_path / 'nope.conf'}: cannot read: No such file or directory\n"
    )


def test_missing_session_directory_exits_2(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "sessions", "stats", "--dir", str(tmp_path / "x" / "y"))
    assert code == 2
    assert err == f"pyservctl: {tmp_path / 'x' / 'y'}: no such session directory\n"


def test_unknown_app_exits_2_naming_the_known_ones(site, capsys) -> None:
    code, _, err = run(capsys, "--config", str(site.config), "sessions", "stats", "--app", "nope")
    assert code == 2 and "no [app:nope]" in err and "apps: testapp" in err


def test_app_and_dir_together_is_a_usage_error(site, capsys, tmp_path) -> None:
    code, _, err = run(capsys, "sessions", "stats", "--app", "testapp", "--dir", str(tmp_path))
    assert code == 2 and "cannot be combined" in err


def test_counting_commands_never_print_session_ids(site, capsys, tmp_path) -> None:
    store = site.store()
    sids = [add_session(store, idle=idle) for idle in (1, 40 * 60, 2 * HOUR)]
    sids.append(add_malicious_session(store, tmp_path / "unpickled", key=b"k" * 64))
    config = str(site.config)

    outputs = [
        run(capsys, "--config", config, *command)
        for command in (
            ("sessions", "stats"),
            ("sessions", "stats", "--json"),
            ("sessions", "verify"),
            ("sessions", "expire", "--idle", "30", "--json"),
            ("sessions", "gc"),
        )
    ]

    text = "".join(out + err for _, out, err in outputs)
    assert not any(sid in text for sid in sids)
