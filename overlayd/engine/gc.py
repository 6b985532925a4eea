"""``saga gc``: remove ended sagas' journal records, compact the journal, sweep orphaned layer
directories and the trash. Never touches the active saga."""

import trio

from ..faults import crash_point
from .records import now, number

GC_KEEP = 10  # ended sagas gc keeps when given neither keep nor older_than


class GcMixin:
    async def op_gc(self, args, peer):
        """Remove ended sagas' journal records (beyond --keep N newest, or older than a duration),
        orphaned layer directories and the trash. Never touches the active saga."""
        older = number(args, "older_than", None, float, 0, 1e12) if args.get("older_than") is not None else None
        keep = number(args, "keep", None, int, 0, 1 << 31) if args.get("keep") is not None else None
        if older is None and keep is None:
            keep = GC_KEEP  # never every saga's history without being asked
        with self._exclusive("collect garbage"):
            await self.audit.flush(essential=True)  # no batch of an ended saga may be journaled after its removal
            before = await trio.to_thread.run_sync(self.ws.disk_usage)
            active = self.active_id()
            await trio.to_thread.run_sync(crash_point, "gc")  # OVERLAYD_STALL_AT=gc:S (tests): a stack op in flight
            sagas = await trio.to_thread.run_sync(self.ws.journal.sagas)
            ended = [s for s in sagas if s["id"] != active and s["state"] in ("committed", "aborted")]
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
            # on a worker thread, and no journal transaction of ours runs meanwhile (the limiter)
            jbefore, jafter = await trio.to_thread.run_sync(self.ws.journal.compact, limiter=self.ws.jlimiter)
            stack = self.ws.stack()
            self.ws.finish_drops()
            quarantined = await trio.to_thread.run_sync(self.ws.collect_orphans, stack)
            after = await trio.to_thread.run_sync(self.ws.disk_usage)
            return {"sagas": victims, "events": events, "bytes_before": before, "bytes_after": after,
                    "journal_before": jbefore, "journal_after": jafter, "quarantined": quarantined}
