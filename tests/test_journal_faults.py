"""The journal under faults, against a real daemon: a damaged or missing journal at start, layer
directories the journal does not know, and a full state filesystem (a real loop-mounted ext4).

A journal that cannot be read is a refusal to start with a message that says what is wrong and
what to do, never a fresh journal; the layers are then untouched, byte for byte, and once the
journal is restored the saga is still there and commits. A layer is deleted only when the
journal says it is gone. On a full state filesystem every journaled transition either works or
is refused cleanly, and the daemon's view of the saga is the journal's.

Slow tests (a loop filesystem filled through the mount) are marked ``slow``; the rest take a
second or two each.
"""

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from conftest import O_NF, put, read, tree_digest
from overlayd.client import ClientError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE and loop filesystems: needs root")


# ---------------------------------------------------------------------------------- helpers


def used_bytes(data: Path) -> int:
    """Bytes of data.mdb its last transaction uses (past them is the room kept by fallocate)."""
    from overlayd.journal.store import check_file

    info = check_file(data)
    return (info["last_page"] + 1) * info["page_size"]


def saga_cli(m, *args, timeout=30.0):
    """The saga console script with the daemon down: (returncode, stdout, stderr)."""
    env = {**m.env, "SAGA_TIMEOUT": "2"}
    p = subprocess.run([sys.executable, "-P", "-c", "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())",
                        "-w", str(m.mp), *args], cwd="/", env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def refused_start(m) -> str:
    """Start the daemon as Mount.start does, expect a refusal: exit status 1 (not a signal) and
    the message it sends on the readiness pipe, which is returned."""
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "overlayd", "--ready-fd", str(wfd), "--name", m.name, "--state-dir", str(m.state),
           "--log-level", "info", "--allow-other", str(m.base), str(m.mp), *m.extra_args]
    with open(m.log_path, "ab") as log:
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdout=log, stderr=log, env=m.env, start_new_session=True)
    os.close(wfd)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        subprocess.run(["fusermount3", "-uz", str(m.mp)], check=False, stderr=subprocess.DEVNULL)
        pytest.fail(f"the daemon started on a damaged journal\n{m.log()}")
    with os.fdopen(rfd, "rb") as f:
        msg = f.read().decode(errors="replace")
    assert rc == 1, f"the daemon exited with {rc} (negative: killed by a signal), not a clean refusal\n{m.log()}"
    assert msg.startswith("error: "), msg
    assert not os.path.ismount(m.mp)
    return msg


def offline_status(m) -> dict:
    """saga status read from the journal with the daemon down."""
    from overlayd.journal import Journal
    from overlayd.engine.records import status_of

    with Journal.open(m.state, readonly=True) as j:
        st = status_of(j)
    return {"saga": st["saga"], "steps": st["steps"]}


def online_status(m) -> dict:
    st = m.call("saga.status")
    return {"saga": st["saga"], "steps": st["steps"]}


def wait_gone(path: Path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} was not deleted"
        time.sleep(0.05)


