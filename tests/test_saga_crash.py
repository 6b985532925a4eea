"""Crash safety of the saga engine: the daemon dies (fault injection, or SIGKILL from the test)
during a commit or a rollback, and is started again on the same state directory.

Expected: a commit whose intent is journaled is rolled forward before the mount; the base is
never left a mix of the old and the new tree once the daemon is back; recovery run twice
gives the same result; an interrupted rollback is finished after mounting; the step open at
a crash is rolled back unless --keep-open-step.

The daemon is started with OVERLAYD_CRASH_AT=label[:n] to SIGKILL itself at a labelled point;
the randomized test kills it from outside at a random moment of a commit instead: 0-50 ms after
the request in even rounds, 0-10 ms after the commit intent is journaled in odd rounds (rounds:
OVERLAYD_CRASH_ROUNDS, default 100; seed: OVERLAYD_CRASH_SEED).
"""

import os
import random
import shlex
import shutil
import signal
import threading
import time

import pytest

import fsmatrix
from overlayd.journal import Journal
from overlayd.client import ClientError
from treecmp import diff
from test_saga import (append, assert_read_only, assert_same, copy_tree, daemon_env, expected_tree, put, read,
                       reap, restart, saga_record, snap, staged_names, status, step_states, strip_staged,
                       wait_dead)


def journal_state(m):
    """(commit plan, {saga id: state}) read from the journal of a stopped daemon."""
    assert m.proc is None, "read the journal only while no daemon runs"
    j = Journal.open(m.state, readonly=True)
    try:
        return j.meta("commit_plan"), {s["id"]: s["state"] for s in j.sagas()}
    finally:
        j.close()


def start_crashing(m, crash_at):
    with daemon_env(OVERLAYD_CRASH_AT=crash_at):
        m.start()
    return m


def call_expecting_crash(m, op, **args):
    """*op* must not answer: the daemon dies while doing it."""
    try:
        res = m.call(op, **args)
    except ClientError as exc:
        assert exc.code in ("disconnected", "timeout"), f"{op}: unexpected error {exc.code}: {exc.message}"
    except OSError:
        pass  # connection reset
    else:
        pytest.fail(f"{op} answered although the daemon should have crashed: {res}")
    rc = wait_dead(m)
    assert rc == -signal.SIGKILL, f"daemon exit status {rc}\n{m.log()}"


# ---------------------------------------------------------------------------------- a saga of ~30 changes


def build_crash_base(root):
    root.mkdir(parents=True)
    for d in ("src", "docs", "replace-me", "to-file", "old-tree", "keep"):
        (root / d).mkdir()
    for i in range(10):
        put(root / "src" / f"m{i}.py", f"def f{i}():\n    return {i}\n" * (i + 1))
    for i in range(4):
        put(root / "docs" / f"d{i}.md", f"# doc {i}\n")
        put(root / "replace-me" / f"r{i}", f"replaced {i}\n")
        put(root / "old-tree" / f"o{i}", f"old {i}\n")
    os.makedirs(root / "old-tree" / "deeper")
    put(root / "old-tree" / "deeper" / "x", "x\n")
    put(root / "to-file" / "t", "t\n")
    put(root / "keep" / "k", "k\n")
    put(root / "top.txt", "top\n")
    os.chown(root / "src" / "m3.py", 1000, 1000)
    os.chmod(root / "src" / "m4.py", 0o755)
    os.link(root / "docs" / "d0.md", root / "docs" / "d0-hard.md")
    os.symlink("src/m1.py", root / "link")
    return root


def crash_ops_1(r):
    for i in range(6):
        put(r / "src" / f"new{i}.py", f"new {i}\n")  # 6 creates
    for i in range(5):
        append(r / "src" / f"m{i}.py", f"# step 1 edit {i}\n")  # 5 modifications (m3 owned by 1000)
    for i in range(6, 9):
        os.unlink(r / "src" / f"m{i}.py")  # 3 deletions
    append(r / "docs" / "d0.md", "edited through one name of a hard link\n")
    os.chmod(r / "docs" / "d1.md", 0o600)


