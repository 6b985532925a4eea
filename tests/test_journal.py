"""Tests for the LMDB journal, against real environments under tmp_path."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lmdb
import pytest

from overlayd.journal import SCHEMA_VERSION, Journal, JournalError, SchemaError, encode_event

ROOT = Path(__file__).resolve().parents[1]


def spawn(code, *args):
    """Run python code in a child with the repo importable; text pipes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def expect(proc, line):
    got = proc.stdout.readline().strip()
    assert got == line, f"child said {got!r}, expected {line!r}"


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def reader_pids(env):
    """Pids in the LMDB reader table (the text of env.readers())."""
    lines = env.readers().splitlines()[1:]  # skip the header line
    return {int(line.split()[0]) for line in lines if line.strip()}


def test_round_trip_and_key_order(tmp_path):
    j = Journal.open(tmp_path)

    def write(txn):
        for sid in (10, 2):
            txn.put_saga(sid, {"id": sid, "name": f"s{sid}", "state": "running"})
            for idx in (10, 2, 1):
                txn.put_step(sid, idx, {"action": f"a{idx}", "state": "done"})
        txn.set_meta("mount", {"lower": "/src", "n": 3})
        return [txn.event("begin", saga=2), txn.event("step", saga=10, step=2, ok=True),
                txn.event("note", text="héllo")]

    assert j.transact(write) == [1, 2, 3]
    j.close()

    j = Journal.open(tmp_path)
    assert [s["id"] for s in j.sagas()] == [2, 10]
    assert j.saga(10) == {"id": 10, "name": "s10", "state": "running"}
    assert j.saga(3) is None
    assert [s["index"] for s in j.steps(10)] == [1, 2, 10]
    assert j.steps(2)[2] == {"saga": 2, "index": 10, "action": "a10", "state": "done"}
    assert j.steps(5) == []
    assert j.meta("mount") == {"lower": "/src", "n": 3}
    assert j.meta("missing", 7) == 7
    assert j.meta("schema_version") == SCHEMA_VERSION

    evs = j.events()
    assert [e["seq"] for e in evs] == [1, 2, 3]
    assert evs[1] == {"seq": 2, "ts": evs[1]["ts"], "saga": 10, "step": 2,
                      "kind": "step", "ok": True}
    assert evs[2]["text"] == "héllo" and evs[2]["saga"] is None
    assert isinstance(evs[0]["ts"], float)
    assert [e["seq"] for e in j.events(saga=10)] == [2]
    assert [e["seq"] for e in j.events(since=1)] == [2, 3]
    assert [e["seq"] for e in j.events(limit=2)] == [1, 2]
    assert j.events(since=3) == []

    # seq keeps counting across a reopen
    assert j.transact(lambda txn: txn.event("after-reopen")) == 4
    stats = j.stats()
    assert stats["entries"] == {"meta": 2, "sagas": 2, "steps": 6, "events": 4, "paths": 0, "bases": 0}
    assert 0 < stats["used_bytes"] <= stats["map_size"]
    j.close()

    # on-disk layout: only the six named dbs in the main db, fixed-width keys
    env = lmdb.open(str(tmp_path / "journal"), max_dbs=8, readonly=True)
    with env.begin() as txn:
        assert {k.rstrip(b"\0") for k in txn.cursor().iternext(values=False)} == {
            b"meta", b"sagas", b"steps", b"events", b"paths", b"bases"}
    sagas = env.open_db(b"sagas", create=False)
    steps = env.open_db(b"steps", create=False)
    with env.begin() as txn:
        assert list(txn.cursor(db=sagas).iternext(values=False)) == [
            struct.pack(">Q", 2), struct.pack(">Q", 10)]
        assert next(txn.cursor(db=steps).iternext(values=False)) == struct.pack(
            ">QI", 2, 1)
        raw = txn.get(struct.pack(">Q", 2), db=sagas)
        assert raw == json.dumps({"id": 2, "name": "s2", "state": "running"},
                                 separators=(",", ":")).encode()
    env.close()


