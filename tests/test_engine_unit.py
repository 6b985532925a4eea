"""The saga engine without a mount: a real workspace (LMDB journal, layer directories) in tmp_path,
the engine driven by its operations directly, changes written into the top layer's directory and
reported as the filesystem reports them (SagaEngine._on_change). Milliseconds per test.

What a mount adds (the view, EROFS on a sealed layer, the kernel's caches) is tests/test_saga.py's.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from overlayd.journal import JournalFull
from overlayd.daemon.wire import Wire
from overlayd.daemon.workspace import Workspace
from overlayd.engine.core import SagaEngine
from overlayd.engine.errors import EngineError
from overlayd.engine.lock import StackLock
from overlayd.engine.records import status_of
from overlayd.protocol import OpError

PEER = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
ROOT = Path(__file__).resolve().parent.parent


class Env:
    def __init__(self, tmp_path):
        self.base, self.mnt, self.state = (tmp_path / d for d in ("base", "mnt", "state"))
        for d in (self.base, self.mnt):
            d.mkdir()
        (self.base / "a.txt").write_text("a\n")
        self.ws = Workspace("unit", self.base, self.mnt, self.state)
        self.ws.open()
        self.lock = StackLock()
        self.engine = SagaEngine(self.ws, self.lock)

    def write(self, name: str, text: str, kind: str = "create") -> None:
        """What a write through the mount does: into the top layer, reported to the engine."""
        Path(self.ws.fs.layers[-1].path, name).write_text(text)
        self.engine._on_change(kind, (name.encode(),))

    def run(self, fn):
        """Run *fn(engine)* under trio with the engine's background tasks started."""
        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.engine.run)
                try:
                    return await fn(self.engine)
                finally:
                    nursery.cancel_scope.cancel()

        return trio.run(main)

    def close(self):
        self.engine.close()
        self.ws.close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLAYD_STATE_ROOT", str(tmp_path / "root"))  # Workspace.open registers it
    e = Env(tmp_path)
    yield e
    e.close()


def live(e):
    sid = e.engine.active_id()
    return [(s["index"], s["state"]) for s in e.engine.live_steps(sid)] if sid else []


def test_begin_step_rollback_abort(env):
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one"}, PEER)
        env.write("one.txt", "1")
        await eng.op_step({"name": "two"}, PEER)
        env.write("two.txt", "2")
        assert live(env) == [(1, "done"), (2, "open")]
        assert len(env.ws.fs.layers) == 3  # base + one layer per live step
        r = await eng.op_rollback({}, PEER)
        assert r["compensated"] == [2] and r["saga"]["state"] == "active"
        assert live(env) == [(1, "done")] and len(env.ws.fs.layers) == 2
        with pytest.raises(EngineError) as exc:
            await eng.op_rollback({}, PEER)
        assert exc.value.code == "no-open-step"
        r = await eng.op_abort({}, PEER)
        assert r["saga"]["state"] == "aborted" and eng.active() is None
        assert len(env.ws.fs.layers) == 1

    env.run(go)
    st = status_of(env.ws.journal)
    assert st["saga"] is None and st["last"]["state"] == "aborted"
    assert not (env.base / "one.txt").exists()


def test_refusals_are_domain_errors(env):
    async def go(eng):
        for op, args, code in ((eng.op_step, {"name": "x"}, "no-saga"), (eng.op_begin, {"name": "a/b"}, "bad-name"),
                               (eng.op_begin, {"name": ".."}, "bad-name"), (eng.op_commit, {}, "no-saga")):
            with pytest.raises(EngineError) as exc:
                await op(args, PEER)
            assert exc.value.code == code, (op, args)
        await eng.op_begin({"name": "s"}, PEER)
        with pytest.raises(EngineError) as exc:
            await eng.op_begin({"name": "t"}, PEER)
        assert exc.value.code == "saga-active"
        with pytest.raises(EngineError) as exc:
            await eng.op_step({"name": "x", "retries": 0}, PEER)
        assert exc.value.code == "bad-request"
        with pytest.raises(EngineError) as exc:
            await eng.op_rollback({"to": "nope"}, PEER)
        assert exc.value.code == "no-step"

    env.run(go)


