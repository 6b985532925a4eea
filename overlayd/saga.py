"""The saga engine: steps as layers, compensation, crash-safe commit with conflict detection.

State machine (journaled; see docs/ARCHITECTURE.md):

    saga:  active -> committing -> committed
           active -> compensating -> active      (rollback, rollback --to K)
           active -> compensating -> aborted     (abort)
           compensating -> stuck -> compensating (retry)
    step:  open -> done;  open|done -> compensating -> compensated

Every transition is one journal write transaction, committed before its effect is visible.
Each live step owns exactly one layer: the stack above the base is the live steps' layers,
in order.
"""

import errno
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time

import trio

from journal import JournalError, JournalFull, encode_event

from . import budgets, commit, osutil, rules
from .control import OpError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[^\x00-\x1f\x7f/]{1,128}")
DEFAULT_RETRIES = 3
GC_KEEP = 10  # ended sagas saga.gc keeps when given neither keep nor older_than
DEFAULT_COMP_TIMEOUT = 60.0  # with 3 attempts, a hung compensation holds the workspace ~3 min
BACKOFF = float(os.environ.get("OVERLAYD_BACKOFF", "0.5"))
STDERR_TAIL = 4096
MIN_STEP_FREE = 1 << 20  # a step is refused with less room than this on the state filesystem (plus
# what ext4 keeps for itself out of the free blocks: 2 % of the filesystem, at most 16 MiB)
AUDIT = os.environ.get("OVERLAYD_AUDIT", "1") != "0"  # 0: no audit trail (to measure its cost)
CRASH_AT = os.environ.get("OVERLAYD_CRASH_AT", "")  # fault injection: "label" or "label:n"
_crash_counts = {}


def crash_point(label: str) -> None:
    """Fault injection for the tests: SIGKILL ourselves at the n-th pass of *label*
    (OVERLAYD_CRASH_AT), or sleep there (OVERLAYD_STALL_AT; only ever reached on worker threads)."""
    osutil.stall_point(label)
    if not CRASH_AT:
        return
    want, _, nth = CRASH_AT.partition(":")
    if want != label:
        return
    _crash_counts[label] = _crash_counts.get(label, 0) + 1
    if _crash_counts[label] >= int(nth or 1):
        log.warning("fault injection: crashing at %s", CRASH_AT)
        os.kill(os.getpid(), signal.SIGKILL)


def check_name(kind: str, name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", "..") \
            or len(name.encode("utf-8", "surrogatepass")) > 128:
        raise OpError("bad-name", f"invalid {kind} name {name!r}: use 1-128 printable characters, "
                                  "no '/', not '.' or '..'")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise OpError("bad-name", f"invalid {kind} name {name!r}: not valid UTF-8") from None
    return name


def _number(args: dict, key: str, default, kind, lo, hi):
    """A numeric request argument, checked: OpError('bad-request') instead of a crash."""
    v = args.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise OpError("bad-request", f"{key} must be a number between {lo} and {hi}, not {v!r}")
    return kind(v)


def now() -> float:
    return time.time()


# ---------------------------------------------------------------------- commit (sync parts)


class BaseLock:
    """flock on the base directory itself: commits on one base are serialized across daemons,
    whoever runs them. Every daemon over a base can open it (O_RDONLY|O_DIRECTORY needs no
    writable path, no lock directory another user could empty), and the lock dies with the
    process. Nothing else in overlayd flocks a base."""

    def __init__(self, base):
        self.path = str(base)
        self.fd = None

    def acquire(self, timeout: float = 600.0) -> None:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise OpError("busy", f"another commit on the base {self.path} has held its lock for "
                                          f"{timeout:.0f} s; try again later")
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
        m = commit.Merger(base_fd, layer_fds, plan["saga"], plan["ops"], plan.get("token", ""))
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
                ws.journal.transact(lambda txn: _set_phase(txn, "staged"))
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


def _set_phase(txn, phase):
    plan = txn.get_meta("commit_plan")
    plan["phase"] = phase
    txn.set_meta("commit_plan", plan)
    txn.event("commit.phase", saga=plan["saga"], phase=phase)


def _finalize_commit(txn, saga_id: int, stack_keep=()) -> None:
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
        ws.journal.transact(lambda txn: _finalize_commit(txn, plan["saga"]))
    finally:
        lock.release()
    log.info("saga %d: commit finished", plan["saga"])


# ---------------------------------------------------------------------- compensation commands


DEFAULT_UMASK = 0o022


def peer_umask(pid) -> int:
    """The umask of process *pid* (the client registering a step), or 022 if it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, TypeError):
        pass
    return DEFAULT_UMASK


# The compensation's shell first waits for one line on its stdin, which the engine writes once
# the child's pid is journaled: a crash before that closes the pipe, and the shell exits without
# running the command (so no attempt ever runs that a restarted daemon could not find again).
# The shell, not Popen, enters the mountpoint: CPython may vfork() while this thread holds the
# GIL, and a child that chdir()s into our own FUSE mount before exec waits for the event loop,
# which waits for the GIL (seen with a non-root daemon: every request hung).
GATE = 'read -r _ || exit 125; exec </dev/null; cd -- "$2" || exit 126; exec /bin/sh -c "$1"'


def start_compensation(cmd: str, env: dict, cwd: str, uid: int, gid: int, state_dir,
                       umask: int = DEFAULT_UMASK):
    """Start one attempt of a compensation command, held at its gate (see GATE), in its own
    session and process group, with *umask* (the one of the client that registered the step),
    never the daemon's 0. Returns (process, output file, gate fd to write to)."""
    kwargs = {}
    if os.geteuid() == 0 and (uid, gid) != (0, 0):
        kwargs = dict(user=uid, group=gid, extra_groups=[])
    try:
        out = tempfile.TemporaryFile(dir=state_dir)
    except OSError:  # a full state filesystem: the rollback that frees it must still run
        out = tempfile.TemporaryFile()
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", GATE, "overlayd-compensate", cmd, cwd], cwd="/", env=env,
                                stdin=rfd, stdout=out, stderr=out, start_new_session=True, umask=umask,
                                **kwargs)
    except BaseException:
        os.close(wfd)
        out.close()
        raise
    finally:
        os.close(rfd)
    return proc, out, wfd


def finish_compensation(proc, out, timeout: float) -> tuple[int, str]:
    """Wait for an attempt to end. Returns (exit status, tail of its output); closes *out*.

    Output goes to a file (a command may print megabytes); the whole process group is killed
    on timeout (status 124, as timeout(1) reports it).
    """
    with out:
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            status = 124
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - STDERR_TAIL))
        tail = out.read().decode("utf-8", "replace")
    return status, tail


# ---------------------------------------------------------------------- the engine