def test_write_txn_reads_deletes_and_ids(tmp_path):
    with Journal.open(tmp_path) as j:
        def first(txn):
            a, b = txn.new_saga_id(), txn.new_saga_id()
            txn.put_saga(a, {"v": 1})
            txn.put_saga(b, {"v": 2})
            txn.put_step(a, 1, {"s": 1})
            txn.put_step(a, 2, {"s": 2})
            txn.put_step(b, 1, {"s": 3})
            assert txn.saga(a) == {"id": a, "v": 1}
            assert [s["s"] for s in txn.steps(a)] == [1, 2]
            assert txn.get_meta("nope", "d") == "d"
            return a, b

        a, b = j.transact(first)
        assert (a, b) == (1, 2)
        assert j.transact(lambda txn: txn.delete_step(a, 2)) is True
        assert j.transact(lambda txn: txn.delete_step(a, 2)) is False
        assert j.transact(lambda txn: txn.delete_saga(b)) is True
        assert j.saga(b) is None and j.steps(b) == []
        assert [s["s"] for s in j.steps(a)] == [1]
        # a deleted newest saga does not get its id handed out again
        assert j.transact(lambda txn: txn.new_saga_id()) == 3


def test_transact_errors_abort_and_propagate(tmp_path):
    with Journal.open(tmp_path) as j:
        def boom(txn):
            txn.put_saga(1, {"x": 1})
            txn.event("lost")
            raise KeyError("from fn")

        with pytest.raises(KeyError, match="from fn"):
            j.transact(boom)
        assert j.sagas() == [] and j.events() == []
        with pytest.raises(ValueError):
            j.transact(lambda txn: txn.put_saga(1, {"id": 2}))
        with pytest.raises(ValueError):
            j.transact(lambda txn: txn.event("x", seq=5))
        with pytest.raises(JournalError, match="not reentrant"):
            j.transact(lambda txn: j.transact(lambda inner: None))
        leaked = j.transact(lambda txn: txn)
        with pytest.raises(JournalError, match="finished"):
            leaked.put_saga(1, {})
        # an lmdb error other than MapFull is wrapped, with the path
        with pytest.raises(JournalError, match=str(j.path)) as info:
            j.transact(lambda txn: txn.set_meta("k" * 600, 1))
        assert isinstance(info.value.__cause__, lmdb.Error)
    with pytest.raises(JournalError, match="closed"):
        j.sagas()


def test_map_growth_keeps_every_event(tmp_path):
    j = Journal.open(tmp_path, map_size=32 * 1024)
    blob = "x" * 3000
    for batch in range(200):
        def write(txn, batch=batch):
            sid = txn.new_saga_id()
            txn.put_saga(sid, {"batch": batch, "blob": blob})
            for i in range(100):
                txn.event("tick", saga=sid, i=i)
        j.transact(write)
    assert j.stats()["map_size"] > 32 * 1024
    j.close()

    j = Journal.open(tmp_path, map_size=32 * 1024)
    evs = j.events()
    assert [e["seq"] for e in evs] == list(range(1, 20_001))
    assert [e["i"] for e in evs[:3]] == [0, 1, 2]
    sagas = j.sagas()
    assert [s["id"] for s in sagas] == list(range(1, 201))
    assert all(s["blob"] == blob for s in sagas)
    assert [e["saga"] for e in j.events(saga=200, limit=3)] == [200] * 3
    j.close()


def test_append_events_encoded_outside_the_transaction(tmp_path):
    j = Journal.open(tmp_path, map_size=32 * 1024)
    j.transact(lambda txn: txn.event("first", saga=1))
    values = [encode_event("op", 1, 2, ts=100.0 + i, path=f"p{i}") for i in range(3000)]
    assert j.transact(lambda txn: txn.append_events(values)) == 3001  # the map grows on the way
    assert j.transact(lambda txn: txn.append_events([])) == 3001
    assert j.transact(lambda txn: txn.event("last")) == 3002
    evs = j.events()
    assert [e["seq"] for e in evs] == list(range(1, 3003))
    assert [e["kind"] for e in (evs[0], evs[1], evs[-1])] == ["first", "op", "last"]
    assert evs[1] == {"seq": 2, "ts": 100.0, "saga": 1, "step": 2, "kind": "op", "path": "p0"}
    assert evs[-2]["path"] == "p2999" and evs[-2]["ts"] == 3099.0
    with pytest.raises(ValueError, match="seq"):
        encode_event("x", seq=3)
    j.close()


