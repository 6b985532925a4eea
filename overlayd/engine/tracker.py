"""What a saga changed: the paths of the open step with the base's identity at their first
change (``touched``), and the paths earlier live steps recorded (``known``: their identity
stands). A commit compares them with the base (conflicts); ``saga diff`` names the step that
first changed each path (overlayd.commit.changes.attribute, given ``stored`` and ``touched``)."""

import logging
import os

from .. import commit
from ..commit import basecopy
from ..commit.changes import live_steps

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, journal, base_fd: int, copies_dir: str | None = None):
        self.journal = journal
        self.base_fd = base_fd  # the base directory (the engine's: it outlives the tracker)
        self.copies_dir = copies_dir  # where the base's versions at first touch go (basecopy)
        self.touched = {}  # path -> base identity, first change in the open step
        self.known = set()

    @property
    def touched(self) -> dict:
        return self._touched

    @touched.setter
    def touched(self, value: dict) -> None:
        """A new open step (or none): its base copies start empty too."""
        self._touched = value
        self.copies = {}  # path -> {"copy": sha256 or None, ...}: the base file at the first touch

    def step_copies(self, paths) -> dict:
        """The base copies of the open step's *paths* (a snapshot of touched), to journal with them."""
        return {p: self.copies[p] for p in paths if p in self.copies}

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
            ident = commit.base_identity(self.base_fd, p)
        except OSError as exc:
            log.warning("cannot record the base identity of %s: %s", p, exc)
            ident = None
        self.touched[p] = ident
        if ident is not None and ident[0] == "f" and self.copies_dir is not None:
            # the base's content now, the ancestor of a later 'saga resolve --merge' (the base is
            # not changed by the view: whatever the change was, the base still holds the file)
            self.copies[p] = basecopy.keep(self.base_fd, p, ident, self.copies_dir)

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

    def bases(self, sid) -> tuple[dict, list]:
        """(the base records of saga *sid*'s steps, its live steps): a journal scan for a worker
        thread (see Journal.step_bases)."""
        return self.journal.step_bases(sid), live_steps(self.journal.steps(sid))

    @staticmethod
    def rebased(paths: dict, bases) -> dict:
        """*paths* (all_paths) with the identities 'saga resolve' re-based: a resolved path is
        compared with the base as it was when it was resolved (the latest live resolution)."""
        stored, live = bases
        out = dict(paths)
        for s in live:
            for p, rec in stored.get(s["index"], {}).items():
                if "rebase" in rec:
                    out[p] = rec["rebase"]
        return out

    @staticmethod
    def ancestor(p: str, bases, copies: dict | None = None) -> dict | None:
        """The base record of *p* a merge takes as the common ancestor: the latest live step's
        (a resolution's copy is the base the saga's version was last reconciled with), else the
        open step's (*copies*)."""
        stored, live = bases
        found = None
        for s in live:
            rec = stored.get(s["index"], {}).get(p)
            if rec is not None and "copy" in rec:
                found = rec
        if found is None and copies:
            found = copies.get(p)
        return found

    @staticmethod
    def live_copies(bases, copies: dict | None = None) -> set:
        """The hashes of every base copy a live step (or the open step) names: those kept."""
        stored, live = bases
        out = set()
        for s in live:
            for rec in stored.get(s["index"], {}).values():
                if rec.get("copy"):
                    out.add(rec["copy"])
        for rec in (copies or {}).values():
            if rec.get("copy"):
                out.add(rec["copy"])
        return out

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