def crash_ops_2(r):
    shutil.rmtree(r / "replace-me")  # a replaced directory
    os.mkdir(r / "replace-me")
    for i in range(3):
        put(r / "replace-me" / f"n{i}", f"replacement {i}\n")
    shutil.rmtree(r / "to-file")  # a directory replaced by a file
    put(r / "to-file", "now a file\n")
    shutil.rmtree(r / "old-tree")  # a deleted tree
    for a in range(2):  # a new directory tree
        for b in range(2):
            os.makedirs(r / "new-tree" / f"a{a}" / f"b{b}")
            for c in range(2):
                put(r / "new-tree" / f"a{a}" / f"b{b}" / f"f{c}", f"{a}{b}{c}\n")
    os.symlink("../top.txt", r / "new-tree" / "up")
    append(r / "src" / "new0.py", "# step 2 edit of a step 1 file\n")
    append(r / "src" / "m0.py", "# step 2 edit\n")
    os.unlink(r / "src" / "new5.py")
    os.rename(r / "docs" / "d2.md", r / "d2-moved.md")
    os.chmod(r / "docs", 0o750)  # a directory's own attribute: the commit's dir op gives it
    put(r / "top.txt", "rewritten\n")


def prepare_two_step_saga(m, base, tmp_path):
    """Begin a saga with two steps of ~30 changes; returns (saga id, pre snapshot, post snapshot)."""
    pre = snap(base)
    post = snap(expected_tree(base, tmp_path / "expected", crash_ops_1, crash_ops_2))
    sid = m.call("saga.begin", name="crashy")["saga"]["id"]
    m.call("saga.step", name="one")
    crash_ops_1(m.mp)
    m.call("saga.step", name="two")
    crash_ops_2(m.mp)
    assert_same(m.mp, post, "the view before the commit")
    assert len(m.call("saga.diff")["changes"]) >= 30
    return sid, pre, post


def check_committed(m, base, sid, post, what):
    assert_same(base, post, f"the base {what}")
    assert staged_names(base) == [], f"leftover temporary names in the base {what}"
    st = status(m)
    assert st["saga"] is None, f"no saga should be active {what}: {st['saga']}"
    assert saga_record(m, sid)["state"] == "committed"
    assert_same(m.mp, post, f"the view {what}")


# ---------------------------------------------------------------------------------- 6. labelled crashes


COMMIT_LABELS = ["commit.intent", "commit.staged", "commit.apply", "commit.applied", "commit.done"]


@pytest.mark.parametrize("label", COMMIT_LABELS)
def test_commit_crash_is_rolled_forward(mount_factory, tmp_path, label):
    commit_crash(mount_factory, build_crash_base(tmp_path / "base"), tmp_path, label)


def commit_crash(mount_factory, base, tmp_path, label, where=None):
    m = start_crashing(mount_factory(base, start=False, where=where), label)
    sid, pre, post = prepare_two_step_saga(m, base, tmp_path)

    call_expecting_crash(m, "saga.commit")
    now = snap(base)
    plan, states = journal_state(m)
    assert plan is not None and plan["saga"] == sid, f"the commit intent must be journaled: {plan}"
    assert states[sid] == "committing"
    if label == "commit.intent":
        assert_same(now, pre, "the base after a crash before it was touched")
    elif label in ("commit.staged", "commit.apply"):
        assert_same(strip_staged(now), pre, f"the base after a crash at {label} (but the staged names)")
        staged = staged_names(base)
        assert staged, "staged entries expected in the base"
        assert all(os.path.basename(p).startswith(f".overlayd-{sid}-") for p in staged), staged
    else:
        assert_same(now, post, f"the base after a crash at {label}")
    assert strip_staged(now) in (pre, post)

    restart(m)
    check_committed(m, base, sid, post, f"after recovering from a crash at {label}")
    assert_read_only(m.mp)
    m.stop()
    assert journal_state(m)[0] is None
    restart(m)
    check_committed(m, base, sid, post, "after a second restart")
    # the workspace is usable again
    m.call("saga.begin", name="next")
    m.call("saga.step", name="s")
    put(m.mp / "after-recovery.txt", "x\n")
    m.call("saga.commit")
    assert read(base / "after-recovery.txt") == b"x\n"