def test_transact_retries_from_scratch_after_map_full(tmp_path):
    j = Journal.open(tmp_path, map_size=32 * 1024)
    calls = []

    def write(txn):
        calls.append(1)
        sid = txn.new_saga_id()
        txn.put_saga(sid, {"blob": "y" * 200_000})
        txn.put_step(sid, 1, {"blob": "z" * 50_000})
        return sid, txn.event("created", saga=sid)

    assert j.transact(write) == (1, 1)
    assert len(calls) > 1
    assert [s["id"] for s in j.sagas()] == [1]
    assert len(j.steps(1)) == 1
    assert [e["seq"] for e in j.events()] == [1]
    assert j.meta("last_saga_id") == 1

    # fn that swallows MapFullError is still retried, not committed half-done
    calls.clear()

    def swallow(txn):
        calls.append(1)
        try:
            txn.put_saga(2, {"blob": "w" * 2_000_000})
        except lmdb.MapFullError:
            return "swallowed"
        return "ok"

    assert j.transact(swallow) == "ok"
    assert len(calls) > 1 and j.saga(2) is not None

    # ... also when fn swallows it and then trips over the failed txn
    calls.clear()

    def swallow_then_write(txn):
        calls.append(1)
        try:
            txn.put_saga(3, {"blob": "v" * 4_000_000})
        except lmdb.MapFullError:
            pass
        txn.event("after")
        return "ok"

    assert j.transact(swallow_then_write) == "ok"
    assert len(calls) > 1 and j.saga(3) is not None
    assert [e["kind"] for e in j.events()] == ["created", "after"]
    j.close()


def test_concurrent_reads_during_growth(tmp_path):
    j = Journal.open(tmp_path, map_size=32 * 1024)
    done = threading.Event()
    errors = []

    def reader():
        try:
            while not done.is_set():
                seqs = [e["seq"] for e in j.events()]
                assert seqs == list(range(1, len(seqs) + 1))
                j.sagas()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    watchdog = threading.Timer(10, done.set)  # a starved writer fails, not hangs
    watchdog.start()
    try:
        for n in range(40):
            j.transact(lambda txn: [txn.put_saga(txn.new_saga_id(), {"b": "q" * 5000}),
                                    [txn.event("e") for _ in range(20)]])
        assert not done.is_set(), "writer starved by concurrent readers"
    finally:
        watchdog.cancel()
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(j.events()) == 800 and len(j.sagas()) == 40
    j.close()


READER = """
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=8)
    txn = env.begin()
    txn.get(b"meta")
    print("ready", flush=True)
    time.sleep(60)
"""

# Keeps the env open, so that the reader table is not reset by the next open
# (LMDB reinitialises it when a process opens an env nobody else has open).
HOLDER = """
    import sys, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=8)
    print("ready", flush=True)
    sys.stdin.readline()
"""


def killed_reader(env_path):
    """Start a child holding a read txn, SIGKILL it; return its pid."""
    proc = spawn(READER, env_path)
    try:
        expect(proc, "ready")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc)
    return proc.pid


def test_reader_check_clears_killed_reader(tmp_path):
    env_path = tmp_path / "journal"
    Journal.open(tmp_path).close()

    # a raw handle sees the stale slot; reader_check clears it
    env = lmdb.open(str(env_path), max_dbs=8)
    pid = killed_reader(env_path)
    assert pid in reader_pids(env)
    assert env.reader_check() >= 1
    assert pid not in reader_pids(env)
    assert env.reader_check() == 0
    env.close()

    # Journal.open clears stale readers itself
    holder = spawn(HOLDER, env_path)
    try:
        expect(holder, "ready")
        pid = killed_reader(env_path)
        env = lmdb.open(str(env_path), max_dbs=8)
        assert pid in reader_pids(env)
        env.close()
        Journal.open(tmp_path).close()
        env = lmdb.open(str(env_path), max_dbs=8)
        assert pid not in reader_pids(env)
        env.close()
    finally:
        stop(holder)

    # Journal.reader_check: 0 while the reader lives, >= 1 once it is killed
    with Journal.open(tmp_path) as j:
        proc = spawn(READER, env_path)
        try:
            expect(proc, "ready")
            assert j.reader_check() == 0
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert j.reader_check() >= 1
            assert j.reader_check() == 0
        finally:
            stop(proc)


