"""The coordinator: runs a definition against a workspace's daemon (``saga run``).

One saga step (one layer) per definition step, the command with the mount as its working
directory, the failure policy on a failure (compensation newest first, never past a *pivot*:
a completed step with ``compensatable = "none"``), and the commit at the end.

What the coordinator does is journaled through ``saga.annotate`` in the saga's record:

    annotations.definition  {"sha256", "text", "file", "name"}   (refuses --resume if changed)
    annotations.runner      {"phase", "pid", "token", "target", "failed", "message", ...}
    annotations.outcomes    {step name: {"status", "index", "attempt", "tail", ...}}

so ``saga run FILE --resume`` (after the runner or the daemon died) knows which steps are
complete: a step is complete when its outcome is ``ok`` and the saga step it names
(``index``) is still live. Everything after the last complete step is rolled back (its
compensation runs) and run again.

Python callables may stand for ``run`` and ``compensate`` (see :func:`from_steps`): they
run in the coordinator's process. A callable compensation is called by the coordinator
right before the daemon drops that step's layer.
"""

import fcntl
import json
import os
import shlex
import time
import uuid

from .. import retry
from ..client import BusyError, Client, ClientError, ConflictError, NoDaemon, StuckError
from ..paths import quote_path
from .attempt import AttemptMixin, RunResult, _DaemonLost, _Finish, kill_token
from .schema import (EXIT_CONFLICT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_DAEMON, EXIT_OK, EXIT_STOPPED,
                     EXIT_STUCK, SCHEMA, TAIL_ANNOTATED, TAIL_BYTES, Definition, StepDef)