@pytest.mark.parametrize("label", ["commit.staged", "commit.apply", "commit.applied"])
def test_crash_during_recovery_is_recovered(mount_factory, tmp_path, label):
    """Recovery runs the same plan: a crash in the middle of it is recovered in turn."""
    base = build_crash_base(tmp_path / "base")
    m = start_crashing(mount_factory(base, start=False), label)
    sid, pre, post = prepare_two_step_saga(m, base, tmp_path)
    call_expecting_crash(m, "saga.commit")
    with pytest.raises(RuntimeError, match="failed to start"):
        start_crashing(m, label)  # recovery runs before the mount and crashes at the same point
    rc = m.proc.wait(timeout=30)
    assert rc == -signal.SIGKILL, rc
    m.proc = None
    assert strip_staged(snap(base)) in (pre, post)
    restart(m)
    check_committed(m, base, sid, post, f"after recovering from two crashes at {label}")


ROLLBACK_LABELS = ["rollback.start", "rollback.step", "rollback.step:2"]


@pytest.mark.parametrize("label", ROLLBACK_LABELS)
def test_rollback_crash_is_finished_after_restart(mount_factory, tmp_path, label):
    rollback_crash(mount_factory, build_crash_base(tmp_path / "base"), tmp_path, label)


def rollback_crash(mount_factory, base, tmp_path, label, where=None):
    comp = tmp_path / "comp.log"
    m = start_crashing(mount_factory(base, start=False, where=where), label)
    base_snap = snap(base)
    sid = m.call("saga.begin", name="rb")["saga"]["id"]
    for i, ops in enumerate((crash_ops_1, crash_ops_2, lambda r: put(r / "third.txt", "3\n")), 1):
        m.call("saga.step", name=f"s{i}", compensate=f"echo $STEP_INDEX >> {shlex.quote(str(comp))}")
        ops(m.mp)
    call_expecting_crash(m, "saga.rollback", to=0)
    assert journal_state(m)[1][sid] == "compensating"
    assert snap(base) == base_snap, "a rollback wrote the base"

    restart(m)
    st = status(m)
    assert st["saga"]["state"] == "active" and st["saga"]["id"] == sid
    assert step_states(m) == {1: "compensated", 2: "compensated", 3: "compensated"}
    assert_same(m.mp, base_snap, "the view after the interrupted rollback was finished")
    assert comp.read_text().split() == ["3", "2", "1"], "each compensation once, newest first"
    assert snap(base) == base_snap
    m.stop()
    restart(m)
    assert step_states(m) == {1: "compensated", 2: "compensated", 3: "compensated"}
    assert comp.read_text().split() == ["3", "2", "1"]
    assert_same(m.mp, base_snap, "the view after a second restart")


def _fs_param(combo, label):
    return pytest.param(combo, label, id=f"{combo}-{label}")


@pytest.mark.parametrize("combo,label", [_fs_param(c, lb) for c in fsmatrix.combos(["ext4/tmpfs"])
                                         for lb in COMMIT_LABELS + ROLLBACK_LABELS[1:2]])
def test_crash_on_fs_matrix(filesystems, mount_factory, tmp_path, combo, label):
    """The same crashes with the state directory and the base on the file system matrix
    (tests/fsmatrix.py): the base is the pre-commit or the committed tree, never a mix, and
    recovery finishes the commit (or the rollback) with nothing lost."""
    place = fsmatrix.Place(filesystems, combo, "crash")
    base = build_crash_base(place.base / "b")
    if label.startswith("commit."):
        commit_crash(mount_factory, base, tmp_path, label, where=place.work)
    else:
        rollback_crash(mount_factory, base, tmp_path, label, where=place.work)


