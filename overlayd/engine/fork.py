"""``saga fork``: a second workspace over the same base whose saga starts as a copy of this one's
finished steps (ForkMixin, the ``saga.fork`` op), and the sync helpers that build its state
directory (``build_fork``, ``clone_layer``).

The fork's state directory is built beside this one's (``STATE/../NAME``), under a hidden temporary
name (``.NAME.fork-tmp``), and renamed into place only once its layers and its journal are on
disk: a crash of the daemon meanwhile leaves a temporary directory that the next fork of the
same name deletes, never a half-made workspace. The CLI then mounts it (``overlayd mount``): a
crash between the rename and the mount leaves a complete workspace that the same mount command
starts (the CLI prints it).

Layers are shared, never copied with their data: every regular file of a finished step's layer
is a hard link of the source's file (the same inode; the link count is the reference count, so a
rollback or commit of the source that deletes its layer leaves the fork's names, and the inode
goes with the last of them). Directories are made anew (with all their xattrs: opaque marks,
base attributes), whiteouts are links of the fork's own ``work/whiteout``. A metacopy (a renamed
or chmod-ed base file: a sparse file whose data is the base file's, found by its inode number)
first gets its own data in the source's layer, as a commit's ``materialize`` gives it, and is
then shared like any file: left a metacopy, it would read EIO in one workspace as soon as the
other's commit replaced or renamed its base file (and a commit materializes it in place). Files
of a sealed layer are otherwise never written in place. Each workspace sharing a layer lists the
others in ``STATE/shared/ID``; a commit puts the files of a layer another workspace still holds
(``layers/ID`` exists there) into the base as copies, never as links or moves
(``commit.apply.shared_layer``): the person's later edits of the base file cannot change the other
workspace's layer.
"""

import errno
import json
import logging
import os
import shutil
import stat
import time

import trio

from .. import osutil
from ..commit import basecopy
from ..commit import changes as by_step
from ..faults import crash_point
from ..osutil import DIR_FLAGS
from ..paths import NAME_RE, fsync_dir
from .errors import EngineError
from .records import check_name, now

log = logging.getLogger(__name__)

TMP_SUFFIX = ".fork-tmp"


def _copy_meta(src_fd: int, dst_fd: int, st) -> None:
    osutil.copy_xattrs(src_fd, dst_fd, skip_private=False)
    if os.geteuid() == 0:
        os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))