class SagaEngine:
    def __init__(self, daemon, *, keep_open_step: bool = False):
        self.d = daemon
        self.ws = daemon.ws
        self.fs = daemon.ws.fs
        self.keep_open_step = keep_open_step
        self.touched = {}  # path -> base identity, first change in the open step
        self.fs.on_change = self._on_change
        self.fs.on_write = self._on_write
        self.fs.on_release = self._on_release
        self._base_fd = os.open(self.ws.base, osutil.DIR_FLAGS)
        self.defaults = budgets.load_defaults(self.ws.state_dir)
        self.step_meter = None  # budgets.Meter of the open step
        self.saga_meter = None  # budgets.Meter of the active saga (since this daemon started)
        self.cutting = None  # the reason of a budget cut in progress
        self.cut_step = None  # the index of the step it cuts
        self.audit = []  # changes not yet journaled: flushed in batches
        self.audit_sealed = []  # [(saga, step, batch)] closed at step transitions, not yet journaled
        self._flushing = trio.Lock()
        self.writers = {}  # path -> {"pid", "uid", "comm"} of the last change, active saga
        self.progress = None  # {"op", "done", "total"} of a long operation, for progress bars
        self.compensation = None  # the compensation command running now: step, attempt, deadline
        self._comms = {}
        daemon.ops.update({
            "saga.begin": self.op_begin, "saga.step": self.op_step, "saga.rollback": self.op_rollback,
            "saga.abort": self.op_abort, "saga.commit": self.op_commit, "saga.retry": self.op_retry,
            "saga.status": self.op_status, "saga.diff": self.op_diff, "saga.log": self.op_log,
            "saga.list": self.op_list, "saga.annotate": self.op_annotate, "saga.gc": self.op_gc,
        })
        self._known = self._known_paths()

    # ------------------------------------------------------------------ state access

    def active_id(self):
        return self.ws.journal.meta("active_saga")

    def active(self):
        sid = self.active_id()
        return self.ws.journal.saga(sid) if sid else None

    def steps(self, sid):
        return self.ws.journal.steps(sid)

    def live_steps(self, sid):
        return [s for s in self.steps(sid) if s["state"] in ("open", "done", "compensating")]

    def _known_paths(self) -> set:
        """Paths already recorded by earlier steps of the active saga (their identity stands)."""
        sid = self.active_id()
        known = set()
        if sid:
            stored = self.ws.journal.step_paths(sid)
            for s in self.live_steps(sid):
                known.update(stored.get(s["index"], ()))
        return known

    def _on_change(self, kind: str, path: tuple, listing=None) -> None:
        """Called by the filesystem on changes of a path: record the base's identity at the first.

        A directory the saga removes or moves is recorded with the entries this view saw in
        it (*listing*), so that entries added to the base meanwhile make a conflict.
        """
        p = os.fsdecode(b"/".join(path))
        self._audit(kind, p)
        for meter in (self.step_meter, self.saga_meter):
            if meter is not None:
                meter.paths.add(p)
        self._check_budgets()
        if listing is not None:
            prev = self.touched.get(p, ["d"])
            if prev is not None and prev[0] == "d":
                self.touched[p] = ["D", commit.listing_digest(listing)]
            return
        if p in self.touched or p in self._known:
            return
        try:
            self.touched[p] = commit.base_identity(self._base_fd, p)
        except OSError as exc:
            log.warning("cannot record the base identity of %s: %s", p, exc)
            self.touched[p] = None

    # ------------------------------------------------------------------ audit trail

    def _comm(self, pid: int) -> str:
        comm = self._comms.get(pid)
        if comm is None:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            if len(self._comms) > 4096:
                self._comms.clear()
            self._comms[pid] = comm
        return comm

    def _audit(self, kind: str, path: str) -> None:
        if not AUDIT:
            return
        ctx = self.fs.ctx
        who = {"pid": ctx.pid, "uid": ctx.uid, "comm": self._comm(ctx.pid)} if ctx is not None else {}
        self.audit.append({"ts": time.time(), "op": kind, "path": path, **who})
        if who:
            self.writers[path] = who

    def _seal_audit(self) -> None:
        """Close the buffered changes as a batch of the saga and step they belong to. Step
        transitions call this (O(1) in the batch's size) instead of journaling the batch on
        their own latency; the audit loop journals it within a second."""
        if not self.audit:
            return
        batch, self.audit = self.audit, []
        sid = self.active_id()
        if not sid:
            return
        live = self.live_steps(sid)
        self.audit_sealed.append((sid, live[-1]["index"] if live else None, batch))

    async def flush_audit(self, essential: bool = False) -> None:
        """Journal the buffered changes in one transaction (every second, before reading the
        log, at shutdown). They are encoded first, on a worker thread but outside the journal's
        write lock: a step transition waits at most for their puts (5 ms for 10,000), not for
        their encoding (50-150 ms)."""
        async with self._flushing:  # one at a time: batches are journaled in the order taken
            self._seal_audit()
            if not self.audit_sealed:
                return
            batches, self.audit_sealed = self.audit_sealed, []

            def encode():
                return [encode_event("op", sid, step, **rec) for sid, step, batch in batches for rec in batch]

            values = await trio.to_thread.run_sync(encode)
            try:
                await self.ws.transact(lambda txn: txn.append_events(values), essential)
            except BaseException:
                self.audit_sealed[:0] = batches  # journaled by a later flush, in order
                raise

    async def audit_loop(self) -> None:
        full = False
        while True:
            await trio.sleep(1.0)
            try:
                await self.flush_audit()
                full = False
            except JournalFull as exc:
                if not full:
                    log.warning("the audit trail waits in memory: %s", exc)
                full = True
            except Exception:
                log.exception("could not journal the audit trail")

    # ------------------------------------------------------------------ budgets

    def _on_write(self, node, nbytes: int) -> None:
        for meter in (self.step_meter, self.saga_meter):
            if meter is not None:
                meter.bytes += nbytes
        self._check_budgets()

    def _on_release(self, node, fd) -> None:
        for meter in (self.step_meter, self.saga_meter):
            if meter is not None:
                meter.rewrite(node.ino, fd)
        self._check_budgets()

    def _check_budgets(self) -> None:
        if self.cutting is not None:
            return
        for meter, default_policy in ((self.step_meter, "step"), (self.saga_meter, "saga")):
            if meter is None:
                continue
            reason = meter.over()
            if reason:
                self._trigger(reason, meter.budget.get("policy", default_policy))
                return

    def _trigger(self, reason: str, policy: str) -> None:
        """Cut now: no write lands after this (EROFS); the rollback follows in the background."""
        if self.cutting is not None or getattr(self.d, "nursery", None) is None:
            return
        sid = self.active_id()
        live = self.live_steps(sid) if sid else []
        if not live or live[-1]["state"] != "open":
            return
        self.cutting = reason
        self.cut_step = live[-1]["index"]
        self.fs.seal_top()
        log.warning("saga %d step %d: %s exceeded; cutting (%s)", sid, live[-1]["index"], reason, policy)
        self.d.nursery.start_soon(self._cut, sid, live[-1]["index"], reason, policy)

    async def _cut(self, sid: int, index: int, reason: str, policy: str) -> None:
        try:
            while self.d.busy is not None:
                await trio.sleep(0.02)
            with self.d.exclusive("cut a step over budget"):
                saga = self.active()
                live = self.live_steps(sid)
                if saga is None or saga["id"] != sid or not live or live[-1]["index"] != index \
                        or live[-1]["state"] != "open":
                    return
                self._seal_audit()

                def note(txn):
                    s = txn.saga(sid)
                    s["cut"] = {"reason": reason, "step": index, "policy": policy, "at": now()}
                    txn.put_saga(sid, s)
                    txn.event("budget.exceeded", saga=sid, step=index, reason=reason, policy=policy)

                await self.ws.transact(note)
                if policy == "saga":
                    await self._compensate(sid, 0, "aborted", None)
                else:
                    await self._compensate(sid, index - 1, "active", None)
        except OpError as exc:
            log.error("cutting step %d: %s", index, exc.message)
        except JournalError as exc:  # (a background task: an exception here would end the daemon)
            log.error("cutting step %d: %s; the step stays sealed: roll it back with: saga rollback", index, exc)
        finally:
            self.cutting = None

    def _refuse_while_cutting(self) -> None:
        """No stack operation may slip in between a budget trigger and its cut (invariant 21):
        the cut waits for the operation in flight, and one arriving meanwhile is refused."""
        if self.cutting is not None:
            raise OpError("cutting", f"step {self.cut_step} is being cut by its budget ({self.cutting}); "
                                     "wait for the cut to finish (see: saga status), then try again")

    def _arm_timer(self, kind: str, sid: int, index: int | None, deadline: float) -> None:
        nursery = getattr(self.d, "nursery", None)
        if nursery is not None:
            nursery.start_soon(self._timer, kind, sid, index, deadline)

    async def _timer(self, kind, sid, index, deadline) -> None:
        await trio.sleep(max(0.0, deadline - time.time()))
        saga = self.active()
        if saga is None or saga["id"] != sid or saga["state"] != "active":
            return
        if kind == "step":
            live = self.live_steps(sid)
            if not live or live[-1]["index"] != index or live[-1]["state"] != "open":
                return
            self._trigger("budget:timeout", (live[-1].get("budgets") or {}).get("policy", "step"))
        else:
            self._trigger("budget:saga-timeout", "saga")

    def require_active(self, states=("active",)):
        saga = self.active()
        if saga is None:
            raise OpError("no-saga", f"no saga is active in {self.ws.mountpoint}; start one with: saga begin NAME")
        if saga["state"] not in states:
            if saga["state"] == "stuck":
                raise OpError("stuck", f"saga {saga['name']!r} is stuck compensating step {saga.get('stuck_step')}: "
                                       f"{saga.get('error')}; fix the cause, then run: saga retry",
                              saga=saga["id"])
            raise OpError("bad-state", f"saga {saga['name']!r} is {saga['state']}; cannot do this now")
        return saga

    def _event_details(self, peer):
        return {"uid": peer.get("uid"), "pid": peer.get("pid")} if peer else {}

    # ------------------------------------------------------------------ begin / step

    async def op_begin(self, args, peer):
        name = check_name("saga", args.get("name"))
        try:
            budget = budgets.validate({**self.defaults["saga"], **(args.get("budgets") or {})}, "saga budgets")
        except ValueError as exc:
            raise OpError("bad-request", str(exc)) from None
        with self.d.exclusive("begin a saga"):
            cur = self.active()
            if cur is not None:
                raise OpError("saga-active", f"saga {cur['name']!r} (id {cur['id']}) is already active in "
                                             f"{self.ws.mountpoint}; commit or abort it first, or mount another "
                                             "workspace over the same base for a parallel saga")

            def begin(txn):
                sid = txn.new_saga_id()
                rec = {"id": sid, "name": name, "state": "active", "created": now(), "updated": now(),
                       "uid": peer.get("uid"), "gid": peer.get("gid"), "steps": 0, "budgets": budget}
                txn.put_saga(sid, rec)
                txn.set_meta("active_saga", sid)
                txn.event("saga.begin", saga=sid, name=name, **self._event_details(peer))
                return rec

            rec = await self.ws.transact(begin)
            self.touched = {}
            self._known = set()
            self.writers = {}
            self.saga_meter = budgets.Meter(budget)
            if "timeout" in budget:
                self._arm_timer("saga", rec["id"], None, rec["created"] + budget["timeout"])
            return {"saga": rec}

    async def op_step(self, args, peer):
        name = check_name("step", args.get("name"))
        compensate = args.get("compensate")
        if compensate is not None and (not isinstance(compensate, str) or "\0" in compensate):
            raise OpError("bad-request", "--compensate must be a shell command string")
        try:
            budget = budgets.validate({**self.defaults["step"],
                                       **{k: args.get(k) for k in budgets.KEYS if args.get(k) is not None}},
                                      "step budgets")
        except ValueError as exc:
            raise OpError("bad-request", str(exc)) from None
        retries = _number(args, "retries", DEFAULT_RETRIES, int, 1, 100)
        comp_timeout = _number(args, "compensate_timeout", DEFAULT_COMP_TIMEOUT, float, 0.001, 86400 * 7)
        with self.d.exclusive("begin a step"):
            saga = self.require_active()
            await self._check_room()
            sid = saga["id"]
            steps = self.steps(sid)
            index = (steps[-1]["index"] if steps else 0) + 1
            prev = steps[-1] if steps and steps[-1]["state"] == "open" else None
            self._refuse_while_cutting()
            # Seal first: from the snapshot of touched until the new layer is pushed, a write gets
            # EROFS instead of landing in the finished step unrecorded (invariant 20).
            was_writable = self.fs.writable()
            old_top = self.fs.layers[-1]
            self.fs.seal_top()
            paths = dict(self.touched)
            rec = {"saga": sid, "index": index, "name": name, "state": "open", "layer": None,
                   "compensate": compensate, "uid": peer.get("uid"), "gid": peer.get("gid"),
                   "umask": peer_umask(peer.get("pid")) if compensate else None,
                   "budgets": budget, "retries": retries,
                   "compensate_timeout": comp_timeout, "created": now(), "attempts": 0}

            def extra(txn, layer_id):
                if prev is not None:
                    p = txn.steps(sid)[-1]
                    p.update(state="done", sealed=now())
                    txn.put_step(sid, p["index"], p)
                    txn.put_step_paths(sid, p["index"], paths)
                    txn.event("step.done", saga=sid, step=p["index"], **self._event_details(peer))
                rec["layer"] = layer_id
                txn.put_step(sid, index, rec)
                s = txn.saga(sid)
                s.update(steps=index, updated=now())
                txn.put_saga(sid, s)
                txn.event("step.begin", saga=sid, step=index, name=name, layer=layer_id,
                          compensate=compensate, **self._event_details(peer))

            self._seal_audit()
            t0 = time.perf_counter()
            try:
                await self.ws.push_layer(txn_extra=extra)
            except BaseException as exc:
                if was_writable and self.fs.layers[-1] is old_top and self.cutting is None:
                    self.fs.unseal_top()
                if isinstance(exc, JournalFull) or (isinstance(exc, OSError)
                                                    and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                    raise OpError("no-space", self._no_room(exc) + "; the saga is unchanged") from None
                raise
            if prev is not None:
                self._known.update(paths)
            self.touched = {}
            self.step_meter = budgets.Meter(budget)
            if self.saga_meter is None:
                self.saga_meter = budgets.Meter(saga.get("budgets") or {})
            if "timeout" in budget:
                self._arm_timer("step", sid, index, rec["created"] + budget["timeout"])
            elapsed = time.perf_counter() - t0
            if prev is not None:
                await self._sync_layer(prev)
            return {"step": rec, "seconds": elapsed}

    def _no_room(self, why) -> str:
        from .daemon import no_space_message

        return no_space_message(self.ws, why)

    async def _check_room(self) -> None:
        """Refuse a step on a full state filesystem (its layer could hold nothing), after giving
        the reaper a moment to delete the layers a rollback just dropped."""
        deadline = time.monotonic() + 10.0
        while True:
            free, size = self.ws.free_bytes(True)  # (one statvfs: no thread hop on a step's latency)
            need = MIN_STEP_FREE + min(size // 50, 16 << 20)
            if free is None or free >= need:
                return
            if not self.ws.trash_pending() or time.monotonic() > deadline:
                raise OpError("no-space", self._no_room(f"a step needs {need // 1024} KiB") +
                              "; the saga is unchanged")
            self.ws.wake_reaper()
            await trio.sleep(0.05)

    async def _sync_layer(self, step) -> None:
        """Flush a finished step's layer to disk, then journal that it is durable."""
        fd = os.open(self.ws.layers_dir / step["layer"], osutil.DIR_FLAGS)
        try:
            await trio.to_thread.run_sync(osutil.syncfs, fd)
        finally:
            os.close(fd)

        def mark(txn):
            s = txn.steps(step["saga"])
            for rec in s:
                if rec["index"] == step["index"]:
                    rec["synced"] = True
                    txn.put_step(step["saga"], rec["index"], rec)

        try:
            await self.ws.transact(mark)
        except JournalError as exc:  # the step has begun; "synced" is only a note
            log.warning("saga %d step %d: could not journal that its layer is synced: %s", step["saga"],
                        step["index"], exc)

    # ------------------------------------------------------------------ rollback / abort / retry

    def _resolve_step(self, saga, ref) -> int:
        live = self.live_steps(saga["id"])
        if ref is None:
            raise OpError("bad-request", "no step given")
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            k = int(ref)
            if k == 0:
                return 0
            if any(s["index"] == k for s in live):
                return k
            raise OpError("no-step", f"saga {saga['name']!r} has no live step {k}; see: saga status")
        matches = [s["index"] for s in live if s["name"] == ref]
        if not matches:
            raise OpError("no-step", f"saga {saga['name']!r} has no live step named {ref!r}; see: saga status")
        return matches[-1]

    async def op_rollback(self, args, peer):
        with self.d.exclusive("roll back"):
            saga = self.require_active()
            self._refuse_while_cutting()
            live = self.live_steps(saga["id"])
            if args.get("to") is None:
                if not live or live[-1]["state"] != "open":
                    raise OpError("no-open-step", "no step is open; roll back finished steps with: saga rollback --to STEP")
                target = live[-1]["index"] - 1
                keep = [s for s in live if s["index"] <= target]
            else:
                target = self._resolve_step(saga, args["to"])
                keep = [s for s in live if s["index"] <= target]
            count = len(live) - len(keep)
            if count == 0:
                return {"saga": saga, "compensated": []}
            return await self._compensate(saga["id"], target, "active", peer)

    async def op_abort(self, args, peer):
        with self.d.exclusive("abort"):
            saga = self.require_active(states=("active", "stuck"))
            self._refuse_while_cutting()
            return await self._compensate(saga["id"], 0, "aborted", peer)

    async def op_retry(self, args, peer):
        with self.d.exclusive("retry compensation"):
            self._refuse_while_cutting()
            saga = self.active()
            if saga is None or saga["state"] not in ("stuck", "compensating"):
                raise OpError("bad-state", "nothing to retry: no saga is stuck")
            return await self._compensate(saga["id"], saga["target"], saga["final"], peer)

    async def _compensate(self, sid: int, target: int, final: str, peer):
        """Compensate and drop every live step above *target*, newest first.

        Every journal write here is essential (Journal.transact): it finds room on a full state
        filesystem, since the rollback is what frees it. If one fails all the same, the saga
        stays ``compensating`` in the journal and in the view (sealed), and 'saga retry' or a
        restart finishes it."""
        self._seal_audit()

        def start(txn):
            s = txn.saga(sid)
            s.update(state="compensating", target=target, final=final, updated=now(), error=None)
            txn.put_saga(sid, s)
            txn.event("saga.compensating", saga=sid, target=target, final=final, **self._event_details(peer))

        await self.ws.transact(start)
        self.step_meter = None
        crash_point("rollback.start")
        self.fs.seal_top()
        try:
            return await self._compensate_steps(sid, target, final)
        except JournalError as exc:
            raise OpError("no-space" if isinstance(exc, JournalFull) else "journal",
                          f"the rollback stopped: {exc}; the saga is still compensating and the workspace "
                          "read-only: free space on the state filesystem if it is full, then run: saga retry "
                          "(a restart of the daemon finishes it too)", saga=sid) from None

    async def _compensate_steps(self, sid: int, target: int, final: str):
        done = []
        t0 = time.perf_counter()
        todo = [st for st in self.live_steps(sid) if st["index"] > target]
        for step in reversed(self.live_steps(sid)):
            if step["index"] <= target:
                break
            self.progress = {"op": "rollback", "done": len(done), "total": len(todo)}
            ok, status, tail = await self._run_step_compensation(sid, step)
            if not ok:
                def stuck(txn):
                    s = txn.saga(sid)
                    s.update(state="stuck", stuck_step=step["index"], exit_status=status, stderr_tail=tail,
                             error=f"compensation of step {step['index']} ({step['name']}) failed with "
                                   f"status {status}", updated=now())
                    txn.put_saga(sid, s)
                    txn.event("saga.stuck", saga=sid, step=step["index"], status=status, stderr=tail[-1000:])

                await self.ws.transact(stuck)
                raise OpError("stuck", f"compensation of step {step['index']} ({step['name']}) failed "
                                       f"{step.get('retries', DEFAULT_RETRIES)} times (last status {status}); "
                                       "the saga is stuck: fix the cause, then run: saga retry",
                              saga=sid, step=step["index"], status=status, stderr=tail[-2000:])
            top = self.fs.layers[-1].id
            if top != step["layer"]:
                raise OpError("internal", f"stack top {top} is not step {step['index']}'s layer {step['layer']}")

            def dropped(txn, step=step):
                rec = [r for r in txn.steps(sid) if r["index"] == step["index"]][0]
                rec.update(state="compensated", compensated=now())
                txn.put_step(sid, rec["index"], rec)
                txn.event("step.compensated", saga=sid, step=rec["index"])

            await self.ws.drop_layers(1, txn_extra=dropped)
            crash_point("rollback.step")
            done.append(step["index"])

        def finish(txn):
            s = txn.saga(sid)
            s.update(state=final, updated=now())
            for k in ("stuck_step", "exit_status", "stderr_tail", "error"):
                s.pop(k, None)
            if final == "aborted":
                s["ended"] = now()
                txn.set_meta("active_saga", None)
            txn.put_saga(sid, s)
            txn.event(f"saga.{'aborted' if final == 'aborted' else 'rolledback'}", saga=sid, target=target,
                      steps=done)

        await self.ws.transact(finish)
        self.touched = {}
        if any(st["state"] != "open" for st in todo):
            self._known = self._known_paths()  # (the paths of an open step were only in touched)
        return {"saga": self.ws.journal.saga(sid), "compensated": done, "seconds": time.perf_counter() - t0}

    async def _run_step_compensation(self, sid: int, step) -> tuple[bool, int, str]:
        def mark(txn):
            rec = [r for r in txn.steps(sid) if r["index"] == step["index"]][0]
            if rec["state"] != "compensating":
                rec["state"] = "compensating"
                txn.put_step(sid, rec["index"], rec)
                txn.event("step.compensating", saga=sid, step=rec["index"])

        await self.ws.transact(mark)
        cmd = step.get("compensate")
        if not cmd:
            return True, 0, ""
        saga = self.ws.journal.saga(sid)
        retries = max(1, int(step.get("retries") or DEFAULT_RETRIES))
        timeout = float(step.get("compensate_timeout") or DEFAULT_COMP_TIMEOUT)
        try:
            return await self._compensation_attempts(sid, step, saga, cmd, retries, timeout)
        finally:
            self.compensation = None

    async def _compensation_attempts(self, sid, step, saga, cmd, retries, timeout) -> tuple[bool, int, str]:
        status, tail = 0, ""
        await self._reap_orphan(sid, step)
        for attempt in range(1, retries + 1):
            start = now()
            # the latest moment this compensation can end: what 'saga status' shows as time left
            worst = start + timeout * (retries - attempt + 1) + sum(BACKOFF * 2 ** (a - 1)
                                                                    for a in range(attempt, retries))
            self.compensation = {"step": step["index"], "name": step["name"], "command": cmd, "attempt": attempt,
                                 "attempts": retries, "timeout": timeout, "started": start, "deadline": worst}
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
                   "SAGA_ID": str(sid), "SAGA_NAME": saga["name"], "STEP_NAME": step["name"],
                   "STEP_INDEX": str(step["index"]), "ATTEMPT": str(attempt), "WORKSPACE": str(self.ws.mountpoint)}
            uid = step.get("uid") if step.get("uid") is not None else os.getuid()
            gid = step.get("gid") if step.get("gid") is not None else os.getgid()
            proc, out, gate = await trio.to_thread.run_sync(
                start_compensation, cmd, env, str(self.ws.mountpoint), uid, gid, str(self.ws.state_dir),
                step.get("umask") if isinstance(step.get("umask"), int) else DEFAULT_UMASK)
            try:
                running = {"pid": proc.pid, "pgid": proc.pid, "start": osutil.process_start_time(proc.pid),
                           "attempt": attempt, "at": now(), "timeout": timeout}

                def started(txn, running=running):
                    rec = [r for r in txn.steps(sid) if r["index"] == step["index"]][0]
                    rec["running"] = running
                    txn.put_step(sid, rec["index"], rec)

                await self.ws.transact(started)
                try:
                    os.write(gate, b"go\n")  # journaled: the command may run
                except BrokenPipeError:
                    pass  # the shell is gone already: its status says why
            except BaseException:
                os.close(gate)  # the shell exits at its gate without running the command
                out.close()
                proc.wait()
                raise
            os.close(gate)
            status, tail = await trio.to_thread.run_sync(finish_compensation, proc, out, timeout)

            def record(txn, attempt=attempt, status=status, tail=tail):
                rec = [r for r in txn.steps(sid) if r["index"] == step["index"]][0]
                rec.pop("running", None)
                txn.put_step(sid, rec["index"], rec)
                txn.event("compensate.attempt", saga=sid, step=step["index"], attempt=attempt, status=status,
                          stderr=tail[-1000:])

            await self.ws.transact(record)
            if status == 0:
                return True, 0, tail
            if attempt < retries:
                await trio.sleep(BACKOFF * (2 ** (attempt - 1)))
        return False, status, tail

    async def _reap_orphan(self, sid: int, step) -> None:
        """An attempt journaled as running is not ours if we are here: a previous daemon died
        during it, and its process group (its own session) may still run. Wait for it to end,
        until its own timeout, then kill the group (SIGTERM, then SIGKILL): never two attempts
        of a compensation at once (invariant 25)."""
        rec = [r for r in self.steps(sid) if r["index"] == step["index"]][0]
        run = rec.get("running")
        if not run:
            return
        outcome = "gone"
        if osutil.group_alive(run["pgid"], run["start"]):
            log.warning("saga %d step %d: attempt %d of the compensation (pid %d) outlived the daemon; waiting "
                        "for it", sid, step["index"], run["attempt"], run["pid"])
            outcome = "finished"
            deadline = run["at"] + run["timeout"]
            while osutil.group_alive(run["pgid"], run["start"]) and time.time() < deadline:
                await trio.sleep(0.05)
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if not osutil.group_alive(run["pgid"], run["start"]):
                    break
                outcome = "killed"
                log.warning("saga %d step %d: killing the orphaned compensation (process group %d) with %s",
                            sid, step["index"], run["pgid"], sig.name)
                try:
                    os.killpg(run["pgid"], sig)
                except ProcessLookupError:
                    break
                with trio.move_on_after(grace):
                    while osutil.group_alive(run["pgid"], run["start"]):
                        await trio.sleep(0.05)
            if osutil.group_alive(run["pgid"], run["start"]):
                raise OpError("orphan", f"the compensation of step {step['index']} started by a previous daemon "
                                        f"(process group {run['pgid']}) survives SIGKILL; end it, then run: "
                                        "saga retry")

        def reaped(txn):
            r = [r for r in txn.steps(sid) if r["index"] == step["index"]][0]
            r.pop("running", None)
            txn.put_step(sid, r["index"], r)
            txn.event("compensate.orphan", saga=sid, step=step["index"], attempt=run["attempt"], pid=run["pid"],
                      outcome=outcome)

        await self.ws.transact(reaped)

    # ------------------------------------------------------------------ commit

    def _all_paths(self, sid) -> dict:
        paths = {}
        stored = self.ws.journal.step_paths(sid)
        records = [stored.get(s["index"], {}) for s in self.live_steps(sid)] + [self.touched]
        for rec in records:
            for p, ident in rec.items():
                if p not in paths or (paths[p] == ["d"] and ident is not None and ident[0] == "D"):
                    paths[p] = ident  # the earliest record, made precise by a later listing
        return paths

    def _conflicts(self, paths: dict) -> list[dict]:
        out = []
        dirs = {}
        try:
            for p, then in sorted(paths.items()):
                cur = commit.base_identity(self._base_fd, p, with_listing=then is not None and then[0] == "D",
                                          dirs=dirs)
                if then is not None and then[0] == "d" and cur is not None and cur[0] == "d":
                    continue  # a directory that is still a directory: entries are checked one by one
                if not commit.same_identity(then, cur):
                    out.append({"path": p, "recorded": then, "now": cur})
        finally:
            for fd in dirs.values():
                os.close(fd)
        return out

    def _refusals(self, ops) -> list[dict]:
        base_fd = os.open(self.ws.base, osutil.DIR_FLAGS)
        try:
            return commit.refusals(base_fd, ops)
        finally:
            os.close(base_fd)

    def _plan(self, for_commit: bool = False, rules_: rules.Rules | None = None):
        """(the commit plan, what *rules_* leave out of it: see rules.summarize). *for_commit*:
        also give metacopies their data and make the layers durable (one syncfs of their
        filesystem) before the plan is journaled. Runs on a worker thread (git reads the view)."""
        base_fd = os.open(self.ws.base, osutil.DIR_FLAGS)
        fds = []
        try:
            for layer in self.fs.layers[1:]:
                fds.append((layer.id, os.open(layer.path, osutil.DIR_FLAGS)))
            ops = commit.plan_commit(base_fd, fds)
            left = []
            if rules_:
                out = rules_.left_out(self._entries(base_fd, ops))
                if out:
                    info = {c["path"]: {"change": c["change"]} for c in commit.summarize(ops)}
                    for op in ops:
                        if op["path"] in out:
                            info.setdefault(op["path"], {"change": "modified"})["layer"] = op["layer"]
                    left = rules.summarize(out, info)
                    ops = commit.leave_out(ops, out)
            if for_commit:
                refused = commit.refusals(base_fd, ops)
                if refused:
                    raise commit.Refused(refused)
                commit.materialize(base_fd, dict(fds), ops)
                if fds:
                    osutil.syncfs(fds[0][1])
            return ops, left
        finally:
            os.close(base_fd)
            for _, fd in fds:
                os.close(fd)

    @staticmethod
    def _entries(base_fd, ops):
        """(path, is a directory) of every op, for the commit rules."""
        for op in ops:
            if op["op"] == "delete":
                yield op["path"], commit.base_identity(base_fd, op["path"]) == ["d"]
            else:
                yield op["path"], op["op"] in ("newdir", "dir")

    def _rules(self, args, saga) -> rules.Rules:
        """The commit rules of a request: STATE/commit.json, then the request's ``exclude`` and
        ``include_ignored``."""
        try:
            cfg = rules.load_config(self.ws.state_dir)
            exclude = cfg["exclude"] + rules.check_patterns(args.get("exclude"), "exclude")
        except rules.RulesError as exc:
            raise OpError("bad-request", str(exc)) from None
        git = not (args.get("include_ignored") or cfg["include_ignored"]) and rules.is_git_work_tree(self._base_fd)
        return rules.Rules(exclude=exclude, mountpoint=self.ws.mountpoint if git else None,
                           uid=saga.get("uid"), gid=saga.get("gid"))

    def _without_left_out(self, rules_: rules.Rules, conflicts: list) -> list:
        """Conflicts on paths the rules leave out do not count: those paths are not committed."""
        if not conflicts or not rules_:
            return conflicts
        entries = [(c["path"], any(i is not None and i[0] in ("d", "D") for i in (c["recorded"], c["now"])))
                   for c in sorted(conflicts, key=lambda c: c["path"])]
        left = rules_.left_out(entries)
        return [c for c in conflicts if c["path"] not in left]

    def _layer_steps(self, sid) -> dict:
        return {s["layer"]: {"index": s["index"], "name": s["name"]} for s in self.steps(sid) if s.get("layer")}

    async def op_commit(self, args, peer):
        dry_run = bool(args.get("dry_run"))
        with self.d.exclusive("commit"):
            saga = self.require_active(states=("active", "committing"))
            if saga["state"] == "committing":
                return await self._finish_commit(saga, peer)
            self._refuse_while_cutting()
            sid = saga["id"]
            paths = self._all_paths(sid)
            rules_ = self._rules(args, saga)
            if dry_run:
                try:
                    ops, left = await trio.to_thread.run_sync(self._plan, False, rules_)
                    conflicts = await trio.to_thread.run_sync(self._conflicts, paths)
                    conflicts = await trio.to_thread.run_sync(self._without_left_out, rules_, conflicts)
                    conflicts += await trio.to_thread.run_sync(self._refusals, ops)
                except rules.RulesError as exc:
                    raise OpError("commit-failed", str(exc)) from None
                return {"saga": saga, "changes": self._annotate(commit.summarize(ops), sid), "conflicts": conflicts,
                        "left_out": self._annotate(left, sid), "dry_run": True}
            t0 = time.perf_counter()
            was_writable = self.fs.writable()
            self.fs.seal_top()  # quiesce: from here a write fails with EROFS, it is never lost
            self._seal_audit()
            lock = BaseLock(self.ws.base)
            try:
                await trio.to_thread.run_sync(lock.acquire)
                try:
                    conflicts = await trio.to_thread.run_sync(self._conflicts, paths)
                    try:
                        conflicts = await trio.to_thread.run_sync(self._without_left_out, rules_, conflicts)
                    except rules.RulesError as exc:
                        raise OpError("commit-failed", f"{exc}; nothing was applied and the saga is still "
                                                       "active") from None
                    if conflicts:
                        if was_writable:
                            self.fs.unseal_top()

                        def refused(txn):
                            txn.event("commit.conflict", saga=sid, paths=[c["path"] for c in conflicts][:1000],
                                      **self._event_details(peer))

                        await self.ws.transact(refused)
                        raise OpError("conflict", f"commit refused: {len(conflicts)} path(s) changed in the base "
                                                  "since this saga changed them; the saga is still active and "
                                                  "untouched", conflicts=conflicts)
                    try:
                        full, left = await trio.to_thread.run_sync(self._plan, True, rules_)
                    except commit.Refused as exc:
                        refused_paths = [c["path"] for c in exc.conflicts][:1000]

                        def refused_(txn):
                            txn.event("commit.conflict", saga=sid, paths=refused_paths, **self._event_details(peer))

                        await self.ws.transact(refused_)
                        raise OpError("conflict", f"commit refused: {exc}; the saga is still active and untouched",
                                      conflicts=exc.conflicts) from None
                    except (OSError, commit.MergeError, rules.RulesError) as exc:
                        raise OpError("commit-failed", f"commit failed before the base was changed: {exc}; "
                                                       "nothing was applied and the saga is still active: fix "
                                                       "the cause and commit again") from None
                    finally:
                        self.fs.forget_origins()  # metacopies may have their own data now
                    changes = self._annotate(commit.summarize(full), sid)
                    ops = commit.compact(full)
                    layers = [layer.id for layer in self.fs.layers[1:]]
                    plan = {"saga": sid, "phase": "planned", "layers": layers, "ops": ops,
                            "token": commit.new_token(full)}
                    open_paths = dict(self.touched)

                    def intent(txn):
                        for s in txn.steps(sid):
                            if s["state"] == "open":
                                s.update(state="done", sealed=now())
                                txn.put_step(sid, s["index"], s)
                                txn.put_step_paths(sid, s["index"], open_paths)
                        s = txn.saga(sid)
                        s.update(state="committing", updated=now(), commit_ops=len(full))
                        txn.put_saga(sid, s)
                        txn.set_meta("commit_plan", plan)
                        txn.set_meta("stack", {"layers": layers, "sealed": True})
                        txn.event("commit.begin", saga=sid, ops=len(full), **self._event_details(peer))

                    t1 = time.perf_counter()
                    await self.ws.transact(intent)
                    crash_point("commit.intent")
                    # left-out entries vanish from the view with the layers: the kernel must forget them
                    gone = self.fs.kernel_entries([c["path"] for c in left])
                    await self._execute_plan(plan, peer, t0, t1, gone)
                finally:
                    lock.release()
            except BaseException:
                if self.active() and self.active()["state"] == "active" and was_writable:
                    self.fs.unseal_top()
                raise
            self.touched = {}
            self._known = set()
            self.step_meter = self.saga_meter = None
            self.writers = {}
            return {"saga": self.ws.journal.saga(sid), "changes": changes, "count": len(changes),
                    "seconds": time.perf_counter() - t0, "left_out": self._annotate(left, sid)}

    async def _execute_plan(self, plan, peer, t0=None, t1=None, gone=((), ())) -> None:
        """Run a journaled plan to the end, then finalize. On failure before anything was renamed
        into the base, undo the staging and give the saga back; after, stay committing."""
        sid, ops, layers = plan["saga"], plan["ops"], plan["layers"]
        t0 = t0 or time.perf_counter()
        t1 = t1 or t0
        t2 = time.perf_counter()
        stale = []
        # directories moved whole out of a layer: the view is paused from the first move until
        # the layers are dropped (fs.pause)
        pause = self._pause_view if any(op.get("move") for op in ops) else None
        try:
            stale = await trio.to_thread.run_sync(commit.base_idents, self._base_fd, ops)
            t2 = time.perf_counter()

            def progress(done, total):
                self.progress = {"op": "commit", "done": done, "total": total}

            inomap = await trio.to_thread.run_sync(run_commit_plan, self.ws, plan, progress, pause)
        except (OSError, commit.MergeError) as exc:
            self.fs.resume()
            err = str(exc)
            cur = self.ws.journal.meta("commit_plan") or {}
            if cur.get("phase") == "planned":
                await trio.to_thread.run_sync(commit.cleanup_stage, self._base_fd, ops, sid, plan.get("token", ""))

                def give_back(txn):
                    # the steps stay done (sealed): a crash now loses nothing; commit again later
                    s = txn.saga(sid)
                    s.update(state="active", updated=now())
                    txn.put_saga(sid, s)
                    txn.set_meta("commit_plan", None)
                    txn.event("commit.failed", saga=sid, phase="planned", error=err)

                await self.ws.transact(give_back)
                raise OpError("commit-failed", f"commit failed before the base was changed: {exc}; nothing was "
                                               "applied and the saga is still active with every step done: fix "
                                               "the cause (e.g. free space in the base's filesystem) and commit "
                                               "again") from None

            def failed(txn):
                txn.event("commit.failed", saga=sid, phase=cur.get("phase"), error=err)

            await self.ws.transact(failed)
            raise OpError("commit-incomplete", f"commit failed while applying it to the base: {exc}; the journal "
                                               "holds the rest: fix the cause, then run 'saga commit' again to "
                                               "finish it (a restart of the daemon finishes it too)") from None
        except BaseException:
            self.fs.resume()
            raise
        crash_point("commit.done")
        t3 = time.perf_counter()
        try:
            await self.ws.drop_layers(len(layers), txn_extra=lambda txn: _finalize_commit(txn, sid),
                                      committed=(inomap, stale, gone), on_view=self.fs.resume)
        finally:
            self.fs.resume()
        log.info("saga %d committed: %d entries in %d ops (%d moved whole); flush+check+plan %.3fs, "
                 "intent %.3fs, merge %.3fs, drop %.3fs", sid, commit.count_entries(ops), len(ops),
                 sum(1 for op in ops if op.get("move")), t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)

    def _pause_view(self) -> None:
        """From the commit's worker thread, before the first move (see OverlayFS.pause)."""
        trio.from_thread.run_sync(self.fs.pause)

    async def _finish_commit(self, saga, peer):
        """'saga commit' on a saga whose commit failed half-way: finish it from the journal."""
        plan = self.ws.journal.meta("commit_plan")
        if not plan or plan["saga"] != saga["id"]:
            raise OpError("internal", f"saga {saga['id']} is committing but the journal holds no plan for it")
        t0 = time.perf_counter()
        lock = BaseLock(self.ws.base)
        await trio.to_thread.run_sync(lock.acquire)
        try:
            await self._execute_plan(plan, peer)
        finally:
            lock.release()
        self.touched = {}
        self._known = set()
        self.step_meter = self.saga_meter = None
        # the journaled plan lists a directory moved whole, not the entries below it
        ops = plan["ops"]
        changes = self._annotate(commit.summarize(ops), saga["id"])
        count = len(changes) + sum(op.get("entries", 0) for op in ops)
        return {"saga": self.ws.journal.saga(saga["id"]), "changes": changes, "count": count,
                "seconds": time.perf_counter() - t0}

    def _annotate(self, changes, sid):
        steps = self._layer_steps(sid)
        for c in changes:
            st = steps.get(c.pop("layer"), {})
            c["step"] = st.get("index")
            c["step_name"] = st.get("name")
        return changes

    # ------------------------------------------------------------------ recovery after mount

    async def resume(self) -> None:
        """After mounting: finish an interrupted rollback, roll back the step open at a crash,
        re-arm the time budgets."""
        saga = self.active()
        if saga is None:
            return
        self.saga_meter = budgets.Meter(saga.get("budgets") or {})
        if "timeout" in (saga.get("budgets") or {}):
            self._arm_timer("saga", saga["id"], None, saga["created"] + saga["budgets"]["timeout"])
        try:
            if saga["state"] == "compensating":
                log.warning("saga %d: finishing an interrupted rollback", saga["id"])
                with self.d.exclusive("recover"):
                    await self._compensate(saga["id"], saga["target"], saga["final"], None)
            elif saga["state"] == "active" and not self.keep_open_step:
                live = self.live_steps(saga["id"])
                if live and live[-1]["state"] == "open" and self.d.crashed:
                    log.warning("saga %d: rolling back step %d, open at the crash", saga["id"], live[-1]["index"])
                    with self.d.exclusive("recover"):
                        await self._compensate(saga["id"], live[-1]["index"] - 1, "active", None)
        except OpError as exc:
            log.error("recovery: %s", exc.message)
        live = self.live_steps(saga["id"])
        if live and live[-1]["state"] == "open":
            b = live[-1].get("budgets") or {}
            self.step_meter = budgets.Meter(b)
            if "timeout" in b:
                self._arm_timer("step", saga["id"], live[-1]["index"], live[-1]["created"] + b["timeout"])

    # ------------------------------------------------------------------ read-only ops

    async def op_status(self, args, peer):
        out = status_of(self.ws.journal, self.fs.writable(), self.d.busy)
        out["progress"] = self.progress if self.d.busy else None
        out["compensation"] = self.compensation
        return out

    async def op_diff(self, args, peer):
        saga = self.require_active(states=("active", "stuck", "compensating"))
        rules_ = self._rules(args, saga)
        try:
            ops, left = await trio.to_thread.run_sync(self._plan, False, rules_)
        except rules.RulesError as exc:
            raise OpError("error", f"{exc} (saga diff leaves out what a commit would)") from None
        changes = self._attribute(self._annotate(commit.summarize(ops), saga["id"]), saga["id"])
        for c in changes:
            if c["path"] in self.writers:
                c["process"] = self.writers[c["path"]]
        left = self._attribute(self._annotate(left, saga["id"]), saga["id"])
        if args.get("step") is not None:
            k = self._resolve_step(saga, args["step"])
            changes = [c for c in changes if k in (c["step"], c.get("last_step"))]
            left = [c for c in left if k in (c["step"], c.get("last_step"))]
        return {"saga": saga, "changes": changes, "left_out": left}

    def _attribute(self, changes, sid):
        """Each change's ``step`` is the step that first changed the path (the steps' journaled
        paths: a step records a path only if no earlier live step did), or of its nearest
        ancestor that a step recorded (entries of a renamed directory); the layer's step (the
        step of the visible version) is kept as ``last_step`` when it is a later one. A
        directory created in step 4 and written into in step 5 is step 4's change."""
        first = {}
        stored = self.ws.journal.step_paths(sid)
        live = self.live_steps(sid)
        names = {s["index"]: s["name"] for s in live}
        for s in live:
            for p in stored.get(s["index"], ()):
                first.setdefault(p, s["index"])
        if live and live[-1]["state"] == "open":
            for p in self.touched:
                first.setdefault(p, live[-1]["index"])
        for c in changes:
            p = c["path"]
            k = first.get(p)
            while k is None and "/" in p:
                p = p.rsplit("/", 1)[0]
                k = first.get(p)
            if k is None or c["step"] is None or k >= c["step"]:
                continue
            c["last_step"], c["last_step_name"] = c["step"], c["step_name"]
            c["step"], c["step_name"] = k, names.get(k)
        return changes

    async def op_log(self, args, peer):
        try:
            await self.flush_audit()
        except JournalFull as exc:  # the log is read all the same; the batch waits in memory
            log.warning("saga log: the audit trail of the last second is not journaled yet: %s", exc)
        since = _number(args, "since", 0, int, 0, 1 << 63)
        saga = args.get("saga")
        if saga is not None and (isinstance(saga, bool) or not isinstance(saga, int)):
            raise OpError("bad-request", f"saga must be a saga id, not {saga!r}")
        events = self.ws.journal.events(saga=saga, since=since)
        if not args.get("ops"):
            events = [e for e in events if e["kind"] != "op"]
        return {"events": events}

    async def op_gc(self, args, peer):
        """Remove ended sagas' journal records (beyond --keep N newest, or older than a duration),
        orphaned layer directories and the trash. Never touches the active saga."""
        older = _number(args, "older_than", None, float, 0, 1e12) if args.get("older_than") is not None else None
        keep = _number(args, "keep", None, int, 0, 1 << 31) if args.get("keep") is not None else None
        if older is None and keep is None:
            keep = GC_KEEP  # never every saga's history without being asked
        with self.d.exclusive("collect garbage"):
            await self.flush_audit(essential=True)  # no batch of an ended saga may be journaled after its removal
            before = await trio.to_thread.run_sync(self.ws.disk_usage)
            active = self.active_id()
            await trio.to_thread.run_sync(crash_point, "gc")  # OVERLAYD_STALL_AT=gc:S (tests): a stack op in flight
            ended = [s for s in self.ws.journal.sagas() if s["id"] != active and s["state"] in ("committed", "aborted")]
            ended.sort(key=lambda s: s.get("ended") or s.get("updated") or 0, reverse=True)
            victims = []
            for i, s in enumerate(ended):
                too_old = older is not None and now() - (s.get("ended") or s.get("updated") or 0) > float(older)
                beyond = keep is not None and i >= int(keep)
                if too_old or beyond:
                    victims.append(s["id"])

            def delete(txn):
                n = 0
                for sid in victims:
                    txn.delete_saga(sid)
                    n += txn.delete_events(sid)
                txn.event("gc", sagas=victims, events=n, **self._event_details(peer))
                return n

            events = await self.ws.transact(delete)
            async with self.ws.jlimiter:  # no journal transaction of ours runs meanwhile
                jbefore, jafter = self.ws.journal.compact()
            stack = self.ws.stack()
            self.ws.finish_drops()
            quarantined = await trio.to_thread.run_sync(self.ws.collect_orphans, stack)
            after = await trio.to_thread.run_sync(self.ws.disk_usage)
            return {"sagas": victims, "events": events, "bytes_before": before, "bytes_after": after,
                    "journal_before": jbefore, "journal_after": jafter, "quarantined": quarantined}

    async def op_annotate(self, args, peer):
        """Merge client data (e.g. a saga definition and its steps' outcomes) into the active
        saga's record under ``annotations``, journaled with an event."""
        fields = args.get("fields")
        if not isinstance(fields, dict) or len(json.dumps(fields)) > 1 << 20:
            raise OpError("bad-request", "'fields' must be an object of at most 1 MiB")
        saga = self.require_active(states=("active", "stuck", "compensating"))

        def put(txn):
            s = txn.saga(saga["id"])
            s.setdefault("annotations", {}).update(fields)
            s["updated"] = now()
            txn.put_saga(saga["id"], s)
            txn.event("saga.annotate", saga=saga["id"], keys=sorted(fields), **self._event_details(peer))
            return s

        return {"saga": await self.ws.transact(put, essential=False)}

    async def op_list(self, args, peer):
        return {"sagas": self.ws.journal.sagas()}


def status_of(journal, writable=None, busy=None) -> dict:
    """The active saga and its steps; with none active, ``last``: the saga that ended last (a
    budget cut that aborted it is in its ``cut``)."""
    sid = journal.meta("active_saga")
    saga = journal.saga(sid) if sid else None
    steps = journal.steps(sid) if sid else []
    last = None
    if saga is None and journal.meta("last_saga_id"):
        last = journal.saga(journal.meta("last_saga_id"))
    return {"saga": saga, "steps": steps, "last": last,
            "writable": writable, "busy": busy}
