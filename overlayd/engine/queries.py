"""Read-only saga operations (status, diff, log, list) and annotate. Journal scans that grow
with the history (the log, the list of sagas) run on worker threads."""

import json
import logging

import trio

from overlayd.journal import JournalFull

from .. import commit, rules
from ..commit import changes as by_step
from .errors import EngineError
from .records import now, number, status_of

log = logging.getLogger(__name__)


class QueryMixin:
    """SagaEngine's read-only operations (uses ws, fs, lock, tracker, audit, progress)."""

    async def op_status(self, args, peer):
        out = status_of(self.ws.journal, self.fs.writable(), self.lock.busy)
        out["progress"] = self.progress if self.lock.busy else None
        out["compensation"] = self.compensation
        return out

    async def op_diff(self, args, peer):
        saga = self.require_active(states=("active", "stuck", "compensating"))
        rules_ = self._rules(args, saga)
        try:
            ops, left = await trio.to_thread.run_sync(self._plan, False, rules_)
        except rules.RulesError as exc:
            raise EngineError("error", f"{exc} (saga diff leaves out what a commit would)") from None
        stored, live = await trio.to_thread.run_sync(self.tracker.stored, saga["id"])

        def attributed(changes):
            return by_step.attribute(self._annotate(changes, saga["id"]), live, stored, self.tracker.touched)

        changes = attributed(commit.summarize(ops))
        for c in changes:
            if c["path"] in self.audit.writers:
                c["process"] = self.audit.writers[c["path"]]
        left = attributed(left)
        if args.get("step") is not None:
            k = self._resolve_step(saga, args["step"])
            changes, left = by_step.of_step(changes, k), by_step.of_step(left, k)
        return {"saga": saga, "changes": changes, "left_out": left}

    async def op_log(self, args, peer):
        try:
            await self.audit.flush()
        except JournalFull as exc:  # the log is read all the same; the batch waits in memory
            log.warning("saga log: the audit trail of the last second is not journaled yet: %s", exc)
        since = number(args, "since", 0, int, 0, 1 << 63)
        saga = args.get("saga")
        if saga is not None and (isinstance(saga, bool) or not isinstance(saga, int)):
            raise EngineError("bad-request", f"saga must be a saga id, not {saga!r}")
        ops = bool(args.get("ops"))

        def read():  # decoding the whole log takes a while: not on the event loop
            events = self.ws.journal.events(saga=saga, since=since)
            return events if ops else [e for e in events if e["kind"] != "op"]

        return {"events": await trio.to_thread.run_sync(read)}

    async def op_annotate(self, args, peer):
        """Merge client data (e.g. a saga definition and its steps' outcomes) into the active
        saga's record under ``annotations``, journaled with an event."""
        fields = args.get("fields")
        if not isinstance(fields, dict) or len(json.dumps(fields)) > 1 << 20:
            raise EngineError("bad-request", "'fields' must be an object of at most 1 MiB")
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
        return {"sagas": await trio.to_thread.run_sync(self.ws.journal.sagas)}
