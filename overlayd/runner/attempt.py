"""One attempt of a definition step: its context, its process (or callable), its outcome."""

import dataclasses
import os
import queue
import signal
import stat
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..client import ClientError
from .schema import EXIT_FAILED, TAIL_BYTES

# ---------------------------------------------------------------------- running


@dataclasses.dataclass
class StepContext:
    """What a Python callable step gets: where the workspace is and which attempt this is."""

    workspace: Path
    saga_id: int
    saga_name: str
    step: str
    index: int  # the saga step's 1-based index in the daemon (grows with retries)
    position: int  # 1-based position in the definition
    attempt: int
    env: dict


@dataclasses.dataclass
class RunResult:
    """How a run ended. ``status``: committed, open (left for review, --no-commit), done (steps
    done in an attached saga), aborted (a step failed; every step compensated), stuck (a person
    must decide: after a pivot, after retries, or a compensation failing), stopped
    (on_failure = "stop"), conflict (the commit was refused), interrupted, daemon-lost, error."""

    status: str
    exit_code: int
    message: str
    saga_id: int | None = None
    outcomes: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def raise_for_status(self):
        if not self.ok:
            raise RunFailed(self)
        return self


class RunFailed(ClientError):
    """A saga run did not finish; ``.result`` says how it ended."""

    def __init__(self, result: RunResult):
        super().__init__(result.status, result.message, {"exit_code": result.exit_code})
        self.result = result


class _Finish(Exception):
    def __init__(self, result: RunResult):
        self.result = result


class _DaemonLost(Exception):
    pass


