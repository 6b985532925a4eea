"""Resolution through the layers: the view's nodes, found top-down through cached listings.

:class:`Resolver` holds the view's state (the stack, the nodes, the identities, the listing and
directory-fd caches) and answers, without changing anything on disk, what a name or an inode
is in the view: which layer shows it (whiteouts hide lower entries, opaque directories hide
lower directories), its merged directory listing, its attributes and whether its top copy is
a metacopy. See docs/ARCHITECTURE.md, "Resolution caches".

Every method here is synchronous and runs on the event loop: no ``await``, so a request sees
one consistent view (invariant 3).
"""

import errno
import logging
import os
import stat
import time
from collections import OrderedDict

import pyfuse3
from pyfuse3 import FUSEError

from .. import osutil
from ..osutil import DIR_FLAGS
from .model import (FD_CACHE, K_DIR, K_FILE, K_OTHER, ROOT, SYNTHETIC_INO, TIMEOUT, Layer, Listing, Node,
                    inconsistent)

log = logging.getLogger(__name__)


class Resolver:
    """The view's state and its read-only questions (the base class of the file system)."""

    def __init__(self, base: str, layers=(), *, generation: int | None = None):
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
        # nodes forgotten by the kernel whose inode number is not their base entry's own (a
        # synthetic number, or a copied-up or renamed base entry): identity -> inode number, and
        # inode number -> its identities, so that the node comes back as it was (see _evict)
        self.ino_of = {}
        self.evicted = {}
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
        self.base_version = 0  # bumped when a commit changed the base (base_changed)
        self.on_change = None  # callable(kind, path tuple, listing) for journals and budgets
        self.on_write = None  # callable(node, nbytes) after every write
        self.on_release = None  # callable(node, fd) when a handle that wrote is released
        self.ctx = None  # the RequestContext of the request being served (handlers are atomic)
        self.fuse_fd = None  # /dev/fuse of this mount, for notifications pyfuse3 lacks (set by the daemon)
        self.workfd = None  # the work directory (its whiteout template: copyup)
        self.base_watch = None  # the watches on the base (basewatch.BaseWatch, set by the daemon)
        self.base_hold = 0  # > 0 while a commit changes the base: its events wait (Stack.base_held)

    @property
    def top(self) -> int:
        return len(self.layers) - 1

    def writable(self) -> bool:
        return self.top > 0 and not self.layers[-1].sealed

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
        dfd = fd_getter()
        if li == 0 and self.base_watch is not None:
            self.base_watch.add(d_ino, dfd)  # before reading it: a change meanwhile is an event
        fd = osutil.reopen_dir(dfd)  # never read a cached fd (btrfs: see reopen_dir)
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
                raise inconsistent("directory node %d has no copy in layer %d", node.ino, li)
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
        raise inconsistent("no entry %r in layer %d of directory %d", name, li, parent.ino)

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
                if node.dlayers != dl or node.epoch != self.epoch:  # (a base listing may have changed)
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
        if ident in self.ino_of:
            node = self._revive(ident, stat.S_ISDIR(st.st_mode))
            if node is not None:
                return self._lookup_node(parent, name)  # found by its identity now
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

    # ------------------------------------------------------------------ bounded memory

    def _evict(self, node: Node) -> bool:
        """Forget a node the kernel no longer knows (lookup count 0, no open handle, no copy in
        flight), as s3ql does: memory then follows what the kernel holds, not what was ever
        looked at. A node whose inode number its base entry does not give again (a synthetic
        number, a copied-up or renamed base entry) leaves its identities and number in
        ``ino_of``/``evicted``, so that it comes back with the same st_ino (git compares it
        with its index). A directory takes its base listing with it (read again when needed)."""
        if node is self.root or node.lookups > 0 or node.opens or self.nodes.get(node.ino) is not node:
            return False
        if node.ino in getattr(self, "in_flight", ()):
            return False
        del self.nodes[node.ino]
        if node.dead:
            for ident in list(node.idents):
                self._unregister(node, ident)
            return True
        keep = set()
        for ident in node.idents:
            if self.by_ident.get(ident) is node:
                del self.by_ident[ident]
            keep.add(ident)
        base_dev = self.layers[0].dev
        if keep and keep != {(base_dev, node.ino, 0)}:
            for ident in keep:
                self.ino_of[ident] = node.ino
            self.evicted[node.ino] = (node.is_dir, keep)
        if node.is_dir and node.dlayers:
            for li, d_ino in node.dlayers:
                if li == 0:
                    self.listings.pop((0, d_ino), None)
        return True

    def _revive(self, ident, is_dir: bool):
        """The node of an evicted identity, with its inode number and all its identities again."""
        ino = self.ino_of.get(ident)
        ent = self.evicted.get(ino)
        if ent is None or ent[0] != is_dir:
            self._drop_evicted(ident)
            return None
        node = self.nodes.get(ino)
        if node is not None:  # its number is in use (a base entry's own): start afresh
            for i in ent[1]:
                self.ino_of.pop(i, None)
            del self.evicted[ino]
            return None
        del self.evicted[ino]
        node = Node(ino, is_dir)
        self.nodes[ino] = node
        for i in ent[1]:
            self.ino_of.pop(i, None)
            node.idents.add(i)
            self.by_ident[i] = node
        return node

    def _drop_evicted(self, ident) -> None:
        """An identity is gone (its inode freed, its layer dropped): no evicted node keeps it."""
        ino = self.ino_of.pop(ident, None)
        if ino is None:
            return
        ent = self.evicted.get(ino)
        if ent is not None:
            ent[1].discard(ident)
            if not ent[1]:
                del self.evicted[ino]

    def memory_stats(self) -> dict:
        """How much the view holds (for `status`)."""
        return {"nodes": len(self.nodes), "identities": len(self.by_ident), "evicted": len(self.evicted),
                "listings": len(self.listings), "dir_fds": len(self.fds)}

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
        self._drop_evicted(ident)
        if ident[2]:  # and from its layer
            for layer in self.layers[1:] + self.pending_purge:
                if layer.serial == ident[2]:
                    layer.idents.discard(ident)
                    break

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = self.generation
        e.entry_timeout = e.attr_timeout = self._timeout(node)
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

    def _negative(self, parent: Node | None = None, name: bytes | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = TIMEOUT
        if self.base_watch is not None and parent is not None:
            e.entry_timeout = self.base_watch.negative(parent.ino, name) or TIMEOUT
        return e

    def _timeout(self, node: Node) -> float:
        """The kernel's entry and attribute timeout for *node*: short for the base's entries
        while the base is revalidated instead of watched (basewatch)."""
        w = self.base_watch
        if w is None or w.live:
            return TIMEOUT
        from_base = any(li == 0 for li, _ in node.dlayers or ()) if node.is_dir else node.li == 0
        return w.timeout(from_base) or TIMEOUT

    def _keep_cache(self, node: Node) -> bool:
        """May the kernel keep an opened file's pages (a directory's listing)? Not a base file's
        (a directory's with a base copy) while the base is revalidated (basewatch): they are read
        again at each open."""
        if self.base_watch is None or self.base_watch.live:
            return True
        if node.is_dir:
            return not any(li == 0 for li, _ in node.dlayers or ())
        return node.li != 0

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

    # ------------------------------------------------------------------ paths

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

    # ------------------------------------------------------------------ metacopies (reading)

    def _origin(self, node: Node):
        """(base ino, base path) if *node*'s current copy is a metacopy, else None. Cached per loc.

        A metacopy is a layer file that holds a base file's metadata but not its data: a rename
        (or a hard link, chmod, xattr change) of a base file copies only the metadata up, with
        ORIGIN_XATTR naming the base file; the data is read from the base until the first open
        for writing (or truncation) copies it (:meth:`_materialize`), and a commit copies it
        before planning (``commit.materialize``). The base never changes under a mounted
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

