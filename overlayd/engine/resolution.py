"""``saga resolve PATH... --theirs | --ours | --merge``: settling a commit conflict in the saga
(docs/ARCHITECTURE.md, Resolving a conflict).

A resolution is a step of its own, named ``resolve``, finished at once: the open step (if any)
is finished as by ``saga step``, a fresh layer is pushed, the resolved content is written into
it through the view (the same copy-up, listings and kernel notifications as any write), and
one transaction marks the step done with, per resolved path, the base's identity it was
reconciled with (``rebase``: the commit's conflict check compares the base with that one) and
a copy of that base version (the ancestor of a later merge). So a crash after ``saga resolve``
keeps it (a done step is never rolled back by recovery), ``saga rollback --to K`` below it
undoes it like any step (the conflict comes back), and the saga's earlier layers are never
rewritten.

- ``theirs``: the view gets the base's current version (content, mode, owner, times; or the
  path is removed when the base no longer has it). The commit writes that same version back.
- ``ours``: nothing is written; the path's identity is re-based.
- ``merge``: ``git merge-file`` of the saga's version, the base at the saga's first touch
  (basecopy) and the base now. A clean merge is written and re-based; conflict markers are
  written, not re-based: the path stays in conflict until ``--ours`` after editing.
"""

import errno
import logging
import os
import shlex
import stat
import time

import trio

from .. import commit, osutil
from ..commit import basecopy
from ..faults import crash_point
from .errors import EngineError
from .records import now

log = logging.getLogger(__name__)

HOWS = ("theirs", "ours", "merge")
HINTS_READ = 1000  # conflicts whose files are read to say whether --merge can merge them


def check_path(p) -> str:
    """A path relative to the workspace's root, normalised; EngineError if it is not one."""
    if not isinstance(p, str) or not p or "\0" in p:
        raise EngineError("bad-request", f"{p!r} is not a path")
    norm = os.path.normpath(p.lstrip("/"))
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise EngineError("bad-request", f"{p!r} is not a path inside the workspace")
    return norm


def resolve_command(path: str, mergeable: bool) -> str:
    """The command that resolves a conflict on *path* (for the commit's refusal)."""
    q = shlex.quote(path)
    return f"saga resolve {q} --merge" if mergeable else f"saga resolve {q} --theirs  (or --ours)"


