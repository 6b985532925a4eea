"""A live view of the base: inotify on the base's directories that the view has listed.

The base is shared: another workspace's commit, the person's editor or a ``git checkout``
change it behind the daemon. Each base directory whose listing the view reads
(:meth:`.resolve.Resolver._listing`) gets an inotify watch first; a task on the event loop
waits for the inotify fd to be readable (``trio.lowlevel.wait_readable``: never a blocking
read on the loop), reads every queued event, and in one event-loop turn forgets exactly what
the events make stale in the daemon's caches: the listing of the changed directory, the base
identity of a name whose inode went away, the cached base ``stat`` of a file whose content or
attributes changed, the base's hard-link table. Then, in a worker thread (the kernel may need
a directory lock that a request in flight holds: see :mod:`.kernel`), it tells the kernel:
the changed names are expired, the changed directories and files invalidated (attributes,
pages, a cached listing).

Names that a layer of the saga shows or hides (a copy-up, a whiteout, an opaque directory)
keep the saga's view: the kernel is not told about them, and conflict detection at commit
compares their base identity as before. The isolation level is therefore read-committed for
paths the saga has not touched, with conflict detection at commit for those it has
(docs/ARCHITECTURE.md, "A live base").

Where events are lost (the kernel's queue overflowed: ``IN_Q_OVERFLOW``) the daemon forgets
every cached base listing and stat, tells the kernel to forget every name and inode it holds
from the view and every negative entry it was given, and *revalidates* for a while: the base's
cached state is dropped every ``TICK`` and the kernel is given entries and attributes of base
files and directories with ``SHORT_TIMEOUT`` (and base files are opened without
``keep_cache``), so a change shows within a second without events. Where notifications cannot
be had at all (no inotify, the watch limit ``fs.inotify.max_user_watches`` reached) the view
revalidates for the daemon's life. ``mode`` says which (``overlayd list``, the ``status`` op).

Why a small ctypes reader rather than a library (``inotify_simple``, ``asyncinotify``): the
three calls and the event layout are all there is to it; a library would add a dependency to
install everywhere and still need the fd handed to trio's ``wait_readable``, the
``/proc/self/fd`` path of a directory fd for the watch, and our own handling of ``ENOSPC``
(the watch limit) and ``IN_Q_OVERFLOW``. fanotify (``FAN_REPORT_DFID_NAME``, one mark for the
whole base file system when root) is not used: it reports every change of the file system,
not only the base's, and inotify's per-directory watches are what the view needs.
"""

import ctypes
import errno
import logging
import os
import struct
import time

import pyfuse3
import trio

from .. import fusecaps
from .model import K_DIR, ROOT

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

NAMESPACE = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
CONTENT = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
MASK = NAMESPACE | CONTENT | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

LIVE = "live (inotify)"
REVALIDATING = "revalidating"
TICK = 0.25  # while revalidating: the base's cached state is forgotten this often
SHORT_TIMEOUT = 0.5  # while revalidating: the kernel's entry and attribute timeout of base entries
HELD_POLL = 0.05  # while a commit holds the base's events: how often the queue is read meanwhile
CALM = 5.0  # after an overflow, revalidate until the queue has not overflowed for this long
MAX_NEGATIVES = 100_000  # negative entries remembered (to expire after an overflow); others get SHORT_TIMEOUT

_libc = None


def _inotify():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _libc


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def parse(buf: bytes):
    """The events in a buffer read from an inotify fd: (wd, mask, name)."""
    out = []
    pos = 0
    while pos + EVENT.size <= len(buf):
        wd, mask, _cookie, length = EVENT.unpack_from(buf, pos)
        pos += EVENT.size
        name = buf[pos:pos + length].rstrip(b"\0")
        pos += length
        out.append((wd, mask, name))
    return out