def test_rollback_to_a_step_reloads_known_paths_and_diff_names_steps(env):
    """Step references resolve through commit.changes (NoStep -> EngineError 'no-step'); a rollback
    of finished steps reloads the known paths (on a worker thread) to the live steps' alone; a
    diff gives each change the step that first made it."""
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        for name in ("one", "two", "three"):
            await eng.op_step({"name": name}, PEER)
            env.write(f"{name}.txt", name)
        await eng.op_step({"name": "four"}, PEER)
        assert {"one.txt", "two.txt", "three.txt"} <= eng.tracker.known
        env.write("one.txt", "again", kind="write")  # a later step rewrites step 1's file
        d = await eng.op_diff({}, PEER)
        by_path = {c["path"]: c for c in d["changes"]}
        assert (by_path["one.txt"]["step"], by_path["one.txt"]["last_step"]) == (1, 4)
        assert [c["path"] for c in (await eng.op_diff({"step": "two"}, PEER))["changes"]] == ["two.txt"]
        for ref, says in ((9, "has no live step 9"), ("nope", "has no live step named 'nope'")):
            with pytest.raises(EngineError) as exc:
                await eng.op_rollback({"to": ref}, PEER)
            assert exc.value.code == "no-step" and says in exc.value.args[0]
        r = await eng.op_rollback({"to": "one"}, PEER)
        assert r["compensated"] == [4, 3, 2]
        assert eng.tracker.known == {"one.txt"} and eng.tracker.touched == {}
        with pytest.raises(EngineError) as exc:
            await eng.op_diff({"step": "two"}, PEER)
        assert exc.value.code == "no-step"

    env.run(go)


def test_commit_writes_the_base_and_refuses_a_conflict(env):
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one"}, PEER)
        env.write("a.txt", "changed by the saga\n", "copyup")
        env.write("new.txt", "new\n")
        (env.base / "a.txt").write_text("changed behind the saga's back\n")
        with pytest.raises(EngineError) as exc:
            await eng.op_commit({}, PEER)
        assert exc.value.code == "conflict"
        assert [c["path"] for c in exc.value.extra["conflicts"]] == ["a.txt"]
        assert eng.active()["state"] == "active" and env.ws.fs.writable()
        assert not (env.base / "new.txt").exists()
        await eng.op_rollback({}, PEER)
        await eng.op_step({"name": "two"}, PEER)
        env.write("new.txt", "new\n")
        dry = await eng.op_commit({"dry_run": True}, PEER)
        assert [c["path"] for c in dry["changes"]] == ["new.txt"] and dry["conflicts"] == []
        r = await eng.op_commit({}, PEER)
        assert r["saga"]["state"] == "committed" and r["count"] == 1

    env.run(go)
    assert (env.base / "new.txt").read_text() == "new\n"
    assert env.ws.journal.meta("commit_plan") is None and env.ws.journal.meta("active_saga") is None
    assert len(env.ws.fs.layers) == 1


def test_compensation_runs_then_sticks_then_retries(env, tmp_path):
    flag = tmp_path / "ok"
    out = tmp_path / "out"

    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one", "retries": 1,
                           "compensate": f'echo "$STEP_NAME $ATTEMPT $(pwd)" >> {out}; test -e {flag}'}, PEER)
        with pytest.raises(EngineError) as exc:
            await eng.op_rollback({}, PEER)
        assert exc.value.code == "stuck" and exc.value.extra["status"] == 1
        assert eng.active()["state"] == "stuck" and live(env) == [(1, "compensating")]
        with pytest.raises(EngineError) as exc:
            await eng.op_step({"name": "two"}, PEER)
        assert exc.value.code == "stuck"
        flag.touch()
        r = await eng.op_retry({}, PEER)
        assert r["compensated"] == [1] and r["saga"]["state"] == "active"

    env.run(go)
    assert out.read_text().splitlines() == [f"one 1 {env.mnt}"] * 2  # cwd: the mountpoint
    kinds = [e["kind"] for e in env.ws.journal.events()]
    assert kinds.count("compensate.attempt") == 2 and "saga.stuck" in kinds


