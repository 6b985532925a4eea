"""Many workspaces over one base (issue 20 item 2): commits into a base are serialized machine-wide
(commit.run.BaseLock: every daemon, every user, nested bases), non-overlapping commits all go
in, and every overlap is caught."""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import put, read
from overlayd.commit import run

ROOT = Path(__file__).resolve().parent.parent
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable  # any user may run it


def holder(path, uid=0, how="EX"):
    """A process (of *uid*) that holds an flock on *path* until its stdin closes."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); "
            f"fcntl.flock(fd, fcntl.LOCK_{how}); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([PY, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         user=uid, group=uid, extra_groups=[], cwd="/")
    assert p.stdout.readline() == b"held\n"
    return p


def release(p):
    p.stdin.close()
    p.wait(timeout=10)


@pytest.fixture
def shared_dir():
    """A directory every user can read (the test's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="overlayd-lock-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_base_lock_across_users_waits_then_times_out_with_the_holder(shared_dir):
    base = shared_dir / "base"
    base.mkdir(mode=0o755)
    p = holder(base, uid=1000)  # another user's commit holds the base
    try:
        lock = run.BaseLock(base)
        t0 = time.monotonic()
        with pytest.raises(run.LockTimeout) as err:
            lock.acquire(timeout=0.5)
        assert time.monotonic() - t0 >= 0.5  # it waited, for the bounded time
        msg = str(err.value)
        assert f"(by process {p.pid}, uid 1000)" in msg and str(base) in msg and "OVERLAYD_COMMIT_LOCK_WAIT" in msg
        assert lock.fds == []  # nothing is left open or held
        # a waiting commit goes in as soon as the holder ends
        threading.Timer(0.3, release, (p,)).start()
        t0 = time.monotonic()
        lock.acquire(timeout=10)
        assert 0.2 < time.monotonic() - t0 < 5
        lock.release()
    finally:
        if p.poll() is None:
            release(p)


def test_base_lock_nested_bases_serialize_siblings_do_not(shared_dir):
    outer = shared_dir / "src"
    (outer / "lib").mkdir(parents=True)
    (outer / "app").mkdir()
    lib = run.BaseLock(outer / "lib")
    lib.acquire(timeout=1)
    try:
        with pytest.raises(run.LockTimeout):  # a commit into /src waits for one into /src/lib
            run.BaseLock(outer).acquire(timeout=0.3)
        app = run.BaseLock(outer / "app")  # a sibling base does not
        app.acquire(timeout=0.3)
        app.release()
        # and one into /src/lib waits for one into /src (by another user)
    finally:
        lib.release()
    p = holder(outer, uid=1000)
    try:
        with pytest.raises(run.LockTimeout) as err:
            run.BaseLock(outer / "lib").acquire(timeout=0.3)
        assert f"another commit into {outer} " in str(err.value) and f"process {p.pid}" in str(err.value)
    finally:
        release(p)
    # a symlink to the base is the same base
    os.symlink(outer / "lib", shared_dir / "alias")
    lock = run.BaseLock(shared_dir / "alias")
    lock.acquire(timeout=0.3)
    try:
        with pytest.raises(run.LockTimeout):
            run.BaseLock(outer / "lib").acquire(timeout=0.3)
    finally:
        lock.release()


# The 16 workspaces: what each one does to the base (the original base: shared/a.txt,
# shared/c.txt, shared/d/x.txt, own/f0..f15.txt). Groups of workspaces touch one path each: an
# overlap, of which exactly one (the first to take the lock) goes in; the others stay isolated.
N = 16
GROUPS = {"a": [0, 1, 2], "new": [3, 4, 5], "c": [6, 7], "d": [8, 9]}


def changes_of(i: int) -> dict:
    """path -> new content (None: deleted) of workspace *i*: its own file, its own existing
    file rewritten, and the shared path of its group if it has one."""
    ch = {f"ws/{i}.txt": f"workspace {i}\n", f"own/f{i}.txt": f"rewritten by {i}\n"}
    if i in GROUPS["a"]:
        ch["shared/a.txt"] = f"a by {i}\n"
    elif i in GROUPS["new"]:
        ch["shared/new.txt"] = f"new by {i}\n"  # created on both sides
    elif i in GROUPS["c"]:
        ch["shared/c.txt"] = None if i == GROUPS["c"][0] else f"c by {i}\n"  # delete vs rewrite
    elif i in GROUPS["d"]:
        ch["shared/d/x.txt"] = f"x by {i}\n"
        if i == GROUPS["d"][0]:
            ch["shared/d/y.txt"] = f"y by {i}\n"  # a new entry in a directory both change
    return ch


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".overlayd-")]
        for fn in filenames:
            p = Path(dirpath) / fn
            out[str(p.relative_to(root))] = p.read_text()
    return out


