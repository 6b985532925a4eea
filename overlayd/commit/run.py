"""Running a journaled commit plan: the base lock, the redo of a plan from its phase, its
finalization, and the roll-forward of an interrupted commit at start (docs/ARCHITECTURE.md,
Commit protocol and Recovery). Sync: the engine calls these on worker threads.
"""

import fcntl
import logging
import os
import time

from . import Merger
from .. import osutil
from ..faults import crash_point

log = logging.getLogger(__name__)


class LockTimeout(Exception):
    """Another commit on the base held its lock for too long."""


def now() -> float:
    return time.time()


LOCK_WAIT = 600.0  # seconds a commit waits for another commit on its base (OVERLAYD_COMMIT_LOCK_WAIT)
# how often a waiting commit tries the lock again: the lock passes to the next commit only when it
# asks, so this is the hand-over's latency (bench/parallel_commit.py, 4 and 16 workspaces: 18-20
# commits/s polling every 50 ms, 24-31 commits/s every 5 ms)
POLL = 0.005


def lock_wait() -> float:
    return float(os.environ.get("OVERLAYD_COMMIT_LOCK_WAIT", LOCK_WAIT))


class BaseLock:
    """flock on the base directory itself: commits on one base are serialized across daemons,
    whoever runs them. Every daemon over a base can open it (O_RDONLY|O_DIRECTORY needs no
    writable path, no lock directory another user could empty), and the lock dies with the
    process. Nothing else in overlayd flocks a base.

    Bases nest (one workspace over /src, another over /src/lib): a commit also takes a shared
    flock on each ancestor directory it can open, root first, so that a commit into /src waits
    for one into /src/lib and the reverse, while commits into sibling bases run at once. The
    order (ancestors before descendants, on one path) makes a deadlock impossible."""

    def __init__(self, base):
        self.path = os.path.realpath(str(base))
        self.fd = None
        self.fds = []

    def acquire(self, timeout: float | None = None) -> None:
        timeout = lock_wait() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            parts = self.path.split("/")
            for i in range(1, len(parts)):
                try:
                    fd = os.open("/".join(parts[:i]) or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue  # a directory this user cannot read: nobody can nest a base of theirs there
                self.fds.append(fd)
                self._wait(fd, fcntl.LOCK_SH, deadline, timeout, "/".join(parts[:i]) or "/")
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds.append(self.fd)
            self._wait(self.fd, fcntl.LOCK_EX, deadline, timeout, self.path)
        except BaseException:
            self.release()
            raise

    def _wait(self, fd: int, how: int, deadline: float, timeout: float, where: str) -> None:
        while True:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"another commit into {where} (or a base inside it){holder(fd)} has held "
                                      f"the commit lock for {timeout:.0f} s, longer than this commit waits; nothing "
                                      "was changed and the saga is still active: commit again later (the wait is "
                                      "OVERLAYD_COMMIT_LOCK_WAIT seconds, 600 by default)") from None
                time.sleep(POLL)

    def release(self) -> None:
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []
        self.fd = None


def holder(fd: int) -> str:
    """' (by process PID, uid UID)' of the process holding an flock on *fd*'s inode, from
    /proc/locks ('' when it cannot be told, e.g. in another PID namespace)."""
    st = os.fstat(fd)
    me = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == me and fields[4].isdigit():
                    pid = int(fields[4])
                    try:
                        uid = os.stat(f"/proc/{pid}").st_uid
                    except OSError:
                        return f" (by process {pid})"
                    return f" (by process {pid}, uid {uid})"
    except OSError:
        pass
    return ""


def run_commit_plan(ws, plan: dict, progress=None, before_apply=None) -> dict | None:
    """Execute a journaled plan from its recorded phase to the end. Sync, idempotent.
    *before_apply* is called (in this thread) once the base is about to be changed. Returns
    the Merger's inomap when this call staged the whole plan (else None: not known)."""
    inomap = None
    base_fd = os.open(ws.base, osutil.DIR_FLAGS)
    layer_fds = {}
    try:
        for lid in plan["layers"]:
            layer_fds[lid] = os.open(ws.layers_dir / lid, osutil.DIR_FLAGS)
        m = Merger(base_fd, layer_fds, plan["saga"], plan["ops"], plan.get("token", ""))
        m.rerun = plan["phase"] != "planned"
        try:
            stage_cb = apply_cb = None
            if progress is not None:  # two passes over the ops: one bar
                stage_cb = lambda d, t: progress(d, 2 * t)  # noqa: E731
                apply_cb = lambda d, t: progress(t + d, 2 * t)  # noqa: E731
            if plan["phase"] == "planned":
                m.stage(stage_cb)
                inomap = m.inomap
                m.sync()
                crash_point("commit.staged")
                ws.journal.transact(lambda txn: set_phase(txn, "staged"))
                plan["phase"] = "staged"
            crash_point("commit.apply")
            if before_apply is not None:
                before_apply()
            m.apply(apply_cb)
            crash_point("commit.applied")
            m.sync()
        finally:
            m.close()
    finally:
        os.close(base_fd)
        for fd in layer_fds.values():
            os.close(fd)
    return inomap


def set_phase(txn, phase):
    plan = txn.get_meta("commit_plan")
    plan["phase"] = phase
    txn.set_meta("commit_plan", plan)
    txn.event("commit.phase", saga=plan["saga"], phase=phase)


def finalize_commit(txn, saga_id: int, stack_keep=()) -> None:
    saga = txn.saga(saga_id)
    saga.update(state="committed", updated=now(), ended=now())
    txn.put_saga(saga_id, saga)
    for step in txn.steps(saga_id):
        if step["state"] in ("open", "done"):
            step["state"] = "committed"
            txn.put_step(saga_id, step["index"], step)
    txn.set_meta("commit_plan", None)
    txn.set_meta("active_saga", None)
    txn.set_meta("stack", {"layers": list(stack_keep), "sealed": True})
    txn.event("saga.committed", saga=saga_id)


def recover_commit(ws) -> None:
    """Before mounting: roll an interrupted commit forward (runs twice harmlessly)."""
    plan = ws.journal.meta("commit_plan")
    if not plan:
        return
    log.warning("saga %d: finishing an interrupted commit (phase %s)", plan["saga"], plan["phase"])
    lock = BaseLock(ws.base)
    lock.acquire()
    try:
        run_commit_plan(ws, plan)
        ws.journal.transact(lambda txn: finalize_commit(txn, plan["saga"]))
    finally:
        lock.release()
    log.info("saga %d: commit finished", plan["saga"])