WRITER = """
    import sys
    from overlayd.journal import Journal
    j = Journal.open(sys.argv[1], map_size=64 * 1024)
    j.transact(lambda txn: (txn.put_saga(1, {"state": "running"}), txn.event("begin", saga=1)))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "grow":
            for _ in range(20):
                j.transact(lambda txn: [txn.event("tick", pad="p" * 1000) for _ in range(50)])
            print("grown", j.stats()["map_size"], flush=True)
        else:
            break
    j.close()
"""


def test_readonly_alongside_live_writer(tmp_path):
    writer = spawn(WRITER, tmp_path)
    try:
        expect(writer, "ready")
        ro = Journal.open(tmp_path, readonly=True, map_size=32 * 1024)
        assert ro.saga(1) == {"id": 1, "state": "running"}
        assert [e["kind"] for e in ro.events()] == ["begin"]
        with pytest.raises(JournalError, match="readonly"):
            ro.transact(lambda txn: None)

        # the writer grows its map well past what this reader has mapped
        writer.stdin.write("grow\n")
        writer.stdin.flush()
        word, size = writer.stdout.readline().split()
        assert word == "grown" and int(size) > 64 * 1024
        evs = ro.events()
        assert [e["seq"] for e in evs] == list(range(1, 1002))
        assert ro.stats()["entries"]["events"] == 1001
        ro.close()

        writer.stdin.write("exit\n")
        writer.stdin.flush()
        assert writer.wait(timeout=10) == 0
    finally:
        stop(writer)


def test_readonly_missing_journal(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(JournalError, match="no journal at"):
        Journal.open(missing, readonly=True)
    assert not missing.exists()


def test_new_journal_is_private_and_stamped(tmp_path):
    with Journal.open(tmp_path / "state") as j:
        assert j.path == tmp_path / "state" / "journal"
        assert j.path.stat().st_mode & 0o777 == 0o700
        assert (j.path / "data.mdb").stat().st_mode & 0o077 == 0
        assert j.meta("schema_version") == SCHEMA_VERSION == 2
    with pytest.raises(JournalError, match="already open"):
        with Journal.open(tmp_path):
            Journal.open(tmp_path)


def test_schema_too_new(tmp_path):
    with Journal.open(tmp_path) as j:
        j.transact(lambda txn: txn.set_meta("schema_version", 99))
    for readonly in (False, True):
        with pytest.raises(SchemaError, match="99") as info:
            Journal.open(tmp_path, readonly=readonly)
        assert "supports schema version 2" in str(info.value)
    # the refused open did not touch the journal and released the env
    env = lmdb.open(str(tmp_path / "journal"), max_dbs=8, readonly=True)
    meta = env.open_db(b"meta", create=False)
    with env.begin() as txn:
        assert txn.get(b"schema_version", db=meta) == b"99"
    env.close()


def test_delete_events_of_one_saga(tmp_path):
    j = Journal.open(tmp_path)
    try:
        def fill(txn):
            for i in range(50):
                txn.event("e", saga=1 + i % 2, n=i)
            txn.event("last", saga=2)

        j.transact(fill)
        assert j.transact(lambda txn: txn.delete_events(2)) == 26
        left = j.events()
        assert len(left) == 25 and {e["saga"] for e in left} == {1}
        assert [e["n"] for e in left] == list(range(0, 50, 2))
    finally:
        j.close()


def test_step_paths_apart_from_step_records(tmp_path):
    with Journal.open(tmp_path) as j:
        paths = {f"d/f{i}": ["f", 1, i] for i in range(2000)}

        def write(txn):
            for sid in (1, 2):
                txn.put_saga(sid, {"name": f"s{sid}"})
                for index in (1, 2, 3):
                    txn.put_step(sid, index, {"name": f"st{index}"})
            txn.put_step_paths(1, 1, paths)
            txn.put_step_paths(1, 3, {"x": None})
            txn.put_step_paths(2, 1, {"y": ["d"]})

        j.transact(write)
        assert j.step_paths(1) == {1: paths, 3: {"x": None}}
        assert j.transact(lambda txn: txn.step_paths(2)) == {1: {"y": ["d"]}}
        assert all("paths" not in s for s in j.steps(1))
        with pytest.raises(ValueError, match="put_step_paths"):
            j.transact(lambda txn: txn.put_step(1, 4, {"paths": {}}))
        j.transact(lambda txn: txn.delete_step(1, 3))
        assert j.step_paths(1) == {1: paths}
        j.transact(lambda txn: txn.delete_saga(1))
        assert j.step_paths(1) == {} and j.steps(1) == []
        assert j.step_paths(2) == {1: {"y": ["d"]}} and len(j.steps(2)) == 3


def _write_schema_1(path, steps):
    """A journal as schema 1 wrote it: four sub-databases, a step's paths inside its record."""
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=8, map_size=1 << 20)
    dbs = {n: env.open_db(n.encode()) for n in ("meta", "sagas", "steps", "events")}
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", b"1", db=dbs["meta"])
        txn.put(struct.pack(">Q", 7), json.dumps({"name": "old"}).encode(), db=dbs["sagas"])
        for index, rec in steps.items():
            txn.put(struct.pack(">QI", 7, index), json.dumps(rec).encode(), db=dbs["steps"])
    env.close()


