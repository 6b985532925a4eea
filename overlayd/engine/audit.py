"""The audit trail: every change the filesystem reports, with the process that made it,
journaled as ``op`` events in batches (every second, before reading the log, at shutdown),
never on a step transition's latency."""

import logging
import os
import time

import trio

from overlayd.journal import JournalFull, encode_event

log = logging.getLogger(__name__)

AUDIT = os.environ.get("OVERLAYD_AUDIT", "1") != "0"  # 0: no audit trail (to measure its cost)


class AuditTrail:
    """*transact(fn, essential)*: the workspace's journal write (async); *where()*: (saga id,
    step index or None) the changes of now belong to, or None without an active saga;
    *context()*: the FUSE request context of the change (pid, uid), or None."""

    def __init__(self, transact, where, context):
        self._transact = transact
        self._where = where
        self._context = context
        self.buffer = []  # changes not yet journaled: flushed in batches
        self.sealed = []  # [(saga, step, batch)] closed at step transitions, not yet journaled
        self.writers = {}  # path -> {"pid", "uid", "comm"} of the last change, active saga
        self._flushing = trio.Lock()
        self._comms = {}

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

    def record(self, kind: str, path: str) -> None:
        if not AUDIT:
            return
        ctx = self._context()
        who = {"pid": ctx.pid, "uid": ctx.uid, "comm": self._comm(ctx.pid)} if ctx is not None else {}
        self.buffer.append({"ts": time.time(), "op": kind, "path": path, **who})
        if who:
            self.writers[path] = who

    def seal(self) -> None:
        """Close the buffered changes as a batch of the saga and step they belong to. Step
        transitions call this (O(1) in the batch's size) instead of journaling the batch on
        their own latency; the audit loop journals it within a second."""
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        where = self._where()
        if where is None:
            return
        self.sealed.append((*where, batch))

    async def flush(self, essential: bool = False) -> None:
        """Journal the buffered changes in one transaction. They are encoded first, on a worker
        thread but outside the journal's write lock: a step transition waits at most for their
        puts (5 ms for 10,000), not for their encoding (50-150 ms)."""
        async with self._flushing:  # one at a time: batches are journaled in the order taken
            self.seal()
            if not self.sealed:
                return
            batches, self.sealed = self.sealed, []

            def encode():
                return [encode_event("op", sid, step, **rec) for sid, step, batch in batches for rec in batch]

            values = await trio.to_thread.run_sync(encode)
            try:
                await self._transact(lambda txn: txn.append_events(values), essential)
            except BaseException:
                self.sealed[:0] = batches  # journaled by a later flush, in order
                raise

    async def loop(self) -> None:
        full = False
        while True:
            await trio.sleep(1.0)
            try:
                await self.flush()
                full = False
            except JournalFull as exc:
                if not full:
                    log.warning("the audit trail waits in memory: %s", exc)
                full = True
            except Exception:
                log.exception("could not journal the audit trail")
