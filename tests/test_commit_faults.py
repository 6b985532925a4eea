"""The fault matrix of a commit: ENOSPC and EIO at each kind of system call it makes.

``OVERLAYD_FAIL_AT=label:ERRNO[:n]`` (overlayd/commit/apply.py, ``fault``) makes the n-th pass of a
label raise that error once, in the daemon: stage.link, stage.copy, stage.mkdir, setxattr,
rename, unlink, syncfs. The saga is the two-step, ~30-change saga of tests/test_saga_crash.py
(new, modified, deleted files, hard links, a replaced directory, a directory replaced by a
file, a deleted tree, a new tree), its base on the state directory's file system ("same":
files staged by hard links) or on a tmpfs ("cross": files staged by copying).

Each case must end in a clean refusal or a recovery, with nothing lost:

- the commit answers with an error naming the failure (``commit-failed``: nothing was applied,
  the base is as before, no temporary name is left, the saga is active with its changes in
  the view; or ``commit-incomplete``: the saga is ``committing`` and the journal holds the rest);
- the daemon keeps serving;
- then ``saga commit`` again (in the same daemon: the fault fired once) or a restart of the
  daemon (without the fault) finishes the commit: the base equals the view the saga showed,
  with no temporary name and no private xattr.

The SIGKILL half of the fault matrix (every journaled point of commit and rollback) is
tests/test_saga_crash.py. CI runs one case per label and error; OVERLAYD_TORTURE=1 runs every
label x error x file system layout x way of finishing.
"""

import itertools
import os
import stat
import threading
import time

import pytest

import fsmatrix
from overlayd import commit
from overlayd.client import ClientError
from test_saga import assert_same, put, read, daemon_env, restart, staged_names, status
from test_saga_crash import build_crash_base, prepare_two_step_saga
from treecmp import walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs and FUSE: needs root")

ERRORS = {"ENOSPC": "No space left on device", "EIO": "Input/output error"}
# where a label is reached: stage.copy only copies across file systems; stage.mkdir only
# when new directories are built entry by entry (not moved whole), hence MOVES=0 for it
LABELS = {
    "stage.link": ("same", "cross"),
    "stage.copy": ("cross",),
    "stage.mkdir": ("same", "cross"),
    "setxattr": ("same", "cross"),
    "rename": ("same", "cross"),
    "unlink": ("same", "cross"),
    "syncfs": ("same", "cross"),  # 1st: after staging
    "syncfs:2": ("same", "cross"),  # 2nd: after applying
}
CI_CASES = [
    ("stage.link", "ENOSPC", "same", "commit-again"), ("stage.link", "EIO", "cross", "restart"),
    ("stage.copy", "ENOSPC", "cross", "commit-again"), ("stage.copy", "EIO", "cross", "restart"),
    ("stage.mkdir", "ENOSPC", "same", "restart"), ("stage.mkdir", "EIO", "cross", "commit-again"),
    ("setxattr", "ENOSPC", "cross", "commit-again"), ("setxattr", "EIO", "same", "restart"),
    ("rename", "ENOSPC", "same", "commit-again"), ("rename", "EIO", "cross", "restart"),
    ("unlink", "ENOSPC", "cross", "restart"), ("unlink", "EIO", "same", "commit-again"),
    ("syncfs", "ENOSPC", "same", "commit-again"), ("syncfs:2", "EIO", "cross", "restart"),
]
ALL_CASES = [(label, err, where, how) for label, wheres in LABELS.items()
             for err, where, how in itertools.product(ERRORS, wheres, ("commit-again", "restart"))]


def test_every_label_is_in_the_matrix():
    assert {label.partition(":")[0] for label in LABELS} == set(commit.FAULT_LABELS)


def fail_at(label, err):
    name, _, nth = label.partition(":")
    return f"{name}:{err}" + (f":{nth}" if nth else "")


@pytest.mark.parametrize("label,err,where,how", ALL_CASES if fsmatrix.TORTURE else CI_CASES,
                         ids=lambda v: str(v))
