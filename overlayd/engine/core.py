"""The saga state machine (journaled; see docs/ARCHITECTURE.md, Sagas):

    saga:  active -> committing -> committed
           active -> compensating -> active      (rollback, rollback --to K)
           active -> compensating -> aborted     (abort)
           compensating -> stuck -> compensating (retry)
    step:  open -> done;  open|done -> compensating -> compensated

Every transition is one journal write transaction, committed before its effect is visible.
Each live step owns exactly one layer: the stack above the base is the live steps' layers,
in order. Operations raise EngineError only; the daemon's wire turns it into a reply.
"""

import errno
import logging
import os
import time

import trio

from overlayd.journal import JournalError, JournalFull

from .. import osutil
from ..commit import basecopy, changes as by_step
from ..faults import crash_point
from . import budgets
from .audit import AuditTrail
from .budgets import BudgetMixin
from .commit import CommitMixin
from .compensation import DEFAULT_COMP_TIMEOUT, DEFAULT_RETRIES, CompensationMixin, peer_umask
from .errors import EngineError, no_space_message
from .export import ExportMixin, base_head
from .fork import ForkMixin
from .gc import GcMixin
from .lock import StackLock
from .queries import QueryMixin
from .records import check_name, live_steps, now, number
from .resolution import ResolveMixin
from .tracker import Tracker

log = logging.getLogger(__name__)

MIN_STEP_FREE = 1 << 20  # a step is refused with less room than this on the state filesystem (plus
# what ext4 keeps for itself out of the free blocks: 2 % of the filesystem, at most 16 MiB)