def test_budget_cut_waits_for_the_lock_and_refuses_meanwhile(env):
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one"}, PEER)
        await eng.op_step({"name": "two", "max_files": 1}, PEER)
        with env.lock.hold("an operation in flight"):
            env.write("x", "1")
            assert eng.cutting is None
            env.write("y", "2")  # the second path: over budget
            assert eng.cutting == "budget:files" and not env.ws.fs.writable()
            await trio.sleep(0.05)
            assert live(env)[-1] == (2, "open")  # the cut waits for the operation in flight
        with pytest.raises(EngineError) as exc:
            await eng.op_step({"name": "three"}, PEER)
        assert exc.value.code == "cutting"  # not busy: the cut is next (invariant 21)
        while eng.cutting is not None:
            await trio.sleep(0.01)
        assert live(env) == [(1, "done")]
        assert eng.active()["cut"]["reason"] == "budget:files"

    env.run(go)


def test_stack_lock():
    async def go():
        lock = StackLock()
        with lock.hold("first"):
            assert lock.busy == "first"
            with pytest.raises(EngineError) as exc:
                with lock.hold("second"):
                    pass
            assert exc.value.code == "busy" and "(first)" in exc.value.message
        assert lock.busy is None
        order = []

        async def waiter():
            async with lock.wait_hold("waiter"):
                order.append("waiter")

        async with trio.open_nursery() as n:
            with lock.hold("op"):
                n.start_soon(waiter)
                await trio.sleep(0.01)
                order.append("op done")
        assert order == ["op done", "waiter"]
        lock.stopping = True
        with pytest.raises(EngineError) as exc:
            with lock.hold("late"):
                pass
        assert exc.value.code == "stopping"
        await lock.wait_idle()

    trio.run(go)


def test_resume_rolls_back_the_step_open_at_a_crash(env):
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one"}, PEER)
        await eng.op_step({"name": "two"}, PEER)
        await eng.resume(crashed=False)
        assert live(env) == [(1, "done"), (2, "open")]
        await eng.resume(crashed=True)
        assert live(env) == [(1, "done")]

    env.run(go)


def test_log_list_gc_diff(env):
    async def go(eng):
        await eng.op_begin({"name": "s"}, PEER)
        await eng.op_step({"name": "one"}, PEER)
        env.write("n.txt", "n")
        await eng.op_step({"name": "two"}, PEER)
        env.write("m.txt", "m")
        diff = await eng.op_diff({"step": "one"}, PEER)
        assert [(c["path"], c["step"]) for c in diff["changes"]] == [("n.txt", 1)]
        log_ = (await eng.op_log({"ops": True}, PEER))["events"]
        assert [e["path"] for e in log_ if e["kind"] == "op"] == ["n.txt", "m.txt"]
        await eng.op_abort({}, PEER)
        assert [s["state"] for s in (await eng.op_list({}, PEER))["sagas"]] == ["aborted"]
        r = await eng.op_gc({"keep": 0}, PEER)
        assert r["sagas"] == [1] and (await eng.op_list({}, PEER))["sagas"] == []

    env.run(go)


def test_wire_maps_domain_errors_to_replies(tmp_path):
    async def go():
        wire = Wire(tmp_path)

        async def refuse(args, peer):
            raise EngineError("conflict", "refused", conflicts=[{"path": "p"}])

        async def full(args, peer):
            raise JournalFull("no room")

        async def enospc(args, peer):
            raise OSError(28, "No space left on device")

        wire.add({"refuse": refuse, "full": full, "enospc": enospc})
        for op, code in (("refuse", "conflict"), ("full", "no-space"), ("enospc", "no-space"),
                         ("nope", "unknown-op")):
            with pytest.raises(OpError) as exc:
                await wire.dispatch(op, {}, PEER)
            assert exc.value.code == code
            if op == "refuse":
                assert exc.value.extra == {"conflicts": [{"path": "p"}]}
            if code == "no-space":
                assert str(tmp_path) in exc.value.message

    trio.run(go)


def test_client_is_a_leaf():
    """The saga CLI's path imports neither trio nor the daemon, the engine or the runner."""
    code = ("import sys, overlayd.client, cli.saga_cmd; "
            "print(sorted(m for m in sys.modules if m == 'trio' or m.startswith(('overlayd.daemon', "
            "'overlayd.engine', 'overlayd.runner', 'pyfuse3'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
