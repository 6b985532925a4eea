"""The pyfuse3 handlers: :class:`OverlayFS`, the one ``Operations`` subclass.

Each handler is thin: it checks its arguments, calls the synchronous helpers of the rooms
below (:mod:`.entries`, :mod:`.copyup`, :mod:`.stack`, :mod:`.resolve`) and builds the reply.
:func:`fuse_errors` wraps them: only ``FUSEError`` leaves a handler (invariant 4), and a
helper that needs slow work first (:class:`.copyup.Blocked`: a large copy, a scan of hard
links) has it done in a worker thread, after which the handler runs again from its start.

Locking model (as in s3ql): a handler's body has no ``await`` in it, so under trio it runs
atomically with respect to the other requests and to stack changes (invariant 3). The only
awaits are before the body (the commit's pause gate, the work of a ``Blocked``), and around
``fsync`` (in a worker thread, on a duplicate fd that nothing else closes).

Caveats (knowingly not done):
- changes made to the base behind the daemon's back show within a second (inotify, or
  revalidation where events are lost or cannot be had: :mod:`.basewatch`), except a change
  made through a hard link in a base directory the view has not listed and changes of a network
  file system made by another machine; a metacopy (a renamed or chmod-ed base file) shows the
  base file's current data until it gets its own;
- renaming a directory that has entries in lower layers copies its whole subtree up (its
  files as metacopies: metadata only; the walk runs on the event loop, only large data copies
  in worker threads);
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
import functools
import logging
import os
import stat

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .. import fusecaps, osutil
from ..osutil import PRIVATE_XATTR
from .copyup import Blocked
from .entries import Entries
from .model import K_DIR, K_FILE, K_OTHER, ROOT, WRITE_FLAGS, inconsistent

FALLOC_FL_PUNCH_HOLE = 0x02

log = logging.getLogger(__name__)


def _nofollow(target) -> dict:
    return {} if isinstance(target, int) else {"follow_symlinks": False}


def fuse_errors(fn):
    """Turn OSError into FUSEError; anything else is a bug: log it and answer EIO. A handler
    whose helper raised :class:`Blocked` runs again once the work it asked for is done."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            while True:
                if self.gate is not None:  # paused while a commit moves layer directories into the base
                    await self.gate.wait()
                self.ctx = args[-1] if args and isinstance(args[-1], pyfuse3.RequestContext) else None
                try:
                    return await fn(self, *args)
                except Blocked as blocked:
                    await self.unblock(blocked)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args[:3])
            raise FUSEError(errno.EIO) from None

    return wrapper


DIR_LISTINGS = 256  # without opendir: the directories whose listing in progress is kept