@pytest.mark.parametrize("keep", [False, True], ids=["rolled-back", "keep-open-step"])
def test_step_open_at_kill(mount_factory, tmp_path, keep):
    base = build_crash_base(tmp_path / "base")
    comp = tmp_path / "comp.log"
    m = mount_factory(base, extra_args=("--keep-open-step",) if keep else ())
    after_1 = snap(expected_tree(base, tmp_path / "e1", crash_ops_1))
    after_2 = snap(expected_tree(base, tmp_path / "e2", crash_ops_1, crash_ops_2))
    sid = m.call("saga.begin", name="open-at-kill")["saga"]["id"]
    m.call("saga.step", name="done-step")
    crash_ops_1(m.mp)
    m.call("saga.step", name="open-step", compensate=f"echo $STEP_NAME >> {shlex.quote(str(comp))}")
    crash_ops_2(m.mp)
    m.kill()
    restart(m)
    st = status(m)
    assert st["saga"]["id"] == sid and st["saga"]["state"] == "active"
    if keep:
        assert step_states(m) == {1: "done", 2: "open"}
        assert_same(m.mp, after_2, "the view with the open step kept")
        assert not comp.exists()
        assert st["writable"] is True
        put(m.mp / "more.txt", "more\n")
    else:
        assert step_states(m) == {1: "done", 2: "compensated"}
        assert_same(m.mp, after_1, "the view after the open step was rolled back")
        assert comp.read_text() == "open-step\n"
        assert st["writable"] is False
        assert_read_only(m.mp)
    m.stop()
    restart(m)  # a clean restart changes nothing
    assert step_states(m) == ({1: "done", 2: "open"} if keep else {1: "done", 2: "compensated"})


# ---------------------------------------------------------------------------------- 7. randomized kills during commits


N_FILES = 1000


def build_big_base(root):
    root.mkdir(parents=True)
    for d in range(20):
        (root / f"d{d:02}").mkdir()
        for f in range(N_FILES // 20):
            put(root / f"d{d:02}" / f"f{f:03}", f"base {d} {f}\n" * (1 + (d * f) % 7))
    return root


def random_ops(rng, model, round_no):
    """A list of operations on a random subset of the model's files (as ("op", args...))."""
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file() and not p.is_symlink())
    dirs = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_dir())
    ops = []
    n = rng.randint(5, 40)
    for rel in rng.sample(files, min(n, len(files))):
        kind = rng.choices(["modify", "rewrite", "delete", "rename", "chmod"], [4, 2, 2, 1, 1])[0]
        ops.append((kind, rel))
    for i in range(rng.randint(0, 15)):
        ops.append(("create", f"{rng.choice(dirs)}/r{round_no}-{i}"))
    if rng.random() < 0.3:
        ops.append(("newtree", f"tree{round_no}"))
    if rng.random() < 0.08:
        ops.append(("replacedir", rng.choice([d for d in dirs if "/" not in d])))
    return ops


def apply_ops(root, ops, round_no):
    for i, (kind, rel) in enumerate(ops):
        p = root / rel
        if not os.path.lexists(p) and kind not in ("create", "newtree"):
            continue  # gone with an earlier op of this round (a replaced directory)
        if kind == "modify":
            append(p, f"round {round_no}\n")
        elif kind == "rewrite":
            put(p, f"rewritten in round {round_no}\n")
        elif kind == "delete":
            os.unlink(p)
        elif kind == "rename":
            os.rename(p, p.parent / f"{p.name}-mv{round_no}-{i}")
        elif kind == "chmod":
            os.chmod(p, 0o600)
        elif kind == "create" and not os.path.lexists(p):
            put(p, f"created in round {round_no}\n")
        elif kind == "newtree" and not os.path.lexists(p):
            os.makedirs(p / "sub")
            for j in range(5):
                put(p / "sub" / f"t{j}", f"{round_no} {j}\n")
        elif kind == "replacedir":
            shutil.rmtree(p)
            os.mkdir(p)
            for j in range(3):
                put(p / f"fresh{j}", f"replaced in round {round_no}\n")


def changed_paths(a, b):
    (ea, _), (eb, _) = a, b
    return sorted(p for p in set(ea) | set(eb) if ea.get(p) != eb.get(p))


def wait_committing(m, commit_thread, timeout=5.0):
    """Poll until the commit intent is journaled (saga state committing) or the commit is over."""
    deadline = time.monotonic() + timeout
    with m.client() as c:
        while commit_thread.is_alive() and time.monotonic() < deadline:
            saga = c.call("saga.status")["saga"]
            if saga is None or saga["state"] != "active":
                return
            time.sleep(0.0005)


