"""Races between the saga engine's stack changes and the requests that run beside them.

A writer that keeps writing while ``saga step`` runs, a step or commit that slips in between a
budget trigger and its cut, an fsync in flight while its handle is reopened, a directory fd
kept across the rollback that removed its directory, a daemon killed while a compensation runs,
and a ``tar`` of the workspace right after ``saga step``. Real mounts, real daemons; fault
injection (``OVERLAYD_STALL_AT``) only to hold an operation in flight for a known time.
"""

import errno
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from overlayd.journal import Journal
from test_saga import daemon_env, put, restart, status, wait_idle


@pytest.fixture
def rbase(tmp_path):
    root = tmp_path / "base"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "empty").mkdir()
    for i in range(5):
        put(root / "src" / f"m{i}.py", f"x = {i}\n")
    put(root / "docs" / "a.md", "# a\n")
    put(root / "top.txt", "top\n")
    return root


def pipelined(m, *requests):
    """Send several requests on one connection at once: the daemon reads the next one from its
    buffer the moment it has answered the previous one. Returns the responses, in order."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(m.socket))
    try:
        sock.sendall(b"".join(json.dumps({"v": 1, "id": i, "op": op, "args": args}).encode() + b"\n"
                              for i, (op, args) in enumerate(requests)))
        buf = b""
        out = []
        while len(out) < len(requests):
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, f"daemon closed the connection after {len(out)} answer(s)\n{m.log()}"
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            out.append(json.loads(line))
        return out
    finally:
        sock.close()


def stopped_journal_paths(m, sid):
    """{step index: {path: identity}} of a saga, read from the journal of the stopped daemon."""
    assert m.proc is None
    j = Journal.open(m.state, readonly=True)
    try:
        return j.step_paths(sid)
    finally:
        j.close()


# ---------------------------------------------------------------------------------- item 8


def test_writes_during_step_are_recorded_or_refused(mount_factory, rbase):
    """A writer creating new files in a loop while 'saga step' runs: every file it managed to
    create is in the paths of the step it landed in (none escapes conflict detection), and a
    base change under one of them makes the commit refuse."""
    m = mount_factory(rbase)
    sid = m.call("saga.begin", name="race")["saga"]["id"]
    m.call("saga.step", name="s1")
    created, refused = [], []
    stop = threading.Event()
    window = []

    def writer():
        i = 0
        while not stop.is_set():
            name = f"w{i:05d}"
            t = time.monotonic()
            try:
                put(m.mp / "src" / name, "w\n")
            except OSError as exc:
                assert exc.errno == errno.EROFS, f"write of {name} failed with {exc!r}"
                refused.append(name)
            else:
                created.append((name, t))
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        for k in range(2, 7):
            time.sleep(0.05)
            t0 = time.monotonic()
            m.call("saga.step", name=f"s{k}")
            window.append((t0, time.monotonic()))
        time.sleep(0.05)
    finally:
        stop.set()
        th.join()
    m.call("saga.step", name="quiet")  # journals the last racing step's paths
    during = [n for n, t in created if any(a <= t <= b for a, b in window)]
    assert during, "the writer created nothing while the steps ran: no race was exercised"
    victim = during[-1]
    put(rbase / "src" / victim, "made in the base meanwhile\n")
    try:
        res = m.call("saga.commit")
    except Exception as exc:  # noqa: BLE001 - the client raises ConflictError
        assert getattr(exc, "code", None) == "conflict", exc
        assert any(c["path"] == f"src/{victim}" for c in exc.data.get("conflicts", [])), exc.data
    else:
        pytest.fail(f"commit applied over a base file created under src/{victim}: {res}")
    assert status(m)["saga"]["state"] == "active"
    m.stop()
    stored = stopped_journal_paths(m, sid)
    recorded = set().union(*stored.values())
    missing = [n for n, _ in created if f"src/{n}" not in recorded]
    assert not missing, f"{len(missing)} of {len(created)} written paths escaped the steps' records " \
                        f"(e.g. {missing[:5]}; {len(during)} written while a step ran, {len(refused)} refused)"


# ---------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("racer", ["saga.step", "saga.commit"])
def test_budget_cut_cannot_be_bypassed(mount_factory, rbase, racer):
    """A step goes over its file budget while another stack operation (a 'saga gc' held in
    flight) keeps the cut waiting; a step or commit queued right behind the gc must not run
    before the cut: it is refused, and the cut then rolls the step back."""
    with daemon_env(OVERLAYD_STALL_AT="gc:1.0"):
        m = mount_factory(rbase, name="cut")
    m.call("saga.begin", name="budget")
    m.call("saga.step", name="big", max_files=3)
    put(m.mp / "src" / "f0", "0\n")
    answers = []
    t = threading.Thread(target=lambda: answers.extend(pipelined(m, ("saga.gc", {}), (racer, {"name": "next"}))))
    t.start()
    time.sleep(0.3)  # the gc holds the stack now
    for i in range(1, 6):
        try:
            put(m.mp / "src" / f"f{i}", f"{i}\n")
        except OSError as exc:
            assert exc.errno == errno.EROFS
            break
    else:
        pytest.fail("the file budget never cut the writes")
    t.join()
    assert answers[0]["ok"], answers[0]
    race = answers[1]
    assert not race["ok"], f"{racer} ran before the budget cut: {race}"
    assert race["error"]["code"] == "cutting", race
    assert "being cut by its budget" in race["error"]["message"], race
    deadline = time.monotonic() + 30
    while (st := wait_idle(m))["steps"][-1]["state"] != "compensated":
        assert time.monotonic() < deadline, f"the cut did not finish: {st}\n{m.log()}"
        time.sleep(0.02)
    assert st["saga"]["state"] == "active" and st["saga"]["cut"]["reason"] == "budget:files", st["saga"]
    assert [s["state"] for s in st["steps"]] == ["compensated"], st["steps"]
    assert not (m.mp / "src" / "f0").exists()
    assert not (rbase / "src" / "f0").exists()


# ---------------------------------------------------------------------------------- item 11


def test_fsync_survives_a_handle_reopen(mount_factory, rbase):
    """fsync in flight (held in its worker thread) while another request reopens its handle (a
    copy-up through another handle, then a read through this one closes the handle's old fd):
    no EBADF, no error."""
    with daemon_env(OVERLAYD_STALL_AT="fsync:0.4"):
        m = mount_factory(rbase, name="fsync")
    m.push()
    errors = []
    for round_ in range(3):
        path = m.mp / "src" / f"m{round_}.py"
        fd = os.open(path, os.O_RDONLY)  # a base file: the handle reads the base

        def do_fsync(fd=fd):
            try:
                os.fsync(fd)
            except OSError as exc:
                errors.append(exc)

        th = threading.Thread(target=do_fsync)
        th.start()
        time.sleep(0.1)  # the fsync waits in its worker thread
        # a copy-up through another handle (a write would wait for the fsync: the inode's lock)
        wfd = os.open(path, os.O_WRONLY)
        assert os.pread(fd, 100, 0) == f"x = {round_}\n".encode()  # reopens the handle on the copy
        th.join()
        os.close(wfd)
        os.close(fd)
        m.push()
    assert not errors, f"fsync failed: {errors}"


# ---------------------------------------------------------------------------------- item 12


def test_directory_fd_across_the_rollback_that_removed_it(mount_factory, rbase):
    """getdents on a directory fd opened before a rollback that dropped the directory: ESTALE,
    never EIO, and the daemon logs no inconsistency."""
    m = mount_factory(rbase, name="stale")
    m.call("saga.begin", name="s")
    m.call("saga.step", name="one")
    os.makedirs(m.mp / "new" / "deeper")
    put(m.mp / "new" / "f", "f\n")
    dfd = os.open(m.mp / "new", os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(m.mp / "new" / "deeper", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(os.listdir(dfd)) == ["deeper", "f"]
        m.call("saga.rollback")
        m.call("saga.step", name="two")
        for fd in (dfd, sfd):
            with pytest.raises(OSError) as ei:
                os.listdir(fd)
            assert ei.value.errno == errno.ESTALE, ei.value
            with pytest.raises(OSError) as ei:
                os.stat(".", dir_fd=fd)
            assert ei.value.errno in (errno.ESTALE, errno.ENOENT), ei.value
            with pytest.raises(OSError) as ei:  # a rename from and into the dead directory
                os.rename("f", m.mp / "g", src_dir_fd=fd)
            assert ei.value.errno in (errno.ESTALE, errno.ENOENT), ei.value
            with pytest.raises(OSError) as ei:
                os.rename(m.mp / "top.txt", "t", dst_dir_fd=fd)
            assert ei.value.errno in (errno.ESTALE, errno.ENOENT), ei.value
    finally:
        os.close(dfd)
        os.close(sfd)
    assert (m.mp / "top.txt").exists()
    assert "inconsistency" not in m.log(), m.log()


# ---------------------------------------------------------------------------------- item 13


def dir_attrs(root):
    out = {}
    for dirpath, dirnames, _ in os.walk(root):
        st = os.lstat(dirpath)
        out[os.path.relpath(dirpath, root)] = (st.st_nlink, st.st_ctime_ns, st.st_mtime_ns, st.st_size, st.st_ino,
                                               st.st_mode, st.st_uid, st.st_gid)
    return out


def assert_same_attrs(before, after, what):
    changed = {p: (before[p], after.get(p)) for p in before if before[p] != after.get(p)}
    assert not changed, f"{what} changed directory attributes (nlink, ctime, mtime, size, ino, mode, uid, " \
                        f"gid; before, after): {changed}"


def test_stack_changes_that_change_nothing_keep_attributes(mount_factory, rbase, tmp_path):
    """A push of an empty layer (saga step) and the drop of an unchanged one (rollback of an
    empty step) change nothing in the view: no directory's attributes may change either; and
    tar of the workspace right after 'saga step' does not find the root 'changed as we read it'."""
    m = mount_factory(rbase, name="attrs")
    m.call("saga.begin", name="s")
    a0 = dir_attrs(m.mp)
    m.call("saga.step", name="one")  # the first layer: the root is in every layer
    assert_same_attrs(a0, dir_attrs(m.mp), "the first saga step")
    os.mkdir(m.mp / "made")  # a real change of the root, and one of src in step one
    put(m.mp / "src" / "new.py", "new\n")
    a1 = dir_attrs(m.mp)
    m.call("saga.step", name="two")
    assert_same_attrs(a1, dir_attrs(m.mp), "a second saga step")
    m.call("saga.rollback")  # drops the empty step two
    assert_same_attrs(a1, dir_attrs(m.mp), "the rollback of an empty step")
    m.call("saga.step", name="three")
    r = subprocess.run(["tar", "-cf", str(tmp_path / "x.tar"), "."], cwd=m.mp, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "changed as we read it" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------- item 10


def test_compensation_orphaned_by_a_crash_never_runs_twice_at_once(mount_factory, rbase, tmp_path):
    """The daemon dies (SIGKILL) while a compensation runs; the command survives in its own
    session. The restarted daemon finishes the rollback, but only once the orphan has ended:
    the log never shows two starts before an end."""
    log_path = tmp_path / "comp.log"
    cmd = f"echo start >> {log_path}; sleep 2; echo end >> {log_path}"
    m = mount_factory(rbase, name="orphan")
    m.call("saga.begin", name="s")
    m.call("saga.step", name="one", compensate=cmd)
    put(m.mp / "made.txt", "x\n")
    th = threading.Thread(target=lambda: pytest.raises(Exception, m.call, "saga.rollback"))
    th.start()
    deadline = time.monotonic() + 20
    while not (log_path.exists() and log_path.read_text()):
        assert time.monotonic() < deadline, f"the compensation never started\n{m.log()}"
        time.sleep(0.02)
    m.kill()  # SIGKILL: the compensation's shell lives on in its own session
    th.join()
    assert log_path.read_text() == "start\n"
    st = restart(m)
    assert st["saga"]["state"] == "active", st
    assert [s["state"] for s in st["steps"]] == ["compensated"], st["steps"]
    lines = log_path.read_text().split()
    assert lines == ["start", "end", "start", "end"], f"compensation runs overlapped: {lines}"
    assert not (m.mp / "made.txt").exists()
    ev = [e for e in m.call("saga.log")["events"] if e["kind"] == "compensate.orphan"]
    assert ev and ev[0]["outcome"] == "finished", ev
