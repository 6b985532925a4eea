"""The saga engine through a real mount and a real daemon: steps, rollback, abort, compensation,
commit and conflicts between two workspaces over one base.

Every base is built in the test's tmp_path (never the session's sample base). Expected trees
are computed by applying the same operations to a plain copy of the base and comparing
snapshots (treecmp, with owners, modes, data, xattrs and hard-link groups).

Every write opens with O_NOFOLLOW, and ``_inside`` refuses a path whose directory resolves
outside /tmp. The helpers here are shared with tests/test_saga_crash.py.
"""

import contextlib
import errno
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

import conftest
from conftest import O_NF, read, tree_digest
from overlayd.client import ClientError
from treecmp import diff, snapshot

STAGE_PREFIX = ".overlayd-"


# ---------------------------------------------------------------------------------- file helpers


def _inside(path):
    """Refuse to write to *path* if its directory resolves outside /tmp (a symlink escaped)."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    assert parent.startswith("/tmp/"), f"refusing to write through {path} (resolves to {parent})"
    return path


def put(path, data: bytes | str, mode=0o644):
    """Create or truncate *path* and write *data* (never through a symlink, never outside /tmp)."""
    conftest.put(_inside(path), data, mode)


def append(path, data: bytes | str):
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(_inside(path), os.O_WRONLY | os.O_APPEND | O_NF)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)



def copy_tree(src, dst):
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    return dst


# ---------------------------------------------------------------------------------- tree helpers


def snap(root, data=True):
    return snapshot(root, data=data, owners=True)


def strip_staged(s):
    """A snapshot without the commit's temporary ``.overlayd-*`` entries (and what is below them)."""
    entries, groups = s

    def staged(p):
        return any(part.startswith(STAGE_PREFIX) for part in p.split(os.sep))

    entries = {p: d for p, d in entries.items() if not staged(p)}
    groups = {frozenset(x for x in g if not staged(x)) for g in groups}
    return entries, {g for g in groups if len(g) > 1}


def staged_names(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith(STAGE_PREFIX)]
    return sorted(out)


def assert_same(actual, expected, what):
    """*actual*/*expected*: a directory or a snapshot."""
    a = actual if isinstance(actual, tuple) else snap(actual)
    e = expected if isinstance(expected, tuple) else snap(expected)
    lines = diff(e, a)
    assert not lines, f"{what}: {len(lines)} difference(s) (first = expected, second = actual):\n" + \
        "\n".join(lines[:40])


def expected_tree(base, dst, *ops):
    """A plain copy of *base* at *dst* with *ops* (functions of a root path) applied."""
    copy_tree(base, dst)
    for op in ops:
        op(dst)
    return dst


# ---------------------------------------------------------------------------------- daemon helpers


def expect_error(code, m, op, **args):
    try:
        res = m.call(op, **args)
    except ClientError as exc:
        assert exc.code == code, f"{op} {args}: expected error {code}, got {exc.code}: {exc.message}"
        return exc
    pytest.fail(f"{op} {args} succeeded, but error {code!r} was expected; it returned {res}")


