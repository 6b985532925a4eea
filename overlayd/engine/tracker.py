"""What a saga changed: the paths of the open step with the base's identity at their first
change (``touched``), and the paths earlier live steps recorded (``known``: their identity
stands). A commit compares them with the base (conflicts); ``saga diff`` names the step that
first changed each path (overlayd.commit.changes.attribute, given ``stored`` and ``touched``)."""

import logging
import os

from .. import commit
from ..commit.changes import live_steps

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, journal, base_fd: int):
        self.journal = journal
        self.base_fd = base_fd  # the base directory (the engine's: it outlives the tracker)
        self.touched = {}  # path -> base identity, first change in the open step
        self.known = set()

    def reload(self, sid) -> None:
        """known := the paths recorded by the live steps of saga *sid* (none: no saga)."""
        self.known = self.known_paths(sid)

    def known_paths(self, sid) -> set:
        """The paths recorded by the live steps of saga *sid* (none: no saga): a journal scan
        that grows with the paths, for a worker thread on a request's path."""
        known = set()
        if sid:
            stored = self.journal.step_paths(sid)
            for s in live_steps(self.journal.steps(sid)):
                known.update(stored.get(s["index"], ()))
        return known

    def reset(self) -> None:
        self.touched = {}
        self.known = set()

    def record(self, p: str, listing=None) -> None:
        """A change of path *p*: record the base's identity at the first.

        A directory the saga removes or moves is recorded with the entries this view saw in
        it (*listing*), so that entries added to the base meanwhile make a conflict.
        """
        if listing is not None:
            prev = self.touched.get(p, ["d"])
            if prev is not None and prev[0] == "d":
                self.touched[p] = ["D", commit.listing_digest(listing)]
            return
        if p in self.touched or p in self.known:
            return
        try:
            self.touched[p] = commit.base_identity(self.base_fd, p)
        except OSError as exc:
            log.warning("cannot record the base identity of %s: %s", p, exc)
            self.touched[p] = None

    def stored(self, sid) -> tuple[dict, list]:
        """(the journaled paths of saga *sid*'s steps, its live steps): a journal scan that grows
        with the paths (10,000 are about 1 MB of JSON), for a worker thread."""
        return self.journal.step_paths(sid), live_steps(self.journal.steps(sid))

    def all_paths(self, stored) -> dict:
        """Every path the saga's live steps changed, with its recorded base identity. *stored*:
        what :meth:`stored` returned."""
        paths = {}
        stored, live = stored
        records = [stored.get(s["index"], {}) for s in live] + [self.touched]
        for rec in records:
            for p, ident in rec.items():
                if p not in paths or (paths[p] == ["d"] and ident is not None and ident[0] == "D"):
                    paths[p] = ident  # the earliest record, made precise by a later listing
        return paths

    def conflicts(self, paths: dict) -> list[dict]:
        """The paths whose base identity is not the recorded one (sync: a worker thread's)."""
        out = []
        dirs = {}
        try:
            for p, then in sorted(paths.items()):
                cur = commit.base_identity(self.base_fd, p, with_listing=then is not None and then[0] == "D",
                                          dirs=dirs)
                if then is not None and then[0] == "d" and cur is not None and cur[0] == "d":
                    continue  # a directory that is still a directory: entries are checked one by one
                if not commit.same_identity(then, cur):
                    out.append({"path": p, "recorded": then, "now": cur})
        finally:
            for fd in dirs.values():
                os.close(fd)
        return out