def test_randomized_kills_during_commit(mount_factory, tmp_path):
    rounds = int(os.environ.get("OVERLAYD_CRASH_ROUNDS", "100"))
    seed = int(os.environ.get("OVERLAYD_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    ctx = f"(OVERLAYD_CRASH_SEED={seed})"
    base = build_big_base(tmp_path / "base")
    model = copy_tree(base, tmp_path / "model")  # always equal to the base between rounds
    m = mount_factory(base)
    outcomes = {"pre": 0, "staged": 0, "mix": 0, "post": 0, "done": 0}
    committed = 0
    changed_files = 0
    t_start = time.monotonic()
    for rnd in range(rounds):
        what = f"round {rnd} {ctx}"
        pre = snap(model)
        post_dir = copy_tree(model, tmp_path / f"post{rnd}")
        ops = random_ops(rng, model, rnd)
        apply_ops(post_dir, ops, rnd)
        post = snap(post_dir)
        changed_files += len(ops)

        sid = m.call("saga.begin", name=f"round {rnd}")["saga"]["id"]
        m.call("saga.step", name="changes")
        apply_ops(m.mp, ops, rnd)

        result = {}

        def commit():
            try:
                result["ok"] = m.call("saga.commit")
            except (ClientError, OSError) as exc:
                result["error"] = exc

        th = threading.Thread(target=commit)
        th.start()
        if rnd % 2 == 0:
            time.sleep(rng.uniform(0, 0.05))
        else:
            wait_committing(m, th)  # aim at the part of the commit that writes the base
            time.sleep(rng.uniform(0, 0.01))
        reap(m)  # SIGKILL
        th.join(timeout=30)
        assert not th.is_alive(), f"{what}: the client hangs after the daemon was killed"

        # right after the crash: pre or post, or a mix only while a journaled intent covers it
        plan, states = journal_state(m)
        now = snap(base)
        if now == pre:
            outcomes["pre"] += 1
        elif now == post:
            outcomes["post" if plan is not None else "done"] += 1
        else:
            assert plan is not None and plan["saga"] == sid, \
                f"{what}: the base is neither the old nor the new tree, and no commit intent is journaled:\n" + \
                "\n".join(diff(pre, now)[:20])
            # the only differences: the plan's paths, and this saga's staged names
            planned = {op["path"] for op in plan["ops"]}
            for p in changed_paths(pre, now):
                parts = p.split(os.sep)
                if any(x.startswith(f".overlayd-{sid}-") for x in parts):
                    continue
                assert any(os.sep.join(parts[:k]) in planned for k in range(1, len(parts) + 1)), \
                    f"{what}: {p} changed in the base but is not in the journaled plan"
            outcomes["staged" if strip_staged(now) == pre else "mix"] += 1
        if plan is None:
            # no intent: nothing of the commit may be in the base; or it finished completely
            assert now == (post if states.get(sid) == "committed" else pre), \
                f"{what}: base does not match the journal's state {states.get(sid)}"

        # recovery, twice
        restart(m)
        final_state = saga_record(m, sid)["state"]
        expected = post if final_state == "committed" else pre
        assert final_state in ("committed", "active"), f"{what}: saga state {final_state}"
        if plan is not None:
            assert final_state == "committed", f"{what}: a journaled commit intent was not rolled forward"
        assert_same(base, expected, f"the base after recovery, {what}, saga {final_state}")
        assert staged_names(base) == [], f"{what}: leftover temporary names"
        if final_state == "active":
            assert step_states(m) == {1: "compensated"}, f"{what}: the open step was not rolled back"
        m.stop()
        restart(m)
        assert saga_record(m, sid)["state"] == final_state, f"{what}: the second restart changed the saga"
        assert_same(base, expected, f"the base after a second recovery, {what}")
        if rnd % 10 == 0:
            assert_same(m.mp, expected, f"the view after recovery, {what}")
        else:
            assert_same(snap(m.mp, data=False), snap(base, data=False), f"the view after recovery (no data), {what}")

        if final_state == "committed":
            committed += 1
            shutil.rmtree(model)
            os.rename(post_dir, model)
        else:
            shutil.rmtree(post_dir)
            m.call("saga.abort")
    elapsed = time.monotonic() - t_start
    print(f"\n{rounds} kills {ctx}: base right after the kill: {outcomes}; committed after recovery: "
          f"{committed}; {changed_files} file operations; {elapsed:.1f} s")
    assert sum(outcomes.values()) == rounds