@pytest.fixture
def saga_ws(mount_factory, tmp_path):
    """A stopped workspace whose journal holds an active saga: step 'a' done, step 'b' open."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "old.txt", "old\n")
    m = mount_factory(base, name="jfault")
    m.call("saga.begin", name="precious")
    m.call("saga.step", name="a")
    put(m.mp / "a.txt", "from step a\n")
    put(m.mp / "old.txt", "changed in a\n")
    m.call("saga.step", name="b")
    put(m.mp / "b.bin", os.urandom(20000))
    m.stop()
    return m


# ---------------------------------------------------------------------------------- a damaged journal


def _damage(data: Path, how: str) -> None:
    size = data.stat().st_size
    if how == "zero-length":
        os.truncate(data, 0)
    elif how == "8192-bytes":
        os.truncate(data, 8192)
    elif how == "truncated-mid-file":  # half of the pages in use, not on a page boundary
        os.truncate(data, used_bytes(data) // 2 + 100)
    elif how == "truncated-on-a-page":
        os.truncate(data, used_bytes(data) // 2 // 4096 * 4096)
    elif how == "zeroed-first-page":
        with open(data, "r+b") as f:
            f.write(b"\0" * 4096)
    elif how == "random-garbage":
        with open(data, "wb") as f:
            f.write(os.urandom(size))
    elif how == "missing":
        os.unlink(data)
    elif how == "never-initialised":  # an LMDB environment with nothing in it
        os.unlink(data)
        lmdb.open(str(data.parent), subdir=True).close()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["zero-length", "8192-bytes", "truncated-mid-file", "truncated-on-a-page",
                                 "zeroed-first-page", "random-garbage", "missing", "never-initialised"])
def test_damaged_journal_refuses_to_start_and_loses_nothing(saga_ws, how):
    """Each damage: the daemon refuses (exit 1, not SIGBUS) saying what is wrong, where, and what to
    do; ``saga status`` with the daemon down says the same (exit 1, no traceback); the layers are
    untouched byte for byte; with the original file back the saga is there and commits."""
    m = saga_ws
    data = m.state / "journal" / "data.mdb"
    original = data.read_bytes()
    layers_before = tree_digest(m.state / "layers")
    assert len(os.listdir(m.state / "layers")) == 2

    _damage(data, how)
    msg = refused_start(m)
    if how == "missing":
        assert "no journal" in msg and str(data) in msg and "2 layer(s)" in msg, msg
    else:
        assert f"the journal {data} cannot be read" in msg, msg
    assert "backup" in msg and "layers" in msg, msg
    if how != "missing":  # what is wrong
        want = {"zero-length": "empty (0 bytes)", "8192-bytes": "cut short", "truncated-mid-file": "cut short",
                "truncated-on-a-page": "cut short", "zeroed-first-page": "meta page 0",
                "random-garbage": "meta page 0", "never-initialised": "holds no records"}[how]
        assert want in msg, msg

    rc, out, err = saga_cli(m, "status")
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in err and "Error: " in err, err
    if how not in ("missing", "never-initialised"):
        assert f"the journal {data} cannot be read" in err, err

    time.sleep(0.3)  # (the old daemon deleted "unknown" layers in the background within 2 s)
    assert tree_digest(m.state / "layers") == layers_before, "the layers changed"
    assert not os.listdir(m.state / "trash")
    assert not (m.state / "quarantine").exists() or not os.listdir(m.state / "quarantine")

    data.parent.mkdir(exist_ok=True)
    data.write_bytes(original)
    m.start()
    st = m.call("saga.status")
    assert st["saga"]["name"] == "precious" and st["saga"]["state"] == "active", st
    assert [(s["name"], s["state"]) for s in st["steps"]] == [("a", "done"), ("b", "open")], st["steps"]
    assert read(m.mp / "a.txt") == b"from step a\n"
    put(m.mp / "after.txt", "after the restore\n")
    m.call("saga.commit")
    base = m.base
    assert read(base / "a.txt") == b"from step a\n"
    assert read(base / "old.txt") == b"changed in a\n"
    assert len(read(base / "b.bin")) == 20000
    assert read(base / "after.txt") == b"after the restore\n"


def test_new_workspace_without_layers_starts_a_fresh_journal(mount_factory, tmp_path):
    """No layers and no data.mdb (a new workspace, or one whose journal was moved aside together
    with its layers): a fresh journal, as before."""
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="fresh")
    m.call("saga.begin", name="one")
    m.call("saga.abort")
    m.stop()
    shutil.move(m.state / "journal", m.state / "journal.damaged")
    m.start()
    assert m.call("saga.status")["saga"] is None


# ---------------------------------------------------------------------------------- the startup sweep


def test_unknown_layer_is_quarantined_and_a_dropped_one_is_trashed(mount_factory, tmp_path):
    """At start, a layer directory the stack does not name goes to the trash only if the journal
    says it is gone (here: its step was compensated, but the crash came before the rename to the
    trash); one the journal does not know is moved to STATE/quarantine, reported, and kept."""
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="sweep")
    m.call("saga.begin", name="s")
    rolled = m.call("saga.step", name="a")["step"]["layer"]
    put(m.mp / "x", "x\n")
    m.call("saga.rollback")
    m.call("saga.step", name="b")
    put(m.mp / "y", "y\n")
    m.stop()
    wait_gone(m.state / "trash" / rolled)
    # the dropped layer, as a crash between the journal and the rename leaves it
    (m.state / "layers" / rolled).mkdir()
    put(m.state / "layers" / rolled / "x", "x\n")
    # a layer the journal never heard of (a journal restored from an older backup, a copy by hand)
    stranger = m.state / "layers" / "00000000000000aa"
    stranger.mkdir()
    put(stranger / "precious.txt", "do not delete me\n")

    m.start()
    kept = m.state / "quarantine" / "00000000000000aa"
    assert read(kept / "precious.txt") == b"do not delete me\n"
    wait_gone(m.state / "layers" / rolled)
    wait_gone(m.state / "trash" / rolled)
    time.sleep(0.5)
    assert read(kept / "precious.txt") == b"do not delete me\n", "the quarantined layer was deleted"
    assert m.call("status")["quarantined"] == ["00000000000000aa"]
    assert "00000000000000aa" in m.log() and "quarantine" in m.log()
    events = [e for e in m.call("saga.log")["events"] if e["kind"] == "layer.quarantined"]
    assert [e["layer"] for e in events] == ["00000000000000aa"], events
    assert read(m.mp / "y") == b"y\n" and not os.path.lexists(m.mp / "x")

    m.call("saga.gc")  # gc sweeps the same way: the quarantine stays
    assert read(kept / "precious.txt") == b"do not delete me\n"
    other = m.state / "layers" / "00000000000000bb"  # one that appears while the daemon runs
    other.mkdir()
    put(other / "f", "f\n")
    assert m.call("saga.gc")["quarantined"] == [str(m.state / "quarantine" / "00000000000000bb")]
    assert read(m.state / "quarantine" / "00000000000000bb" / "f") == b"f\n"
    m.call("saga.commit")
    assert read(base / "y") == b"y\n" and not os.path.lexists(base / "x")


# ---------------------------------------------------------------------------------- a full state filesystem


@pytest.fixture
def loopfs(tmp_path):
    """make(path, size): a fresh ext4 of *size* bytes on a loop device mounted at *path*;
    unmounted at teardown. Request it before mount_factory (the daemons stop first)."""
    mounted = []

    def make(path, size=64 << 20):
        img = tmp_path / f"fs{len(mounted)}.img"
        with open(img, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, stdout=subprocess.DEVNULL)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(path)], check=True)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], check=False, stderr=subprocess.DEVNULL).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path) -> int:
    sv = os.statvfs(path)
    return sv.f_bfree * sv.f_frsize


def syncfs(path) -> None:
    from overlayd import osutil

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        osutil.syncfs(fd)
    finally:
        os.close(fd)


def fill_through(mp: Path, fs: Path, name="fill") -> set:
    """Write into the view until the state filesystem is full (ext4's delayed allocation gives
    room back after a sync, so write again after each one); returns the errnos the writer saw."""
    errs, n = set(), 0
    for chunk in (1 << 20, 1 << 20, 64 << 10, 4096, 4096):
        fd = os.open(mp / f"{name}{n}", os.O_WRONLY | os.O_CREAT | O_NF, 0o644)
        n += 1
        try:
            while True:
                os.write(fd, b"\xa5" * chunk)
        except OSError as exc:
            errs.add(exc.errno)
        finally:
            os.close(fd)
        syncfs(fs)
    return errs


def fill_outside(fs: Path) -> Path:
    """Fill *fs* with one file outside the state directory (allocated, not written: fast)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | O_NF, 0o600)
    try:
        size, step = 0, free_bytes(fs)
        while step >= 4096:
            try:
                os.posix_fallocate(fd, size, step)
                size += step
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                step //= 2
    finally:
        os.close(fd)
    syncfs(fs)
    assert free_bytes(fs) < 2 << 20, free_bytes(fs)
    return filler