class BaseWatch:
    """The watches on the base's directories of one view (an :class:`.stack.Stack`), and the
    task that applies their events (:meth:`run`)."""

    def __init__(self, fs):
        self.fs = fs
        self.fd = None
        self.wds = {}  # wd -> base directory inode (0: the base's root, as in Node.dlayers)
        self.by_dir = {}  # base directory inode -> wd
        self.negatives = set()  # (parent ino, name) given to the kernel as negative entries
        self.permanent = None  # why the view revalidates for good (no inotify, the watch limit)
        self.calm_at = None  # while revalidating after an overflow: when to go live again
        self.overflows = 0
        self.events = 0
        try:
            self.fd = _check(_inotify().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        except (OSError, AttributeError) as exc:
            more = (f"; fs.inotify.max_user_instances: {_read_sysctl('max_user_instances')}"
                    if getattr(exc, "errno", None) == errno.EMFILE else "")
            self.permanent = f"inotify is not available ({exc}{more})"
        fs.base_watch = self
        self._forget_base()  # listings read before now have no watch: read them again

    # ------------------------------------------------------------------ state

    @property
    def live(self) -> bool:
        return self.permanent is None and self.calm_at is None

    @property
    def mode(self) -> str:
        return LIVE if self.live else REVALIDATING

    def timeout(self, from_base: bool) -> float | None:
        """The kernel's timeout for an entry of the view: None for the usual one."""
        return None if self.live or not from_base else SHORT_TIMEOUT

    def negative(self, parent_ino: int, name: bytes) -> float | None:
        """A negative entry is being given: remember it (expired after an overflow); None for the
        usual timeout, else a short one (not remembered, or not live)."""
        if not self.live:
            return SHORT_TIMEOUT
        if len(self.negatives) >= MAX_NEGATIVES and (parent_ino, name) not in self.negatives:
            return SHORT_TIMEOUT
        self.negatives.add((parent_ino, name))
        return None

    def _close_fd(self) -> None:
        if self.fd is not None:
            try:
                trio.lowlevel.notify_closing(self.fd)  # the task waiting on it wakes up
            except RuntimeError:
                pass  # outside trio: nobody waits
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self._close_fd()
        if self.fs.base_watch is self:
            self.fs.base_watch = None

    # ------------------------------------------------------------------ watches

    def add(self, d_ino: int, dirfd: int) -> None:
        """Watch the base directory *d_ino* (open as *dirfd*) before its listing is read."""
        if self.permanent is not None or self.fd is None:
            return
        # asked again even if d_ino is watched: a directory removed (its events not read yet)
        # and a new one with the same inode number need a watch of their own (another wd)
        try:
            wd = _check(_inotify().inotify_add_watch(self.fd, f"/proc/self/fd/{dirfd}".encode(), MASK))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # removed meanwhile: its listing cannot be read either
            if exc.errno == errno.ENOSPC:
                why = ("the inotify watch limit is reached (fs.inotify.max_user_watches: "
                       f"{_read_sysctl('max_user_watches')})")
            else:
                why = f"a base directory cannot be watched ({exc.strerror})"
            self._go_permanent(why)
            return
        old = self.wds.get(wd)
        if old is not None and old != d_ino:
            self.by_dir.pop(old, None)
        self.wds[wd] = d_ino
        self.by_dir[d_ino] = wd

    def _go_permanent(self, why: str) -> None:
        self.permanent = why
        log.warning("base view: revalidating from now on: %s; changes made to the base outside "
                    "this workspace show within %.2f s", why, SHORT_TIMEOUT + TICK)
        self._close_fd()
        self.wds.clear()
        self.by_dir.clear()
        self.flush_needed = True

    flush_needed = False  # the kernel must forget what it has from the view (set on a mode change)

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        if self.permanent:
            log.warning("base view: %s (%s): changes made to the base outside this workspace show within "
                        "%.2f s", self.mode, self.permanent, SHORT_TIMEOUT + TICK)
        else:
            log.info("base view: %s", self.mode)
        events = []
        while True:
            held = self.fs.gate is not None or self.fs.base_hold > 0
            try:
                if self.fd is not None and self.live and not held:
                    await trio.lowlevel.wait_readable(self.fd)
                else:
                    with trio.move_on_after(HELD_POLL if held else TICK):
                        if self.fd is not None:
                            await trio.lowlevel.wait_readable(self.fd)
                        else:
                            await trio.sleep_forever()
            except trio.ClosedResourceError:
                pass  # the watches were given up (_go_permanent)
            events.extend(self._read())  # read even while held: the kernel's queue is bounded
            if self.fs.gate is not None or self.fs.base_hold > 0:
                continue  # a commit is changing the base: its drop adopts the result first
            events, batch = [], events
            inos, entries = self.apply(batch)
            if not self.live:
                self._forget_base()
                inos = list(inos) + self._cached_base_listings()
                if self.calm_at is not None and time.monotonic() >= self.calm_at:
                    self.calm_at = None
                    log.info("base view: %s again (no overflow for %.0f s)", self.mode, CALM)
            if self.flush_needed:
                self.flush_needed = False
                more_inos, more_entries = self.everything()
                inos = list(inos) + more_inos
                entries = list(entries) + more_entries
            if inos or entries:
                await trio.to_thread.run_sync(self.fs.invalidate, inos, entries, abandon_on_cancel=True)

    def _read(self) -> list:
        if self.fd is None:
            return []
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            except OSError as exc:
                self._go_permanent(f"reading inotify events failed ({exc.strerror})")
                return out
            if not buf:
                return out
            out.extend(parse(buf))

    # ------------------------------------------------------------------ applying events

    def apply(self, events):
        """Forget what *events* make stale (on the loop, in one turn); returns the kernel's
        invalidations (inodes, (parent ino, name) entries) to make in a worker thread."""
        fs = self.fs
        changed = {}  # base directory inode -> {name: mask}; b"" for the directory itself
        for wd, mask, name in events:
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                self._overflow()
                continue
            d_ino = self.wds.get(wd)
            if d_ino is None:
                continue
            if mask & IN_IGNORED:  # the directory was removed (or the watch dropped)
                del self.wds[wd]
                if self.by_dir.get(d_ino) == wd:  # else a new directory has the inode number now
                    del self.by_dir[d_ino]
                    self._dir_gone(d_ino)
                continue
            names = changed.setdefault(d_ino, {})
            names[name] = names.get(name, 0) | mask
        inos, entries = set(), []
        namespace = False
        links = False
        base_dev = fs.layers[0].dev
        for d_ino, names in changed.items():
            dnode = fs.root if d_ino == 0 else fs.by_ident.get((base_dev, d_ino, 0))
            if dnode is not None and (dnode.dead or not dnode.is_dir):
                dnode = None
            lst = fs.listings.get((0, d_ino))
            if any(m & NAMESPACE for m in names.values()):
                fs.listings.pop((0, d_ino), None)
                namespace = True
            for name, mask in names.items():
                if not name:  # the directory itself: its attributes
                    if dnode is not None and mask & CONTENT and self._from_base(dnode, None):
                        inos.add(dnode.ino)
                    continue
                old = lst.names.get(name) if lst is not None else None
                child = fs.by_ident.get((base_dev, old[1], 0)) if old is not None else None
                if mask & NAMESPACE:
                    if old is not None and old[0] == K_DIR:
                        if mask & IN_DELETE:
                            self._dir_gone(old[1])
                    elif old is not None:
                        links = True
                        if child is not None and not child.is_dir and not self._still_there(dnode, d_ino, name, old[1]):
                            fs._unregister(child, (base_dev, old[1], 0))
                    else:
                        links = links or not mask & IN_ISDIR
                if child is not None:
                    child.st = None  # its cached base stat
                    child.mc = None
                    child.nsub = None
                if dnode is None or not self._from_base(dnode, name):
                    continue  # unseen by the kernel, or the saga's own (a layer shows or hides it)
                if mask & NAMESPACE:
                    if dnode.lookups > 0:
                        entries.append((dnode.ino, name))
                    inos.add(dnode.ino)  # its listing, link count, times
                    self.negatives.discard((dnode.ino, name))
                if child is not None and (child.lookups > 0 or child.opens) and (child.is_dir or child.li == 0):
                    inos.add(child.ino)
        if namespace:
            fs.epoch += 1  # nodes find their place again (a name gone: the node is dead)
            fs.root.epoch = -1
        if links:
            fs.hardlinks_base = None
            fs.base_version += 1  # a scan of the base's hard links running meanwhile is stale
        return list(inos), entries

    def _cached_base_listings(self) -> list:
        """While revalidating without opendir (pyfuse3.no_opendir), the kernel keeps every
        listing it read: the directories with a base copy that it holds, to invalidate each
        TICK (with opendir, such directories are opened without cache_readdir instead)."""
        if not fusecaps.NO_OPENDIR or not pyfuse3.no_opendir:
            return []
        return [n.ino for n in self.fs.nodes.values()
                if n.is_dir and n.lookups > 0 and not n.dead and any(li == 0 for li, _ in n.dlayers or ())]

    def _dir_gone(self, d_ino: int) -> None:
        """A base directory was removed: its inode number may come back for a new directory,
        which must not find the old one's node, listing or fd."""
        fs = self.fs
        fs.listings.pop((0, d_ino), None)
        fd = fs.fds.pop((0, d_ino), None)
        if fd is not None:
            os.close(fd)
        if d_ino:
            ident = (fs.layers[0].dev, d_ino, 0)
            node = fs.by_ident.get(ident)
            if node is not None and node.is_dir:
                fs._unregister(node, ident)
                node.merged = None
            fs._drop_evicted(ident)
        fs.epoch += 1  # merged listings built from it are recomputed

    def _from_base(self, dnode, name) -> bool:
        """Does the view show *name* of directory *dnode* (or *dnode* itself, name None) from the
        base, as far as the cached state tells? A name that a layer shows or hides is the saga's."""
        fs = self.fs
        dl = dnode.dlayers
        if dl is None:
            return True  # not resolved yet: nothing of it is cached
        if not any(li == 0 for li, _ in dl):
            return False  # an opaque directory of the saga hides the base's
        if name is None:
            return dnode.li == 0
        for li, d_ino in dl:
            if li == 0:
                break
            lst = fs.listings.get((li, d_ino))
            if lst is not None and (name in lst.names or name in lst.whiteouts):
                return False
        return True

    def _still_there(self, dnode, d_ino, name, ino) -> bool:
        """Is base inode *ino* still at *name* of base directory *d_ino*? (False if unknown)"""
        fs = self.fs
        try:
            if d_ino == 0:
                pfd = fs.layers[0].fd
            elif dnode is not None:
                pfd = fs._dirfd(dnode, 0, d_ino)
            else:
                return False
            return os.stat(name, dir_fd=pfd, follow_symlinks=False).st_ino == ino
        except Exception:  # noqa: BLE001 - gone, or its directory is
            return False

    def _overflow(self) -> None:
        self.overflows += 1
        was_live = self.live
        self.calm_at = time.monotonic() + CALM
        self._forget_base()
        self.flush_needed = True
        if was_live:
            log.warning("base view: the inotify queue overflowed (fs.inotify.max_queued_events: %s): "
                        "changes to the base were missed; forgot the cached base, revalidating until "
                        "it is calm for %.0f s", _read_sysctl("max_queued_events"), CALM)

    def _forget_base(self) -> None:
        """Forget every cached listing and stat of the base (they are read again on use)."""
        fs = self.fs
        for key in [k for k in fs.listings if k[0] == 0]:
            del fs.listings[key]
        fs.hardlinks_base = None
        fs.base_version += 1
        fs.epoch += 1
        fs.root.epoch = -1

    def everything(self):
        """Every name and inode the kernel holds from the view, and every negative entry it was
        given: (inodes, entries) to invalidate after events were lost."""
        fs = self.fs
        inos, entries = [], list(self.negatives)
        self.negatives.clear()
        for node in fs.nodes.values():
            if node.lookups <= 0 and not node.opens:
                continue
            inos.append(node.ino)
            if node.is_dir:
                if node.parent is not None and node.parent.lookups > 0:
                    entries.append((node.parent.ino, node.name))
            else:
                entries.extend((p.ino, n) for p, n in node.links if p.lookups > 0)
        if ROOT not in inos:
            inos.append(ROOT)
        return inos, entries


def _read_sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"