def clone_layer(src: str, dst: str, whiteout: str, base_fd: int) -> dict:
    """Make *dst* a copy of the layer *src* that shares its files' data (see the module's
    docstring); returns counts {"dirs", "links", "materialized", "whiteouts"}."""
    counts = {"dirs": 0, "links": 0, "materialized": 0, "whiteouts": 0}

    def walk(sfd: int, dfd: int) -> None:
        for de in os.scandir(sfd):
            name = os.fsencode(de.name)
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=dfd)
                cs = os.open(name, DIR_FLAGS, dir_fd=sfd)
                cd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                try:
                    _copy_meta(cs, cd, st)
                    walk(cs, cd)
                    os.utime(cd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(cs)
                    os.close(cd)
                counts["dirs"] += 1
            elif osutil.is_whiteout(st):
                os.link(whiteout, name, dst_dir_fd=dfd)
                counts["whiteouts"] += 1
            elif stat.S_ISREG(st.st_mode) and osutil.get_origin(b"/proc/self/fd/%d/" % sfd + name) is not None:
                # a metacopy: its data is the base file's, found by inode number; once either
                # workspace commits (and replaces that base file) the other's copy would read EIO.
                # It gets its own data first, in the source's sealed layer, as a commit's
                # materialize does (the view forgets the cached origins after), then is shared.
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
                try:
                    osutil.materialize(base_fd, fd)
                finally:
                    os.close(fd)
                os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                counts["materialized"] += 1
            else:
                # files, symlinks, fifos, devices: the same inode (sealed layers are not written)
                os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                counts["links"] += 1

    sfd = os.open(src, DIR_FLAGS)
    dfd = os.open(dst, DIR_FLAGS)
    try:
        st = os.fstat(sfd)
        _copy_meta(sfd, dfd, st)
        walk(sfd, dfd)
        os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        osutil.syncfs(dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    return counts


def _write_json(path: str, value) -> None:
    t = path + ".tmp"
    fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(value).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(t, path)


def _note_sharing(source: str, target: str, tmp: str, layers: list[str]) -> None:
    """Record, for each shared layer, the state directories sharing its files (``STATE/shared/ID``,
    read by commit.apply.shared_layer): the source, the workspaces it already shared the layer
    with, and the fork (*target*, being built at *tmp*). Each member lists the others."""
    for lid in layers:
        path = os.path.join(source, "shared", lid)
        try:
            with open(path, "rb") as f:
                known = [o for o in json.loads(f.read() or b"[]") if isinstance(o, str)]
        except FileNotFoundError:
            known = []
        group = sorted({source, target, *known})
        for member in group:
            where = tmp if member == target else member
            if member != target and not os.path.isdir(os.path.join(member, "layers", lid)):
                continue  # it dropped the layer: shares nothing any more
            os.makedirs(os.path.join(where, "shared"), mode=0o700, exist_ok=True)
            _write_json(os.path.join(where, "shared", lid), [o for o in group if o != member])


def _share_base_copies(src_dir: str, dst_dir: str, bases: dict) -> None:
    """Hard-link the base copies that the steps' *bases* records name (content-addressed files,
    never changed in place) from *src_dir* into *dst_dir*: ``saga resolve --merge`` in the fork
    finds the same ancestors."""
    names = {rec.get("copy") for recs in bases.values() for rec in recs.values() if isinstance(rec, dict)}
    names.discard(None)
    if not names:
        return
    os.makedirs(dst_dir, 0o700, exist_ok=True)
    for name in sorted(names):
        try:
            os.link(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        except FileNotFoundError:
            log.warning("fork: the base copy %s is gone: a merge of its path in the fork will say so", name)


def build_fork(target: str, base: str, layers_dir: str, saga: dict, steps: list[dict], paths: dict, next_layer: int,
               origin: dict, bases: dict | None = None, copies_dir: str | None = None) -> dict:
    """Build the fork's state directory at *target* (through ``.NAME.fork-tmp`` beside it): the layers
    of *steps* shared with *layers_dir*, and a journal whose saga is *saga* with *steps* and their
    recorded *paths* and kept base versions (*bases*, their files linked from *copies_dir*). Sync;
    the source's stack lock is held meanwhile."""
    from overlayd.journal import Journal

    tmp = os.path.join(os.path.dirname(target), "." + os.path.basename(target) + TMP_SUFFIX)  # hidden: not listed
    if os.path.lexists(tmp):
        log.warning("removing %s, left by a fork that did not finish", tmp)
        shutil.rmtree(tmp)
    os.mkdir(tmp, 0o700)
    t0 = time.perf_counter()
    try:
        for d in ("layers", "trash", "work"):
            os.mkdir(os.path.join(tmp, d), 0o700)
        whiteout = os.path.join(tmp, "work", "whiteout")
        wfd = os.open(os.path.join(tmp, "work"), DIR_FLAGS)
        try:
            osutil.make_whiteout(wfd, b"whiteout")
        finally:
            os.close(wfd)
        counts = {}
        base_fd = os.open(base, DIR_FLAGS)
        try:
            for s in steps:
                dst = os.path.join(tmp, "layers", s["layer"])
                os.mkdir(dst, 0o700)
                for k, v in clone_layer(os.path.join(layers_dir, s["layer"]), dst, whiteout, base_fd).items():
                    counts[k] = counts.get(k, 0) + v
        finally:
            os.close(base_fd)
        _note_sharing(os.path.dirname(layers_dir), target, tmp, [s["layer"] for s in steps])
        bases = {s["index"]: (bases or {}).get(s["index"]) for s in steps if (bases or {}).get(s["index"])}
        if bases and copies_dir:
            _share_base_copies(copies_dir, basecopy.copies_dir(tmp), bases)
        journal = Journal.open(tmp)
        try:
            def write(txn):
                sid = txn.new_saga_id()
                rec = {**saga, "id": sid, "state": "active", "steps": steps[-1]["index"] if steps else 0,
                       "updated": now(), "forked_from": origin}
                for k in ("target", "final", "error", "exit_status", "stderr_tail", "stuck_step"):
                    rec.pop(k, None)
                txn.put_saga(sid, rec)
                for s in steps:
                    txn.put_step(sid, s["index"], {**s, "saga": sid})
                    txn.put_step_paths(sid, s["index"], paths.get(s["index"], {}))
                    txn.put_step_bases(sid, s["index"], bases.get(s["index"], {}))
                txn.set_meta("stack", {"layers": [s["layer"] for s in steps], "sealed": True})
                txn.set_meta("next_layer", next_layer)
                txn.set_meta("active_saga", sid)
                txn.event("saga.forked", saga=sid, name=rec["name"], forked_from=origin)
                return sid
            sid = journal.transact(write)
        finally:
            journal.close()
        fsync_dir(tmp)
        crash_point("fork.built")
        os.rename(tmp, target)
        fsync_dir(os.path.dirname(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"saga_id": sid, "counts": counts, "seconds": time.perf_counter() - t0}


class ForkMixin:
    """SagaEngine's ``saga.fork``: the fork's state directory, journal first; the CLI mounts it."""

    async def op_fork(self, args, peer):
        name = args.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise EngineError("bad-name", f"invalid fork name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
                                          "starting with a letter or digit (it names the new workspace and its saga)")
        check_name("saga", name)
        target = str(self.ws.state_dir.parent / name)
        if os.path.lexists(target) or name == self.ws.name:
            raise EngineError("exists", f"a workspace named {name!r} exists (its state directory {target}); "
                                        "choose another name, or remove it first with: overlayd forget " + name)
        with self._exclusive("fork the saga"):
            saga = self.require_active()
            self._refuse_while_cutting()
            sid = saga["id"]
            live = self.live_steps(sid)
            at = args.get("at")
            if at is None:
                done = [s for s in live if s["state"] == "done"]
                if live and live[-1]["state"] == "open" and self.tracker.touched:
                    raise EngineError("step-open", f"step {live[-1]['index']} {live[-1]['name']!r} is open and has "
                                                   f"changes ({len(self.tracker.touched)} path(s)); a fork copies "
                                                   "finished steps only: finish it first with: saga step NEXT, or "
                                                   f"fork from an earlier step with --at STEP; nothing was changed")
            else:
                try:
                    index = by_step.resolve_step(saga, self.steps(sid), at)
                except by_step.NoStep as exc:
                    raise EngineError("no-step", f"{exc}; nothing was changed") from None
                done = [s for s in live if s["index"] <= index]
                if any(s["state"] != "done" for s in done):
                    raise EngineError("step-open", f"step {index} is still open: a fork copies finished steps only; "
                                                   "finish it first with: saga step NEXT; nothing was changed")
            if any(s.get("layer") is None for s in done):
                raise EngineError("bad-request", "a finished step has no layer; nothing was changed")
            paths = await trio.to_thread.run_sync(self.ws.journal.step_paths, sid)
            bases = await trio.to_thread.run_sync(self.ws.journal.step_bases, sid)
            origin = {"workspace": self.ws.name, "state_dir": str(self.ws.state_dir), "saga": sid,
                      "saga_name": saga["name"], "step": done[-1]["index"] if done else 0, "at": now()}
            saga_rec = {**saga, "name": name}
            next_layer = self.ws.journal.meta("next_layer", 1)
            try:
                try:
                    r = await trio.to_thread.run_sync(build_fork, target, str(self.ws.base), str(self.ws.layers_dir),
                                                      saga_rec, done, paths, next_layer, origin, bases,
                                                      basecopy.copies_dir(self.ws.state_dir))
                finally:
                    self.fs.forget_origins()  # the shared steps' metacopies may have their own data now
            except FileExistsError:
                raise EngineError("exists", f"a workspace named {name!r} exists ({target}); nothing was changed") from None
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise EngineError("fork-failed", f"could not build the fork at {target}: {exc}; nothing was "
                                                 "changed in this workspace") from None

            def note(txn):
                txn.event("saga.fork", saga=sid, name=name, step=origin["step"], state_dir=target,
                          **self._event_details(peer))
            await self.ws.transact(note)
            return {"name": name, "state_dir": target, "base": str(self.ws.base), "saga": saga_rec,
                    "fork_saga_id": r["saga_id"], "steps": [s["index"] for s in done], "shared": r["counts"],
                    "seconds": r["seconds"]}