class OverlayFS(Entries, pyfuse3.Operations):
    """The layered copy-on-write filesystem: the handlers over the rooms below."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    # ------------------------------------------------------------------ handlers: lookup

    @fuse_errors
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
                return self._negative(parent, name)
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
                self._evict(node)  # bounded memory: the kernel forgot it (resolve._evict)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        return self._attrs(node, self._stat(node))

    @fuse_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        parent, name = self._link_of(node) or (None, None)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        return os.readlink(name, dir_fd=self._dirfd(parent, node.li))

    # ------------------------------------------------------------------ handlers: directories

    @fuse_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        if fusecaps.NO_OPENDIR and pyfuse3.no_opendir_support and \
                (self.base_watch is None or self.base_watch.permanent is None):
            # the kernel sends no opendir or releasedir again, caches every listing until
            # invalidate_inode (drop_layers, basewatch) and readdir gets the inode as fh
            raise FUSEError(errno.ENOSYS)
        fh = self.next_fh
        self.next_fh += 1
        self.dirhandles[fh] = [node, None]
        if fusecaps.CACHE_READDIR and self._keep_cache(node):
            # the kernel keeps the listing until invalidate_inode (drop_layers, basewatch)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        entry = self._dirhandle(fh, start_id)
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

    def _dirhandle(self, fh, start_id: int) -> list:
        """[node, names listed] of an open directory. Without opendir (pyfuse3.no_opendir) *fh*
        is the directory's inode: the names a listing started with are kept per directory,
        for the last DIR_LISTINGS directories listed (no releasedir says when one is done)."""
        if not fusecaps.NO_OPENDIR or not pyfuse3.no_opendir:
            return self.dirhandles[fh]
        entry = self.dirhandles.pop(fh, None)
        if entry is None or start_id == 0 or entry[0] is not self.nodes.get(fh):  # (a node dropped: _evict)
            entry = [self._node(fh), None]
        self.dirhandles[fh] = entry  # the newest last
        if len(self.dirhandles) > DIR_LISTINGS:
            del self.dirhandles[next(iter(self.dirhandles))]
        return entry

    async def releasedir(self, fh):
        self.dirhandles.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        node = self._dirhandle(fh, 1)[0]
        self._fresh(node)
        if node.li == self.top and self.top > 0:
            fd = os.dup(self._dirfd(node, self.top))
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent, pfd = self._prepare_create(parent_inode, name)
        os.mkdir(name, 0o700, dir_fd=pfd)
        node, st = self._finish_create(parent, pfd, name, ctx, mode | stat.S_IFDIR, K_DIR)
        return self._attrs(node, st)

    @fuse_errors
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

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent, pfd = self._prepare_create(parent_inode, name)
        os.symlink(target, name, dir_fd=pfd)
        node, st = self._finish_create(parent, pfd, name, ctx, stat.S_IFLNK | 0o777, K_FILE)
        return self._attrs(node, st)

    @fuse_errors
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

    @fuse_errors
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

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        parent, node, st = self._removal_target(parent_inode, name)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if (node.li < self.top and (st.st_nlink > 1 or node.opens)) or (node.opens and self._origin(node)):
            # a lower hard link: the other names' st_nlink must drop; an open file: its handles
            # must keep a private copy they may change (fchmod, write) after the unlink
            self._copy_up(node)
            st = os.stat(name, dir_fd=self._dirfd(parent, self.top), follow_symlinks=False)
        if node.opens:  # also after a copy made in a thread (Blocked), which ran the handler again
            self._reopen_handles(node)
        li = node.li
        self._remove_entry(parent, name, False)
        node.links.discard((parent, name))
        self._forget_ident_if_gone(node, st, li)
        if not node.links:
            node.dead = True
        self._touch(node)
        self._changed("unlink", parent, name)

    @fuse_errors
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

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # ------------------------------------------------------------------ attributes

    @fuse_errors
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
                raise inconsistent("unlinked node %d is open on a base file", node.ino)
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
                if node.is_dir:  # an explicit change of a directory's times: committed (commit.dir_fields)
                    os.setxattr(target["fd"], osutil.UTIME_XATTR, b"y")
                os.utime(target["fd"], ns=(a, m))
            else:
                os.utime(target["name"], ns=(a, m), dir_fd=target["dir_fd"], follow_symlinks=False)
        self._touch(node)
        return self._attrs(node, self._stat_target(target))

    @fuse_errors
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

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        if name.startswith(PRIVATE_XATTR):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        target = self._xattr_target(node)
        return os.getxattr(target, name, **_nofollow(target))

    @fuse_errors
    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        target = self._xattr_target(node)
        names = os.listxattr(target, **_nofollow(target))
        return [os.fsencode(n) for n in names if not os.fsencode(n).startswith(PRIVATE_XATTR)]

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        if name.startswith(PRIVATE_XATTR):
            raise FUSEError(pyfuse3.ENOATTR)
        self._check_writable()
        node = self._node(inode)
        self._copy_up(node, meta_only=True)
        target = self._xattr_target(node)
        os.removexattr(target, name, **_nofollow(target))
        self._touch(node)

    @fuse_errors
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

    @fuse_errors
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
                    raise inconsistent("unlinked node %d is open on a base file", node.ino)
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
        return pyfuse3.FileInfo(fh=self._new_handle(node, fd, flags), keep_cache=self._keep_cache(node))

    @fuse_errors
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if h.loc != h.node.loc or h.node.epoch != self.epoch:
            self._refresh_handle(h, write=False)
        return os.pread(h.fd, size, off)

    @fuse_errors
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

    @fuse_errors
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
        if not node.opens and node.lookups <= 0:
            self._evict(node)

    @fuse_errors
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