def expect_no_space(m, op, **args) -> str:
    with pytest.raises(ClientError) as ei:
        m.call(op, **args)
    exc = ei.value
    assert exc.code == "no-space", (exc.code, exc.message)
    assert "state file system is full" in exc.message and "roll back" in exc.message, exc.message
    return exc.message


def restart_and_compare(m) -> dict:
    """Memory and journal agree: saga status through the daemon == read from the journal with
    the daemon down, before and after a restart."""
    online = online_status(m)
    m.stop()
    assert offline_status(m) == online, "the daemon's saga status is not the journal's"
    m.start()
    assert online_status(m) == online, "the saga changed across a restart"
    return online


@pytest.mark.slow
def test_full_state_filesystem_step_rollback_commit(loopfs, mount_factory, tmp_path):
    """The state directory on a 64 MiB ext4, filled through the mount: a write gets ENOSPC (not
    EIO), a step is refused with a clear message and the saga stays usable, the daemon restarts on
    the full disk, a rollback works and frees the space, and then a step, a write and a commit
    work; memory and journal agree throughout."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "old.txt", "old\n")
    m = mount_factory(base, name="fullfs", start=False)
    fs = loopfs(m.state_root)
    m.start()
    m.call("saga.begin", name="full")
    m.call("saga.step", name="keep")
    put(m.mp / "keep.txt", "keep\n")
    m.call("saga.step", name="fill")
    assert fill_through(m.mp, fs) == {errno.ENOSPC}
    with pytest.raises(OSError) as ei:
        put(m.mp / "one-more", b"z" * (1 << 20))
    assert ei.value.errno == errno.ENOSPC, ei.value
    assert free_bytes(fs) < 2 << 20  # (ext4 keeps about 2 % of its blocks for itself)

    msg = expect_no_space(m, "saga.step", name="refused")
    assert "the saga is unchanged" in msg, msg
    st = restart_and_compare(m)  # (the old daemon could not start on a full disk)
    assert [(s["name"], s["state"]) for s in st["steps"]] == [("keep", "done"), ("fill", "open")]
    assert st["saga"]["state"] == "active" and m.call("saga.status")["writable"] is True

    assert m.call("saga.rollback")["compensated"] == [2]
    deadline = time.monotonic() + 20
    while free_bytes(fs) < 32 << 20:
        assert time.monotonic() < deadline, f"the rollback freed nothing: {free_bytes(fs)} bytes free"
        time.sleep(0.05)
    m.call("saga.step", name="again")
    put(m.mp / "again.txt", "again\n")
    st = restart_and_compare(m)
    assert [(s["name"], s["state"]) for s in st["steps"]] == [("keep", "done"), ("fill", "compensated"),
                                                              ("again", "open")]
    m.call("saga.commit")
    assert sorted(os.listdir(base)) == ["again.txt", "keep.txt", "old.txt"]
    assert read(base / "keep.txt") == b"keep\n" and read(base / "again.txt") == b"again\n"
    assert restart_and_compare(m)["saga"] is None


TRANSITIONS = {"begin": ("saga.begin", {"name": "s"}), "step": ("saga.step", {"name": "c"}),
               "rollback": ("saga.rollback", {}), "abort": ("saga.abort", {}), "commit": ("saga.commit", {})}
# what the base holds at the end: the transition, then a step 'last' and a commit
BASE_AFTER = {"begin": ["last.txt", "old.txt"], "step": ["a.txt", "b.txt", "last.txt", "old.txt"],
              "rollback": ["a.txt", "last.txt", "old.txt"], "abort": ["last.txt", "old.txt"],
              "commit": ["a.txt", "b.txt", "last.txt", "old.txt"]}


def _full_ws(loopfs, mount_factory, tmp_path, name, transition):
    """A workspace on a 64 MiB ext4 (a saga with steps a done and b open, unless the transition is
    begin), then filled from outside; returns (mount, base, filler)."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "old.txt", "old\n")
    m = mount_factory(base, name=name, start=False)
    fs = loopfs(m.state_root)
    m.start()
    if transition != "begin":
        m.call("saga.begin", name="s")
        m.call("saga.step", name="a")
        put(m.mp / "a.txt", "a\n")
        m.call("saga.step", name="b")
        put(m.mp / "b.txt", "b\n")
    return m, base, fill_outside(fs)


