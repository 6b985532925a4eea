"""Changes of the stack: push, seal, drop, pause, and what a commit changes in the base.

:class:`Stack` adds to the resolver the operations the engine (saga.py, workspace.py) calls on
the view between requests: pushing an empty layer, sealing the top, dropping layers in O(1) of
their size (their identities are purged later, in slices), pausing requests while a commit
moves layer directories into the base, and adopting the committed base entries as the nodes'
new identities. A drop's kernel invalidations are computed here and sent by :mod:`.kernel`.
"""

import contextlib
import logging
import os

import trio
from pyfuse3 import FUSEError

from . import kernel
from .resolve import Resolver
from .model import Layer
from ..osutil import DIR_FLAGS

log = logging.getLogger(__name__)


class Stack(Resolver):
    """The view plus the stack operations of the engine."""

    def push_layer(self, layer_id: str, path: str) -> None:
        """Put an empty writable layer on top. The view does not change."""
        fd = os.open(path, DIR_FLAGS)
        if self.layers[-1] is not self.layers[0]:
            self.layers[-1].sealed = True
            self.layers[-1].links = None  # it was written while on top: scanned again if need be
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

    @contextlib.contextmanager
    def base_held(self):
        """While a commit changes the base and until its drop has adopted the result, the view
        keeps the base as it knew it: the base's events (basewatch) wait, so that no node is
        resolved again between the apply and the adoption (``committed_identities`` needs the
        layers' identities as they were). Entering, the layers' nodes are made fresh: a change
        of the base seen before (an epoch bump) must not make one resolve again after the apply,
        when the base holds what the layers held (and moved directories have left the layers)."""
        self.base_hold += 1
        for li in range(1, len(self.layers)):
            for ident in list(self.layers[li].idents):
                node = self.by_ident.get(ident)
                if node is not None and not node.dead:
                    try:
                        self._fresh(node)
                    except (OSError, FUSEError):
                        pass
        try:
            yield
        finally:
            self.base_hold -= 1

    def seal_top(self) -> None:
        if self.top > 0:
            self.layers[-1].sealed = True

    def unseal_top(self) -> None:
        if self.top > 0:
            self.layers[-1].sealed = False
            self.layers[-1].links = None  # writable again: a scan of its hard links goes stale

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
                self._drop_evicted(ident)
                node = self.by_ident.pop(ident, None)
                if node is not None:
                    node.idents.discard(ident)
                n += 1
            self.pending_purge.pop()
        return 0

    def invalidate(self, inos, entries) -> None:
        """Tell the kernel to forget names and attributes/pages (:func:`.kernel.invalidate`).
        Call from a worker thread."""
        self.fuse_fd = kernel.invalidate(self.fuse_fd, inos, entries)

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
            self._drop_evicted(ident)
            node = self.by_ident.pop(ident, None)
            if node is not None:
                node.idents.discard(ident)
        for key in [k for k in self.listings if k[0] == 0]:
            del self.listings[key]
        for key in [k for k in self.fds if k[0] == 0]:
            os.close(self.fds.pop(key))
        self.hardlinks_base = None
        self.base_version += 1  # a scan of the base's hard links running meanwhile is stale
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

    def forget_origins(self) -> None:
        """Forget every cached metacopy origin: a commit gave the metacopies their own data
        (``commit.materialize``) behind the view's back, and is about to replace their base files,
        so the next access reads the layer's copy (a cached origin would give EIO once the base
        file is replaced, "the base file ... was replaced behind the workspace's back")."""
        for node in self.nodes.values():
            node.mc = None