def test_commit_fault(filesystems, mount_factory, tmp_path, label, err, where, how):
    if where == "cross":
        base = build_crash_base(filesystems.dir("tmpfs", "fault") / "base")
    else:
        base = build_crash_base(tmp_path / "base")
    m = mount_factory(base, start=False)
    env = {"OVERLAYD_FAIL_AT": fail_at(label, err)}
    if label == "stage.mkdir":
        env["OVERLAYD_COMMIT_MOVES"] = "0"
    with daemon_env(**env):
        m.start()
    sid, pre, post = prepare_two_step_saga(m, base, tmp_path)

    try:
        res = m.call("saga.commit")
    except ClientError as exc:
        error = exc
    else:
        pytest.fail(f"the commit succeeded although {label} failed with {err}: {res}\n{m.log()}")
    assert f"fault injection: {label.partition(':')[0]} fails with {err}" in m.log(), \
        f"the fault at {label} never fired: this layout does not reach it\n{m.log()}"
    assert m.proc.poll() is None, f"the daemon died on {err} at {label}\n{m.log()}"
    assert error.code in ("commit-failed", "commit-incomplete"), f"{error.code}: {error.message}"
    assert ERRORS[err] in error.message, f"the error does not say what failed: {error.message}"
    saga = status(m)["saga"]
    assert saga is not None and saga["id"] == sid, f"the saga is gone after a failed commit: {saga}"
    if error.code == "commit-failed":
        # a clean refusal: nothing applied, nothing left behind, nothing lost
        assert saga["state"] == "active", saga
        assert_same(base, pre, f"the base after a commit refused at {label} ({err})")
        assert staged_names(base) == [], "temporary names left in the base by a refused commit"
        assert_same(m.mp, post, f"the view after the commit refused at {label} ({err})")
    else:
        # half applied: the view may answer ENOENT for names cached before the commit until it
        # is finished (docs/ARCHITECTURE.md, commit protocol, 7.), but never other data or EIO
        assert saga["state"] == "committing", saga
        for rel, fd, name, st in walk(m.mp):
            if stat.S_ISREG(st.st_mode):
                try:
                    efd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    continue
                try:
                    os.read(efd, 1 << 20)
                finally:
                    os.close(efd)

    if how == "restart":
        m.kill()
        restart(m)  # without the fault: recovery rolls a journaled commit forward
    if status(m)["saga"] is not None:
        res = m.call("saga.commit")
        assert res["saga"]["state"] == "committed", res
    assert status(m)["saga"] is None
    assert_same(base, post, f"the base after the commit that failed at {label} ({err}) was finished ({how})")
    assert staged_names(base) == [], "temporary names left in the base"
    assert_same(m.mp, post, "the view after the commit was finished")
    m.stop()
    restart(m)
    assert_same(base, post, "the base after another restart")


def test_metacopy_read_while_commit_applies(mount_factory, tmp_path):
    """A file the saga only chmod-ed (a metacopy) is read while the commit has already renamed
    its layer copy over the base file: the view must give its data. It answered EIO (the view
    still held the metacopy's origin, whose base inode had just been replaced), and went on doing
    so after a commit that failed half-way."""
    base = tmp_path / "base"
    base.mkdir()
    data = os.urandom(10000)
    put(base / "f", data)
    m = mount_factory(base, start=False)
    with daemon_env(OVERLAYD_STALL_AT="commit.applied:2"):
        m.start()
    m.call("saga.begin", name="read-during-commit")
    m.call("saga.step", name="s")
    assert read(m.mp / "f") == data  # the kernel may cache this; the daemon must answer the next open
    os.chmod(m.mp / "f", 0o600)
    done = []
    t = threading.Thread(target=lambda: done.append(m.call("saga.commit")))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while os.stat(base / "f").st_mode & 0o777 != 0o600:  # renamed into place: now stalling
            assert time.monotonic() < deadline, "the commit never renamed f into the base"
            time.sleep(0.01)
        with open(m.mp / "f", "rb", buffering=0) as f:  # a new open: the daemon answers it
            assert f.read() == data
    finally:
        t.join()
    assert done and done[0]["saga"]["state"] == "committed"
    assert read(base / "f") == data


def test_a_file_that_only_lost_a_hard_link_is_no_conflict(mount_factory, tmp_path):
    """A commit links the layer's file into the base; the layer keeps its link until the reaper
    deletes the dropped layer, whose unlink changes the file's ctime. If the next saga recorded
    the file before that, its commit was refused as a conflict (about one commit in four of a
    file changed by consecutive sagas, on a loaded machine). Here the other link is made and
    removed by the test, at the worst moment."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "0\n")
    other = tmp_path / "other-link"  # on the base's file system, outside the base
    os.link(base / "f", other)
    m = mount_factory(base)
    m.call("saga.begin", name="after-reap")
    m.call("saga.step", name="s")
    with open(m.mp / "f", "a") as f:
        f.write("1\n")  # the first change records the base file (2 links)
    os.unlink(other)  # what the reaper does to a committed file's layer link
    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    assert read(base / "f") == b"0\n1\n"
    # a real change still conflicts
    m.call("saga.begin", name="real-change")
    m.call("saga.step", name="s")
    with open(m.mp / "f", "a") as f:
        f.write("2\n")
    os.chmod(base / "f", 0o600)  # behind the workspace's back: only the ctime tells
    with pytest.raises(ClientError) as ei:
        m.call("saga.commit")
    assert ei.value.code == "conflict"
