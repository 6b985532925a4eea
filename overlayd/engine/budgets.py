"""Fish-or-cut-bait budgets: limits on a step (or a whole saga) that cut it automatically.

A budget is a dict with any of ``timeout`` (seconds of wall time), ``max_bytes`` (bytes
written), ``max_files`` (distinct paths changed), ``max_spins`` (the same file rewritten with
identical content that many times in a row) and ``policy`` (``"step"``: roll back the step;
``"saga"``: abort the saga). Workspace-wide defaults live in ``STATE/budgets.json``::

    {"step": {"timeout": 600, "max_bytes": 1073741824}, "saga": {"timeout": 7200}}

The filesystem calls the engine after every write, change and release of a handle that wrote
(BudgetMixin); a budget exceeded seals the top layer at once and cuts in the background
(invariant 21).
"""

import hashlib
import json
import logging
import os
import time

import trio

from overlayd.journal import JournalError

from .errors import EngineError
from .records import now

log = logging.getLogger(__name__)

KEYS = ("timeout", "max_bytes", "max_files", "max_spins", "policy")
SPIN_HASH_LIMIT = 8 << 20  # files larger than this are not hashed for spin detection


#: the largest values that make sense (inf, nan and 1e308 are refused: they mean a typo)
LIMITS = {"timeout": 7 * 86400}


def validate(budget: dict | None, where: str) -> dict:
    out = {}
    for k, v in (budget or {}).items():
        if v is None:
            continue
        if k not in KEYS:
            raise ValueError(f"{where}: unknown budget {k!r} (known: {', '.join(KEYS)})")
        if k == "policy":
            if v not in ("step", "saga"):
                raise ValueError(f"{where}: policy must be 'step' or 'saga', not {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= LIMITS.get(k, 2 ** 63):
            raise ValueError(f"{where}: {k} must be a positive number"
                             + (f" of at most {LIMITS[k]:g}" if k in LIMITS else "") + f", not {v!r}")
        out[k] = v
    return out


def load_defaults(state_dir) -> dict:
    path = os.path.join(state_dir, "budgets.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"step": {}, "saga": {}}
    return {"step": validate(data.get("step"), f"{path}: step"), "saga": validate(data.get("saga"), f"{path}: saga")}


class Meter:
    """What one step (or one saga) has done so far."""

    def __init__(self, budget: dict):
        self.budget = budget
        self.bytes = 0
        self.paths = set()
        self.spins = {}  # node ino -> (digest, count)

    def over(self) -> str | None:
        """The reason the budget is exceeded (``budget:bytes`` ...), or None."""
        b = self.budget
        if "max_bytes" in b and self.bytes > b["max_bytes"]:
            return "budget:bytes"
        if "max_files" in b and len(self.paths) > b["max_files"]:
            return "budget:files"
        if "max_spins" in b and any(c >= b["max_spins"] for _, c in self.spins.values()):
            return "budget:spinning"
        return None

    def rewrite(self, ino: int, fd: int) -> None:
        """A handle that wrote was closed: count identical rewrites in a row."""
        if "max_spins" not in self.budget:
            return
        size = os.fstat(fd).st_size
        if size > SPIN_HASH_LIMIT:
            self.spins.pop(ino, None)
            return
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # the handle may be write-only
        try:
            digest = hashlib.sha256(os.pread(rfd, size, 0)).digest()
        finally:
            os.close(rfd)
        prev = self.spins.get(ino)
        self.spins[ino] = (digest, prev[1] + 1 if prev and prev[0] == digest else 0)


class BudgetMixin:
    """SagaEngine's budgets: meters fed by the filesystem's callbacks, time budgets, the cut.
    Uses the engine's step_meter, saga_meter, cutting, cut_step, lock and _nursery."""

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
        if self.cutting is not None or self._nursery is None:
            return
        sid = self.active_id()
        live = self.live_steps(sid) if sid else []
        if not live or live[-1]["state"] != "open":
            return
        self.cutting = reason
        self.cut_step = live[-1]["index"]
        self.fs.seal_top()
        log.warning("saga %d step %d: %s exceeded; cutting (%s)", sid, live[-1]["index"], reason, policy)
        self._nursery.start_soon(self._cut, sid, live[-1]["index"], reason, policy)

    async def _cut(self, sid: int, index: int, reason: str, policy: str) -> None:
        try:
            async with self.lock.wait_hold("cut a step over budget"):
                saga = self.active()
                live = self.live_steps(sid)
                if saga is None or saga["id"] != sid or not live or live[-1]["index"] != index \
                        or live[-1]["state"] != "open":
                    return
                self.audit.seal()

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
        except EngineError as exc:
            log.error("cutting step %d: %s", index, exc.message)
        except JournalError as exc:  # (a background task: an exception here would end the daemon)
            log.error("cutting step %d: %s; the step stays sealed: roll it back with: saga rollback", index, exc)
        finally:
            self.cutting = None

    def _refuse_while_cutting(self) -> None:
        """No stack operation may slip in between a budget trigger and its cut (invariant 21):
        the cut waits for the operation in flight, and one arriving meanwhile is refused."""
        if self.cutting is not None:
            raise EngineError("cutting", f"step {self.cut_step} is being cut by its budget ({self.cutting}); "
                                         "wait for the cut to finish (see: saga status), then try again")

    def _exclusive(self, name: str):
        """The stack lock for the saga operation *name*. While a budget cut waits for the lock or
        holds it, a refusal says so (``cutting``, not ``busy``): nothing slips in before the cut."""
        if self.cutting is not None and self.lock.locked():
            self._refuse_while_cutting()
        return self.lock.hold(name)

    def _arm_timer(self, kind: str, sid: int, index: int | None, deadline: float) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._timer, kind, sid, index, deadline)

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