def test_schema_1_is_upgraded_by_a_writer_and_refused_by_a_reader(tmp_path):
    big = {f"p{i}": ["f", 2, i] for i in range(3000)}
    steps = {1: {"name": "a", "state": "done", "paths": big},
             2: {"name": "b", "state": "done", "paths": {}},
             3: {"name": "c", "state": "open"}}
    _write_schema_1(tmp_path / "journal", steps)
    with pytest.raises(SchemaError, match="start overlayd on it once"):
        Journal.open(tmp_path, readonly=True)
    with Journal.open(tmp_path) as j:
        assert j.meta("schema_version") == 2
        assert j.step_paths(7) == {1: big, 2: {}}
        assert [s["name"] for s in j.steps(7)] == ["a", "b", "c"]
        assert all("paths" not in s for s in j.steps(7))
        assert j.saga(7)["name"] == "old"
    with Journal.open(tmp_path, readonly=True) as j:
        assert j.step_paths(7)[1] == big


def test_step_bases_round_trip_delete_and_a_journal_without_them(tmp_path):
    """The "bases" sub-database (saga resolve's base copies): keyed like paths, deleted with the
    step and the saga; a journal made before it existed opens read-only (reads as empty) and
    gets it on the next read-write open."""
    j = Journal.open(tmp_path)

    def write(txn):
        for sid in (1, 2):
            txn.put_saga(sid, {"name": f"s{sid}", "state": "active"})
            for i in (1, 2, 300):
                txn.put_step(sid, i, {"state": "done"})
                txn.put_step_bases(sid, i, {f"p{i}": {"copy": "ab" * 32}} if i != 2 else {})
        with pytest.raises(TypeError):
            txn.put_step_bases(1, 1, ["not", "a", "dict"])

    j.transact(write)
    assert j.step_bases(1) == {1: {"p1": {"copy": "ab" * 32}}, 300: {"p300": {"copy": "ab" * 32}}}
    j.transact(lambda txn: txn.delete_step(1, 300))
    assert list(j.step_bases(1)) == [1]
    j.transact(lambda txn: txn.delete_saga(2))
    assert j.step_bases(2) == {} and list(j.step_bases(1)) == [1]
    j.close()
    # an older journal: no "bases" at all
    env = lmdb.open(str(tmp_path / "journal"), subdir=True, max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"bases", txn=txn), delete=True)
    env.close()
    ro = Journal.open(tmp_path, readonly=True)
    assert ro.step_bases(1) == {} and [s["index"] for s in ro.steps(1)] == [1, 2]
    ro.close()
    rw = Journal.open(tmp_path)
    assert rw.step_bases(1) == {}
    rw.transact(lambda txn: txn.put_step_bases(1, 1, {"x": {"copy": None, "why": "larger than 1 MiB"}}))
    assert rw.step_bases(1) == {1: {"x": {"copy": None, "why": "larger than 1 MiB"}}}
    rw.close()
