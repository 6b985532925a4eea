"""Compensation commands: one attempt at a time, held at a gate until its process is journaled,
retried with overlayd.retry's back-off, and an attempt left by a dead daemon waited for or killed first
(invariant 25)."""

import logging
import os
import signal
import subprocess
import tempfile
import time

import trio

from .. import osutil, retry
from .errors import EngineError
from .records import now

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 3
DEFAULT_COMP_TIMEOUT = 60.0  # with 3 attempts, a hung compensation holds the workspace ~3 min
STDERR_TAIL = 4096
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


class CompensationMixin:
    """SagaEngine's running of a step's compensation (uses ws, steps and ``compensation``,
    the attempt running now, which 'saga status' shows)."""

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
        for attempt, pause in retry.schedule(retries):
            start = now()
            # the latest moment this compensation can end: what 'saga status' shows as time left
            worst = start + timeout * (retries - attempt + 1) + retry.pauses_left(attempt, retries)
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
            if pause is not None:
                await trio.sleep(pause)
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
                raise EngineError("orphan", f"the compensation of step {step['index']} started by a previous daemon "
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