class Coordinator(AttemptMixin):
    """Runs a :class:`Definition` against the daemon listening on *socket_path*.

    *on_event(dict)* receives every event (``{"version": 1, "event": ..., ...}``, the NDJSON of
    ``saga run --json``); ``step.output`` events carry each output line of a step.
    *attach*: run inside the saga already active (begun by the caller): no begin, no commit,
    no abort, and never compensate the steps that were live before the run.
    """

    def __init__(self, definition: Definition, socket_path, *, commit=True, on_event=None, attach=False,
                 resume_hint=None, progress_interval=1.0, expect=None):
        self.defn = definition
        self.socket_path = str(socket_path)
        self.expect = expect  # a client.MountInfo: verify the daemon before each request (Client)
        self.commit = commit
        self.on_event = on_event or (lambda ev: None)
        self.attach = attach
        self.by_name = {s.name: s for s in definition.steps}
        self.position = {s.name: i for i, s in enumerate(definition.steps)}
        self.token = uuid.uuid4().hex
        self.outcomes = {}
        self.runner = {}
        self.completed = []  # [(position, saga step index)]
        self.saga_id = None
        self.floor = 0
        self.mountpoint = self.state_dir = self.daemon_pid = None
        self.progress_interval = progress_interval
        self.resume_hint = resume_hint or (
            f"saga run {shlex.quote(definition.file)} --resume" if definition.file else "run it again with resume=True")
        self._current = None  # (position, index) of the step running

    # ------------------------------------------------------------------ plumbing

    def _call(self, op, timeout=60.0, busy_wait=True, **args):
        """One request; waits while the daemon is busy with another stack operation (its
        recovery, or a budget cut rolling a step back)."""
        deadline = time.monotonic() + 3600
        while True:
            try:
                with Client(self.socket_path, timeout=timeout, expect=self.expect) as c:
                    return c.call(op, **{k: v for k, v in args.items() if v is not None})
            except NoDaemon:
                raise _DaemonLost() from None
            except BusyError:
                if not busy_wait or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except ClientError as exc:
                if exc.code == "disconnected":
                    raise _DaemonLost() from None
                raise

    def emit(self, event, **fields):
        self.on_event({"version": SCHEMA, "event": event, "saga": self.saga_id, "time": round(time.time(), 3),
                       **fields})

    def _annotate(self, **fields):
        self._call("saga.annotate", fields=fields)

    def _set_runner(self, **fields):
        self.runner.update(fields, updated=time.time())
        self._annotate(runner=self.runner)

    def _set_outcome(self, name, **fields):
        rec = self.outcomes.setdefault(name, {})
        if fields.get("status") == "running":
            rec.clear()
        rec.update(fields)
        if "tail" in rec and rec["tail"]:
            rec["tail"] = rec["tail"][-(TAIL_ANNOTATED if rec.get("status") == "ok" else TAIL_BYTES):]
        self._annotate(outcomes=self.outcomes)

    def _lock_path(self):
        return self.socket_path + ".run.lock"

    def _lock(self):
        """flock the runner's lock file, which the holder removes when it is done: a file
        locked but no longer at the path (removed, or replaced, by a runner that ended
        meanwhile) does not count, so take the one that is there."""
        path = self._lock_path()
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError:
                return None  # no lock where we may not write: the daemon still refuses a second saga
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    other = os.pread(fd, 32, 0).decode().strip()
                finally:
                    os.close(fd)
                raise _Finish(RunResult("error", EXIT_FAILED, f"another 'saga run' (pid {other or '?'}) is driving "
                                                              "this workspace; wait for it to end or stop it first"))
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _unlock(self, fd):
        try:
            os.unlink(self._lock_path())  # still ours: we hold the lock on the file at the path
        except OSError:
            pass
        os.close(fd)

    def _result(self, status, code, message) -> RunResult:
        return RunResult(status, code, message, self.saga_id, json.loads(json.dumps(self.outcomes)))

    def _live(self, st=None, floor=None):
        st = st or self._call("saga.status")
        floor = self.floor if floor is None else floor
        return [s for s in st["steps"] if s["state"] in ("open", "done", "compensating") and s["index"] > floor]

    # ------------------------------------------------------------------ entry

    def run(self, resume=False) -> RunResult:
        try:
            lock = self._lock()
        except _Finish as f:
            self.emit("end", status=f.result.status, exit_code=f.result.exit_code, message=f.result.message)
            return f.result
        try:
            try:
                if resume:
                    self._start_resumed()
                else:
                    self._start_fresh()
                for pos in range(self.next_pos, len(self.defn.steps)):
                    self._run_step(pos)
                result = self._finish()
            except _Finish as f:
                result = f.result
            except _DaemonLost:
                result = self._daemon_lost()
            except KeyboardInterrupt:
                result = self._interrupted()
            except ClientError as exc:
                code = {"conflict": EXIT_CONFLICT, "stuck": EXIT_STUCK, "no-daemon": EXIT_NO_DAEMON}.get(exc.code, 1)
                result = self._result("error", code, exc.message)
        finally:
            if lock is not None:
                self._unlock(lock)
        self.emit("end", status=result.status, exit_code=result.exit_code, message=result.message)
        return result

    def _daemon_lost(self) -> RunResult:
        if self.daemon_pid is None:
            return self._result("daemon-lost", EXIT_NO_DAEMON,
                                f"no daemon serves the workspace ({self.socket_path}); mount it "
                                "(overlayd mount BASE MOUNTPOINT), then run this again")
        where = ""
        if self._current is not None:
            pos, index = self._current
            where = f" during step {pos + 1} {self.defn.steps[pos].name!r} (its command was stopped)"
        return self._result("daemon-lost", EXIT_NO_DAEMON,
                            f"the workspace's daemon stopped{where}; once it is mounted again "
                            f"(overlayd mount BASE {self.mountpoint or 'MOUNTPOINT'}), continue with: {self.resume_hint}")

    def _interrupted(self) -> RunResult:
        try:
            if self._current is not None:
                pos, index = self._current
                self._set_outcome(self.defn.steps[pos].name, status="interrupted", index=index, ended=time.time())
            if self.runner.get("phase") == "running":
                self._set_runner(phase="interrupted")
        except (ClientError, _DaemonLost, OSError):
            pass
        return self._result("interrupted", EXIT_INTERRUPTED,
                            f"interrupted; the saga is left as it is; continue with: {self.resume_hint}")

    def _status_info(self):
        info = self._call("status")
        self.mountpoint = info["mountpoint"]
        self.state_dir = info.get("state_dir")
        self.daemon_pid = info.get("pid")

    def _start_fresh(self):
        self._status_info()
        if self.attach:
            st = self._call("saga.status")
            if st["saga"] is None:
                raise _Finish(self._result("error", EXIT_FAILED, "no saga is active to run the steps in"))
            self.saga_id = st["saga"]["id"]
            live = [s for s in st["steps"] if s["state"] in ("open", "done")]
            self.floor = live[-1]["index"] if live else 0
        else:
            try:
                rec = self._call("saga.begin", name=self.defn.name, budgets=self.defn.budgets or None)["saga"]
            except ClientError as exc:
                if exc.code != "saga-active":
                    raise
                st = self._call("saga.status")
                saga = st["saga"] or {}
                mine = (saga.get("annotations") or {}).get("definition", {}).get("sha256") == self.defn.sha256
                hint = (f"it was started from this definition: continue it with: {self.resume_hint}, or abort it "
                        "with: saga abort" if mine else "commit or abort it first (saga commit / saga abort)")
                raise _Finish(self._result("error", EXIT_FAILED, f"{exc.message.split(';')[0]}; {hint}")) from None
            self.saga_id = rec["id"]
        self.runner = {"phase": "running", "pid": os.getpid(), "token": self.token, "floor": self.floor,
                       "started": time.time(), "commit": self.commit}
        self._annotate(definition={"sha256": self.defn.sha256, "text": self.defn.text, "file": self.defn.file,
                                   "name": self.defn.name},
                       runner={**self.runner, "updated": time.time()}, outcomes={})
        self.next_pos = 0
        self.emit("saga.begin", name=self.defn.name, definition=self.defn.sha256, file=self.defn.file,
                  steps=len(self.defn.steps), resume=False, mountpoint=self.mountpoint)

    # ------------------------------------------------------------------ resume

    def _wait_idle(self, timeout=600.0):
        """The daemon may be finishing its recovery (rolling back the step open at a crash)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._call("saga.status")
            if not st.get("busy"):
                return st
            if time.monotonic() > deadline:
                raise _Finish(self._result("error", EXIT_FAILED, f"the daemon stays busy ({st['busy']}); try later"))
            time.sleep(0.1)

    def _start_resumed(self):
        self._status_info()
        st = self._wait_idle()
        saga = st["saga"]
        if saga is None:
            mine = [s for s in self._call("saga.list")["sagas"]
                    if (s.get("annotations") or {}).get("definition", {}).get("sha256") == self.defn.sha256]
            if mine and mine[-1]["state"] == "committed":
                self.saga_id = mine[-1]["id"]
                raise _Finish(self._result("committed", EXIT_OK, f"nothing to resume: saga {mine[-1]['id']} "
                                                                  f"{self.defn.name!r} from this definition is "
                                                                  "already committed"))
            if mine:
                raise _Finish(self._result("error", EXIT_FAILED,
                                           f"nothing to resume: saga {mine[-1]['id']} {self.defn.name!r} from this "
                                           f"definition ended {mine[-1]['state']}; run it again without --resume"))
            raise _Finish(self._result("error", EXIT_FAILED, f"nothing to resume: no saga is active in "
                                                             f"{self.mountpoint}; run it without --resume"))
        self.saga_id = saga["id"]
        ann = saga.get("annotations") or {}
        recorded = ann.get("definition")
        if not recorded:
            raise _Finish(self._result("error", EXIT_FAILED,
                                       f"saga {saga['id']} {saga['name']!r} was not started by 'saga run' "
                                       "(no definition in its journal); drive it with saga step/commit/abort"))
        if recorded.get("sha256") != self.defn.sha256:
            raise _Finish(self._result(
                "error", EXIT_FAILED,
                f"the definition changed since saga {saga['id']} {saga['name']!r} began (sha256 "
                f"{recorded.get('sha256', '?')[:12]} in the journal, {self.defn.sha256[:12]} now): refusing to "
                "resume. Resume with the original definition (its text: saga status --json, "
                "saga.annotations.definition.text), or end the saga (saga abort) and run the new one"))
        self.outcomes = ann.get("outcomes") or {}
        previous = ann.get("runner") or {}
        self.floor = int(previous.get("floor") or 0)
        self.attach = self.attach or bool(self.floor)
        kill_token(previous.get("token"))
        self.runner = {**previous, "pid": os.getpid(), "token": self.token, "resumed": time.time(),
                       "commit": self.commit}
        if saga["state"] in ("stuck", "compensating"):
            self.emit("saga.retry", state=saga["state"], error=saga.get("error"))
            try:
                self._call("saga.retry", timeout=None)
            except StuckError as exc:
                self._set_runner()
                raise _Finish(self._result("stuck", EXIT_STUCK, f"{exc.message} (then: {self.resume_hint})")) from None
        phase = previous.get("phase")
        self._set_runner()
        live = self._live()
        prefix = 0
        for s, d in zip(live, self.defn.steps):
            o = self.outcomes.get(d.name) or {}
            if s["name"] == d.name and o.get("status") == "ok" and o.get("index") == s["index"]:
                prefix += 1
            else:
                break
        self.completed = [(i, live[i]["index"]) for i in range(prefix)]
        self.next_pos = prefix
        self.emit("saga.begin", name=self.defn.name, definition=self.defn.sha256, file=self.defn.file,
                  steps=len(self.defn.steps), resume=True, mountpoint=self.mountpoint, phase=phase,
                  complete=[self.defn.steps[i].name for i in range(prefix)])
        if phase in ("compensating", "aborted"):
            self._compensate_to(int(previous.get("target") or self.floor), reason="compensate")
            self._after_compensation(previous.get("failed"), previous.get("failure"))
        if prefix < len(self.defn.steps):
            d = self.defn.steps[prefix]
            o = self.outcomes.get(d.name) or {}
            if d.pivot and o.get("status") in ("running", "interrupted") and phase != "stuck" \
                    and d.on_failure != "retry":
                self._set_outcome(d.name, status="interrupted")
                msg = (f"step {prefix + 1} {d.name!r} was interrupted, and it cannot be compensated "
                       "(compensatable = \"none\"): its effects outside the workspace may be half done. Check them; "
                       f"then run it again with: {self.resume_hint}; or end the saga with: saga abort")
                self._set_runner(phase="stuck", failed=d.name, message=msg)
                raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        keep = self.completed[-1][1] if self.completed else self.floor
        if any(s["index"] > keep for s in live):
            self._compensate_to(keep, reason="resume")
        self._set_runner(phase="running", failed=None, message=None, target=None)

    # ------------------------------------------------------------------ steps

    def _pivot(self):
        for pos, index in reversed(self.completed):
            if self.defn.steps[pos].pivot:
                return pos, index
        return None

    def _compensate_command(self, d: StepDef):
        if not isinstance(d.compensate, str):
            return None
        exports = dict(d.env)
        if self.defn.file:
            exports = {"SAGA_DEFINITION": self.defn.file, "SAGA_DEFINITION_DIR": self.defn.directory, **exports}
        if not exports:
            return d.compensate
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()) + "; " + d.compensate

    def _run_step(self, pos):
        d = self.defn.steps[pos]
        attempts = 1 + d.retries
        for attempt, pause in retry.schedule(attempts):
            rec = self._call("saga.step", name=d.name, compensate=self._compensate_command(d), timeout=d.timeout,
                             max_bytes=d.max_bytes, max_files=d.max_files, max_spins=d.max_spins, policy="step",
                             retries=d.compensate_retries,
                             compensate_timeout=d.compensate_timeout)["step"]
            index = rec["index"]
            self._current = (pos, index)
            self._set_outcome(d.name, status="running", index=index, attempt=attempt, position=pos + 1,
                              started=time.time())
            self.emit("step.start", step=d.name, position=pos + 1, of=len(self.defn.steps), index=index,
                      attempt=attempt, attempts=attempts)
            res = self._attempt(d, pos, rec, attempt)
            fields = dict(seconds=round(res.seconds, 3), bytes=res.bytes, files=res.files, tail=res.tail,
                          ended=time.time())
            if res.ok:
                self._set_outcome(d.name, status="ok", **fields)
                self.emit("step.done", step=d.name, position=pos + 1, index=index, attempt=attempt, **fields)
                self.completed.append((pos, index))
                self._current = None
                return
            self._set_outcome(d.name, status="failed", exit_status=res.status, reason=res.reason, detail=res.detail,
                              **fields)
            self.emit("step.failed", step=d.name, position=pos + 1, index=index, attempt=attempt, attempts=attempts,
                      exit_status=res.status, reason=res.reason, detail=res.detail, will_retry=attempt < attempts,
                      **fields)
            self._current = None
            if pause is not None:
                self._compensate_to(self.completed[-1][1] if self.completed else self.floor, reason="retry")
                time.sleep(pause)
        self._on_failure(pos, d, res)

    def _describe(self, pos, d, res) -> str:
        if res.reason == "exit":
            how = f"exit status {res.status}"
        else:
            how = res.detail or res.reason
        tries = f" ({1 + d.retries} attempts)" if d.retries else ""
        return f"step {pos + 1} {d.name!r} failed{tries}: {how}"

    def _on_failure(self, pos, d, res):
        what = self._describe(pos, d, res)
        if d.on_failure == "stop":
            msg = (f"{what}; on_failure = \"stop\": the saga is left as it is, with the failed step open for "
                   f"inspection (saga diff, saga status). Then: {self.resume_hint} (runs the step again), "
                   "or saga abort")
            self._set_runner(phase="stopped", failed=d.name, message=msg)
            raise _Finish(self._result("stopped", EXIT_STOPPED, msg))
        if d.on_failure == "retry":
            kept = self._kept_text()
            msg = (f"{what}; on_failure = \"retry\" goes forward only: the failed attempt is rolled back, "
                   f"{kept} kept. Fix the cause, then: {self.resume_hint}; or end it with: saga abort")
            self._set_runner(phase="stuck", failed=d.name, message=msg, target=None)
            self._compensate_to(self._keep_index(), reason="retry")
            raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        pivot = self._pivot()
        target = max(pivot[1] if pivot else 0, self.floor)
        self._set_runner(phase="compensating", failed=d.name, target=target, failure=what)
        self._compensate_to(target, reason="compensate")
        self._after_compensation(d.name, what)

    def _keep_index(self):
        return self.completed[-1][1] if self.completed else self.floor

    def _kept_text(self):
        if not self.completed:
            return "no earlier step is"
        return "step(s) " + ", ".join(f"{p + 1} {self.defn.steps[p].name!r}" for p, _ in self.completed) + " are"

    def _after_compensation(self, failed, what=None):
        what = what or (f"step {failed!r} failed" if failed else "a step failed")
        pivot = self._pivot()
        partial = [n for n, o in self.outcomes.items() if o.get("status") == "compensated"
                   and self.by_name.get(n) and self.by_name[n].compensatable == "partial"]
        note = (" Compensated only partially (compensatable = \"partial\"): " + ", ".join(partial) + "."
                if partial else "")
        if pivot is not None:
            ppos, pindex = pivot
            msg = (f"{what}, after the pivot step {ppos + 1} {self.defn.steps[ppos].name!r} (compensatable = "
                   f"\"none\"), which cannot be undone: the steps after it are compensated, the saga is kept at "
                   f"step {ppos + 1} and needs a person.{note} Fix the cause and go forward: {self.resume_hint}; "
                   "or keep what is done: saga commit; or undo the rest too: saga abort")
            self._set_runner(phase="stuck", message=msg, target=None)
            raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        if self.attach:
            msg = f"{what}; the definition's steps are compensated.{note}"
            self._set_runner(phase="failed", message=msg, target=None)
            raise _Finish(self._result("aborted", EXIT_FAILED, msg))
        msg = f"{what}; every step is compensated and the saga is aborted: the base is untouched.{note}"
        self._set_runner(phase="aborted", message=msg, target=None)
        r = self._call("saga.abort", timeout=None)
        self.emit("aborted", compensated=r.get("compensated", []))
        raise _Finish(self._result("aborted", EXIT_FAILED, msg))

    def _compensate_to(self, target, reason):
        """Compensate and drop every live step above *target*, newest first, one at a time (a
        callable compensation is called right before its step's layer is dropped)."""
        live = self._live(floor=0)
        for n, s in reversed(list(enumerate(live))):
            if s["index"] <= target:
                break
            prev = live[n - 1]["index"] if n > 0 else 0
            d = self.by_name.get(s["name"])
            if d is not None and callable(d.compensate):
                self._call_compensation(d, s)
            try:
                self._call("saga.rollback", to=prev, timeout=None)
            except StuckError as exc:
                raise _Finish(self._result("stuck", EXIT_STUCK, f"{exc.message}; then continue with: "
                                                                 f"{self.resume_hint}")) from None
            o = self.outcomes.get(s["name"])
            if o is not None and o.get("index") == s["index"]:
                # a failed step stays "failed" (with the time it was compensated)
                status = o["status"] if o.get("status") == "failed" else "compensated"
                self._set_outcome(s["name"], status=status, compensated=reason, compensated_at=time.time())
            self.completed = [(p, i) for p, i in self.completed if i < s["index"]]
            self.emit("compensated", step=s["name"], index=s["index"], reason=reason,
                      partial=bool(d and d.compensatable == "partial"))

    def _resolve_conflicts(self, conflicts) -> str | None:
        """on_conflict = "merge" or "theirs": resolve every conflicting path that way; None when
        all are resolved, else why not (the saga stays as the resolution left it)."""
        how = self.defn.on_conflict
        paths = [c["path"] for c in conflicts]
        if any(c.get("reason") for c in conflicts):
            return "the commit was refused for a reason no resolution settles: " + \
                "; ".join(c["reason"] for c in conflicts if c.get("reason"))
        if how == "merge":
            cannot = [c["path"] for c in conflicts if not c.get("mergeable")]
            if cannot:
                return (f"on_conflict = \"merge\" cannot merge {', '.join(quote_path(p) for p in cannot[:10])} "
                        "(not text files with a kept base version): resolve with --theirs or --ours")
        try:
            r = self._call("saga.resolve", paths=paths, how=how)
        except ClientError as exc:
            return f"saga resolve --{how} failed: {exc.message}"
        self.emit("resolved", how=how, resolved=r.get("resolved"), step=r.get("step"))
        if r.get("unresolved"):
            return (f"the merge left conflict markers in {', '.join(quote_path(p) for p in r['unresolved'][:10])}: "
                    "edit them in a step, then: saga resolve PATH --ours")
        return None

    def _call_compensation(self, d, s):
        attempts = d.compensate_retries or 3
        for attempt, pause in retry.schedule(attempts):
            try:
                d.compensate(self._context(d, self.position.get(d.name, -1), s["index"], attempt))
                return
            except Exception as exc:  # noqa: BLE001 - a failed compensation makes the saga stuck
                err = f"{type(exc).__name__}: {exc}"
                if pause is None:
                    raise _Finish(self._result(
                        "stuck", EXIT_STUCK, f"the compensation of step {s['index']} {d.name!r} failed {attempts} "
                                             f"times (last: {err}); the saga is stuck: fix the cause, then "
                                             f"{self.resume_hint}")) from None
                time.sleep(pause)

    def _finish(self) -> RunResult:
        n = len(self.defn.steps)
        if self.attach:
            self._set_runner(phase="done")
            return self._result("done", EXIT_OK, f"all {n} steps done")
        if not self.commit:
            self._set_runner(phase="done")
            self.emit("saga.open")
            return self._result("open", EXIT_OK,
                                f"all {n} steps done; the saga is left open for review: saga diff, then saga commit "
                                "(or saga abort)")
        self._set_runner(phase="committing")
        rounds = 0
        while True:
            try:
                r = self._call("saga.commit", timeout=None)
                break
            except ConflictError as exc:
                rounds += 1
                why = exc.message
                if self.defn.on_conflict != "stop" and rounds <= 3:
                    why = self._resolve_conflicts(exc.conflicts)
                    if why is None:
                        continue  # resolved: commit again (a commit into the base meanwhile may conflict anew)
                self._set_runner(phase="done", message=why)
                paths = ", ".join(quote_path(c["path"]) for c in exc.conflicts[:10])
                raise _Finish(self._result("conflict", EXIT_CONFLICT,
                                           f"all {n} steps done, but {why} ({paths}). Resolve (saga resolve PATH "
                                           f"--merge|--theirs|--ours), then: saga commit (or {self.resume_hint}); "
                                           "or saga abort")) from None
        self.emit("committed", changes=r.get("changes"), count=r.get("count"), seconds=r.get("seconds"))
        return self._result("committed", EXIT_OK, f"all {n} steps done; saga {self.saga_id} {self.defn.name!r} "
                                                  f"committed: {r.get('count')} change(s)")