def test_sixteen_workspaces_commit_at_once(mount_factory, tmp_path):
    base = tmp_path / "base"
    for p in ("shared/a.txt", "shared/c.txt", "shared/d/x.txt", *[f"own/f{i}.txt" for i in range(N)]):
        (base / p).parent.mkdir(parents=True, exist_ok=True)
        put(base / p, f"original {p}\n")
    (base / "ws").mkdir()
    original = snapshot(base)

    t0 = time.monotonic()
    # mount_factory is not thread-safe: make them in order, start the 16 daemons at once
    mounts = [mount_factory(base, name=f"p{i}", start=False) for i in range(N)]
    starters = [threading.Thread(target=m.start) for m in mounts]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert all(m.proc is not None for m in mounts), "a daemon did not start"
    for i, m in enumerate(mounts):
        m.call("saga.begin", name=f"agent{i}")
        m.call("saga.step", name="work")
        for p, data in changes_of(i).items():
            if data is None:
                os.unlink(m.mp / p)
            else:
                put(m.mp / p, data)
    started = time.monotonic() - t0

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    results = [None] * N

    def commit(i):
        m = mounts[i]
        results[i] = subprocess.run([sys.executable, "-c", code, "commit"], cwd=m.mp, env={**env, **m.env},
                                    capture_output=True, text=True, timeout=120)

    t1 = time.monotonic()
    threads = [threading.Thread(target=commit, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committing = time.monotonic() - t1

    codes = {i: r.returncode for i, r in enumerate(results)}
    assert set(codes.values()) <= {0, 3}, {i: (r.returncode, r.stderr) for i, r in enumerate(results)}
    winners = [i for i in range(N) if codes[i] == 0]
    losers = [i for i in range(N) if codes[i] == 3]
    # every workspace outside a group goes in; exactly one per group does; every overlap is reported
    grouped = {i for g in GROUPS.values() for i in g}
    assert set(range(N)) - grouped <= set(winners), codes
    for name, g in GROUPS.items():
        assert len([i for i in g if i in winners]) == 1, (name, codes)
    assert len(losers) == sum(len(g) - 1 for g in GROUPS.values())  # 100% of the overlaps
    for i in losers:
        shared = [p for p in changes_of(i) if p.startswith("shared/")]
        assert all(f"conflict: {p}" in results[i].stderr for p in shared[:1]), results[i].stderr
        assert mounts[i].call("saga.status")["saga"]["state"] == "active"

    # the base is the serial application of the winners' changes to the original base
    expected = dict(original)
    for i in winners:
        for p, data in changes_of(i).items():
            if data is None:
                expected.pop(p, None)
            else:
                expected[p] = data
    assert snapshot(base) == expected
    # 0 lost changes: each loser's saga still shows all of its work, nothing of it went in
    for i in losers:
        for p, data in changes_of(i).items():
            if data is None:
                assert not os.path.lexists(mounts[i].mp / p)
            else:
                assert read(mounts[i].mp / p).decode() == data
                if not p.startswith("shared/"):
                    assert snapshot(base).get(p) == original.get(p), p
    print(f"16 workspaces: start and work {started:.1f} s, commits {committing:.1f} s; winners {winners}")
    assert committing < 60
