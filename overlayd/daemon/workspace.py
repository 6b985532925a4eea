"""A workspace: one base, one mountpoint, one state directory holding the layers and the journal.

On-disk layout of the state directory::

    journal/        LMDB environment (see journal/)
    layers/ID/      one directory per layer of the stack (ID: 16 hex digits)
    trash/ID/       dropped layers, deleted in the background
    quarantine/ID/  layer directories the journal does not know: kept, never deleted by overlayd
    lock            flock()ed by the daemon that serves the workspace
    workspace.json  name, base, mountpoint (for 'overlayd list')

The stack (the layer IDs, bottom to top, and whether the top is sealed) is the journal's
``meta/stack`` record; the view is rebuilt from it at start. A layer directory that the
stack does not name goes to the trash only when the journal positively says it is gone (its
step compensated or committed, the last drop, a push that never happened: a crash between
mkdir and the journal, or between a drop's journal and its rename to the trash); any other
goes to the quarantine. A journal that cannot be read, or a missing one while layers exist,
is a refusal to start, never a fresh journal (Journal.open, Workspace._open_journal).
"""

import fcntl
import json
import logging
import os
import stat
import shutil
import subprocess
import threading
import time
from pathlib import Path

import trio

from overlayd.journal import Journal

from ..layers import OverlayFS
from ..paths import UsageError, disk_usage, fsync_dir, index_dir, is_within, make_parents, register

log = logging.getLogger(__name__)


def _remove_tree(path: str) -> None:
    """Delete a dropped layer's directory in a child process at the lowest CPU and I/O priority.

    In a thread of the daemon, ``shutil.rmtree`` of a 10,000-file layer takes the GIL between
    its 10,000 ``unlink``s for about a second, and every request and saga operation in that
    second waits for it (a 1-file rollback right after a 10,000-file one took 20-30 ms instead
    of 4). ``rm`` does not follow symbolic links and, with ``--one-file-system``, does not
    cross into anything mounted below.
    """
    cmd = ["nice", "-n", "19", "rm", "-rf", "--one-file-system", "--", path]
    ionice = shutil.which("ionice")
    if ionice:
        cmd = [ionice, "-c", "2", "-n", "7"] + cmd
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
    except OSError as exc:
        log.warning("cannot run rm (%s): deleting %s in the daemon", exc, path)
        shutil.rmtree(path, ignore_errors=True)
        return
    if proc.returncode != 0:
        log.warning("could not delete %s: %s", path, proc.stderr.decode(errors="replace").strip()[-500:])