class SagaEngine(BudgetMixin, CompensationMixin, CommitMixin, QueryMixin, GcMixin, ExportMixin, ResolveMixin, ForkMixin):
    """The sagas of one workspace. *ws*: the open workspace (journal, stack of layers, view);
    *lock*: the stack lock the daemon's own stack operations share. Background work (the audit
    trail, time budgets, budget cuts) runs in the nursery of :meth:`run`, which the daemon
    starts; ``ops`` maps the control operations to their handlers."""

    def __init__(self, ws, lock: StackLock, *, keep_open_step: bool = False):
        self.ws = ws
        self.fs = ws.fs
        self.lock = lock
        self.keep_open_step = keep_open_step
        self._nursery = None  # set by run()
        self._base_fd = os.open(self.ws.base, osutil.DIR_FLAGS)
        self.tracker = Tracker(ws.journal, self._base_fd, basecopy.copies_dir(ws.state_dir))
        self.audit = AuditTrail(ws.transact, self._audit_where, lambda: self.fs.ctx)
        self.fs.on_change = self._on_change
        self.fs.on_write = self._on_write
        self.fs.on_release = self._on_release
        self.defaults = budgets.load_defaults(self.ws.state_dir)
        self.step_meter = None  # budgets.Meter of the open step
        self.saga_meter = None  # budgets.Meter of the active saga (since this daemon started)
        self.cutting = None  # the reason of a budget cut in progress
        self.cut_step = None  # the index of the step it cuts
        self.progress = None  # {"op", "done", "total"} of a long operation, for progress bars
        self.compensation = None  # the compensation command running now: step, attempt, deadline
        self.ops = {
            "saga.begin": self.op_begin, "saga.step": self.op_step, "saga.rollback": self.op_rollback,
            "saga.abort": self.op_abort, "saga.commit": self.op_commit, "saga.retry": self.op_retry,
            "saga.status": self.op_status, "saga.diff": self.op_diff, "saga.log": self.op_log,
            "saga.list": self.op_list, "saga.annotate": self.op_annotate, "saga.gc": self.op_gc,
            "saga.export": self.op_export,  # what 'saga export --git' reads
            "saga.resolve": self.op_resolve,
            "saga.fork": self.op_fork,  # 'saga fork': the fork's state directory (the CLI mounts it)
        }
        self.tracker.reload(self.active_id())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The engine's background tasks (the audit trail's flushes, time budgets, budget cuts),
        until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.audit.loop)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def close(self) -> None:
        if self._base_fd is not None:
            os.close(self._base_fd)
            self._base_fd = None

    # ------------------------------------------------------------------ state access

    def active_id(self):
        return self.ws.journal.meta("active_saga")

    def active(self):
        sid = self.active_id()
        return self.ws.journal.saga(sid) if sid else None

    def steps(self, sid):
        return self.ws.journal.steps(sid)

    def live_steps(self, sid):
        return live_steps(self.steps(sid))

    def _audit_where(self):
        """(saga, step) the buffered audit records belong to; None without an active saga."""
        sid = self.active_id()
        if not sid:
            return None
        live = self.live_steps(sid)
        return sid, (live[-1]["index"] if live else None)

    def _on_change(self, kind: str, path: tuple, listing=None) -> None:
        """Called by the filesystem on changes of a path: audit it, meter it, and record the
        base's identity at the first change (Tracker.record)."""
        p = os.fsdecode(b"/".join(path))
        self.audit.record(kind, p)
        for meter in (self.step_meter, self.saga_meter):
            if meter is not None:
                meter.paths.add(p)
        self._check_budgets()
        self.tracker.record(p, listing)

    def require_active(self, states=("active",)):
        saga = self.active()
        if saga is None:
            raise EngineError("no-saga", f"no saga is active in {self.ws.mountpoint}; start one with: saga begin NAME")
        if saga["state"] not in states:
            if saga["state"] == "stuck":
                raise EngineError("stuck", f"saga {saga['name']!r} is stuck compensating step {saga.get('stuck_step')}: "
                                           f"{saga.get('error')}; fix the cause, then run: saga retry",
                                  saga=saga["id"])
            raise EngineError("bad-state", f"saga {saga['name']!r} is {saga['state']}; cannot do this now")
        return saga

    def _event_details(self, peer):
        return {"uid": peer.get("uid"), "pid": peer.get("pid")} if peer else {}

    # ------------------------------------------------------------------ begin / step

    async def op_begin(self, args, peer):
        name = check_name("saga", args.get("name"))
        try:
            budget = budgets.validate({**self.defaults["saga"], **(args.get("budgets") or {})}, "saga budgets")
        except ValueError as exc:
            raise EngineError("bad-request", str(exc)) from None
        with self._exclusive("begin a saga"):
            cur = self.active()
            if cur is not None:
                raise EngineError("saga-active", f"saga {cur['name']!r} (id {cur['id']}) is already active in "
                                                 f"{self.ws.mountpoint}; commit or abort it first, or mount another "
                                                 "workspace over the same base for a parallel saga")

            # the base's HEAD, the parent of 'saga export --git' (None: not a git work tree)
            head = await trio.to_thread.run_sync(base_head, str(self.ws.base), peer.get("uid"), peer.get("gid"))

            def begin(txn):
                sid = txn.new_saga_id()
                rec = {"id": sid, "name": name, "state": "active", "created": now(), "updated": now(),
                       "uid": peer.get("uid"), "gid": peer.get("gid"), "steps": 0, "budgets": budget,
                       **({"base_head": head} if head else {})}
                txn.put_saga(sid, rec)
                txn.set_meta("active_saga", sid)
                txn.event("saga.begin", saga=sid, name=name, **self._event_details(peer))
                return rec

            rec = await self.ws.transact(begin)
            self.tracker.touched = {}
            self.tracker.known = set()
            self.audit.writers = {}
            self.saga_meter = budgets.Meter(budget)
            if "timeout" in budget:
                self._arm_timer("saga", rec["id"], None, rec["created"] + budget["timeout"])
            return {"saga": rec}

    async def op_step(self, args, peer):
        name = check_name("step", args.get("name"))
        compensate = args.get("compensate")
        if compensate is not None and (not isinstance(compensate, str) or "\0" in compensate):
            raise EngineError("bad-request", "--compensate must be a shell command string")
        try:
            budget = budgets.validate({**self.defaults["step"],
                                       **{k: args.get(k) for k in budgets.KEYS if args.get(k) is not None}},
                                      "step budgets")
        except ValueError as exc:
            raise EngineError("bad-request", str(exc)) from None
        retries = number(args, "retries", DEFAULT_RETRIES, int, 1, 100)
        comp_timeout = number(args, "compensate_timeout", DEFAULT_COMP_TIMEOUT, float, 0.001, 86400 * 7)
        with self._exclusive("begin a step"):
            saga = self.require_active()
            return await self._new_step(saga, name, peer, compensate=compensate, budget=budget, retries=retries,
                                        comp_timeout=comp_timeout)

    async def _new_step(self, saga, name, peer, *, compensate=None, budget=None, retries=DEFAULT_RETRIES,
                        comp_timeout=DEFAULT_COMP_TIMEOUT):
        """Finish the open step (if any) and open step *name* with a fresh layer; the caller
        holds the stack lock."""
        if budget is None:
            budget = budgets.validate(dict(self.defaults["step"]), "step budgets")
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
        paths = dict(self.tracker.touched)
        copies = self.tracker.step_copies(paths)
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
                txn.put_step_bases(sid, p["index"], copies)
                txn.event("step.done", saga=sid, step=p["index"], **self._event_details(peer))
            rec["layer"] = layer_id
            txn.put_step(sid, index, rec)
            s = txn.saga(sid)
            s.update(steps=index, updated=now())
            txn.put_saga(sid, s)
            txn.event("step.begin", saga=sid, step=index, name=name, layer=layer_id,
                      compensate=compensate, **self._event_details(peer))

        self.audit.seal()
        t0 = time.perf_counter()
        try:
            await self.ws.push_layer(txn_extra=extra)
        except BaseException as exc:
            if was_writable and self.fs.layers[-1] is old_top and self.cutting is None:
                self.fs.unseal_top()
            if isinstance(exc, JournalFull) or (isinstance(exc, OSError)
                                                and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                raise EngineError("no-space", self._no_room(exc) + "; the saga is unchanged") from None
            raise
        if prev is not None:
            self.tracker.known.update(paths)
        self.tracker.touched = {}
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
        return no_space_message(self.ws.state_dir, why)

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
                raise EngineError("no-space", self._no_room(f"a step needs {need // 1024} KiB") +
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
        """The index of the live step *ref* names (commit.changes.resolve_step), or EngineError."""
        if ref is None:
            raise EngineError("bad-request", "no step given")
        try:
            return by_step.resolve_step(saga, self.steps(saga["id"]), ref)
        except by_step.NoStep as exc:
            raise EngineError("no-step", str(exc)) from None

    async def op_rollback(self, args, peer):
        with self._exclusive("roll back"):
            saga = self.require_active()
            self._refuse_while_cutting()
            live = self.live_steps(saga["id"])
            if args.get("to") is None:
                if not live or live[-1]["state"] != "open":
                    raise EngineError("no-open-step", "no step is open; roll back finished steps with: saga rollback --to STEP")
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
        with self._exclusive("abort"):
            saga = self.require_active(states=("active", "stuck"))
            self._refuse_while_cutting()
            return await self._compensate(saga["id"], 0, "aborted", peer)

    async def op_retry(self, args, peer):
        with self._exclusive("retry compensation"):
            self._refuse_while_cutting()
            saga = self.active()
            if saga is None or saga["state"] not in ("stuck", "compensating"):
                raise EngineError("bad-state", "nothing to retry: no saga is stuck")
            return await self._compensate(saga["id"], saga["target"], saga["final"], peer)

    async def _compensate(self, sid: int, target: int, final: str, peer):
        """Compensate and drop every live step above *target*, newest first.

        Every journal write here is essential (Journal.transact): it finds room on a full state
        filesystem, since the rollback is what frees it. If one fails all the same, the saga
        stays ``compensating`` in the journal and in the view (sealed), and 'saga retry' or a
        restart finishes it."""
        self.audit.seal()

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
            raise EngineError("no-space" if isinstance(exc, JournalFull) else "journal",
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
                raise EngineError("stuck", f"compensation of step {step['index']} ({step['name']}) failed "
                                           f"{step.get('retries', DEFAULT_RETRIES)} times (last status {status}); "
                                           "the saga is stuck: fix the cause, then run: saga retry",
                                  saga=sid, step=step["index"], status=status, stderr=tail[-2000:])
            top = self.fs.layers[-1].id
            if top != step["layer"]:
                raise EngineError("internal", f"stack top {top} is not step {step['index']}'s layer {step['layer']}")

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
        self.tracker.touched = {}
        if any(st["state"] != "open" for st in todo):  # (the paths of an open step were only in touched)
            # a journal scan that grows with the paths: not on the event loop (no step is open, so
            # nothing records a path meanwhile)
            self.tracker.known = await trio.to_thread.run_sync(self.tracker.known_paths, sid)
        await self._sweep_copies()  # the base copies the dropped steps took (still under the stack lock)
        return {"saga": self.ws.journal.saga(sid), "compensated": done, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ recovery after mount

    async def resume(self, crashed: bool = False) -> None:
        """After mounting: finish an interrupted rollback, roll back the step open at a crash
        (*crashed*: the previous daemon did not stop cleanly), re-arm the time budgets."""
        saga = self.active()
        if saga is None:
            return
        self.saga_meter = budgets.Meter(saga.get("budgets") or {})
        if "timeout" in (saga.get("budgets") or {}):
            self._arm_timer("saga", saga["id"], None, saga["created"] + saga["budgets"]["timeout"])
        try:
            if saga["state"] == "compensating":
                log.warning("saga %d: finishing an interrupted rollback", saga["id"])
                with self._exclusive("recover"):
                    await self._compensate(saga["id"], saga["target"], saga["final"], None)
            elif saga["state"] == "active" and not self.keep_open_step:
                live = self.live_steps(saga["id"])
                if live and live[-1]["state"] == "open" and crashed:
                    log.warning("saga %d: rolling back step %d, open at the crash", saga["id"], live[-1]["index"])
                    with self._exclusive("recover"):
                        await self._compensate(saga["id"], live[-1]["index"] - 1, "active", None)
        except EngineError as exc:
            log.error("recovery: %s", exc.message)
        live = self.live_steps(saga["id"])
        if live and live[-1]["state"] == "open":
            b = live[-1].get("budgets") or {}
            self.step_meter = budgets.Meter(b)
            if "timeout" in b:
                self._arm_timer("step", saga["id"], live[-1]["index"], live[-1]["created"] + b["timeout"])