def _finish(m, base, transition):
    """Space is back: a step 'last', a write, a commit; the base holds what it should."""
    if m.call("saga.status")["saga"] is None:
        m.call("saga.begin", name="t")
    m.call("saga.step", name="last")
    put(m.mp / "last.txt", "last\n")
    m.call("saga.commit")
    assert read(base / "last.txt") == b"last\n"
    assert sorted(os.listdir(base)) == BASE_AFTER[transition]


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_transitions_on_a_full_state_filesystem(loopfs, mount_factory, tmp_path, transition):
    """The state filesystem filled from outside (no room for the journal to grow into but the
    room it keeps in data.mdb): each journaled transition works (begin, rollback, abort, commit:
    they finish or free) or is refused cleanly (step); memory and journal agree, across a restart
    on the full disk; once the space is back nothing is lost and the saga commits."""
    m, base, filler = _full_ws(loopfs, mount_factory, tmp_path, f"full-{transition}", transition)
    op, args = TRANSITIONS[transition]
    if transition == "step":
        expect_no_space(m, op, **args)
    else:
        m.call(op, **args)
    st = restart_and_compare(m)
    expected = {"begin": [], "step": [("a", "done"), ("b", "open")],
                "rollback": [("a", "done"), ("b", "compensated")]}.get(transition)
    if expected is None:
        assert st["saga"] is None
    else:
        assert [(s["name"], s["state"]) for s in st["steps"]] == expected, st["steps"]
    os.unlink(filler)
    if transition == "step":
        m.call(op, **args)
    _finish(m, base, transition)


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_transitions_without_the_journal_reserve(loopfs, mount_factory, tmp_path, monkeypatch, transition):
    """The same with no room kept in data.mdb (OVERLAYD_JOURNAL_RESERVE=0): a journal write may
    now really fail inside LMDB. Whatever happens is clean: the transition works, or it is
    refused as 'no-space' with the saga as before or stopped in a state the journal names
    (compensating, committing); the daemon's status is the journal's; once the space is back
    'saga retry' or 'saga commit' finishes what was started, and nothing is lost."""
    monkeypatch.setenv("OVERLAYD_JOURNAL_RESERVE", "0")
    m, base, filler = _full_ws(loopfs, mount_factory, tmp_path, f"noreserve-{transition}", transition)
    op, args = TRANSITIONS[transition]
    before = online_status(m)
    try:
        m.call(op, **args)
        done = True
    except ClientError as exc:
        assert exc.code == "no-space", (exc.code, exc.message)
        done = False
    assert m.proc.poll() is None, f"the daemon died\n{m.log()}"
    st = online_status(m)
    assert offline_status(m) == st, "the daemon's saga status is not the journal's"
    if not done and st != before:
        assert st["saga"]["state"] in ("compensating", "committing"), st["saga"]
    os.unlink(filler)
    state = (st["saga"] or {}).get("state")
    if state == "compensating":
        m.call("saga.retry")
    elif state == "committing":
        m.call("saga.commit")
    elif not done:
        m.call(op, **args)
    restart_and_compare(m)
    _finish(m, base, transition)