def assert_erofs(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == errno.EROFS, f"{fn.__name__}{args}: expected EROFS, got {ei.value!r}"


def assert_read_only(mp):
    """Every kind of change in the view fails with EROFS."""
    names = sorted(os.listdir(mp))
    files = [n for n in names if stat.S_ISREG(os.lstat(mp / n).st_mode)]
    assert_erofs(put, mp / "erofs-probe", b"x")
    assert_erofs(os.mkdir, mp / "erofs-dir")
    assert_erofs(os.symlink, "x", mp / "erofs-link")
    if files:
        f = mp / files[0]
        assert_erofs(append, f, b"x")
        assert_erofs(os.unlink, f)
        assert_erofs(os.rename, f, mp / "erofs-renamed")
        assert_erofs(os.chmod, f, 0o600)
        assert_erofs(os.link, f, mp / "erofs-hard")
        assert_erofs(os.truncate, f, 0)


def status(m):
    return m.call("saga.status")


def saga_record(m, sid):
    recs = [s for s in m.call("saga.list")["sagas"] if s["id"] == sid]
    assert len(recs) == 1, f"saga {sid} not listed exactly once: {recs}"
    return recs[0]


def step_states(m):
    return {s["index"]: s["state"] for s in status(m)["steps"]}


def events(m, sid):
    return m.call("saga.log", saga=sid)["events"]


def wait_idle(m, timeout=30.0):
    """Wait until the daemon runs no stack operation (recovery after a restart runs after mounting)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(m)
        if st["busy"] is None and (st["saga"] is None or st["saga"]["state"] != "compensating"):
            return st
        assert time.monotonic() < deadline, f"daemon still busy after {timeout} s: {st}\n{m.log()}"
        time.sleep(0.02)


@contextlib.contextmanager
def daemon_env(**env):
    """Environment variables for the daemons started inside the block (Mount.env copies os.environ)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reap(m, timeout=30.0):
    """After the daemon died (or to crash it): make sure it is dead, reap it, clear the dead mount."""
    if m.proc is None:
        return None
    try:
        m.proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    rc = m.proc.wait(timeout=timeout)
    m.proc = None
    subprocess.run(["fusermount3", "-uz", str(m.mp)], check=False, stderr=subprocess.DEVNULL)
    assert not os.path.ismount(m.mp), f"{m.mp} is still mounted after the daemon died"
    return rc


def wait_dead(m, timeout=30.0):
    """The daemon killed itself (fault injection): wait for it, then clear its mount. Returns rc."""
    try:
        rc = m.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(m)
        raise AssertionError(f"the daemon did not crash within {timeout} s\n{m.log()}")
    reap(m)
    return rc


def restart(m):
    """Start the daemon again on the same state directory (recovery), and wait for it to settle."""
    assert m.proc is None
    m.start()
    return wait_idle(m)


# ---------------------------------------------------------------------------------- the base of most tests


def build_base(root):
    """Files, dirs, owners, modes, an xattr, a hard-link pair and a relative symlink."""
    root.mkdir(parents=True)
    put(root / "mod.txt", "modify me\n")
    os.chown(root / "mod.txt", 1000, 1000)
    os.chmod(root / "mod.txt", 0o640)
    os.setxattr(root / "mod.txt", "user.tag", b"v1")
    put(root / "del.txt", "delete me\n")
    put(root / "a.txt", "a\n" * 100)
    put(root / "exe.sh", "#!/bin/sh\necho hi\n")
    os.chmod(root / "exe.sh", 0o755)
    (root / "olddir" / "sub").mkdir(parents=True)
    put(root / "olddir" / "x", "x\n")
    put(root / "olddir" / "y", "y\n" * 1000)
    put(root / "olddir" / "sub" / "z", "z\n")
    os.chown(root / "olddir", 1000, 1000)
    os.chmod(root / "olddir", 0o750)
    (root / "keep").mkdir()
    put(root / "keep" / "k1", "k1\n")
    put(root / "keep" / "k2", "k2\n")
    put(root / "h1", "hard\n")
    os.link(root / "h1", root / "h2")
    os.symlink("a.txt", root / "link-a")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def base(tmp_path):
    return build_base(tmp_path / "base")


# the operations of the lifecycle test's steps, applied to the mount and to a plain copy alike


def ops_s1(r):
    put(r / "new1.txt", "created in step 1\n")
    append(r / "mod.txt", "modified in step 1\n")
    os.unlink(r / "del.txt")
    os.mkdir(r / "newdir")
    put(r / "newdir" / "inner", "inner\n")


def ops_s2(r):
    os.rename(r / "olddir", r / "renamed")
    os.symlink("mod.txt", r / "sym-mod")
    os.link(r / "a.txt", r / "a-hard")
    put(r / "new2.txt", "created in step 2\n")


def ops_s3(r):
    put(r / "s3.txt", "created in step 3\n")
    append(r / "a.txt", "modified in step 3\n")
    os.unlink(r / "keep" / "k1")
    os.mkdir(r / "d3")


def ops_s4(r):
    os.makedirs(r / "new4" / "deep")
    put(r / "new4" / "deep" / "file", "deep\n")
    append(r / "h1", "both names of the hard link\n")
    os.rename(r / "keep", r / "kept")
    os.symlink("../mod.txt", r / "new4" / "up-link")
    os.link(r / "new1.txt", r / "new1-hard")
    os.unlink(r / "a.txt")
    os.rename(r / "olddir" / "x", r / "x-moved")
    os.chmod(r / "exe.sh", 0o700)
    os.mkdir(r / "empty" / "now-not")


# ---------------------------------------------------------------------------------- 1. lifecycle


def test_lifecycle_steps_rollbacks_commit(mount_factory, base, tmp_path):
    m = mount_factory(base)
    mp = m.mp
    base_snap = snap(base)
    base_digest = tree_digest(base)
    after_s1 = snap(expected_tree(base, tmp_path / "exp1", ops_s1))
    after_s2 = snap(expected_tree(base, tmp_path / "exp2", ops_s1, ops_s2))
    after_s3 = snap(expected_tree(base, tmp_path / "exp3", ops_s1, ops_s2, ops_s3))
    final = snap(expected_tree(base, tmp_path / "exp4", ops_s1, ops_s4))

    assert_same(mp, base_snap, "the view before any saga")
    sid = m.call("saga.begin", name="lifecycle")["saga"]["id"]
    st = status(m)
    assert st["saga"]["name"] == "lifecycle" and st["saga"]["state"] == "active"
    assert_read_only(mp)  # no step yet: no layer to write to

    for name, ops, expect in (("s1", ops_s1, after_s1), ("s2", ops_s2, after_s2), ("s3", ops_s3, after_s3)):
        step = m.call("saga.step", name=name)["step"]
        assert step["state"] == "open" and step["name"] == name
        ops(mp)
        assert_same(mp, expect, f"the view after step {name}")
    assert step_states(m) == {1: "done", 2: "done", 3: "open"}
    assert tree_digest(base) == base_digest, "the base was written before commit"

    # rollback without `to`: the open step (3) goes
    res = m.call("saga.rollback")
    assert res["compensated"] == [3]
    assert_same(mp, after_s2, "the view after rolling back the open step 3")
    assert step_states(m) == {1: "done", 2: "done", 3: "compensated"}
    # rollback to step 1: step 2 goes
    res = m.call("saga.rollback", to=1)
    assert res["compensated"] == [2]
    assert_same(mp, after_s1, "the view after rollback --to 1")
    assert step_states(m) == {1: "done", 2: "compensated", 3: "compensated"}
    assert status(m)["saga"]["state"] == "active"

    step = m.call("saga.step", name="s4")["step"]
    assert step["index"] == 4
    ops_s4(mp)
    assert_same(mp, final, "the view after step 4")
    assert tree_digest(base) == base_digest, "the base was written before commit"

    dry = m.call("saga.commit", dry_run=True)
    assert dry["conflicts"] == []
    assert {c["step"] for c in dry["changes"]} <= {1, 4}, dry["changes"]
    assert tree_digest(base) == base_digest, "a dry run wrote the base"

    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    assert_same(base, final, "the base after commit")
    assert staged_names(base) == []
    assert_same(mp, snap(base), "the view after commit")
    st = status(m)
    assert st["saga"] is None and st["steps"] == [] and st["writable"] is False
    rec = saga_record(m, sid)
    assert rec["state"] == "committed" and rec["name"] == "lifecycle"
    kinds = [(e["kind"], e.get("step")) for e in events(m, sid)]
    assert ("saga.committed", None) in kinds
    assert {s for k, s in kinds if k == "step.compensated"} == {2, 3}
    assert_read_only(mp)  # no saga, no layer


def test_rollback_forgets_what_the_kernel_cached(mount_factory, base):
    """Names, attributes and pages the kernel cached from a step (300 s timeouts) are gone
    right after its rollback: new files, new directories, renamed and modified base files,
    looked up directly by path (not through a listing)."""
    m = mount_factory(base)
    mp = m.mp
    m.call("saga.begin", name="cache")
    m.call("saga.step", name="s1")
    orig = read(mp / "mod.txt")
    os.makedirs(mp / "newdir" / "deep")
    paths = [mp / "newdir" / "deep" / f"f{i}" for i in range(200)] + [mp / "top-new"]
    for p in paths:
        put(p, "new\n")
    put(mp / "mod.txt", "changed\n")
    os.rename(mp / "olddir", mp / "moved")
    os.unlink(mp / "a.txt")
    for p in paths + [mp / "moved" / "y"]:
        os.lstat(p)  # in the kernel's caches now
    assert read(mp / "mod.txt") == b"changed\n"
    assert not os.path.lexists(mp / "a.txt") and not os.path.lexists(mp / "olddir")
    m.call("saga.rollback")
    for p in paths + [mp / "newdir", mp / "moved", mp / "moved" / "y"]:
        assert not os.path.lexists(p), f"{p} still visible after the rollback"
    assert read(mp / "mod.txt") == orig
    assert os.lstat(mp / "mod.txt").st_size == len(orig)
    assert read(mp / "a.txt") == b"a\n" * 100
    assert read(mp / "olddir" / "y") == b"y\n" * 1000


def test_dropped_layers_are_deleted_and_never_through_a_symlink(mount_factory, base, tmp_path):
    """A rolled-back step's layer is deleted in the background (by rm in a child process): the
    trash empties, the layer's files are gone, and what its symbolic links point to (outside
    the base, or a base directory) is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    put(outside / "precious", "keep me\n")
    m = mount_factory(base)
    mp = m.mp
    m.call("saga.begin", name="reap")
    m.call("saga.step", name="s1")
    layer = m.call("saga.status")["steps"][-1]["layer"]
    os.makedirs(mp / "gen" / "sub")
    for i in range(300):
        put(mp / "gen" / "sub" / f"f{i}", "x" * 100)
    os.symlink(str(outside), mp / "gen" / "to-outside")
    os.symlink(str(outside / "precious"), mp / "gen" / "to-precious")
    os.symlink("../olddir", mp / "gen" / "to-base")
    layers = m.state / "layers"
    assert (layers / layer / "gen" / "sub" / "f0").is_file()
    m.call("saga.rollback")
    trash = m.state / "trash"
    deadline = time.monotonic() + 30
    while any(trash.iterdir()) or (layers / layer).exists():
        assert time.monotonic() < deadline, f"layer {layer} not deleted: {sorted(os.listdir(trash))}"
        time.sleep(0.05)
    assert read(outside / "precious") == b"keep me\n"
    assert read(base / "olddir" / "y") == b"y\n" * 1000
    assert read(mp / "olddir" / "y") == b"y\n" * 1000
    assert not os.path.lexists(mp / "gen")


# ---------------------------------------------------------------------------------- 2. read-only after rollback, names


def test_rollback_leaves_view_read_only_until_next_step(mount_factory, base, tmp_path):
    m = mount_factory(base)
    mp = m.mp
    m.call("saga.begin", name="ro")
    m.call("saga.step", name="one")
    put(mp / "one.txt", "1\n")
    m.call("saga.step", name="two")
    put(mp / "two.txt", "2\n")
    m.call("saga.rollback")
    assert status(m)["writable"] is False
    assert_read_only(mp)
    assert read(mp / "one.txt") == b"1\n" and not os.path.lexists(mp / "two.txt")
    expect_error("no-open-step", m, "saga.rollback")  # nothing open any more
    assert_read_only(mp)

    m.call("saga.step", name="three")
    assert status(m)["writable"] is True
    put(mp / "three.txt", "3\n")
    append(mp / "mod.txt", "3\n")
    m.call("saga.rollback", to="one")  # by name
    assert_read_only(mp)
    assert not os.path.lexists(mp / "three.txt")
    assert_same(mp, snap(expected_tree(base, tmp_path / "e1", lambda r: put(r / "one.txt", "1\n"))),
                "the view after rollback --to one")

    # commit with a step open seals it: its changes are committed with the rest
    expected = snap(expected_tree(base, tmp_path / "e2", lambda r: put(r / "one.txt", "1\n"), ops_s1))
    sid = m.call("saga.step", name="four")["step"]["saga"]
    ops_s1(mp)
    assert status(m)["writable"] is True
    m.call("saga.commit")
    assert_read_only(mp)
    assert_same(base, expected, "the base after committing with an open step")
    assert_same(mp, expected, "the view after committing with an open step")
    assert status(m)["saga"] is None
    assert saga_record(m, sid)["state"] == "committed"


BAD_NAMES = ["", ".", "..", "a/b", "x" * 300, "a\nb", "tab\there", "nul\0", None, 7]


def test_bad_names_and_state_errors(mount_factory, base):
    m = mount_factory(base)
    expect_error("no-saga", m, "saga.step", name="s")
    expect_error("no-saga", m, "saga.commit")
    expect_error("no-saga", m, "saga.rollback")
    for name in BAD_NAMES:
        expect_error("bad-name", m, "saga.begin", name=name)
    assert status(m)["saga"] is None
    m.call("saga.begin", name="ok name with spaces")
    expect_error("saga-active", m, "saga.begin", name="second")
    for name in BAD_NAMES:
        expect_error("bad-name", m, "saga.step", name=name)
    assert status(m)["steps"] == []
    m.call("saga.step", name="é-ünïcode")
    expect_error("no-step", m, "saga.rollback", to=5)
    expect_error("no-step", m, "saga.rollback", to="nope")
    expect_error("no-step", m, "saga.diff", step=9)
    m.call("saga.abort")


# ---------------------------------------------------------------------------------- 3. abort


def test_abort_compensates_every_step(mount_factory, base, tmp_path):
    logf = tmp_path / "comp.log"
    m = mount_factory(base)
    mp = m.mp
    digest = tree_digest(base)
    base_snap = snap(base)
    sid = m.call("saga.begin", name="to-abort")["saga"]["id"]
    for i, ops in enumerate((ops_s1, ops_s2, ops_s3), 1):
        m.call("saga.step", name=f"s{i}", compensate=f"echo $STEP_INDEX >> {shlex.quote(str(logf))}")
        ops(mp)
    res = m.call("saga.abort")
    assert res["compensated"] == [3, 2, 1]
    assert res["saga"]["state"] == "aborted"
    assert logf.read_text().split() == ["3", "2", "1"], "compensations: each once, newest first"
    assert tree_digest(base) == digest, "abort changed the base"
    assert_same(mp, base_snap, "the view after abort")
    assert status(m)["saga"] is None
    assert saga_record(m, sid)["state"] == "aborted"
    assert_read_only(mp)
    assert [e["step"] for e in events(m, sid) if e["kind"] == "step.compensated"] == [3, 2, 1]

    sid2 = m.call("saga.begin", name="after-abort")["saga"]["id"]
    assert sid2 != sid
    m.call("saga.step", name="again")
    put(mp / "again.txt", "again\n")
    m.call("saga.commit")
    assert read(base / "again.txt") == b"again\n"
    assert saga_record(m, sid)["state"] == "aborted"
    assert saga_record(m, sid2)["state"] == "committed"


# ---------------------------------------------------------------------------------- 4. compensation


ENV_VARS = ("SAGA_ID", "SAGA_NAME", "STEP_NAME", "STEP_INDEX", "ATTEMPT", "WORKSPACE")


def test_compensation_retried_until_it_succeeds(mount_factory, base, tmp_path):
    t = tmp_path / "comp"
    t.mkdir()
    T = shlex.quote(str(t))
    cmd = (f"n=$(cat {T}/c 2>/dev/null || echo 0); n=$((n+1)); echo $n > {T}/c; "
           f"env > {T}/env.$n; pwd -P > {T}/cwd.$n; cat made-in-step-2.txt > {T}/seen.$n 2>&1; "
           f"[ $n -ge 3 ] && echo ok >> {T}/ran")
    m = mount_factory(base)
    mp = m.mp
    sid = m.call("saga.begin", name="retrying saga")["saga"]["id"]
    m.call("saga.step", name="first")
    put(mp / "first.txt", "1\n")
    m.call("saga.step", name="second step", compensate=cmd, retries=3)
    put(mp / "made-in-step-2.txt", "visible during compensation\n")

    res = m.call("saga.rollback")
    assert res["compensated"] == [2]
    assert (t / "c").read_text().strip() == "3"
    assert (t / "ran").read_text().splitlines() == ["ok"], "the command must succeed exactly once"
    for n in (1, 2, 3):
        env = dict(line.split("=", 1) for line in (t / f"env.{n}").read_text().splitlines() if "=" in line)
        got = {k: env.get(k) for k in ENV_VARS}
        assert got == {"SAGA_ID": str(sid), "SAGA_NAME": "retrying saga", "STEP_NAME": "second step",
                       "STEP_INDEX": "2", "ATTEMPT": str(n), "WORKSPACE": str(mp)}, got
        assert (t / f"cwd.{n}").read_text().strip() == os.path.realpath(mp)
        assert (t / f"seen.{n}").read_text() == "visible during compensation\n", \
            "the step's layer must be visible while its compensation runs"
    attempts = [(e["attempt"], e["status"]) for e in events(m, sid) if e["kind"] == "compensate.attempt"]
    assert attempts == [(1, 1), (2, 1), (3, 0)]
    assert not os.path.lexists(mp / "made-in-step-2.txt")
    assert read(mp / "first.txt") == b"1\n"
    assert status(m)["saga"]["state"] == "active"
    assert step_states(m) == {1: "done", 2: "compensated"}


def test_compensation_failing_leaves_saga_stuck_until_retry(mount_factory, base, tmp_path):
    t = tmp_path / "comp"
    t.mkdir()
    T = shlex.quote(str(t))
    failing = (f"echo attempt $ATTEMPT >> {T}/tries; "
               f"[ -e {T}/fixed ] || {{ echo 'cannot undo step two: {T}/fixed is missing' >&2; exit 7; }}")
    m = mount_factory(base)
    mp = m.mp
    base_snap = snap(base)
    sid = m.call("saga.begin", name="stuck")["saga"]["id"]
    m.call("saga.step", name="one")
    put(mp / "one.txt", "1\n")
    m.call("saga.step", name="two", compensate=failing, retries=2)
    put(mp / "two.txt", "2\n")
    os.unlink(mp / "del.txt")
    m.call("saga.step", name="three", compensate=f"echo 3 >> {T}/three")
    put(mp / "three.txt", "3\n")

    err = expect_error("stuck", m, "saga.rollback", to=0)
    assert err.data.get("step") == 2 and err.data.get("status") == 7, err.data
    assert "cannot undo step two" in err.data.get("stderr", ""), err.data
    assert (t / "tries").read_text().split("\n")[:-1] == ["attempt 1", "attempt 2"]
    assert (t / "three").read_text() == "3\n"

    st = status(m)
    assert st["saga"]["state"] == "stuck"
    assert st["saga"]["stuck_step"] == 2
    assert st["saga"]["exit_status"] == 7
    assert "cannot undo step two" in st["saga"]["stderr_tail"]
    assert {s["index"]: s["state"] for s in st["steps"]} == {1: "done", 2: "compensating", 3: "compensated"}
    assert st["writable"] is False
    assert_read_only(mp)
    # the layers of steps 1 and 2 are still visible, step 3's is gone
    assert read(mp / "one.txt") == b"1\n" and read(mp / "two.txt") == b"2\n"
    assert not os.path.lexists(mp / "del.txt")
    assert not os.path.lexists(mp / "three.txt")
    # a stuck saga refuses new work
    expect_error("stuck", m, "saga.step", name="more")
    expect_error("stuck", m, "saga.commit")
    expect_error("stuck", m, "saga.rollback", to=0)

    put(t / "fixed", "")
    res = m.call("saga.retry")
    assert res["compensated"] == [2, 1]
    st = status(m)
    assert st["saga"]["state"] == "active" and st["saga"].get("error") is None
    assert {s["index"]: s["state"] for s in st["steps"]} == {1: "compensated", 2: "compensated",
                                                             3: "compensated"}
    assert_same(mp, base_snap, "the view after the retried rollback")
    assert (t / "three").read_text() == "3\n", "step 3 must not be compensated twice"
    expect_error("bad-state", m, "saga.retry")
    m.call("saga.step", name="fresh")
    put(mp / "fresh.txt", "f\n")
    m.call("saga.commit")
    assert read(base / "fresh.txt") == b"f\n" and read(base / "del.txt") == b"delete me\n"
    assert saga_record(m, sid)["state"] == "committed"


def test_abort_of_stuck_saga(mount_factory, base, tmp_path):
    flag = tmp_path / "ok"
    m = mount_factory(base)
    m.call("saga.begin", name="stuck-abort")
    m.call("saga.step", name="one", compensate=f"test -e {shlex.quote(str(flag))}", retries=1)
    put(m.mp / "one.txt", "1\n")
    expect_error("stuck", m, "saga.abort")
    assert status(m)["saga"]["state"] == "stuck"
    put(flag, "")
    assert m.call("saga.abort")["saga"]["state"] == "aborted"
    assert status(m)["saga"] is None
    assert_same(m.mp, snap(base), "the view after aborting the stuck saga")


# ---------------------------------------------------------------------------------- 5. conflicts


def test_conflicting_commits(mount_factory, base, tmp_path):
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")
    a.call("saga.begin", name="A")
    b.call("saga.begin", name="B")
    a.call("saga.step", name="a1")
    b.call("saga.step", name="b1")
    append(a.mp / "mod.txt", "from A\n")
    put(a.mp / "a-only.txt", "A\n")
    append(b.mp / "mod.txt", "from B\n")
    put(b.mp / "b-only.txt", "B\n")
    b.call("saga.step", name="b2")
    os.unlink(b.mp / "keep" / "k2")

    a.call("saga.commit")
    after_a = snap(base)
    assert read(base / "mod.txt") == b"modify me\nfrom A\n"
    view_b = snap(b.mp)

    err = expect_error("conflict", b, "saga.commit")
    paths = [c["path"] for c in err.data.get("conflicts", [])]
    assert paths == ["mod.txt"], err.data
    assert_same(base, after_a, "the base after the refused commit (nothing of B applied)")
    assert staged_names(base) == []
    st = status(b)
    assert st["saga"]["state"] == "active" and st["saga"]["name"] == "B"
    assert st["writable"] is True
    assert_same(b.mp, view_b, "B's view after its refused commit")
    # still a live saga: it can go on, and still conflicts
    put(b.mp / "b-more.txt", "more\n")
    expect_error("conflict", b, "saga.commit")
    assert_same(base, after_a, "the base after the second refused commit")
    b.call("saga.abort")
    assert_same(base, after_a, "the base after B's abort")


def test_conflicts_found_after_finished_steps_are_rolled_back(mount_factory, base):
    """A path first changed by a finished step that is rolled back, then changed again, is
    recorded again: its base identity is checked at commit (the known paths are recomputed
    when finished steps go; a rollback of the open step alone keeps them)."""
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")
    b.call("saga.begin", name="B")
    b.call("saga.step", name="b1")
    append(b.mp / "mod.txt", "b1\n")
    b.call("saga.step", name="b2")
    append(b.mp / "a.txt", "b2\n")
    b.call("saga.rollback")  # the open step b2 only: b1's paths stay known
    b.call("saga.step", name="b3")
    put(b.mp / "b3.txt", "b3\n")
    b.call("saga.rollback", to=0)  # b3 (open) and b1 (finished)
    b.call("saga.step", name="b4")
    append(b.mp / "mod.txt", "b4\n")
    a.call("saga.begin", name="A")
    a.call("saga.step", name="a1")
    append(a.mp / "mod.txt", "from A\n")
    a.call("saga.commit")
    after_a = snap(base)
    err = expect_error("conflict", b, "saga.commit")
    assert [c["path"] for c in err.data.get("conflicts", [])] == ["mod.txt"], err.data
    assert_same(base, after_a, "the base after the refused commit")
    b.call("saga.abort")


def test_non_overlapping_commits_both_apply(mount_factory, base, tmp_path):
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")

    def ops_a(r):
        append(r / "mod.txt", "from A\n")
        put(r / "keep" / "a.new", "A\n")
        os.unlink(r / "olddir" / "x")

    def ops_b(r):
        append(r / "a.txt", "from B\n")
        put(r / "keep" / "b.new", "B\n")
        os.rename(r / "olddir" / "y", r / "y-moved")
        os.mkdir(r / "bdir")

    expected = snap(expected_tree(base, tmp_path / "exp", ops_a, ops_b))
    a.call("saga.begin", name="A")
    b.call("saga.begin", name="B")
    a.call("saga.step", name="a1")
    b.call("saga.step", name="b1")
    ops_a(a.mp)
    ops_b(b.mp)
    a.call("saga.commit")
    b.call("saga.commit")
    assert_same(base, expected, "the base after two non-overlapping commits")
    assert staged_names(base) == []


def test_create_conflicts_with_create_committed_meanwhile(mount_factory, base, tmp_path):
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")
    b.call("saga.begin", name="B")
    b.call("saga.step", name="b1")
    put(b.mp / "same-name.txt", "B's\n")
    os.makedirs(b.mp / "newdir" / "sub")
    put(b.mp / "newdir" / "sub" / "f", "B\n")
    a.call("saga.begin", name="A")
    a.call("saga.step", name="a1")
    put(a.mp / "same-name.txt", "A's\n")
    a.call("saga.commit")
    after_a = snap(base)

    err = expect_error("conflict", b, "saga.commit")
    assert [c["path"] for c in err.data["conflicts"]] == ["same-name.txt"], err.data
    assert_same(base, after_a, "the base after the refused commit")
    assert read(b.mp / "same-name.txt") == b"B's\n"
    assert status(b)["saga"]["state"] == "active"


def _b_deletes_dir(r, d):
    shutil.rmtree(r / d)


def _b_replaces_dir(r, d):
    shutil.rmtree(r / d)
    os.mkdir(r / d)
    put(r / d / "fresh", "B\n")


def _b_renames_dir(r, d):
    os.rename(r / d, r / f"{d}-moved-by-b")


# (directory B removes, a new entry A adds below it, an existing entry A modifies below it)
DIR_CASES = {"top": ("keep", "keep/from-a", "keep/k1"),
             "deep": ("olddir", "olddir/sub/from-a", "olddir/sub/z")}


@pytest.mark.parametrize("b_ops", [_b_deletes_dir, _b_replaces_dir, _b_renames_dir],
                         ids=["delete", "replace", "rename"])
@pytest.mark.parametrize("a_change", ["new-entry", "modified-entry"])
@pytest.mark.parametrize("where", sorted(DIR_CASES))
def test_directory_change_vs_entries_committed_meanwhile(mount_factory, base, b_ops, a_change, where):
    """B removes (or replaces, or renames away) a base directory while A changes an entry below
    it and commits first: B's commit must not silently destroy A's committed change.

    A modified entry is a modify/delete conflict: refused. A new entry may be refused as a
    conflict too, or kept (as a merge of file sets would), but never lost.
    """
    d, new_entry, modified_entry = DIR_CASES[where]
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")
    b.call("saga.begin", name="B")
    b.call("saga.step", name="b1")
    b_ops(b.mp, d)
    a.call("saga.begin", name="A")
    a.call("saga.step", name="a1")
    if a_change == "new-entry":
        put(a.mp / new_entry, "from A\n")
    else:
        append(a.mp / modified_entry, "from A\n")
    a.call("saga.commit")
    after_a = snap(base)

    if a_change == "modified-entry":
        err = expect_error("conflict", b, "saga.commit")
    else:
        try:
            res = b.call("saga.commit")
        except ClientError as exc:
            assert exc.code == "conflict", f"{exc.code}: {exc.message}"
            err = exc
        else:
            survivors = [p for p, desc in snap(base)[0].items()
                         if os.path.basename(p) == "from-a" and desc.get("size") == len("from A\n")]
            assert survivors, f"B's commit (no conflict reported: {res['changes']} changes) destroyed " \
                              f"{new_entry}, which A committed meanwhile (a lost update)"
            return
    paths = [c["path"] for c in err.data["conflicts"]]
    assert any(p == d or p.startswith(d + "/") for p in paths), paths
    assert_same(base, after_a, "the base after B's refused commit")
    assert status(b)["saga"]["state"] == "active"


def test_compensation_timeout_leaves_saga_stuck(mount_factory, base):
    m = mount_factory(base)
    m.call("saga.begin", name="slow")
    m.call("saga.step", name="s", compensate="sleep 60", retries=1, compensate_timeout=0.5)
    put(m.mp / "x.txt", "x\n")
    t0 = time.monotonic()
    err = expect_error("stuck", m, "saga.rollback")
    assert time.monotonic() - t0 < 10, "the compensation was not killed at its timeout"
    assert err.data.get("status") == 124, err.data
    st = status(m)["saga"]
    assert st["state"] == "stuck" and st["exit_status"] == 124
    assert read(m.mp / "x.txt") == b"x\n"
