"""Changing names in the top layer: creating, removing and moving entries, and open handles.

:class:`Entries` holds the synchronous bodies of the handlers that change the namespace
(create, remove, rename, with whiteouts and opaque directories where a lower layer shows the
name) and the open-handle bookkeeping (handles follow the view: they reopen after a copy-up or
a drop). The handlers themselves, in :mod:`.ops`, only check their arguments and call these.
"""

import errno
import logging
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from .. import osutil
from .copyup import CopyUp
from .model import K_DIR, K_FILE, WRITE_FLAGS, Handle, Listing, Node, inconsistent

log = logging.getLogger(__name__)


class Entries(CopyUp):
    """The view with copy-up, plus the namespace changes and the handles of the handlers."""

    # ------------------------------------------------------------------ removal

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

    # ------------------------------------------------------------------ creation

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

    # ------------------------------------------------------------------ removal and rename

    def _removal_target(self, parent_inode: int, name: bytes):
        """(parent, node, stat) of an entry about to be removed; EROFS, bad names, ENOENT first."""
        self._check_writable()
        osutil.check_name(name)
        parent = self._node(parent_inode)
        res = self._lookup_node(parent, name)
        if res is None:
            raise FUSEError(errno.ENOENT)
        self._wait_in_flight(res[0])  # its copy runs in a thread: after it
        return (parent, *res)

    def _rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags) -> None:
        """rename(2) in the view (RENAME_NOREPLACE, RENAME_EXCHANGE): the handler's body."""
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
        self._wait_in_flight(snode)  # a copy of either runs in a thread: after it
        if dst is not None:
            self._wait_in_flight(dst[0])
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
            dst = (dst[0], os.stat(name_new, dir_fd=self._dirfd(pnew, top), follow_symlinks=False))
        if dst is not None and not dst[0].is_dir and dst[0].opens:
            self._reopen_handles(dst[0])  # also after a copy made in a thread (Blocked)
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

    # ------------------------------------------------------------------ handles

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
                    raise inconsistent("open for writing of metacopy node %d", node.ino)
                return osutil.open_origin(self.layers[0].fd, origin)
        return os.open(name, oflags, dir_fd=self._dirfd(parent, node.li))

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