def test_journal_enospc_is_a_clean_refusal(loopfs, mount_factory, tmp_path, monkeypatch):
    """Without the room kept in data.mdb (OVERLAYD_JOURNAL_RESERVE=0), a journal write that needs
    new pages on a full filesystem fails inside LMDB: the request is refused as 'no-space', the
    saga is as before (memory and journal), and after space is freed it goes on."""
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setenv("OVERLAYD_JOURNAL_RESERVE", "0")
    m = mount_factory(base, name="noreserve", start=False)
    fs = loopfs(m.state_root)
    m.start()
    m.call("saga.begin", name="s")
    m.call("saga.step", name="a")
    put(m.mp / "a.txt", "a\n")
    filler = fill_outside(fs)
    before = online_status(m)
    expect_no_space(m, "saga.annotate", fields={"blob": "x" * (900 << 10)})
    assert online_status(m) == before
    assert restart_and_compare(m) == before
    os.unlink(filler)
    m.call("saga.annotate", fields={"blob": "y"})
    m.call("saga.commit")
    assert read(base / "a.txt") == b"a\n"


def test_probe_catches_damage_past_the_meta_pages(tmp_path):
    """Valid meta pages over garbage pages: the file passes check_file, and the child process that
    reads every page in use refuses it (the caller never maps it); restored, it opens."""
    from overlayd.journal import Journal, JournalDamaged
    from overlayd.journal.store import check_file

    with Journal.open(tmp_path) as j:
        for i in range(20):
            j.transact(lambda txn, i=i: [txn.event("e", n=i, blob="b" * 3000) for _ in range(10)])
    data = tmp_path / "journal" / "data.mdb"
    original = data.read_bytes()
    info = check_file(data)
    with open(data, "r+b") as f:
        f.seek(2 * info["page_size"])
        f.write(os.urandom((info["last_page"] - 1) * info["page_size"]))
    check_file(data)  # the meta pages alone look fine
    for readonly in (False, True):
        with pytest.raises(JournalDamaged) as ei:
            Journal.open(tmp_path, readonly=readonly)
        assert f"the journal {data} cannot be read" in str(ei.value) and "backup" in str(ei.value)
    data.write_bytes(original)
    with Journal.open(tmp_path, readonly=True) as j:
        assert len(j.events()) == 200


def test_a_map_that_cannot_grow_is_a_clean_refusal(tmp_path, monkeypatch):
    """A full map that may not grow further is the same kind of case as a full disk: JournalFull,
    nothing written, and the journal takes the next (smaller) transaction."""
    import overlayd.journal.store
    from overlayd.journal import Journal, JournalFull

    monkeypatch.setattr(overlayd.journal.store, "MAX_MAP_SIZE", 1 << 20)
    with Journal.open(tmp_path, map_size=256 << 10) as j:
        j.transact(lambda txn: txn.set_meta("before", 1))
        with pytest.raises(JournalFull):
            j.transact(lambda txn: (txn.set_meta("big", "x" * (2 << 20)), txn.set_meta("before", 2)))
        assert j.meta("before") == 1 and j.meta("big") is None
        j.transact(lambda txn: txn.set_meta("after", 3))
        assert j.meta("after") == 3