class Workspace:
    def __init__(self, name: str, base, mountpoint, state_dir):
        self.name = name
        self.base = Path(os.path.realpath(base))
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.state_dir = Path(os.path.abspath(state_dir))
        self.layers_dir = self.state_dir / "layers"
        self.trash_dir = self.state_dir / "trash"
        self.quarantine_dir = self.state_dir / "quarantine"
        self.work_dir = self.state_dir / "work"  # the shared whiteout (fs.OverlayFS._whiteout)
        self.journal = None
        self.fs = None
        self._lockfd = None
        self.jlimiter = trio.CapacityLimiter(1)
        self._reaper_wake = threading.Event()
        self._purge_wake = trio.Event()

    # ------------------------------------------------------------------ setup

    def check_paths(self) -> None:
        if not self.base.is_dir():
            raise UsageError(f"base {self.base} is not a directory")
        if not self.mountpoint.is_dir():
            raise UsageError(f"mountpoint {self.mountpoint} is not a directory; create it with: mkdir -p {self.mountpoint}")
        for a, an, b, bn in ((self.state_dir, "state directory", self.base, "base"),
                             (self.state_dir, "state directory", self.mountpoint, "mountpoint"),
                             (self.base, "base", self.state_dir, "state directory"),
                             (self.mountpoint, "mountpoint", self.base, "base"),
                             (self.base, "base", self.mountpoint, "mountpoint")):
            if is_within(a, b):
                raise UsageError(f"the {an} {a} must not be inside the {bn} {b}")

    def open(self, recover=None) -> None:
        """Lock the state directory, open the journal, rebuild the stack. Sync; before mounting.

        *recover(workspace)* runs after the journal is open and before the view is built
        (the saga engine finishes an interrupted commit there).
        """
        self.check_paths()
        make_parents(self.state_dir)
        for d in (self.state_dir, self.layers_dir, self.trash_dir, self.work_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._lockfd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            raise UsageError(f"workspace state {self.state_dir} is in use by another daemon; "
                             "unmount it first (overlayd unmount MOUNTPOINT)") from None
        self.journal = self._open_journal()
        self._write_info()
        try:
            register(self.name, self.state_dir)  # so that 'overlayd list' finds it wherever it lives
        except OSError as exc:
            log.warning("cannot register the workspace in %s: %s", index_dir(), exc)
        if recover is not None:
            recover(self)
        stack = self.stack()
        self.sweep_layers(stack)
        self._check_stack(stack)
        self.fs = OverlayFS(str(self.base), [(lid, str(self.layers_dir / lid), sealed)
                                             for lid, sealed in self._stack_entries(stack)],
                             workdir=str(self.work_dir))

    def stack(self) -> dict:
        return self.journal.meta("stack", {"layers": [], "sealed": True})

    @staticmethod
    def _stack_entries(stack):
        ids = stack["layers"]
        return [(lid, True if i < len(ids) - 1 else stack["sealed"]) for i, lid in enumerate(ids)]

    def _open_journal(self) -> Journal:
        """Open the journal; a new one only for a state directory without layers.

        A journal that cannot be read is never replaced (Journal.open raises JournalDamaged),
        and a missing or empty one is refused while layers exist: a new journal would not know
        them, and the saga they hold would be lost."""
        layers = sorted(os.listdir(self.layers_dir))
        data = self.state_dir / "journal" / "data.mdb"
        if layers and not os.path.lexists(data):
            raise UsageError(
                f"the state directory {self.state_dir} holds {len(layers)} layer(s) "
                f"({', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}) but no journal ({data} is "
                f"missing): a new journal would not know them. Restore {data} from a backup, or, to "
                f"start a new journal, move the layers aside (mv {self.layers_dir} {self.layers_dir}.saved): "
                "the saga's changes stay there, one directory per step")
        return Journal.open(self.state_dir, create=not layers)

    def _write_info(self) -> None:
        """workspace.json (for 'overlayd list'), private (0600) and durable, rewritten only when it
        changes: a start on a full state filesystem must not fail on it."""
        info = json.dumps({"name": self.name, "base": str(self.base), "mountpoint": str(self.mountpoint)})
        path = self.state_dir / "workspace.json"
        try:
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and path.read_text() == info:
                if st.st_mode & 0o777 != 0o600:
                    os.chmod(path, 0o600)  # an older version wrote it 0666
                return
        except (OSError, UnicodeDecodeError):
            pass
        tmp = self.state_dir / "workspace.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, info.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(self.state_dir)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def sweep_layers(self, stack) -> list:
        """Layer directories the stack does not name: to the trash when the journal says they are
        gone (Journal.gone_layers), else to the quarantine, kept. Returns the quarantined paths."""
        keep = set(stack["layers"])
        strays = sorted(e for e in os.listdir(self.layers_dir) if e not in keep)
        if not strays:
            return []
        gone = self.journal.gone_layers()
        moved = []
        for entry in strays:
            if entry in gone:
                log.info("layer %s is not in the stack and %s: moving it to the trash", entry, gone[entry])
                os.rename(self.layers_dir / entry, self.trash_dir / entry)
            else:
                moved.append(self._quarantine(entry))
        return moved

    def _quarantine(self, entry: str) -> str:
        self.quarantine_dir.mkdir(mode=0o700, exist_ok=True)
        dst = self.quarantine_dir / entry
        n = 1
        while os.path.lexists(dst):
            dst = self.quarantine_dir / f"{entry}.{n}"
            n += 1
        os.rename(self.layers_dir / entry, dst)
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.layers_dir)
        log.warning("layer %s is not in the journal's stack and the journal does not say it was dropped: "
                    "moved to %s and kept (overlayd never deletes it); look at it, and delete it by hand "
                    "once it is not needed", entry, dst)
        try:
            self.journal.transact(lambda txn: txn.event("layer.quarantined", layer=entry, path=str(dst)))
        except Exception as exc:  # the move is what matters; the event is a courtesy
            log.warning("could not journal the quarantine of layer %s: %s", entry, exc)
        return str(dst)

    def quarantined(self) -> list:
        try:
            return sorted(os.listdir(self.quarantine_dir))
        except FileNotFoundError:
            return []

    def _check_stack(self, stack) -> None:
        for lid in stack["layers"]:
            if not (self.layers_dir / lid).is_dir():
                raise UsageError(f"the journal's stack names layer {lid} but {self.layers_dir / lid} is "
                                 "missing: the state directory was changed by hand or restored partly; "
                                 f"restore {self.layers_dir / lid}, or the state directory whole, from a backup")

    def close(self) -> None:
        if self.fs is not None:
            self.finish_drops()
            self.fs.close()
        if self.journal is not None:
            self.journal.close()
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None

    # ------------------------------------------------------------------ journal access

    async def transact(self, fn, essential=True):
        """One journal write transaction, on a worker thread (one transaction per thread hop).
        *essential*=False: refused while the state filesystem is full (Journal.transact)."""
        return await trio.to_thread.run_sync(self.journal.transact, fn, essential, limiter=self.jlimiter)

    # ------------------------------------------------------------------ stack changes

    def _new_layer_dir(self, txn) -> str:
        """Reserve the next layer id (journaled as ``meta/pending_layer`` until the push is
        journaled, so that a crash in between leaves a directory the sweep may delete). An id
        whose directory exists anyway (quarantined, say) is skipped."""
        n = txn.get_meta("next_layer", 1)
        while any(os.path.lexists(d / f"{n:016x}") for d in (self.layers_dir, self.trash_dir, self.quarantine_dir)):
            n += 1
        txn.set_meta("next_layer", n + 1)
        txn.set_meta("pending_layer", f"{n:016x}")
        return f"{n:016x}"

    def _sync_new_layer(self, fd: int) -> None:
        os.fsync(fd)
        fsync_dir(self.layers_dir)

    async def push_layer(self, txn_extra=None) -> str:
        """Journal and push a new empty writable layer. *txn_extra(txn, layer_id)* joins the transaction."""
        def reserve(txn):
            return self._new_layer_dir(txn)

        layer_id = await self.transact(reserve, essential=False)
        path = self.layers_dir / layer_id

        def commit(txn):
            stack = txn.get_meta("stack", {"layers": [], "sealed": True})
            stack = {"layers": stack["layers"] + [layer_id], "sealed": False}
            txn.set_meta("stack", stack)
            txn.set_meta("pending_layer", None)
            if txn_extra is not None:
                txn_extra(txn, layer_id)
            else:
                txn.event("layer.push", layer=layer_id)

        os.mkdir(path, 0o700)
        try:
            # the root directory is in every layer: the new one starts as the view's root is now
            # (copied in this turn: no request changes the root meanwhile); the fsyncs on a thread
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                src = self.fs.layers[-1].fd
                self.fs.copy_meta(src, fd, os.fstat(src))
                await trio.to_thread.run_sync(self._sync_new_layer, fd)
            finally:
                os.close(fd)
            await self.transact(commit, essential=False)
        except BaseException:
            # not journaled: nothing names the directory, and nothing was written in it
            try:
                os.rmdir(path)
            except OSError as exc:
                log.warning("could not remove %s after a failed push: %s", path, exc)
            raise
        self.fs.push_layer(layer_id, str(path))
        return layer_id

    async def set_sealed(self, sealed: bool, txn_extra=None) -> None:
        def commit(txn):
            stack = txn.get_meta("stack", {"layers": [], "sealed": True})
            txn.set_meta("stack", {"layers": stack["layers"], "sealed": sealed})
            if txn_extra is not None:
                txn_extra(txn)

        await self.transact(commit)
        if sealed:
            self.fs.seal_top()
        else:
            self.fs.unseal_top()

    async def drop_layers(self, count: int, txn_extra=None, reopen: bool = False, on_view=None,
                          committed=None) -> list[str]:
        """Journal, then drop the top *count* layers from the view; returns their ids.

        The view switches in O(1): the layers' directories are renamed into the trash and
        deleted later by the reaper thread. The kernel's caches are invalidated before this
        returns, so no process sees a stale name, attribute or page afterwards. The new top
        layer stays sealed unless *reopen*.

        *committed* = (inomap or None, stale base identities[, (names, inodes)]): the drop ends a
        commit, whose base now holds what the layers held, but for the entries the commit left
        out (names (parent ino, name) and inodes the kernel must forget besides, see
        OverlayFS.kernel_entries); the view's nodes move to their base identities in the same
        event-loop turn as the switch (OverlayFS.adopt). *on_view* is called once the view has
        switched, before the kernel notifications.
        """
        if count <= 0:
            if txn_extra is not None:
                await self.transact(txn_extra)
            return []
        ids = [layer.id for layer in self.fs.layers[-count:]]

        def commit(txn):
            stack = txn.get_meta("stack", {"layers": [], "sealed": True})
            if stack["layers"][-count:] != ids:
                raise RuntimeError(f"journal stack {stack['layers']} disagrees with the view {ids}")
            txn.set_meta("stack", {"layers": stack["layers"][:-count], "sealed": not reopen})
            txn.set_meta("dropped_layers", ids)
            if txn_extra is not None:
                txn_extra(txn)
            else:
                txn.event("layer.drop", layers=ids)

        t0 = time.perf_counter()
        await self.transact(commit)
        t1 = time.perf_counter()
        pairs = []
        if committed is not None and committed[0] is not None:
            pairs = self.fs.committed_identities(committed[0])
        dropped, (inos, entries) = self.fs.drop_layers(count)
        if committed is not None:
            self.fs.adopt(pairs, committed[1])
            # what the kernel knows of them changed too: set-ID bits are never committed, a
            # file linked into the base has one more link (and it may cache their listings)
            known = set(inos)
            inos = inos + [node.ino for node, _ in pairs if node.lookups > 0 and node.ino not in known]
            if len(committed) > 2:
                entries = entries + list(committed[2][0])
                inos = inos + list(committed[2][1])
        if reopen:
            self.fs.unseal_top()
        for layer in dropped:
            os.close(layer.fd)
            try:
                os.rename(self.layers_dir / layer.id, self.trash_dir / layer.id)
            except OSError as exc:  # the journal says it is gone: the next sweep trashes it
                log.warning("could not move dropped layer %s to the trash: %s", layer.id, exc)
        self._reaper_wake.set()
        self._purge_wake.set()  # their identities are forgotten off the drop's latency
        if on_view is not None:
            on_view()  # the view has switched; before the kernel notifications
        t2 = time.perf_counter()
        await trio.to_thread.run_sync(self.fs.invalidate, inos, entries)
        log.info("dropped %s: journal %.1f ms, view %.1f ms, kernel invalidation %.1f ms (%d inodes, %d names)",
                 ",".join(ids), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3,
                 len(inos), len(entries))
        return ids

    # ------------------------------------------------------------------ background deletion

    def finish_drops(self) -> None:
        """Forget every dropped layer's identities now (sync, in the event loop)."""
        if self.fs is not None:
            self.fs.purge_dropped()

    async def purge_loop(self) -> None:
        """Forget dropped layers' identities in slices, between requests, after each drop.
        (Only memory: an identity carries its layer's serial, see OverlayFS._key.)"""
        while True:
            await self._purge_wake.wait()
            # after the operation that dropped them has answered (a slice holds the GIL that its
            # worker threads need to finish)
            await trio.sleep(0.05)
            self._purge_wake = trio.Event()
            while self.fs is not None and self.fs.purge_dropped(budget=1000):
                await trio.sleep(0)

    def free_bytes(self, with_size: bool = False):
        """Room left on the state filesystem for the daemon (root may use the reserved blocks);
        *with_size*: (room, size of the filesystem). None when unknown."""
        try:
            sv = os.statvfs(self.state_dir)
        except OSError:
            return (None, 0) if with_size else None
        free = (sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize
        return (free, sv.f_blocks * sv.f_frsize) if with_size else free

    def trash_pending(self) -> bool:
        try:
            return bool(os.listdir(self.trash_dir))
        except OSError:
            return False

    def wake_reaper(self) -> None:
        self._reaper_wake.set()

    def reap_trash(self) -> int:
        n = 0
        for entry in os.listdir(self.trash_dir):
            _remove_tree(str(self.trash_dir / entry))
            n += 1
        return n

    def collect_orphans(self, stack) -> list:
        """Sweep layer directories the stack does not name (sweep_layers: the journal's dropped
        ones to the trash, unknown ones to the quarantine) and empty the trash (sync; may run on
        a worker thread: a drop moves its layers to the trash in the turn it drops them).
        Returns the quarantined paths."""
        moved = self.sweep_layers(stack)
        self.reap_trash()
        return moved

    def reaper_loop(self, stop: threading.Event) -> None:
        """Runs in its own thread: delete dropped layers whenever woken."""
        while not stop.is_set():
            try:
                self.reap_trash()
            except OSError as exc:
                log.warning("could not empty the trash: %s", exc)
            self._reaper_wake.wait(30)
            self._reaper_wake.clear()

    def disk_usage(self) -> int:
        return disk_usage(self.state_dir)
