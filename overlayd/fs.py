"""The layered copy-on-write filesystem: one pyfuse3 ``Operations`` over a stack of directories.

The stack is ``[base, layer 1, ..., layer N]``. Index 0 is the base, which is never written;
the top layer receives every change, unless it is *sealed* (a finished saga step) or there is
no layer at all, in which case every change fails with ``EROFS``.

Resolution is top-down through cached per-directory listings; a whiteout (a character device
0/0) hides lower entries; a directory carrying the ``user.overlayd.opaque`` xattr hides the
directories below it. See docs/ARCHITECTURE.md for the model and its invariants.

Locking model (as in s3ql): handlers are ``async`` but the work they do has no ``await`` in it,
so under trio each handler's critical section runs atomically. The only awaits are around
``fsync`` (in a worker thread, on a duplicate fd that nothing else closes) and the kernel cache
invalidation after a stack change.

Caveats (knowingly not done):
- changes made to the base behind the daemon's back are not noticed until the directory
  listing cache is refreshed (after a layer drop);
- renaming a directory that has entries in lower layers copies its whole subtree up (its
  files as metacopies: metadata only);
- a character device 0/0 cannot be created in the view (EPERM, as in kernel overlayfs): in a
  layer it is a whiteout; other devices can, by root only (the mount is ``nodev``: they cannot
  be opened through it);
- on a stock pyfuse3 (without patches/pyfuse3), ``fallocate(2)`` gets EOPNOTSUPP (libfuse
  answers ENOSYS, the kernel stops asking) and every directory listing reaches the daemon;
- a file system mounted inside the base is shown, but keyed by the base's ``st_dev``;
- a directory whose xattrs leave no room for the record of the base's attributes loses it
  (its commit then gives every attribute of the view's copy).
"""

import errno
import itertools
import json
import logging
import os
import stat
import struct
import time
from collections import OrderedDict

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import fusecaps, osutil
from .osutil import DIR_FLAGS, PRIVATE_XATTR

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 300.0  # entry and attribute timeout given to the kernel, in seconds
FD_CACHE = 1024  # directory fds kept open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
FALLOC_FL_PUNCH_HOLE = 0x02
K_DIR, K_FILE, K_WHITEOUT, K_OTHER = 1, 2, 3, 4
SYNTHETIC_INO = 1 << 48
WHITEOUT = "whiteout"  # the shared whiteout's name in the work directory


class Layer:
    """One directory of the stack."""

    __slots__ = ("id", "path", "fd", "dev", "serial", "sealed", "idents", "inos", "entries", "same_root")

    _serials = itertools.count(1)

    def __init__(self, layer_id: str, path: str, fd: int, sealed: bool = False, base: bool = False):
        self.id = layer_id
        self.path = path
        self.fd = fd
        self.dev = os.fstat(fd).st_dev
        self.serial = 0 if base else next(Layer._serials)  # part of every identity (see _key)
        self.sealed = sealed
        self.idents = set()  # identities (see _key) registered in by_ident while this layer lives
        self.inos = set()  # view inodes present below this layer whose attributes or data it changed
        self.entries = {}  # parent ino -> {names this layer changed in that directory}
        self.same_root = None  # does its root directory still look as the one below? (None: unknown)


class Listing:
    """The raw content of one physical directory of one layer."""

    __slots__ = ("names", "whiteouts")

    def __init__(self):
        self.names = {}  # name -> (kind, d_ino)
        self.whiteouts = set()


class Node:
    """A view inode. Directories have one (parent, name); files may have several."""

    __slots__ = ("ino", "is_dir", "parent", "name", "links", "lookups", "idents", "epoch",
                 "li", "loc", "dlayers", "merged", "opens", "dead", "st", "mc", "nsub")

    def __init__(self, ino: int, is_dir: bool):
        self.ino = ino
        self.is_dir = is_dir
        self.parent = None  # dirs only
        self.name = None  # dirs only
        self.links = set()  # files: {(parent Node, name)}
        self.lookups = 0
        self.idents = set()
        self.epoch = -1
        self.li = 0  # layer index of the top copy (files), of the top dir (dirs)
        self.loc = 0  # bumped whenever the backing file changes; handles reopen on mismatch
        self.dlayers = None  # dirs: [(layer index, d_ino)] top-down
        self.merged = None  # dirs: name -> layer index of the visible entry
        self.opens = 0
        self.dead = False
        self.st = None  # (epoch, stat) of an entry that lives in the base: it does not change
        self.mc = None  # files: (loc, origin or None[, its st_blocks]): is the top copy a metacopy (_origin)
        self.nsub = None  # dirs: (merged, how many of its entries are directories), see _dir_nlink


class Handle:
    __slots__ = ("node", "fd", "flags", "loc", "li", "wrote", "base")

    def __init__(self, node, fd, flags, li, base):
        self.node = node
        self.fd = fd
        self.flags = flags
        self.loc = node.loc
        self.li = li
        self.wrote = False
        self.base = base  # fd is a base file (read-only): never to be written, chmod-ed, reopened for writing


FUSE_NOTIFY_INVAL_ENTRY = 3  # linux/fuse.h
FUSE_EXPIRE_ONLY = 1


def _expire_entry(fuse_fd: int, parent: int, name: bytes) -> None:
    """``fuse_lowlevel_notify_expire_entry``: a FUSE_NOTIFY_INVAL_ENTRY message with the
    FUSE_EXPIRE_ONLY flag (protocol 7.38), written to the session's /dev/fuse fd in one write, as
    libfuse does. pyfuse3 exposes only the evicting variant."""
    body = struct.pack("=QII", parent, len(name), FUSE_EXPIRE_ONLY) + name + b"\0"
    msg = struct.pack("=IiQ", 16 + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body
    if os.write(fuse_fd, msg) != len(msg):
        raise OSError(errno.EIO, "short write of a FUSE notification")


def find_fuse_fd() -> int | None:
    """The fd of /dev/fuse that pyfuse3.init opened in this process (one mount per daemon)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "/dev/fuse":
                found.append(int(entry))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def _inconsistent(msg, *args) -> FUSEError:
    """An internal inconsistency: log it with a stack, answer EIO."""
    log.error("inconsistency: " + msg, *args, stack_info=True)
    return FUSEError(errno.EIO)


def _restore_times(fd: int, st: os.stat_result) -> None:
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_origin(fd: int, origin) -> bool:
    """Mark the layer file *fd* a metacopy of *origin*; False if its file system has no room left
    for that xattr next to the file's own (ENOSPC, E2BIG)."""
    try:
        os.setxattr(fd, osutil.ORIGIN_XATTR, osutil.encode_origin(*origin))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.E2BIG):
            return False
        raise
    return True


def _nofollow(target) -> dict:
    return {} if isinstance(target, int) else {"follow_symlinks": False}


def _fuse_errors(fn):
    """Turn OSError into FUSEError; anything else is a bug: log it and answer EIO."""
    import functools

    @functools.wraps(fn)
    async def wrapper(self, *args):
        if self.gate is not None:  # paused while a commit moves layer directories into the base
            await self.gate.wait()
        self.ctx = args[-1] if args and isinstance(args[-1], pyfuse3.RequestContext) else None
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args[:3])
            raise FUSEError(errno.EIO) from None

    return wrapper


class OverlayFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, base: str, layers=(), *, generation: int | None = None, workdir: str | None = None):
        super().__init__()
        fd = os.open(base, DIR_FLAGS)
        self.layers = [Layer("base", base, fd, sealed=True, base=True)]
        for layer_id, path, sealed in layers:
            self.layers.append(Layer(layer_id, path, os.open(path, DIR_FLAGS), sealed))
        self.generation = generation if generation is not None else int(time.time())
        self.epoch = 0
        self.nodes = {}
        self.by_ident = {}
        self.next_ino = SYNTHETIC_INO  # inode numbers of entries that do not come from the base
        self.pending_purge = []  # dropped layers whose identities are still in by_ident (see purge_dropped)
        self.garbage = []  # large objects of dropped layers, released by purge_dropped
        self.listings = {}  # (layer index, d_ino) -> Listing
        self.fds = OrderedDict()  # (layer index, d_ino) -> fd
        self.handles = {}
        self.dirhandles = {}
        self.next_fh = 1
        self.gate = None  # a trio.Event while paused (see pause)
        self.is_root = os.geteuid() == 0
        root = Node(ROOT, True)
        root.lookups = 1
        self.nodes[ROOT] = root
        self.root = root
        self.hardlinks_base = None  # base (dev, ino) -> [path tuples], built on first need
        self.on_change = None  # callable(kind, path tuple, listing) for journals and budgets
        self.on_write = None  # callable(node, nbytes) after every write
        self.on_release = None  # callable(node, fd) when a handle that wrote is released
        self.ctx = None  # the RequestContext of the request being served (handlers are atomic)
        self.fuse_fd = None  # /dev/fuse of this mount, for notifications pyfuse3 lacks (set by the daemon)
        # whiteouts are hard links of one whiteout in *workdir* (as kernel overlayfs shares its
        # whiteout inode): a link costs no inode allocation, a mknod does (about 30x slower)
        self.workfd = os.open(workdir, DIR_FLAGS) if workdir else None
        if self.workfd is not None:
            self._new_whiteout_template(reuse=True)

    # ------------------------------------------------------------------ stack API

    @property
    def top(self) -> int:
        return len(self.layers) - 1

    def writable(self) -> bool:
        return self.top > 0 and not self.layers[-1].sealed

    def push_layer(self, layer_id: str, path: str) -> None:
        """Put an empty writable layer on top. The view does not change."""
        fd = os.open(path, DIR_FLAGS)
        if self.layers[-1] is not self.layers[0]:
            self.layers[-1].sealed = True
        self.layers.append(Layer(layer_id, path, fd))
        self.root.epoch = -1  # the root is the one directory present in every layer
        log.info("layer %s pushed (depth %d)", layer_id, self.top)

    def pause(self) -> None:
        """Hold every request but forget and release until `resume`: a commit that moves whole
        directories out of a layer into the base pauses the view from the first move until the
        layers are dropped, so that no request resolves a name in a layer that no longer holds
        it. Nothing may write kernel notifications while paused (a process blocked here may hold
        the directory lock a notification needs): the drop's invalidations come after `resume`."""
        if self.gate is None:
            self.gate = trio.Event()

    def resume(self) -> None:
        if self.gate is not None:
            self.gate.set()
            self.gate = None

    def seal_top(self) -> None:
        if self.top > 0:
            self.layers[-1].sealed = True

    def unseal_top(self) -> None:
        if self.top > 0:
            self.layers[-1].sealed = False

    def drop_layers(self, count: int):
        """Remove the top *count* layers from the view, atomically and in O(1) of their size.

        Returns (dropped layers, kernel invalidations to make). The caller closes the
        layers' fds after moving their directories away, and runs the invalidations in a
        thread (:meth:`invalidate`).
        """
        if count <= 0:
            return [], ([], [])
        if count > self.top:
            raise ValueError(f"cannot drop {count} layers, only {self.top} exist")
        keep = len(self.layers) - count
        dropped = self.layers[keep:]
        del self.layers[keep:]
        self.epoch += 1
        inos = set()
        for layer in dropped:
            inos |= layer.inos
        for key in [k for k in self.listings if k[0] >= keep]:
            self.garbage.append(self.listings.pop(key))  # freed by purge_dropped, not on this latency
        for key in [k for k in self.fds if k[0] >= keep]:
            os.close(self.fds.pop(key))
        for h in self.handles.values():  # open handles into dropped layers reopen or get ESTALE
            if h.li >= keep:
                h.node.loc += 1
                inos.add(h.node.ino)  # and their cached pages go
        self.pending_purge.extend(dropped)
        # Tell the kernel only what it can still see: a node that lived only in the dropped
        # layers and has no open handle vanishes with its parent's entry, which is invalidated.
        def gone(node):
            return node is not self.root and all(any(i in layer.idents for layer in dropped)
                                                 for i in node.idents)
        inval_inos = [i for i in inos if i in self.nodes and self.nodes[i].lookups > 0
                      and (self.nodes[i].opens or not gone(self.nodes[i]))]
        inval_entries = []
        for layer in dropped:  # a name changed by several dropped layers is expired once per layer
            for p, names in layer.entries.items():
                node = self.nodes.get(p)
                if node is not None and node.lookups > 0 and not gone(node):
                    inval_entries.extend((p, n) for n in names)
                    if p not in inos:  # its listing, cached by the kernel (cache_readdir), goes too
                        inos.add(p)
                        inval_inos.append(p)
        log.info("dropped %d layer(s): %s", count, ", ".join(layer.id for layer in dropped))
        return dropped, (inval_inos, inval_entries)

    def purge_dropped(self, budget: int | None = None) -> int:
        """Forget up to *budget* (default: all) identities of dropped layers' files; returns
        how many are left. This is memory only, and may wait: an identity carries its layer's
        serial, which no live or later layer has, so a file that reuses a dropped file's inode
        number never resolves to the old node (invariant 5)."""
        n = 0
        while self.garbage:  # a cached listing of 10,000 names takes about 1 ms to release
            if budget is not None and n >= budget:
                return len(self.garbage) + sum(len(x.idents) for x in self.pending_purge)
            self.garbage.pop()
            n += 1000
        while self.pending_purge:
            layer = self.pending_purge[-1]
            idents = layer.idents
            while idents:
                if budget is not None and n >= budget:
                    return sum(len(x.idents) for x in self.pending_purge)
                ident = idents.pop()
                node = self.by_ident.pop(ident, None)
                if node is not None:
                    node.idents.discard(ident)
                n += 1
            self.pending_purge.pop()
        return 0

    def invalidate(self, inos, entries) -> None:
        """Tell the kernel to forget names and attributes/pages. Call from a worker thread.

        Names are *expired* where the kernel allows it (Linux >= 6.2): the kernel asks again at
        the next use of the name (one lookup) instead of evicting, there and then, every dentry
        and inode it cached below it. A drop of a step that created 10,000 files then costs the
        same as a drop of a step that created one.
        """
        for parent, name in entries:
            if self.fuse_fd is not None:
                try:
                    _expire_entry(self.fuse_fd, parent, name)
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # the kernel has nothing cached under that parent
                    log.info("expiring kernel entries failed (%s): invalidating them instead", exc.strerror)
                    self.fuse_fd = None
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError:
                pass
        for ino in inos:
            try:
                pyfuse3.invalidate_inode(ino)
            except OSError:
                pass

    def committed_identities(self, inomap: dict) -> list:
        """Before a commit's drop of every layer: (node, base identity) for each live node whose
        visible copy is in a layer. The commit put that very inode into the base (a hard link of
        a layer file, a layer directory moved whole), or a new one that *inomap* names
        ((layer dev, layer ino) -> base ino: directories, symlinks and copies it staged). See
        `adopt`."""
        base_dev = self.layers[0].dev
        out = []
        for li in range(1, len(self.layers)):
            for ident in list(self.layers[li].idents):
                node = self.by_ident.get(ident)
                if node is None or node.dead:
                    continue
                self._fresh(node)
                if node.dead:
                    continue
                if node.is_dir:
                    # known by its bottom-most copy (this one): a directory the base lacks; the
                    # commit moved or built its top copy
                    if not node.dlayers or node.dlayers[-1][0] != li:
                        continue
                    top_li, top_ino = node.dlayers[0]
                    ident = self._key(top_li, top_ino)
                elif node.li != li:
                    continue
                dev, ino = ident[0], ident[1]
                ino = inomap.get((dev, ino), ino if dev == base_dev else None)
                if ino is not None:
                    out.append((node, (base_dev, ino, 0)))
        return out

    def adopt(self, pairs, stale_idents=()) -> None:
        """Right after a commit's drop (same event-loop turn): forget what was cached about the
        base, then give each node of *pairs* its base identity. A process inside a committed
        tree (a cwd, an open directory, a cached name) goes on seeing the same tree: a commit
        does not change the view, only where it is stored."""
        self.base_changed(stale_idents)
        for node, ident in pairs:
            if ident not in self.by_ident:
                self._register(node, ident, 0)

    def base_changed(self, stale_idents=()) -> None:
        """The base was changed by a commit: forget what was cached about it."""
        for dev, ino in stale_idents:
            ident = (dev, ino, 0)
            node = self.by_ident.pop(ident, None)
            if node is not None:
                node.idents.discard(ident)
        for key in [k for k in self.listings if k[0] == 0]:
            del self.listings[key]
        for key in [k for k in self.fds if k[0] == 0]:
            os.close(self.fds.pop(key))
        self.hardlinks_base = None
        self.epoch += 1

    def kernel_entries(self, paths):
        """(names, inodes) the kernel may have cached for the view *paths*: (parent ino, name)
        of each, and its parent directory's inode (its link count and listing change). For a
        commit that leaves these paths out: they vanish from the view with the layers, while
        their parents stay (with the same inode numbers, so the kernel would keep their children)."""
        names, inos = [], set()
        for path in paths:
            parts = tuple(os.fsencode(path).split(b"/"))
            try:
                parent = self._walk(parts[:-1])
            except (OSError, FUSEError):
                continue
            if parent is not None and parent.lookups > 0:
                names.append((parent.ino, parts[-1]))
                inos.add(parent.ino)
        return names, list(inos)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for layer in self.layers:
            os.close(layer.fd)
        if self.workfd is not None:
            os.close(self.workfd)
            self.workfd = None

    def _new_whiteout_template(self, reuse: bool = False) -> None:
        if reuse:
            try:
                if osutil.is_whiteout(os.stat(WHITEOUT, dir_fd=self.workfd, follow_symlinks=False)):
                    return
            except FileNotFoundError:
                pass
        try:
            os.unlink(WHITEOUT + ".new", dir_fd=self.workfd)
        except FileNotFoundError:
            pass
        osutil.make_whiteout(self.workfd, WHITEOUT + ".new")
        os.rename(WHITEOUT + ".new", WHITEOUT, src_dir_fd=self.workfd, dst_dir_fd=self.workfd)

    def _whiteout(self, dirfd: int, name: bytes) -> None:
        """Create a whiteout *name* in *dirfd* (a directory of the top layer)."""
        if self.workfd is not None:
            for _ in range(2):
                try:
                    os.link(WHITEOUT, name, src_dir_fd=self.workfd, dst_dir_fd=dirfd, follow_symlinks=False)
                    return
                except OSError as exc:
                    if exc.errno == errno.EMLINK:  # the template has its filesystem's most links
                        self._new_whiteout_template()
                        continue
                    if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EOPNOTSUPP):
                        log.info("whiteouts are made one by one (%s)", exc.strerror)
                        os.close(self.workfd)
                        self.workfd = None
                        break
                    raise
        osutil.make_whiteout(dirfd, name)

    # ------------------------------------------------------------------ resolution

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        self._fresh(node)
        if node.dead and not node.opens:
            raise FUSEError(errno.ESTALE)
        return node

    def _listing(self, li: int, d_ino: int, fd_getter) -> Listing:
        key = (li, d_ino)
        lst = self.listings.get(key)
        if lst is not None:
            return lst
        lst = Listing()
        fd = osutil.reopen_dir(fd_getter())  # never read a cached fd (btrfs: see reopen_dir)
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if de.is_dir(follow_symlinks=False):
                        kind = K_DIR
                    elif de.is_file(follow_symlinks=False) or de.is_symlink():
                        kind = K_FILE
                    else:
                        st = de.stat(follow_symlinks=False)
                        if li > 0 and osutil.is_whiteout(st):
                            lst.whiteouts.add(name)
                            continue
                        kind = K_OTHER
                    lst.names[name] = (kind, de.inode())
        finally:
            os.close(fd)
        self.listings[key] = lst
        return lst

    def _dirfd(self, node: Node, li: int, d_ino: int | None = None) -> int:
        """An fd of *node*'s directory in layer *li* (cached, opened relative to its parent)."""
        if node is self.root:
            return self.layers[li].fd
        if d_ino is None:
            for lj, ino in node.dlayers:
                if lj == li:
                    d_ino = ino
                    break
            else:
                if node.dead:  # it left the view (a drop, a replacing rename): invariant 23
                    raise FUSEError(errno.ESTALE)
                raise _inconsistent("directory node %d has no copy in layer %d", node.ino, li)
        key = (li, d_ino)
        fd = self.fds.get(key)
        if fd is not None:
            self.fds.move_to_end(key)
            return fd
        pfd = self._dirfd(node.parent, li)
        fd = os.open(node.name, DIR_FLAGS, dir_fd=pfd)
        self.fds[key] = fd
        if len(self.fds) > FD_CACHE:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        return fd

    def _fresh(self, node: Node) -> None:
        """Recompute a node's place in the stack after the stack changed (lazily, per epoch)."""
        if node.epoch == self.epoch:
            return
        node.epoch = self.epoch
        if node is self.root:
            node.dlayers = [(li, 0) for li in range(self.top, -1, -1)]
            node.li = self.top
            node.merged = None
            return
        if node.is_dir:
            parent = node.parent
            self._fresh(parent)
            res = None if parent.dead else self._resolve_dir(parent, node.name)
            if res is None or self._key(res[-1][0], res[-1][1]) not in node.idents:
                self._kill(node)
                return
            node.dlayers = res
            node.li = res[0][0]
            node.merged = None
            return
        if node.dead and not node.links:
            return  # unlinked while open: its handles keep their file
        valid = set()
        li = None
        for parent, name in node.links:
            self._fresh(parent)
            if parent.dead:
                continue
            m = self._merged(parent)
            lj = m.get(name)
            if lj is None:
                continue
            kind, ino = self._entry(parent, lj, name)
            if kind == K_DIR or self._key(lj, ino) not in node.idents:
                continue
            valid.add((parent, name))
            li = lj
        node.links = valid
        if li is None:
            self._kill(node)
        elif li != node.li:
            node.li = li
            node.loc += 1

    def _kill(self, node: Node) -> None:
        node.dead = True
        node.loc += 1
        if node.is_dir:
            node.merged = {}
            node.dlayers = []
        else:
            node.links = set()

    def _entry(self, parent: Node, li: int, name: bytes):
        for lj, d_ino in parent.dlayers:
            if lj == li:
                lst = self._listing(li, d_ino, lambda: self._dirfd(parent, li, d_ino))
                return lst.names[name]
        raise _inconsistent("no entry %r in layer %d of directory %d", name, li, parent.ino)

    def _merged(self, node: Node) -> dict:
        """name -> layer index of the visible entry, for a fresh directory node."""
        if node.merged is not None:
            return node.merged
        merged = {}
        hidden = set()
        for li, d_ino in node.dlayers:
            lst = self._listing(li, d_ino, lambda: self._dirfd(node, li, d_ino))
            for name in lst.names:
                if name not in merged and name not in hidden:
                    merged[name] = li
            hidden |= lst.whiteouts
            hidden.update(lst.names)
        node.merged = merged
        return merged

    def _resolve_dir(self, parent: Node, name: bytes):
        """The dlayers [(li, d_ino)] of a directory entry, or None if *name* is no directory."""
        top = self._merged(parent).get(name)
        if top is None:
            return None
        out = []
        for li, d_ino in parent.dlayers:
            if li > top:
                continue
            lst = self._listing(li, d_ino, lambda: self._dirfd(parent, li, d_ino))
            ent = lst.names.get(name)
            if ent is None:
                if name in lst.whiteouts:
                    break
                continue
            if ent[0] != K_DIR:
                if li == top:
                    return None
                break
            out.append((li, ent[1]))
        if not out:
            return None
        return self._trim_opaque(parent, name, out)

    def _has_lower(self, parent: Node, above: int, name: bytes) -> bool:
        for li, d_ino in parent.dlayers:
            if li >= above:
                continue
            lst = self._listing(li, d_ino, lambda: self._dirfd(parent, li, d_ino))
            if name in lst.names:
                return True
            if name in lst.whiteouts:
                return False
        return False

    def _dirfd_for_child(self, parent, li, p_ino, name, c_ino) -> int:
        key = (li, c_ino)
        fd = self.fds.get(key)
        if fd is None:
            fd = os.open(name, DIR_FLAGS, dir_fd=self._dirfd(parent, li, p_ino))
            self.fds[key] = fd
            if len(self.fds) > FD_CACHE:
                _, old = self.fds.popitem(last=False)
                os.close(old)
        return fd

    def _trim_opaque(self, parent, name, out):
        if len(out) == 1:
            return out
        p_inos = dict(parent.dlayers)
        for i, (li, c_ino) in enumerate(out[:-1]):
            if osutil.is_opaque(self._dirfd_for_child(parent, li, p_inos[li], name, c_ino)):
                return out[: i + 1]
        return out

    def _lookup_node(self, parent: Node, name: bytes):
        """(node, stat) of a visible name, or None. Creates the node on first sight."""
        m = self._merged(parent)
        li = m.get(name)
        if li is None:
            return None
        if li == 0:
            hit = self._base_hit(parent, name)
            if hit is not None:
                return hit
        pfd = self._dirfd(parent, li)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            dl = self._resolve_dir(parent, name)
            if dl is None:  # the entry changed behind the cached listing (the base, under the daemon)
                raise FUSEError(errno.ESTALE)
            ident = self._key(dl[-1][0], dl[-1][1])
        else:
            ident = self._key(li, st.st_ino)
        node = self.by_ident.get(ident)
        if node is not None and node.is_dir == stat.S_ISDIR(st.st_mode):
            node.dead = False
            if node.is_dir:
                node.parent, node.name = parent, name
                if node.dlayers != dl:
                    node.dlayers = dl
                    node.merged = None
                node.li = dl[0][0]
                node.epoch = self.epoch
            else:
                node.links.add((parent, name))
                if node.li != li:
                    node.li = li
                    node.loc += 1
            node.st = (self.epoch, st) if node.li == 0 else None
            return node, st
        node = Node(self._pick_ino(ident), stat.S_ISDIR(st.st_mode))
        self.nodes[node.ino] = node
        # a directory is known by its bottom-most copy: registered with that copy's layer, so
        # that dropping a higher layer holding another copy does not forget it
        self._register(node, ident, dl[-1][0] if node.is_dir else li)
        node.epoch = self.epoch
        if node.is_dir:
            node.parent, node.name = parent, name
            node.dlayers = dl
            node.li = dl[0][0]
        else:
            node.links.add((parent, name))
            node.li = li
        if node.li == 0:
            node.st = (self.epoch, st)
        return node, st

    def _base_hit(self, parent: Node, name: bytes):
        """(node, stat) of a base entry seen before in this epoch, without a system call.

        The base does not change under a mounted workspace (a commit bumps the epoch), so its
        entries' attributes are cached on their nodes; readdirplus and lookups of unchanged
        trees (git status, find, grep -r) then cost dictionary lookups only.
        """
        kind, d_ino = self._entry(parent, 0, name)
        if kind == K_DIR:
            return None
        node = self.by_ident.get(self._key(0, d_ino))
        if node is None or node.is_dir or node.li != 0 or node.dead or node.st is None \
                or node.st[0] != self.epoch:
            return None
        node.links.add((parent, name))
        return node, node.st[1]

    def _pick_ino(self, ident) -> int:
        """A base entry keeps its own inode number (tools such as git compare st_ino with what
        they recorded on the base, and numbers stay the same across restarts); anything else
        gets a synthetic number above 2**48."""
        ino = ident[1]
        if ident[2] == 0 and ROOT < ino < SYNTHETIC_INO and ino not in self.nodes:
            return ino
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _key(self, li: int, ino: int):
        """The identity of the physical entry *ino* of layer *li* in by_ident and Node.idents:
        (st_dev, st_ino, layer serial), the serial 0 for the base.

        Entries of different layers are told apart even when they share a filesystem: if the
        base changes behind the workspace's back (another workspace's commit), a freed base inode
        number reused by a new layer file must not resolve to the node of the base file that had
        it; and an inode number freed with a dropped layer and reused in a live one must not
        resolve to the dropped file's node, whether or not its identities were purged yet.
        """
        layer = self.layers[li]
        return (layer.dev, ino, layer.serial)

    def _register(self, node: Node, ident, li: int) -> None:
        node.idents.add(ident)
        self.by_ident[ident] = node
        if li > 0:
            self.layers[li].idents.add(ident)

    def _unregister(self, node: Node, ident) -> None:
        """Forget an identity whose inode is gone (its number may come back for a new file)."""
        node.idents.discard(ident)
        if self.by_ident.get(ident) is node:
            del self.by_ident[ident]
        if ident[2]:  # and from its layer
            for layer in self.layers[1:] + self.pending_purge:
                if layer.serial == ident[2]:
                    layer.idents.discard(ident)
                    break

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = self.generation
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = st.st_mode
        if node.is_dir and len(node.dlayers or ()) > 1:
            e.st_nlink = self._dir_nlink(node)
        elif node.dead and not node.is_dir:
            e.st_nlink = 0
        else:
            e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        if not node.is_dir and node.li > 0 and stat.S_ISREG(st.st_mode):
            e.st_blocks = self._metacopy_blocks(node, st.st_blocks)  # du counts a renamed file
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _dir_nlink(self, node: Node) -> int:
        """st_nlink of a directory merged from several layers: 2 + its visible subdirectories,
        as a plain directory has (kernel overlayfs says 1). Counted from the merged listing the
        view keeps anyway, once per change of it (a change of the listing resets the count)."""
        if node.nsub is not None and node.nsub[0] is node.merged:
            return 2 + node.nsub[1]
        try:
            merged = self._merged(node)
            lsts = {li: self._listing(li, d_ino, lambda li=li, d_ino=d_ino: self._dirfd(node, li, d_ino))
                    for li, d_ino in node.dlayers}
            n = sum(1 for name, li in merged.items() if lsts[li].names[name][0] == K_DIR)
        except (OSError, FUSEError, KeyError):
            return 1  # an answer for stat, never a failure of it
        node.nsub = (merged, n)
        return 2 + n

    def _negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = TIMEOUT
        return e

    def _link_of(self, node: Node):
        """(parent node, name) of a live name of a file node, or None."""
        for link in node.links:
            return link
        return None

    def _stat(self, node: Node) -> os.stat_result:
        if node.is_dir:
            if node is self.root:
                return os.fstat(self.layers[self._root_attr_layer()].fd)
            return os.fstat(self._dirfd(node, node.li))
        link = self._link_of(node)
        if link is None:
            for h in self.handles.values():
                if h.node is node:
                    return os.fstat(h.fd)
            raise FUSEError(errno.ESTALE)
        if node.li == 0 and node.st is not None and node.st[0] == self.epoch and not node.dead:
            return node.st[1]
        parent, name = link
        return os.stat(name, dir_fd=self._dirfd(parent, node.li), follow_symlinks=False)

    def _root_attr_layer(self) -> int:
        """The layer whose root directory gives the view's root its attributes: the highest one
        that changed it. Every layer has a root, which a push creates as a copy of the one below
        (mode, owner, times, xattrs): until something changes it, the root keeps the attributes of
        the layer below, so that pushes and drops of unchanged layers change no attribute of the
        view (invariant 24). A copy-up into a root restores its times: no change either."""
        for li in range(self.top, 0, -1):
            layer = self.layers[li]
            if layer.same_root is None:
                layer.same_root = osutil.same_dir_meta(layer.fd, self.layers[li - 1].fd)
            if not layer.same_root:
                return li
        return 0

    # ------------------------------------------------------------------ copy-up

    def _check_writable(self) -> None:
        if not self.writable():
            raise FUSEError(errno.EROFS)

    def _touch(self, node: Node | None = None, entry=None) -> None:
        """Record what the top layer changed, for the kernel cache invalidation of its drop.

        Nodes that exist only in this layer are not recorded: when it drops they vanish with
        the entry of their first ancestor that survives (which is recorded), so a drop costs
        in proportion to the directories it touched, not to the files it created.
        """
        layer = self.layers[-1]
        if node is self.root or (entry is not None and entry[0] == ROOT):
            layer.same_root = None  # to be compared again (_root_attr_layer)
        if node is not None and node.ino not in layer.inos:
            if any(i not in layer.idents for i in node.idents) or node is self.root:
                layer.inos.add(node.ino)
        if entry is not None:
            names = layer.entries.get(entry[0])
            if names is None:
                layer.entries[entry[0]] = {entry[1]}
            else:
                names.add(entry[1])

    def _copy_up_dir(self, node: Node) -> int:
        """Make sure *node* exists as a directory in the top layer; return its fd there."""
        top = self.top
        self._fresh(node)
        if node.li == top:
            return self._dirfd(node, top)
        pfd = self._copy_up_dir(node.parent)
        src = self._dirfd(node, node.li)
        st = os.fstat(src)
        pst = os.fstat(pfd)
        os.mkdir(node.name, 0o700, dir_fd=pfd)
        fd = os.open(node.name, DIR_FLAGS, dir_fd=pfd)
        try:
            _restore_times(pfd, pst)  # a copy-up is no change of the parent, in the view
            # the base's attributes as the saga found them: a commit carries over only those
            # the saga changed, and refuses one the base changed too (merge.dir_fields)
            snap = json.dumps(osutil.dir_attrs(src, st)).encode() if node.li == 0 else \
                osutil.get_private(src, osutil.BASE_ATTRS_XATTR)
            if snap is not None:
                os.setxattr(fd, osutil.BASE_ATTRS_XATTR, snap)
            if node.li > 0 and osutil.get_private(src, osutil.UTIME_XATTR) is not None:
                os.setxattr(fd, osutil.UTIME_XATTR, b"y")
            self.copy_meta(src, fd, st)
            new_ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        self.fds[(top, new_ino)] = fd
        node.dlayers = [(top, new_ino)] + node.dlayers
        node.li = top
        self._listings_add(node.parent, top, node.name, K_DIR, new_ino)
        self.listings[(top, new_ino)] = Listing()
        self._touch(node)
        return fd

    def copy_meta(self, src_fd: int, dst_fd: int, st: os.stat_result) -> None:
        osutil.copy_xattrs(src_fd, dst_fd)
        if self.is_root:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _listings_add(self, dnode: Node, li: int, name: bytes, kind: int, ino: int) -> None:
        """Record a new entry *name* in *dnode*'s top-layer directory."""
        d_ino = dict(dnode.dlayers)[li]
        lst = self._listing(li, d_ino, lambda: self._dirfd(dnode, li, d_ino))
        lst.whiteouts.discard(name)
        lst.names[name] = (kind, ino)
        if dnode.merged is not None:
            dnode.merged[name] = li
            dnode.nsub = None

    def _listings_remove(self, dnode: Node, li: int, name: bytes, whiteout: bool) -> None:
        d_ino = dict(dnode.dlayers)[li]
        lst = self._listing(li, d_ino, lambda: self._dirfd(dnode, li, d_ino))
        lst.names.pop(name, None)
        if whiteout:
            lst.whiteouts.add(name)
        if dnode.merged is not None:
            dnode.merged.pop(name, None)
            dnode.nsub = None

    def _origin(self, node: Node):
        """(base ino, base path) if *node*'s current copy is a metacopy, else None. Cached per loc.

        A metacopy is a layer file that holds a base file's metadata but not its data: a rename
        (or a hard link, chmod, xattr change) of a base file copies only the metadata up, with
        ORIGIN_XATTR naming the base file; the data is read from the base until the first open
        for writing (or truncation) copies it (:meth:`_materialize`), and a commit copies it
        before planning (``merge.materialize``). The base never changes under a mounted
        workspace, and :func:`osutil.open_origin` checks the inode number anyway.
        """
        if node.is_dir or node.li == 0:
            return None
        if node.mc is not None and node.mc[0] == node.loc:
            return node.mc[1]
        link = self._link_of(node)
        if link is None:
            return None
        parent, name = link
        origin = osutil.get_origin(f"/proc/self/fd/{self._dirfd(parent, node.li)}/{os.fsdecode(name)}")
        node.mc = (node.loc, origin)
        return origin

    def forget_origins(self) -> None:
        """Forget every cached metacopy origin: a commit gave the metacopies their own data
        (``merge.materialize``) behind the view's back, and is about to replace their base files,
        so the next access reads the layer's copy (a cached origin would give EIO once the base
        file is replaced, "the base file ... was replaced behind the workspace's back")."""
        for node in self.nodes.values():
            node.mc = None

    def _metacopy_blocks(self, node: Node, blocks: int) -> int:
        """st_blocks of a metacopy: its origin's (the data it shows); *blocks* for any other
        file. Whether it is a metacopy is asked of its xattr (cached per loc with the origin),
        never guessed from its block count: an xattr too big for the inode takes a block. Never
        fails, and reads an origin only through names known to be current (the node is fresh):
        it runs inside lookup and readdir, where a node found by identity may still carry names
        from before a drop (see _fresh)."""
        if node.epoch != self.epoch and (node.mc is None or node.mc[0] != node.loc):
            return blocks
        try:
            origin = self._origin(node)
            if origin is None:
                return blocks
            if len(node.mc) < 3:
                fd = osutil.open_origin(self.layers[0].fd, origin)
                try:
                    node.mc = (node.mc[0], node.mc[1], os.fstat(fd).st_blocks)
                finally:
                    os.close(fd)
            return node.mc[2]
        except (OSError, FUSEError):
            return blocks

    def _materialize(self, node: Node, truncate: bool = False) -> None:
        """Give the top layer's metacopy of *node* its own data (none if *truncate*)."""
        origin = self._origin(node)
        if origin is None:
            return
        parent, name = self._link_of(node)
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd(parent, node.li))
        try:
            if truncate:
                st = os.fstat(fd)
                os.ftruncate(fd, 0)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                osutil.discard_xattr(fd, osutil.ORIGIN_XATTR)
            else:
                osutil.materialize(self.layers[0].fd, fd, origin)
        finally:
            os.close(fd)
        node.loc += 1  # read handles on the base file reopen the layer's copy
        node.mc = (node.loc, None)

    def _copy_up(self, node: Node, truncate: bool = False, meta_only: bool = False) -> None:
        """Make the top layer hold *node*'s file (all its names, for hard links).

        With *meta_only* a regular file with a single name may become a metacopy (see
        :meth:`_origin`); otherwise the top copy has its own data when this returns.
        """
        top = self.top
        if node.is_dir:
            self._copy_up_dir(node)
            return
        if node.li == top:
            if not meta_only:
                self._materialize(node, truncate)
            return
        link = self._link_of(node)
        if link is None:
            raise FUSEError(errno.ESTALE)
        parent, name = link
        src_li = node.li
        spfd = self._dirfd(parent, src_li)
        st = os.stat(name, dir_fd=spfd, follow_symlinks=False)
        names = [link]
        if st.st_nlink > 1:
            names = self._hardlink_names(node, src_li, (st.st_dev, st.st_ino)) or names
            if link not in names:
                names.insert(0, link)
        first_parent, first_name = names[0]
        origin, metacopy = None, False
        dpfd = self._copy_up_dir(first_parent)
        parent_times = {dpfd: os.fstat(dpfd)}
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(first_name, dir_fd=self._dirfd(first_parent, src_li))
            self._clear_whiteout(first_parent, first_name)
            os.symlink(target, first_name, dir_fd=dpfd)
            if self.is_root:
                os.chown(first_name, st.st_uid, st.st_gid, dir_fd=dpfd, follow_symlinks=False)
            os.utime(first_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dpfd, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            src = os.open(first_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=self._dirfd(first_parent, src_li))
            try:
                if not truncate and st.st_size > 0:
                    if src_li == 0:
                        origin = (st.st_ino, b"/".join(self._path_of(first_parent) + (first_name,)))
                    else:
                        origin = self._origin(node)
                metacopy = meta_only and origin is not None and len(names) == 1 and st.st_nlink == 1
                dst = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dpfd)
                try:
                    if metacopy:
                        os.ftruncate(dst, st.st_size)
                    elif origin is not None and src_li > 0:  # a lower metacopy: its data is in the base
                        self._copy_origin_data(origin, dst, st.st_size)
                    elif not truncate:
                        osutil.copy_data(src, dst, st.st_size)
                    self.copy_meta(src, dst, st)
                    if metacopy and not _set_origin(dst, origin):
                        # no room for the origin next to the file's own xattrs (ext4 keeps all of
                        # a file's xattrs in one 4 KiB block): a full copy instead
                        metacopy = False
                        if src_li > 0:
                            self._copy_origin_data(origin, dst, st.st_size)
                        else:
                            osutil.copy_data(src, dst, st.st_size)
                        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                    self._clear_whiteout(first_parent, first_name)
                    os.link(f"/proc/self/fd/{dst}", first_name, dst_dir_fd=dpfd, follow_symlinks=True)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        else:  # fifo, socket, device
            self._clear_whiteout(first_parent, first_name)
            os.mknod(first_name, st.st_mode, st.st_rdev, dir_fd=dpfd)
            if self.is_root:
                os.chown(first_name, st.st_uid, st.st_gid, dir_fd=dpfd, follow_symlinks=False)
            os.utime(first_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dpfd, follow_symlinks=False)
        new = os.stat(first_name, dir_fd=dpfd, follow_symlinks=False)
        self._listings_add(first_parent, top, first_name, K_FILE, new.st_ino)
        for p, n in names[1:]:
            pfd = self._copy_up_dir(p)
            parent_times.setdefault(pfd, os.fstat(pfd))
            self._clear_whiteout(p, n)
            os.link(first_name, n, src_dir_fd=dpfd, dst_dir_fd=pfd, follow_symlinks=False)
            self._listings_add(p, top, n, K_FILE, new.st_ino)
        for pfd, pst in parent_times.items():
            _restore_times(pfd, pst)
        node.links.update(names)
        self._register(node, self._key(top, new.st_ino), top)
        node.li = top
        node.loc += 1
        node.mc = (node.loc, origin if metacopy else None)
        self._touch(node)
        for p, n in names:
            self._changed("copyup", p, n)

    def _copy_origin_data(self, origin, dst: int, size: int) -> None:
        data = osutil.open_origin(self.layers[0].fd, origin)
        try:
            osutil.copy_data(data, dst, size)
        finally:
            os.close(data)

    def _clear_whiteout(self, parent: Node, name: bytes) -> None:
        """Remove a whiteout for *name* from the top layer's copy of *parent*, if any."""
        top = self.top
        d_ino = dict(parent.dlayers).get(top)
        if d_ino is None:
            return
        lst = self._listing(top, d_ino, lambda: self._dirfd(parent, top, d_ino))
        if name in lst.whiteouts:
            os.unlink(name, dir_fd=self._dirfd(parent, top))
            lst.whiteouts.discard(name)

    def _hardlink_names(self, node: Node, li: int, ident):
        """Every visible (parent, name) of the lower file *ident* living in layer *li*."""
        if li == 0:
            if self.hardlinks_base is None:
                self.hardlinks_base = self._scan_links(0)
            paths = self.hardlinks_base.get(ident, [])
        else:
            paths = self._scan_links(li).get(ident, [])
        out = []
        for path in paths:
            parent = self._walk(path[:-1])
            if parent is None:
                continue
            m = self._merged(parent)
            if m.get(path[-1]) != li:
                continue
            st = os.stat(path[-1], dir_fd=self._dirfd(parent, li), follow_symlinks=False)
            if (st.st_dev, st.st_ino) == ident:
                out.append((parent, path[-1]))
        return out

    def _scan_links(self, li: int):
        found = {}
        stack = [((), osutil.reopen_dir(self.layers[li].fd), True)]
        while stack:
            prefix, fd, close = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for de in it:
                        name = os.fsencode(de.name)
                        if de.is_dir(follow_symlinks=False):
                            try:
                                cfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                            except OSError:
                                continue
                            stack.append((prefix + (name,), cfd, True))
                        else:
                            st = de.stat(follow_symlinks=False)
                            if st.st_nlink > 1 and not (li > 0 and osutil.is_whiteout(st)):
                                found.setdefault((st.st_dev, st.st_ino), []).append(prefix + (name,))
            finally:
                if close:
                    os.close(fd)
        return found

    def _walk(self, path):
        """The directory node at a view path (tuple of names), or None."""
        node = self.root
        self._fresh(node)
        for name in path:
            res = self._lookup_node(node, name)
            if res is None or not res[0].is_dir:
                return None
            node = res[0]
        return node

    # ------------------------------------------------------------------ removal helpers

    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """True if a layer below the top shows *name* in *parent* (so removal needs a whiteout)."""
        return self._has_lower(parent, self.top, name)

    def _remove_entry(self, parent: Node, name: bytes, is_dir: bool) -> None:
        """Remove *name* from the view: delete it from the top layer, then whiteout if needed."""
        top = self.top
        pfd = self._copy_up_dir(parent)
        m = self._merged(parent)
        li = m.get(name)
        needs_whiteout = self._lower_has(parent, name)
        if li == top:
            if is_dir:
                self._rmtree_at(pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
        if needs_whiteout:
            self._whiteout(pfd, name)
        self._listings_remove(parent, top, name, needs_whiteout)
        self._touch(entry=(parent.ino, name))

    def _rmtree_at(self, dirfd: int, name: bytes) -> None:
        """Remove a directory of the top layer (which may hold whiteouts).

        Cached listings and fds of removed directories go too: their inode numbers may come
        back for new directories.
        """
        top = self.top

        def purge(st):
            self.listings.pop((top, st.st_ino), None)
            old = self.fds.pop((top, st.st_ino), None)
            if old is not None:
                os.close(old)

        osutil.rmtree_at(dirfd, name, purge)

    def _forget_ident_if_gone(self, node: Node, st: os.stat_result, li: int) -> None:
        """After removing the last name of a top-layer file, its inode number may be reused."""
        if li == self.top and (st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode)):
            self._unregister(node, self._key(li, st.st_ino))

    # ------------------------------------------------------------------ creation helpers

    def _prepare_create(self, parent_ino: int, name: bytes):
        self._check_writable()
        osutil.check_name(name)
        parent = self._node(parent_ino)
        if not parent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        if parent.dead:
            raise FUSEError(errno.ENOENT)
        if name in self._merged(parent):
            raise FUSEError(errno.EEXIST)
        pfd = self._copy_up_dir(parent)
        self._clear_whiteout(parent, name)
        return parent, pfd

    def _owner(self, parent: Node, ctx, mode: int):
        """uid, gid and mode for a new entry: the caller's ids, setgid directories' group."""
        uid, gid = ctx.uid, ctx.gid
        pst = os.fstat(self._dirfd(parent, self.top))
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return uid, gid, mode

    def _finish_create(self, parent: Node, pfd: int, name: bytes, ctx, mode: int, kind: int,
                       fd: int | None = None):
        uid, gid, mode = self._owner(parent, ctx, mode)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        if self.is_root:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            if fd is not None:
                os.fchmod(fd, perm)
            else:
                os.chmod(name, perm, dir_fd=pfd, follow_symlinks=False)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self._listings_add(parent, self.top, name, kind, st.st_ino)
        if kind == K_DIR:
            if self._lower_has(parent, name):
                osutil.set_opaque(self._dirfd_for_child(parent, self.top, dict(parent.dlayers)[self.top],
                                                         name, st.st_ino))
            self.listings[(self.top, st.st_ino)] = Listing()
        res = self._lookup_node(parent, name)
        node, st = res
        if not node.is_dir:
            node.mc = (node.loc, None)  # no metacopy: _attrs need not ask its xattr
        node.lookups += 1
        self._touch(node, (parent.ino, name))
        self._changed("create", parent, name)
        return node, st

    def _changed(self, kind: str, parent: Node, name: bytes, listing=None) -> None:
        if self.on_change is not None:
            self.on_change(kind, self._path_of(parent) + (name,), listing)

    def _base_names(self, node: Node):
        """The base's subtree under a directory as this view saw it: sorted relative paths (for
        conflict detection of a directory the saga removes or moves), or None if the base has no
        such directory. Cached listings are used where present, so entries that appeared in the
        base after this view read the directory do count as a change."""
        if not node.is_dir or node.dead:
            return None
        self._fresh(node)
        d_ino = dict(node.dlayers).get(0)
        if d_ino is None:
            return None
        out = []
        fd = self._dirfd(node, 0, d_ino)
        self._walk_base(fd, d_ino, b"", out, close=False)
        return sorted(out)

    def _walk_base(self, fd: int, d_ino: int, prefix: bytes, out: list, close: bool) -> None:
        try:
            lst = self._listing(0, d_ino, lambda: fd)
            for name, (kind, ino) in lst.names.items():
                rel = prefix + name
                out.append(rel)
                if kind == K_DIR:
                    try:
                        cfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    self._walk_base(cfd, ino, rel + b"/", out, close=True)
        finally:
            if close:
                os.close(fd)

    def _path_of(self, node: Node):
        out = []
        while node is not self.root and node is not None:
            out.append(node.name)
            node = node.parent
        return tuple(reversed(out))

    # ------------------------------------------------------------------ handlers: lookup

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if len(name) > osutil.NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        parent = self._node(parent_inode)
        if name == b".":
            node, st = parent, self._stat(parent)
        elif name == b"..":
            node = parent.parent or self.root
            st = self._stat(node)
        else:
            res = self._lookup_node(parent, name)
            if res is None:
                return self._negative()
            node, st = res
        node.lookups += 1
        return self._attrs(node, st)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and ino != ROOT:
                node.lookups = 0
                if node.dead and not node.opens:
                    del self.nodes[ino]
                    for ident in list(node.idents):
                        self._unregister(node, ident)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        return self._attrs(node, self._stat(node))

    @_fuse_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        parent, name = self._link_of(node) or (None, None)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        return os.readlink(name, dir_fd=self._dirfd(parent, node.li))

    # ------------------------------------------------------------------ handlers: directories

    @_fuse_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fh = self.next_fh
        self.next_fh += 1
        self.dirhandles[fh] = [node, None]
        if fusecaps.CACHE_READDIR:  # the kernel keeps the listing until invalidate_inode (drop_layers)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)
        return fh

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        entry = self.dirhandles[fh]
        node = entry[0]
        self._fresh(node)
        if node.dead:  # opened before a drop that took it, or before a rename replaced it
            raise FUSEError(errno.ESTALE)
        if entry[1] is None or start_id == 0:
            entry[1] = [b".", b".."] + sorted(self._merged(node))
        names = entry[1]
        for i in range(start_id, len(names)):
            name = names[i]
            if name == b".":
                child, st = node, self._stat(node)
                counted = False
            elif name == b"..":
                child = node.parent or self.root
                st = self._stat(child)
                counted = False
            else:
                try:
                    res = self._lookup_node(node, name)
                except (OSError, FUSEError):
                    continue
                if res is None:
                    continue
                child, st = res
                counted = True
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, st), i + 1):
                return
            if counted:
                child.lookups += 1

    async def releasedir(self, fh):
        self.dirhandles.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh, datasync):
        node = self.dirhandles[fh][0]
        self._fresh(node)
        if node.li == self.top and self.top > 0:
            fd = os.dup(self._dirfd(node, self.top))
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent, pfd = self._prepare_create(parent_inode, name)
        os.mkdir(name, 0o700, dir_fd=pfd)
        node, st = self._finish_create(parent, pfd, name, ctx, mode | stat.S_IFDIR, K_DIR)
        return self._attrs(node, st)

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        if device and (not self.is_root or ctx.uid != 0 or (stat.S_ISCHR(mode) and rdev == 0)):
            # root only (the kernel has checked CAP_MKNOD too); a character device 0/0 is a
            # whiteout in a layer, and anyone may create one: refused, as kernel overlayfs does
            raise FUSEError(errno.EPERM)
        parent, pfd = self._prepare_create(parent_inode, name)
        os.mknod(name, stat.S_IFMT(mode) | 0o600, rdev if device else 0, dir_fd=pfd)
        node, st = self._finish_create(parent, pfd, name, ctx, mode, K_OTHER if not stat.S_ISREG(mode) else K_FILE)
        return self._attrs(node, st)

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent, pfd = self._prepare_create(parent_inode, name)
        os.symlink(target, name, dir_fd=pfd)
        node, st = self._finish_create(parent, pfd, name, ctx, stat.S_IFLNK | 0o777, K_FILE)
        return self._attrs(node, st)

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent, pfd = self._prepare_create(parent_inode, name)
        oflags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT)) \
            | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        if not (oflags & (os.O_WRONLY | os.O_RDWR)):
            oflags |= os.O_RDWR
        else:
            oflags = (oflags & ~os.O_WRONLY) | os.O_RDWR
        fd = os.open(name, oflags, 0o600, dir_fd=pfd)
        try:
            node, st = self._finish_create(parent, pfd, name, ctx, mode, K_FILE, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        fh = self._new_handle(node, fd, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attrs(node, st)

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EPERM)
        parent, pfd = self._prepare_create(new_parent_inode, new_name)
        self._copy_up(node, meta_only=True)
        src_parent, src_name = self._link_of(node)
        os.link(src_name, new_name, src_dir_fd=self._dirfd(src_parent, self.top), dst_dir_fd=pfd,
                follow_symlinks=False)
        st = os.stat(new_name, dir_fd=pfd, follow_symlinks=False)
        self._listings_add(parent, self.top, new_name, K_FILE, st.st_ino)
        node.links.add((parent, new_name))
        node.lookups += 1
        self._touch(node, (parent.ino, new_name))
        self._changed("link", parent, new_name)
        return self._attrs(node, st)

    def _removal_target(self, parent_inode: int, name: bytes):
        """(parent, node, stat) of an entry about to be removed; EROFS, bad names, ENOENT first."""
        self._check_writable()
        osutil.check_name(name)
        parent = self._node(parent_inode)
        res = self._lookup_node(parent, name)
        if res is None:
            raise FUSEError(errno.ENOENT)
        return (parent, *res)

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        parent, node, st = self._removal_target(parent_inode, name)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if (node.li < self.top and (st.st_nlink > 1 or node.opens)) or (node.opens and self._origin(node)):
            # a lower hard link: the other names' st_nlink must drop; an open file: its handles
            # must keep a private copy they may change (fchmod, write) after the unlink
            self._copy_up(node)
            self._reopen_handles(node)
            st = os.stat(name, dir_fd=self._dirfd(parent, self.top), follow_symlinks=False)
        li = node.li
        self._remove_entry(parent, name, False)
        node.links.discard((parent, name))
        self._forget_ident_if_gone(node, st, li)
        if not node.links:
            node.dead = True
        self._touch(node)
        self._changed("unlink", parent, name)

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent, node, st = self._removal_target(parent_inode, name)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        self._fresh(node)
        if self._merged(node):
            raise FUSEError(errno.ENOTEMPTY)
        listing = self._base_names(node)
        li = node.li
        self._remove_entry(parent, name, True)
        self._forget_ident_if_gone(node, st, li)
        self._kill(node)
        self._touch(node)
        self._changed("rmdir", parent, name, listing)

    # ------------------------------------------------------------------ rename

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._check_writable()
        osutil.check_name(name_old)
        osutil.check_name(name_new)
        pold = self._node(parent_inode_old)
        pnew = self._node(parent_inode_new)
        src = self._lookup_node(pold, name_old)
        if src is None:
            raise FUSEError(errno.ENOENT)
        snode, sst = src
        dst = self._lookup_node(pnew, name_new)
        if dst is not None and dst[0] is snode:
            return  # the same file: rename(2) does nothing
        if flags & pyfuse3.RENAME_NOREPLACE and dst is not None:
            raise FUSEError(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst is None:
                raise FUSEError(errno.ENOENT)
            self._rename_exchange(pold, name_old, snode, pnew, name_new, dst[0])
            return
        if snode.is_dir:
            p = pnew
            while p is not None and p is not self.root:
                if p is snode:
                    raise FUSEError(errno.EINVAL)
                p = p.parent
        if dst is not None:
            dnode, dst_st = dst
            if snode.is_dir and not dnode.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not snode.is_dir and dnode.is_dir:
                raise FUSEError(errno.EISDIR)
            if dnode.is_dir:
                self._fresh(dnode)
                if self._merged(dnode):
                    raise FUSEError(errno.ENOTEMPTY)
        top = self.top
        src_listing = self._base_names(snode)
        dst_listing = self._base_names(dst[0]) if dst is not None else None
        # 1. everything the rename touches lives in the top layer; a replaced lower file with
        #    other names too (so that their st_nlink drops), or that is open (handles keep it)
        if dst is not None and not dst[0].is_dir and (
                (dst[0].li < top and (dst[1].st_nlink > 1 or dst[0].opens))
                or (dst[0].opens and self._origin(dst[0]))):
            self._copy_up(dst[0])
            self._reopen_handles(dst[0])
            dst = (dst[0], os.stat(name_new, dir_fd=self._dirfd(pnew, top), follow_symlinks=False))
        self._copy_up_for_move(snode)
        opfd = self._dirfd(pold, top)
        npfd = self._copy_up_dir(pnew)
        # 2. the destination: remove a lower-only or top entry so the rename can land
        if dst is not None:
            dnode, dst_st = dst
            dli = dnode.li
            if dli == top and dnode.is_dir:
                self._rmtree_at(npfd, name_new)  # empty in the view, may hold whiteouts
                self._listings_remove(pnew, top, name_new, False)
            self._clear_whiteout(pnew, name_new)
        else:
            self._clear_whiteout(pnew, name_new)
        dst_lower = self._lower_has(pnew, name_new)
        src_lower = self._lower_has(pold, name_old)
        # 3. the rename itself, then a whiteout if a lower layer shows the old name (a crash in
        #    between shows the file under both names: a duplicate, never a loss)
        osutil.renameat2(opfd, name_old, npfd, name_new, 0)
        if src_lower:
            self._whiteout(opfd, name_old)
        new_st = os.stat(name_new, dir_fd=npfd, follow_symlinks=False)
        self._listings_remove(pold, top, name_old, src_lower)
        self._listings_add(pnew, top, name_new, K_DIR if snode.is_dir else K_FILE, new_st.st_ino)
        if dst is not None:
            dnode, dst_st = dst
            if dnode.is_dir:
                self._kill(dnode)
            else:
                dnode.links.discard((pnew, name_new))
                if dnode.li == top:
                    self._forget_ident_if_gone(dnode, dst_st, top)
                if not dnode.links:
                    dnode.dead = True
            self._touch(dnode)
        if snode.is_dir:
            if dst_lower:
                osutil.set_opaque(self._dirfd_for_child(pnew, top, dict(pnew.dlayers)[top], name_new,
                                                        new_st.st_ino))
            snode.parent, snode.name = pnew, name_new
            self.epoch += 1  # descendants' places changed: recompute them lazily
        else:
            snode.links.discard((pold, name_old))
            snode.links.add((pnew, name_new))
        self._touch(snode, (pold.ino, name_old))
        self._touch(None, (pnew.ino, name_new))
        self._changed("rename", pold, name_old, src_listing)
        self._changed("rename", pnew, name_new, dst_listing)

    def _copy_up_for_move(self, node: Node) -> None:
        """A file is copied up (as a metacopy if it can be: a rename copies no data); a directory
        is copied up with its whole visible subtree."""
        if not node.is_dir:
            self._copy_up(node, meta_only=True)
            return
        self._copy_up_tree(node)

    def _copy_up_tree(self, node: Node) -> None:
        top = self.top
        self._fresh(node)
        fd = self._copy_up_dir(node)
        if len(node.dlayers) == 1:
            return
        for name, li in sorted(self._merged(node).items()):
            if li == top and self._entry(node, top, name)[0] != K_DIR:
                continue
            res = self._lookup_node(node, name)
            if res is None:
                continue
            child, _ = res
            if child.is_dir:
                self._copy_up_tree(child)
            else:
                self._copy_up(child, meta_only=True)
        osutil.set_opaque(fd)
        # the lower directories no longer show through: forget them
        node.dlayers = node.dlayers[:1]
        node.merged = None
        ident_top = self._key(top, node.dlayers[0][1])
        self._register(node, ident_top, top)

    def _rename_exchange(self, pold, name_old, snode, pnew, name_new, dnode) -> None:
        top = self.top
        listings = (self._base_names(snode), self._base_names(dnode))
        self._copy_up_for_move(snode)
        self._copy_up_for_move(dnode)
        opfd = self._dirfd(pold, top)
        npfd = self._dirfd(pnew, top)
        osutil.renameat2(opfd, name_old, npfd, name_new, osutil.RENAME_EXCHANGE)
        st_new = os.stat(name_new, dir_fd=npfd, follow_symlinks=False)
        st_old = os.stat(name_old, dir_fd=opfd, follow_symlinks=False)
        self._listings_add(pnew, top, name_new, K_DIR if snode.is_dir else K_FILE, st_new.st_ino)
        self._listings_add(pold, top, name_old, K_DIR if dnode.is_dir else K_FILE, st_old.st_ino)
        for node, (p_from, n_from), (p_to, n_to) in ((snode, (pold, name_old), (pnew, name_new)),
                                                      (dnode, (pnew, name_new), (pold, name_old))):
            if node.is_dir:
                node.parent, node.name = p_to, n_to
                osutil.set_opaque(self._dirfd_for_child(p_to, top, dict(p_to.dlayers)[top], n_to,
                                                        (st_new if p_to is pnew and n_to == name_new
                                                         else st_old).st_ino))
            else:
                node.links.discard((p_from, n_from))
                node.links.add((p_to, n_to))
            self._touch(node)
        self.epoch += 1
        self._touch(None, (pold.ino, name_old))
        self._touch(None, (pnew.ino, name_new))
        self._changed("rename", pold, name_old, listings[0])
        self._changed("rename", pnew, name_new, listings[1])

    # ------------------------------------------------------------------ attributes

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._check_writable()
        node = self._node(inode)
        handle = self.handles.get(fh) if fh is not None else None
        if node.dead and handle is None:
            # fchmod/fchown/futimens of an unlinked open file arrive without a handle
            handle = next((h for h in self.handles.values() if h.node is node), None)
            if handle is None:
                raise FUSEError(errno.ENOENT)
            if handle.base:
                raise _inconsistent("unlinked node %d is open on a base file", node.ino)
        if not node.dead:
            self._copy_up(node, truncate=fields.update_size and attr.st_size == 0,
                          meta_only=not fields.update_size)
        fd = None
        if handle is not None:
            self._refresh_handle(handle, write=True)
            fd = handle.fd
        if node.is_dir:
            target = dict(fd=self._dirfd(node, self.top))
        elif fd is not None:
            target = dict(fd=fd)
        else:
            parent, name = self._link_of(node)
            target = dict(name=name, dir_fd=self._dirfd(parent, self.top))
        st = self._stat_target(target)
        is_link = stat.S_ISLNK(st.st_mode)
        if fields.update_size:
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            if "fd" in target:
                os.ftruncate(target["fd"], attr.st_size)
            else:
                tfd = os.open(target["name"], os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=target["dir_fd"])
                try:
                    os.ftruncate(tfd, attr.st_size)
                finally:
                    os.close(tfd)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if "fd" in target:
                os.fchown(target["fd"], uid, gid)
            else:
                os.chown(target["name"], uid, gid, dir_fd=target["dir_fd"], follow_symlinks=False)
        if fields.update_mode and not is_link:
            if "fd" in target:
                os.fchmod(target["fd"], stat.S_IMODE(attr.st_mode))
            else:
                os.chmod(target["name"], stat.S_IMODE(attr.st_mode), dir_fd=target["dir_fd"])
        if fields.update_atime or fields.update_mtime:
            cur = self._stat_target(target)
            a = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
            m = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
            if "fd" in target:
                if node.is_dir:  # an explicit change of a directory's times: committed (merge.dir_fields)
                    os.setxattr(target["fd"], osutil.UTIME_XATTR, b"y")
                os.utime(target["fd"], ns=(a, m))
            else:
                os.utime(target["name"], ns=(a, m), dir_fd=target["dir_fd"], follow_symlinks=False)
        self._touch(node)
        return self._attrs(node, self._stat_target(target))

    @staticmethod
    def _stat_target(target) -> os.stat_result:
        if "fd" in target:
            return os.fstat(target["fd"])
        return os.stat(target["name"], dir_fd=target["dir_fd"], follow_symlinks=False)

    def _xattr_target(self, node: Node):
        """A path usable by os.*xattr for a node in its current layer (via /proc/self/fd)."""
        if node.is_dir:
            return self._dirfd(node, node.li)
        parent, name = self._link_of(node) or (None, None)
        if parent is None:
            for h in self.handles.values():
                if h.node is node:
                    return h.fd
            raise FUSEError(errno.ESTALE)
        pfd = self._dirfd(parent, node.li)
        return f"/proc/self/fd/{pfd}/{os.fsdecode(name)}"

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if name.startswith(PRIVATE_XATTR):
            raise FUSEError(errno.EPERM)
        self._check_writable()
        node = self._node(inode)
        self._copy_up(node, meta_only=True)
        target = self._xattr_target(node)
        try:
            os.setxattr(target, name, value, **_nofollow(target))
        except OSError as exc:
            # a private xattr takes room this value may need (ext4: one 4 KiB block for all of
            # an inode's xattrs): a metacopy gets its own data and drops its origin; a directory
            # drops the record of the base's attributes (its commit then gives every attribute,
            # as for a copy made before records existed: docs/ARCHITECTURE.md, known gaps)
            if exc.errno not in (errno.ENOSPC, errno.E2BIG):
                raise
            if node.is_dir and osutil.get_private(target, osutil.BASE_ATTRS_XATTR) is not None:
                osutil.discard_xattr(target, osutil.BASE_ATTRS_XATTR)
                osutil.discard_xattr(target, osutil.UTIME_XATTR)
            elif node.is_dir or self._origin(node) is None:
                raise
            else:
                self._materialize(node)
            os.setxattr(target, name, value, **_nofollow(target))
        self._touch(node)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        if name.startswith(PRIVATE_XATTR):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        target = self._xattr_target(node)
        return os.getxattr(target, name, **_nofollow(target))

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        target = self._xattr_target(node)
        names = os.listxattr(target, **_nofollow(target))
        return [os.fsencode(n) for n in names if not os.fsencode(n).startswith(PRIVATE_XATTR)]

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        if name.startswith(PRIVATE_XATTR):
            raise FUSEError(pyfuse3.ENOATTR)
        self._check_writable()
        node = self._node(inode)
        self._copy_up(node, meta_only=True)
        target = self._xattr_target(node)
        os.removexattr(target, name, **_nofollow(target))
        self._touch(node)

    @_fuse_errors
    async def statfs(self, ctx):
        sv = os.statvfs(self.layers[-1].fd if self.top > 0 else self.layers[0].fd)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, attr, getattr(sv, attr))
        out.f_namemax = osutil.NAME_MAX
        return out

    async def access(self, inode, mode, ctx):
        return True

    # ------------------------------------------------------------------ files

    def _new_handle(self, node: Node, fd: int, flags: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(node, fd, flags, node.li, self._reads_base(node))
        node.opens += 1
        return fh

    def _reads_base(self, node: Node) -> bool:
        """Does an fd from :meth:`_open_fd` for *node* (as it is now) refer to a base file?"""
        return node.li == 0 or self._origin(node) is not None

    def _open_fd(self, node: Node, flags: int) -> int:
        parent, name = self._link_of(node) or (None, None)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        oflags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_TRUNC)) \
            | os.O_NOFOLLOW | os.O_CLOEXEC
        if node.li > 0:
            origin = self._origin(node)
            if origin is not None:
                if flags & WRITE_FLAGS:  # callers copy up first; never hand out a base fd to write
                    raise _inconsistent("open for writing of metacopy node %d", node.ino)
                return osutil.open_origin(self.layers[0].fd, origin)
        return os.open(name, oflags, dir_fd=self._dirfd(parent, node.li))

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.dead:
            # an unlinked file that is still open (e.g. reopened through /proc/self/fd)
            h = next((h for h in self.handles.values() if h.node is node and h.loc == node.loc), None)
            if h is None:
                raise FUSEError(errno.ESTALE)
            if flags & WRITE_FLAGS:
                self._check_writable()
                if h.base:  # unlink and rename give open files a private copy first
                    raise _inconsistent("unlinked node %d is open on a base file", node.ino)
            oflags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_TRUNC)
            fd = os.open(f"/proc/self/fd/{h.fd}", oflags | os.O_CLOEXEC)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
            return pyfuse3.FileInfo(fh=self._new_handle(node, fd, flags), keep_cache=True)
        if flags & WRITE_FLAGS:
            self._check_writable()
            self._copy_up(node, truncate=bool(flags & os.O_TRUNC))
            link = self._link_of(node)
            if link is not None:
                self._changed("write", *link)
        fd = self._open_fd(node, flags)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
            self._touch(node)
        return pyfuse3.FileInfo(fh=self._new_handle(node, fd, flags), keep_cache=True)

    def _reopen_handles(self, node: Node) -> None:
        """Point every open handle of *node* at its current copy (while it still has a name)."""
        for h in self.handles.values():
            if h.node is node and h.loc != node.loc:
                fd = self._open_fd(node, h.flags)
                os.close(h.fd)
                h.fd, h.loc, h.li, h.base = fd, node.loc, node.li, self._reads_base(node)

    def _refresh_handle(self, h: Handle, write: bool) -> None:
        """Handles follow the view: reopen after a copy-up or a drop, copy up into a newer top.

        A handle whose file left the view (its layer was dropped) gets ESTALE; an unlinked
        file that is still open keeps working on its own data.
        """
        node = h.node
        self._fresh(node)
        if write:
            self._check_writable()
        if node.dead:
            if h.loc != node.loc:
                raise FUSEError(errno.ESTALE)
            return
        if write:
            self._copy_up(node)
        if h.loc != node.loc:
            fd = self._open_fd(node, h.flags)
            os.close(h.fd)
            h.fd = fd
            h.loc = node.loc
            h.base = self._reads_base(node)
        h.li = node.li

    @_fuse_errors
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if h.loc != h.node.loc or h.node.epoch != self.epoch:
            self._refresh_handle(h, write=False)
        return os.pread(h.fd, size, off)

    @_fuse_errors
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        if h.li != self.top or h.loc != h.node.loc or not self.writable() or h.node.epoch != self.epoch:
            self._refresh_handle(h, write=True)
        n = os.pwrite(h.fd, buf, off)
        if h.node.ino not in self.layers[-1].inos:
            self._touch(h.node)
        h.wrote = True
        if self.on_write is not None:
            self.on_write(h.node, n)
        return n

    @_fuse_errors
    async def fallocate(self, fh, mode, offset, length):
        # as a write: the handle's file is copied up (a metacopy gets its data) into the top layer
        h = self.handles[fh]
        if h.li != self.top or h.loc != h.node.loc or not self.writable() or h.node.epoch != self.epoch:
            self._refresh_handle(h, write=True)
        osutil.fallocate(h.fd, mode, offset, length)  # a mode the layer's fs lacks: its errno
        if h.node.ino not in self.layers[-1].inos:
            self._touch(h.node)
        h.wrote = True
        if self.on_write is not None:
            self.on_write(h.node, 0 if mode & FALLOC_FL_PUNCH_HOLE else length)

    async def flush(self, fh):
        # Writes reach the layer synchronously: nothing to flush on close(). ENOSYS tells the
        # kernel to stop sending FLUSH, one round trip less per close().
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.node.opens -= 1
        if h.wrote and self.on_release is not None:
            try:
                self.on_release(h.node, h.fd)
            except Exception:  # a hook must never break release
                log.exception("release hook failed")
        os.close(h.fd)
        node = h.node
        if node.dead and not node.opens and node.lookups <= 0 and node.ino in self.nodes:
            del self.nodes[node.ino]
            for ident in list(node.idents):
                self._unregister(node, ident)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        h = self.handles[fh]
        # the worker thread syncs a duplicate: a reopen (_refresh_handle, _reopen_handles) or the
        # release may close h.fd meanwhile, and its number be reused by another file (invariant 22)
        fd = os.dup(h.fd)
        try:
            def sync():
                osutil.stall_point("fsync")  # OVERLAYD_STALL_AT=fsync:S (tests)
                (os.fdatasync if datasync else os.fsync)(fd)

            await trio.to_thread.run_sync(sync)
        finally:
            os.close(fd)
        if h.li == self.top and self.top > 0 and not h.node.dead:
            link = self._link_of(h.node)
            if link is not None:
                # the file's name, and the directories a copy-up created for it, up to the
                # layer's root: duplicated fds, so that the LRU may close its own meanwhile
                fds = []
                d = link[0]
                while d is not None and d.li == h.li:
                    fds.append(os.dup(self._dirfd(d, h.li)))
                    d = d.parent
                try:
                    await trio.to_thread.run_sync(lambda: [os.fsync(fd) for fd in fds])
                finally:
                    for fd in fds:
                        os.close(fd)