def _child_setup():
    """In the step's shell before exec: die with the runner (the shell itself; what it started
    is found by its OVERLAYD_RUN_TOKEN on --resume)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def kill_token(token: str) -> int:
    """SIGKILL every process whose environment carries OVERLAYD_RUN_TOKEN=token (leftovers of a
    runner that died). Returns how many were signalled."""
    if not token:
        return 0
    needle = f"OVERLAYD_RUN_TOKEN={token}".encode()
    total = 0
    for _ in range(5):
        found = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needle in env:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    found += 1
                except OSError:
                    pass
        total += found
        if not found:
            break
        time.sleep(0.05)
    return total


def measure_layer(path) -> tuple[int, int] | None:
    """(bytes of regular files, entries that are not directories) in a layer directory."""
    size = files = 0
    try:
        os.stat(path)
    except OSError:
        return None
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: None):
        for n in filenames:
            files += 1
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return size, files


def human_size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _Tail:
    def __init__(self, limit=TAIL_BYTES):
        self.limit = limit
        self.data = b""

    def add(self, chunk: bytes):
        self.data = (self.data + chunk)[-self.limit:]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclasses.dataclass
class _Attempt:
    ok: bool
    status: Any = None  # exit status (int) or None
    reason: str = "exit"  # exit, timeout, budget, exception, interrupted
    tail: str = ""
    seconds: float = 0.0
    bytes: int | None = None
    files: int | None = None
    detail: str = ""


class AttemptMixin:
    """The Coordinator's part that runs one attempt of a step (see coordinator.Coordinator)."""

    def _context(self, d, pos, index, attempt) -> StepContext:
        return StepContext(workspace=Path(self.mountpoint), saga_id=self.saga_id, saga_name=self.defn.name,
                           step=d.name, index=index, position=pos + 1, attempt=attempt, env=self._env(d, pos, index,
                                                                                                     attempt))

    def _env(self, d, pos, index, attempt) -> dict:
        env = {**os.environ, **d.env, "SAGA_ID": str(self.saga_id), "SAGA_NAME": self.defn.name,
               "STEP_NAME": d.name, "STEP_INDEX": str(index), "STEP_POSITION": str(pos + 1),
               "ATTEMPT": str(attempt), "WORKSPACE": str(self.mountpoint), "SAGA_WORKSPACE": str(self.mountpoint),
               "OVERLAYD_RUN_TOKEN": self.token}
        if self.defn.file:
            env.update(SAGA_DEFINITION=self.defn.file, SAGA_DEFINITION_DIR=self.defn.directory)
        return env

    # ------------------------------------------------------------------ one attempt

    def _layer_path(self, rec):
        if not self.state_dir or not rec.get("layer"):
            return None
        return os.path.join(self.state_dir, "layers", rec["layer"])

    def _daemon_state(self):
        """(alive, writable) of the daemon; a daemon that answers slowly counts as alive."""
        try:
            info = self._call("status", timeout=10.0, busy_wait=False)
        except _DaemonLost:
            return False, None
        except ClientError:
            return True, None
        return info.get("pid") == self.daemon_pid, info.get("writable")

    def _settle(self, index):
        """saga.status once the daemon is done with the step: a budget cut seals the layer at
        once and rolls the step back in the background."""
        deadline = time.monotonic() + 3600
        sealed_since = None
        while True:
            st = self._call("saga.status")
            saga = st["saga"]
            step = [s for s in st["steps"] if s["index"] == index]
            pending = saga is not None and saga["id"] == self.saga_id and step and step[0]["state"] == "open" \
                and st.get("writable") is False
            if not st.get("busy") and not pending:
                return st
            if pending and not st.get("busy"):
                sealed_since = sealed_since or time.monotonic()
                if time.monotonic() - sealed_since > 5.0:
                    return st  # sealed for some other reason
            if time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def _check_cut(self, d, index, res: _Attempt) -> _Attempt:
        """Did the daemon cut the step (a budget) or end the saga while the attempt ran?"""
        st = self._settle(index)
        saga = st["saga"]
        if saga is None or saga["id"] != self.saga_id:
            rec = [s for s in self._call("saga.list")["sagas"] if s["id"] == self.saga_id]
            cut = (rec[0].get("cut") if rec else None) or {}
            state = rec[0]["state"] if rec else "gone"
            why = f" ({cut.get('reason')} exceeded)" if cut.get("reason") else ""
            raise _Finish(self._result("aborted", EXIT_FAILED,
                                       f"the daemon ended the saga while step {d.name!r} ran: it is {state}{why}"))
        cut = saga.get("cut") or {}
        if cut.get("step") == index:
            reason = cut.get("reason", "budget")
            budget = ([s for s in st["steps"] if s["index"] == index] or [{}])[0].get("budgets") or {}
            if reason == "budget:timeout":
                return dataclasses.replace(res, ok=False, reason="timeout", status=124,
                                           detail=f"timed out after {budget.get('timeout', d.timeout):g} s "
                                                  "(the daemon cut the step)")
            what = {"budget:bytes": f"more than max_bytes = {budget.get('max_bytes')} bytes written",
                    "budget:files": f"more than max_files = {budget.get('max_files')} paths changed",
                    "budget:spinning": f"a file rewritten unchanged max_spins = {budget.get('max_spins')} times"}
            return dataclasses.replace(res, ok=False, reason="budget",
                                       detail=f"over budget: {what.get(reason, reason)} (the daemon cut the step)")
        step = [s for s in st["steps"] if s["index"] == index]
        if res.ok and (not step or step[0]["state"] != "open"):
            return dataclasses.replace(res, ok=False, reason="rolled-back",
                                       detail="the step was rolled back while it ran")
        return res

    def _attempt(self, d, pos, rec, attempt) -> _Attempt:
        if callable(d.run):
            res = self._attempt_callable(d, pos, rec, attempt)
        else:
            res = self._attempt_command(d, pos, rec, attempt)
        return self._check_cut(d, rec["index"], res)

    def _attempt_callable(self, d, pos, rec, attempt) -> _Attempt:
        t0 = time.monotonic()
        try:
            d.run(self._context(d, pos, rec["index"], attempt))
            res = _Attempt(ok=True)
        except Exception as exc:  # noqa: BLE001 - a failing step
            res = _Attempt(ok=False, reason="exception", detail=f"{type(exc).__name__}: {exc}",
                           tail=traceback.format_exc()[-TAIL_BYTES:])
        res.seconds = time.monotonic() - t0
        measured = measure_layer(self._layer_path(rec)) if self._layer_path(rec) else None
        if measured:
            res.bytes, res.files = measured
        return res

    def _attempt_command(self, d, pos, rec, attempt) -> _Attempt:
        env = self._env(d, pos, rec["index"], attempt)
        layer = self._layer_path(rec)
        proc = subprocess.Popen(["/bin/sh", "-c", d.run], cwd=self.mountpoint, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup)
        lines = queue.Queue()

        def reader():
            try:
                for chunk in iter(lambda: proc.stdout.readline(65536), b""):
                    lines.put(chunk)
            finally:
                lines.put(None)

        threading.Thread(target=reader, daemon=True, name="step-output").start()

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        tail = _Tail()
        t0 = time.monotonic()
        next_check = t0 + self.progress_interval
        last_line = ""
        measured = None
        reason, detail = "exit", ""
        eof = False
        exited_at = None
        try:
            while True:
                try:
                    chunk = lines.get(timeout=0.1)
                except queue.Empty:
                    chunk = b""
                if chunk is None:
                    eof = True
                elif chunk:
                    tail.add(chunk)
                    line = chunk.decode("utf-8", "replace").rstrip("\r\n")
                    last_line = line or last_line
                    self.emit("step.output", step=d.name, position=pos + 1, line=line)
                    continue
                now = time.monotonic()
                if proc.poll() is not None:
                    if eof:
                        break
                    exited_at = exited_at or now
                    if now - exited_at > 1.0:
                        kill()  # background processes still hold its output open
                # the daemon enforces the step's timeout (it seals the layer); this is the backstop
                # that stops the command itself
                if d.timeout is not None and now - t0 > d.timeout + 1.0 and reason == "exit":
                    reason, detail = "timeout", f"timed out after {d.timeout:g} s"
                    kill()
                if now >= next_check:
                    alive, writable = self._daemon_state()
                    if not alive:
                        kill()
                        proc.wait()
                        raise _DaemonLost()
                    if writable is False and reason == "exit":
                        reason, detail = "cut", "the daemon sealed the step's layer"  # a budget cut
                        kill()
                    w0 = time.monotonic()
                    measured = measure_layer(layer) if layer else None
                    spent = time.monotonic() - w0
                    next_check = now + max(self.progress_interval, 10 * spent)
                    self.emit("step.progress", step=d.name, position=pos + 1, of=len(self.defn.steps),
                              elapsed=round(now - t0, 1), bytes=measured[0] if measured else None,
                              files=measured[1] if measured else None, line=last_line)
        except BaseException:
            kill()
            proc.wait()
            raise
        status = proc.wait()
        kill()  # whatever it left running in the background
        if status < 0:
            status = 128 - status
        if reason == "timeout":
            status = 124
        measured = measure_layer(layer) if layer else None
        res = _Attempt(ok=(reason == "exit" and status == 0), status=status, reason=reason, tail=tail.text(),
                       seconds=time.monotonic() - t0, detail=detail)
        if measured:
            res.bytes, res.files = measured
        return res

    # ------------------------------------------------------------------ the end