class ResolveMixin:
    """SagaEngine's conflict resolution (uses ws, fs, tracker, lock and the step machinery)."""

    # ------------------------------------------------------------------ helpers (sync)

    def _view_path(self, p: str) -> str:
        return os.path.join(os.fspath(self.ws.mountpoint), p)

    def _view_head(self, p: str):
        """(lstat of the saga's version of *p* in the view or None, its first bytes or None)."""
        full = self._view_path(p)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return None, None
        if not stat.S_ISREG(st.st_mode):
            return st, None
        with open(full, "rb") as f:
            return st, f.read(basecopy.TEXT_PROBE)

    def _base_file(self, p: str):
        """(fd, fstat) of the base's regular file at *p*, opened without following symlinks."""
        rel = os.fsencode(p)
        pfd = osutil.open_beneath(self._base_fd, os.path.dirname(rel))
        try:
            fd = os.open(os.path.basename(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=pfd)
        finally:
            os.close(pfd)
        return fd, os.fstat(fd)

    def _mergeable(self, p: str, now_ident, bases, copies) -> bool:
        """Whether --merge can merge *p*: both versions text files of at most basecopy.MAX_SIZE,
        and the base's version at the saga's first touch kept."""
        if now_ident is None or now_ident[0] != "f" or now_ident[2] > basecopy.MAX_SIZE:
            return False
        anc = self.tracker.ancestor(p, bases, copies)
        if not anc or not anc.get("copy"):
            return False
        try:
            st, head = self._view_head(p)
            if head is None or st.st_size > basecopy.MAX_SIZE or not basecopy.is_text(head):
                return False
            fd, _ = self._base_file(p)
            try:
                return basecopy.is_text(os.pread(fd, basecopy.TEXT_PROBE, 0))
            finally:
                os.close(fd)
        except OSError:
            return False

    def _resolve_hints(self, conflicts: list, sid, copies) -> list:
        """Each conflict with the command that resolves it (``resolve``) and whether --merge can
        (``mergeable``): sync, for a worker thread."""
        if not conflicts:
            return conflicts
        bases = self.tracker.bases(sid)
        for i, c in enumerate(conflicts):
            if c.get("reason"):  # a refusal (mount point, directory attributes), not a content conflict
                continue
            if i >= HINTS_READ:  # (each one reads two files: bounded, a commit refused for 10,000 paths)
                c["resolve"] = f"saga resolve {shlex.quote(c['path'])} --merge  (or --theirs, --ours)"
                continue
            now_ident = c.get("now") if isinstance(c.get("now"), list) else None
            c["mergeable"] = self._mergeable(c["path"], now_ident, bases, copies)
            c["resolve"] = resolve_command(c["path"], c["mergeable"])
        return conflicts

    def _plan_resolution(self, paths, how, recorded, bases, copies) -> list[dict]:
        """What resolving *paths* with *how* writes, checked before anything changes (sync, a
        worker thread's, under the base lock). Raises EngineError for a path it cannot resolve."""
        cdir = basecopy.copies_dir(self.ws.state_dir)
        out = []
        for p in paths:
            then = recorded[p]
            now_ident = commit.base_identity(self._base_fd, p)
            conflict = not commit.same_identity(then, now_ident) and not (
                then is not None and then[0] == "d" and now_ident is not None and now_ident[0] == "d")
            item = {"path": p, "how": how, "conflict": conflict, "now": now_ident, "action": None, "copy": None}
            view_st, head = self._view_head(p)
            if how == "ours":
                item["result"] = "ours"
            elif how == "theirs":
                if now_ident is None:
                    if view_st is not None and stat.S_ISDIR(view_st.st_mode):
                        raise EngineError("cannot-resolve", f"{p}: the base no longer has it and the saga's version "
                                                            "is a directory: remove it in a step (rm -r), or keep "
                                                            f"it: saga resolve {shlex.quote(p)} --ours")
                    item["action"] = "remove" if view_st is not None else None
                elif now_ident[0] in ("f", "l"):
                    if view_st is not None and stat.S_ISDIR(view_st.st_mode):
                        raise EngineError("cannot-resolve", f"{p}: the saga's version is a directory and the base's a "
                                                            "file: remove the directory in a step, or keep it: saga "
                                                            f"resolve {shlex.quote(p)} --ours")
                    item["action"] = "put"
                else:
                    raise EngineError("cannot-resolve", f"{p}: --theirs takes files and symbolic links from the base, "
                                                        f"and the base's {p} is a "
                                                        f"{'directory' if now_ident[0] in ('d', 'D') else now_ident[0]}"
                                                        ": roll back the step that changed it (saga rollback --to K)"
                                                        f", or keep the saga's version: saga resolve {shlex.quote(p)} "
                                                        "--ours")
                item["result"] = "theirs"
            else:  # merge
                q = shlex.quote(p)
                if not conflict:
                    item["result"] = "unchanged"  # the base did not change it: the saga's version is the merge
                    out.append(item)
                    continue
                if now_ident is None or now_ident[0] != "f" or view_st is None or not stat.S_ISREG(view_st.st_mode):
                    side = "the base no longer has it" if now_ident is None else \
                        "the saga removed it" if view_st is None else "it is not a regular file on both sides"
                    raise EngineError("cannot-resolve", f"{p}: --merge merges two versions of a text file, and {side}:"
                                                        f" take one side: saga resolve {q} --theirs (or --ours)")
                anc = self.tracker.ancestor(p, bases, copies)
                ancestor = basecopy.read(cdir, anc.get("copy")) if anc else None
                if ancestor is None:
                    why = (anc or {}).get("why") or ("it was not kept" if anc else
                                                     "the saga did not change a base file there (both sides added it)")
                    raise EngineError("cannot-resolve", f"{p}: cannot merge: the base's version at the saga's first "
                                                        f"change is not available ({why}); take one side: saga "
                                                        f"resolve {q} --theirs (or --ours, after editing the view's "
                                                        "version by hand)")
                if view_st.st_size > basecopy.MAX_SIZE or now_ident[2] > basecopy.MAX_SIZE:
                    raise EngineError("cannot-resolve", f"{p}: cannot merge files larger than "
                                                        f"{basecopy.limit()}: take one side: saga resolve "
                                                        f"{q} --theirs (or --ours)")
                with open(self._view_path(p), "rb") as f:
                    ours = f.read()
                theirs = self._read_base(p, now_ident)
                if not (basecopy.is_text(ours) and basecopy.is_text(theirs) and basecopy.is_text(ancestor)):
                    raise EngineError("cannot-resolve", f"{p} is a binary file: --merge merges text files only; "
                                                        f"take one side: saga resolve {q} --theirs (or --ours)")
                try:
                    merged, n = basecopy.merge(ours, ancestor, theirs)
                except basecopy.MergeUnavailable as exc:
                    raise EngineError("cannot-resolve", f"{p}: {exc}") from None
                item.update(action="write", data=merged, conflicts=n,
                            result="merged" if n == 0 else "conflict-markers")
            if item["result"] in ("ours", "theirs", "merged"):
                # the base version the saga is now reconciled with: the next merge's ancestor
                if now_ident is not None and now_ident[0] == "f" and now_ident[2] <= basecopy.MAX_SIZE:
                    item["copy"] = basecopy.store(cdir, self._read_base(p, now_ident))
            out.append(item)
        return out

    def _read_base(self, p: str, ident) -> bytes:
        """The base's file at *p*, which must still have identity *ident* (else EngineError)."""
        fd, st = self._base_file(p)
        try:
            data = basecopy._read_fd(fd, max(st.st_size, 0) + (1 << 20))
        finally:
            os.close(fd)
        if [st.st_ino, st.st_size, st.st_mtime_ns] != ident[1:4] or data is None or len(data) != st.st_size:
            raise EngineError("busy", f"{p} changed in the base while it was read: run saga resolve again")
        return data

    def _write_resolution(self, items) -> None:
        """Write the planned resolutions into the view (sync, a worker thread's: the view is this
        daemon's own mount, served by the event loop meanwhile)."""
        for it in items:
            full = self._view_path(it["path"])
            if it["action"] == "remove":
                os.unlink(full)
            elif it["action"] == "write":
                fd = os.open(full, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    _write_all(fd, it["data"])
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif it["action"] == "put":
                self._put_theirs(it["path"], full, it["now"])

    def _put_theirs(self, p, full, ident) -> None:
        rel = os.fsencode(p)
        pfd = osutil.open_beneath(self._base_fd, os.path.dirname(rel))
        try:
            st = os.stat(os.path.basename(rel), dir_fd=pfd, follow_symlinks=False)
            if [st.st_ino, st.st_size, st.st_mtime_ns] != ident[1:4]:
                raise EngineError("busy", f"{p} changed in the base while it was read: run saga resolve again")
            os.makedirs(os.path.dirname(full), exist_ok=True)
            try:
                vst = os.lstat(full)
            except FileNotFoundError:
                vst = None
            if vst is not None and not stat.S_ISREG(vst.st_mode) or stat.S_ISLNK(st.st_mode) and vst is not None:
                os.unlink(full)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(os.path.basename(rel), dir_fd=pfd), full)
                if os.geteuid() == 0:
                    os.chown(full, st.st_uid, st.st_gid, follow_symlinks=False)
                return
            src = os.open(os.path.basename(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            dst = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                          stat.S_IMODE(st.st_mode) | 0o200)
            try:
                while True:
                    b = os.read(src, 1 << 20)
                    if not b:
                        break
                    _write_all(dst, b)
                if os.geteuid() == 0:
                    os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.fsync(dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)

    # ------------------------------------------------------------------ the operation

    async def op_resolve(self, args, peer):
        how = args.get("how")
        if how not in HOWS:
            raise EngineError("bad-request", f"how must be one of {', '.join(HOWS)}, not {how!r}")
        raw = args.get("paths")
        if not isinstance(raw, list) or not raw:
            raise EngineError("bad-request", "no path given: saga resolve PATH... --theirs|--ours|--merge")
        paths = list(dict.fromkeys(check_path(p) for p in raw))
        with self._exclusive("resolve"):
            saga = self.require_active()
            self._refuse_while_cutting()
            sid = saga["id"]
            stored = await trio.to_thread.run_sync(self.tracker.stored, sid)
            bases = await trio.to_thread.run_sync(self.tracker.bases, sid)
            recorded = self.tracker.rebased(self.tracker.all_paths(stored), bases)
            missing = [p for p in paths if p not in recorded]
            if missing:
                raise EngineError("bad-request", f"{missing[0]} was not changed by saga {saga['name']!r}"
                                                 + (f" (nor {len(missing) - 1} more path(s))" if len(missing) > 1
                                                    else "") + ": nothing to resolve ('saga diff' lists what it "
                                                               "changed; paths are relative to the workspace)")
            t0 = time.perf_counter()
            lock = await self._lock_base()  # no commit changes the base between reading and re-basing
            try:
                try:
                    items = await trio.to_thread.run_sync(self._plan_resolution, paths, how, recorded, bases,
                                                          dict(self.tracker.copies))
                except OSError as exc:
                    raise EngineError("cannot-resolve", f"cannot read {exc.filename or 'a version'}: "
                                                        f"{exc.strerror}; nothing was changed") from None
                if all(it["result"] == "unchanged" for it in items):  # --merge of paths the base did not change
                    return {"saga": saga, "step": None, "unresolved": [], "seconds": time.perf_counter() - t0,
                            "resolved": [{k: it[k] for k in ("path", "how", "result", "conflict")} for it in items]}
                r = await self._new_step(saga, "resolve", peer)
                step = r["step"]
                try:
                    await trio.to_thread.run_sync(self._write_resolution, items)
                except (OSError, EngineError) as exc:
                    msg = exc.message if isinstance(exc, EngineError) else f"{exc.filename}: {exc.strerror}"
                    raise EngineError("resolve-failed", f"resolving failed while writing the view: {msg}; step "
                                                        f"{step['index']} (resolve) is open with part of it: undo it "
                                                        "with 'saga rollback', then resolve again") from None
                crash_point("resolve.written")
                await self._finish_resolve_step(sid, step, items, peer)
            finally:
                lock.release()
            results = [{k: it[k] for k in ("path", "how", "result", "conflict")}
                       | ({"conflicts": it["conflicts"]} if "conflicts" in it else {}) for it in items]
            return {"saga": self.ws.journal.saga(sid), "step": step["index"], "resolved": results,
                    "unresolved": [it["path"] for it in items if it["result"] == "conflict-markers"],
                    "seconds": time.perf_counter() - t0}

    async def _finish_resolve_step(self, sid, step, items, peer) -> None:
        """Seal the resolve step and journal it done, with its paths and the re-based identities."""
        self.fs.seal_top()
        self.audit.seal()
        await self.fs.wait_idle()
        paths = dict(self.tracker.touched)
        kept = self.tracker.step_copies(paths)
        for it in items:
            if it["result"] in ("ours", "theirs", "merged"):
                kept[it["path"]] = {"how": it["how"], "rebase": it["now"], "copy": it["copy"]}
        index = step["index"]

        def done(txn):
            s = [r for r in txn.steps(sid) if r["index"] == index][0]
            s.update(state="done", sealed=now())
            txn.put_step(sid, index, s)
            txn.put_step_paths(sid, index, paths)
            txn.put_step_bases(sid, index, kept)
            txn.event("saga.resolve", saga=sid, step=index,
                      paths=[{"path": it["path"], "how": it["how"], "result": it["result"]} for it in items][:1000],
                      **self._event_details(peer))

        await self.ws.transact(done)
        self.tracker.known.update(paths)
        self.tracker.touched = {}
        self.step_meter = None
        await self._sync_layer(step)

    async def _sweep_copies(self) -> None:
        """Delete the base copies no live step of the active saga names (after a rollback, a
        commit, an abort). The caller holds the stack lock with no step open, so no copy is being
        kept meanwhile."""
        sid = self.active_id()
        copies = dict(self.tracker.copies)
        cdir = basecopy.copies_dir(self.ws.state_dir)

        def sweep():
            live = self.tracker.live_copies(self.tracker.bases(sid), copies) if sid else set()
            return basecopy.sweep(cdir, live)

        try:
            n = await trio.to_thread.run_sync(sweep)
        except OSError as exc:
            log.warning("cannot sweep the base copies: %s", exc)
            return
        if n:
            log.info("deleted %d base copies no live step needs", n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
