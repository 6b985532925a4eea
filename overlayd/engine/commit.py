"""The engine's side of a commit (docs/ARCHITECTURE.md, Commit protocol): conflicts, the plan
and what the commit rules leave out, the intent, then overlayd.commit.run on a worker thread,
and the drop of the committed layers."""

import logging
import os
import time

import trio

from .. import commit, osutil, rules
from ..commit import changes as by_step, gitpolicy, run
from ..faults import crash_point
from .errors import EngineError
from .records import now

log = logging.getLogger(__name__)


class CommitMixin:
    """SagaEngine's commit (uses ws, fs, lock, tracker, audit, progress and the meters)."""

    async def _lock_base(self) -> run.BaseLock:
        """The base's commit lock, taken on a worker thread (another daemon's commit may hold it)."""
        lock = run.BaseLock(self.ws.base)
        try:
            await trio.to_thread.run_sync(lock.acquire)
        except run.LockTimeout as exc:
            raise EngineError("busy", str(exc)) from None
        return lock

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
            raise EngineError("bad-request", str(exc)) from None
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

    def _git_settle(self, conflicts: list, saga, write: bool) -> tuple[list, list]:
        """(the conflicts that stand, those the git policy settled) when the base is a git
        repository (commit.gitpolicy): sync, for a worker thread. *write*: write settled
        content into the layers (not for a dry run)."""
        if not conflicts or not any(gitpolicy.kind(c["path"]) for c in conflicts) \
                or not gitpolicy.is_git_base(self._base_fd):
            return conflicts, []
        fds = []
        try:
            for layer in self.fs.layers[1:]:
                fds.append(os.open(layer.path, osutil.DIR_FLAGS))
            git = gitpolicy.Git(str(self.ws.base), str(self.ws.mountpoint), uid=saga.get("uid"), gid=saga.get("gid"))
            return gitpolicy.settle(self._base_fd, fds, conflicts, git, write=write)
        finally:
            for fd in fds:
                os.close(fd)

    async def op_commit(self, args, peer):
        dry_run = bool(args.get("dry_run"))
        with self._exclusive("commit"):
            saga = self.require_active(states=("active", "committing"))
            if saga["state"] == "committing":
                return await self._finish_commit(saga, peer)
            self._refuse_while_cutting()
            sid = saga["id"]
            paths = self.tracker.all_paths(await trio.to_thread.run_sync(self.tracker.stored, sid))
            # the identities 'saga resolve' re-based: those paths are compared with the base they were resolved with
            paths = self.tracker.rebased(paths, await trio.to_thread.run_sync(self.tracker.bases, sid))
            copies = dict(self.tracker.copies)
            rules_ = self._rules(args, saga)
            if dry_run:
                try:
                    ops, left = await trio.to_thread.run_sync(self._plan, False, rules_)
                    conflicts = await trio.to_thread.run_sync(self.tracker.conflicts, paths)
                    conflicts = await trio.to_thread.run_sync(self._without_left_out, rules_, conflicts)
                    conflicts, settled = await trio.to_thread.run_sync(self._git_settle, conflicts, saga, False)
                    conflicts = await trio.to_thread.run_sync(self._resolve_hints, conflicts, sid, copies)
                    conflicts += await trio.to_thread.run_sync(self._refusals, ops)
                except rules.RulesError as exc:
                    raise EngineError("commit-failed", str(exc)) from None
                return {"saga": saga, "changes": self._annotate(commit.summarize(ops), sid), "conflicts": conflicts,
                        "left_out": self._annotate(left, sid), "settled": settled, "dry_run": True}
            t0 = time.perf_counter()
            was_writable = self.fs.writable()
            self.fs.seal_top()  # quiesce: from here a write fails with EROFS, it is never lost
            self.audit.seal()
            try:
                # a copy running in a worker thread (copy-up, materialisation) ends before the plan
                # reads the layers: none can start on a sealed top (invariant 1: the commit alone
                # writes the base)
                await self.fs.wait_idle()
                lock = await self._lock_base()
                try:
                    conflicts = await trio.to_thread.run_sync(self.tracker.conflicts, paths)
                    try:
                        conflicts = await trio.to_thread.run_sync(self._without_left_out, rules_, conflicts)
                    except rules.RulesError as exc:
                        raise EngineError("commit-failed", f"{exc}; nothing was applied and the saga is still "
                                                           "active") from None
                    # a git repository as the base: most conflicts under .git/ settle by themselves
                    conflicts, settled = await trio.to_thread.run_sync(self._git_settle, conflicts, saga, True)
                    if settled:
                        log.info("saga %d: %d conflict(s) under .git/ settled by the git policy", sid, len(settled))
                    if conflicts:
                        conflicts = await trio.to_thread.run_sync(self._resolve_hints, conflicts, sid, copies)
                        if was_writable:
                            self.fs.unseal_top()

                        def refused(txn):
                            txn.event("commit.conflict", saga=sid, paths=[c["path"] for c in conflicts][:1000],
                                      **self._event_details(peer))

                        await self.ws.transact(refused)
                        raise EngineError("conflict", f"commit refused: {len(conflicts)} path(s) changed in the base "
                                                      "since this saga changed them; the saga is still active and "
                                                      "untouched: resolve each with the command listed for it ("
                                                      + "; ".join(c.get("resolve") or c["path"] for c in conflicts[:3])
                                                      + ("; ..." if len(conflicts) > 3 else "")
                                                      + "), then commit again", conflicts=conflicts)
                    try:
                        full, left = await trio.to_thread.run_sync(self._plan, True, rules_)
                    except commit.Refused as exc:
                        refused_paths = [c["path"] for c in exc.conflicts][:1000]

                        def refused_(txn):
                            txn.event("commit.conflict", saga=sid, paths=refused_paths, **self._event_details(peer))

                        await self.ws.transact(refused_)
                        raise EngineError("conflict", f"commit refused: {exc}; the saga is still active and untouched",
                                          conflicts=exc.conflicts) from None
                    except (OSError, commit.MergeError, rules.RulesError) as exc:
                        raise EngineError("commit-failed", f"commit failed before the base was changed: {exc}; "
                                                           "nothing was applied and the saga is still active: fix "
                                                           "the cause and commit again") from None
                    finally:
                        self.fs.forget_origins()  # metacopies may have their own data now
                    changes = self._annotate(commit.summarize(full), sid)
                    ops = commit.compact(full)
                    layers = [layer.id for layer in self.fs.layers[1:]]
                    plan = {"saga": sid, "phase": "planned", "layers": layers, "ops": ops,
                            "token": commit.new_token(full)}
                    open_paths = dict(self.tracker.touched)
                    open_copies = self.tracker.step_copies(open_paths)

                    def intent(txn):
                        for s in txn.steps(sid):
                            if s["state"] == "open":
                                s.update(state="done", sealed=now())
                                txn.put_step(sid, s["index"], s)
                                txn.put_step_paths(sid, s["index"], open_paths)
                                txn.put_step_bases(sid, s["index"], open_copies)
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
                    # and so must the files the git policy rewrote in a layer (their content changed)
                    gone = self.fs.kernel_entries([c["path"] for c in left] +
                                                  [c["path"] for c in settled if c.get("rewritten")])
                    await self._execute_plan(plan, peer, t0, t1, gone)
                finally:
                    lock.release()
            except BaseException:
                if self.active() and self.active()["state"] == "active" and was_writable:
                    self.fs.unseal_top()
                raise
            self.tracker.touched = {}
            self.tracker.known = set()
            self.step_meter = self.saga_meter = None
            self.audit.writers = {}
            await self._sweep_copies()
            return {"saga": self.ws.journal.saga(sid), "changes": changes, "count": len(changes),
                    "seconds": time.perf_counter() - t0, "left_out": self._annotate(left, sid), "settled": settled}

    async def _execute_plan(self, plan, peer, t0=None, t1=None, gone=((), ())) -> None:
        """Run a journaled plan to the end, then finalize. On failure before anything was renamed
        into the base, undo the staging and give the saga back; after, stay committing."""
        with self.fs.base_held():  # the base's events wait until the view has adopted the commit
            await self._run_plan(plan, peer, t0, t1, gone)

    async def _run_plan(self, plan, peer, t0, t1, gone) -> None:
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

            inomap = await trio.to_thread.run_sync(run.run_commit_plan, self.ws, plan, progress, pause)
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
                raise EngineError("commit-failed", f"commit failed before the base was changed: {exc}; nothing was "
                                                   "applied and the saga is still active with every step done: fix "
                                                   "the cause (e.g. free space in the base's filesystem) and commit "
                                                   "again") from None

            def failed(txn):
                txn.event("commit.failed", saga=sid, phase=cur.get("phase"), error=err)

            await self.ws.transact(failed)
            raise EngineError("commit-incomplete", f"commit failed while applying it to the base: {exc}; the journal "
                                                   "holds the rest: fix the cause, then run 'saga commit' again to "
                                                   "finish it (a restart of the daemon finishes it too)") from None
        except BaseException:
            self.fs.resume()
            raise
        crash_point("commit.done")
        t3 = time.perf_counter()
        try:
            await self.ws.drop_layers(len(layers), txn_extra=lambda txn: run.finalize_commit(txn, sid),
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
            raise EngineError("internal", f"saga {saga['id']} is committing but the journal holds no plan for it")
        t0 = time.perf_counter()
        lock = await self._lock_base()
        try:
            await self._execute_plan(plan, peer)
        finally:
            lock.release()
        self.tracker.touched = {}
        self.tracker.known = set()
        self.step_meter = self.saga_meter = None
        await self._sweep_copies()
        # the journaled plan lists a directory moved whole, not the entries below it
        ops = plan["ops"]
        changes = self._annotate(commit.summarize(ops), saga["id"])
        count = len(changes) + sum(op.get("entries", 0) for op in ops)
        return {"saga": self.ws.journal.saga(saga["id"]), "changes": changes, "count": count,
                "seconds": time.perf_counter() - t0}

    def _annotate(self, changes, sid):
        """Each change's layer given to its step (commit.changes.annotate)."""
        return by_step.annotate(changes, self.steps(sid))
