"""Copy-up: making the top layer hold what a change needs, and the work that runs in threads.

A change of a lower entry first copies it into the top layer: its parent directories (mode,
owner, times, xattrs), then the file through an ``O_TMPFILE`` published with ``linkat`` (a
half-copied file is never visible), all its visible names for a hard-linked file, or only
its metadata (a *metacopy*) when the change needs no data. Whiteouts and the listings of the
top layer are kept here too. See docs/ARCHITECTURE.md, "Copy-up".

Blocking work leaves the event loop. A copy of ``THREAD_COPY`` bytes or more (a copy-up's
data, a metacopy's materialisation) and a scan of a layer's hard links run in a worker thread:
the synchronous helper that finds it needs one raises :class:`Blocked`; the handler's wrapper
(``ops.fuse_errors``) awaits :meth:`CopyUp.unblock` and runs the handler again from its start,
which then finds the work done. The work runs under the node's entry in ``in_flight`` (a lock
table keyed by inode): a second request for the same node waits for it, requests for other
nodes keep flowing. A copy is prepared and published on the event loop (so each handler still
changes the view in one turn, invariant 3); only the data moves in the thread, between fds
the job owns, into a file nothing else can see. The publication checks that the stack did
not change meanwhile (a push, a seal, a drop): else the copy is thrown away and the request,
run again, decides anew (``EROFS`` once the layer is sealed, invariant 20).
"""

import errno
import functools
import json
import logging
import os
import stat

import trio
from pyfuse3 import FUSEError

from .. import osutil
from ..osutil import DIR_FLAGS
from .model import K_DIR, K_FILE, ROOT, THREAD_COPY, WHITEOUT, Listing, Node, restore_times
from .stack import Stack

log = logging.getLogger(__name__)


class Blocked(Exception):
    """A synchronous helper needs slow work done before it can go on: await
    ``CopyUp.unblock(exc)``, then run the request again from its start.

    *key* names what the work is about (a node's inode number, ``("links", layer serial)``);
    *work* is the async callable that does it, or None: only wait for whoever holds *key*.
    """

    def __init__(self, key, work=None):
        super().__init__(key)
        self.key = key
        self.work = work


class Job:
    """The data of one copy, moved in a worker thread between two fds the job owns."""

    __slots__ = ("kind", "sig", "src", "dst", "size", "times")

    def __init__(self):
        self.kind = None  # "copyup" (into an O_TMPFILE) or "materialize" (a metacopy in place)
        self.sig = None  # what the copy-up was made from (see CopyUp._copy_up)
        self.src = self.dst = None
        self.size = 0
        self.times = None  # (atime, mtime) ns to restore after a materialisation

    def prepare(self, kind, sig, src: int, dst: int, size: int, times=None) -> None:
        self.kind, self.sig, self.src, self.dst, self.size, self.times = kind, sig, src, dst, size, times

    def run(self) -> None:
        """In a worker thread: touches nothing but the job's own fds."""
        osutil.stall_point("copyup")  # OVERLAYD_STALL_AT=copyup:S (tests)
        osutil.copy_data(self.src, self.dst, self.size)

    def close(self) -> None:
        for fd in (self.src, self.dst):
            if fd is not None:
                os.close(fd)
        self.src = self.dst = None


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


def scan_links(fd: int, is_layer: bool) -> dict:
    """(st_dev, st_ino) -> [path tuples] of every non-directory with several links under the
    directory *fd* (which it closes). Blocking: runs in a worker thread."""
    found = {}
    stack = [((), fd)]
    while stack:
        prefix, fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if de.is_dir(follow_symlinks=False):
                        try:
                            cfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                        except OSError:
                            continue
                        stack.append((prefix + (name,), cfd))
                    else:
                        st = de.stat(follow_symlinks=False)
                        if st.st_nlink > 1 and not (is_layer and osutil.is_whiteout(st)):
                            found.setdefault((st.st_dev, st.st_ino), []).append(prefix + (name,))
        finally:
            os.close(fd)
    return found


class CopyUp(Stack):
    """The view, its stack operations, and the writes that prepare the top layer for a change."""

    def __init__(self, base: str, layers=(), *, generation: int | None = None, workdir: str | None = None):
        super().__init__(base, layers, generation=generation)
        self.in_flight = {}  # key (see Blocked) -> trio.Event, set when the work on it is done
        # whiteouts are hard links of one whiteout in *workdir* (as kernel overlayfs shares its
        # whiteout inode): a link costs no inode allocation, a mknod does (about 30x slower)
        self.workfd = os.open(workdir, DIR_FLAGS) if workdir else None
        if self.workfd is not None:
            self._new_whiteout_template(reuse=True)

    # ------------------------------------------------------------------ work in threads

    async def unblock(self, blocked: Blocked) -> None:
        """Do the work a helper asked for (:class:`Blocked`), or wait for whoever does it now."""
        ev = self.in_flight.get(blocked.key)
        if ev is not None:
            await ev.wait()
            return
        if blocked.work is None:
            return
        ev = self.in_flight[blocked.key] = trio.Event()
        try:
            await blocked.work()
        finally:
            del self.in_flight[blocked.key]
            ev.set()

    async def wait_idle(self) -> None:
        """Until no work of a request runs in a thread. For a stack operation that must not
        overlap one (a commit, after sealing the top: no new copy can start, and a
        materialisation in flight still writes a layer file it may move into the base)."""
        while self.in_flight:
            await next(iter(self.in_flight.values())).wait()

    def _wait_in_flight(self, node: Node) -> None:
        """Requests for a node whose copy runs in a thread wait for it (then run again)."""
        if node.ino in self.in_flight:
            raise Blocked(node.ino)

    async def _in_thread(self, step) -> None:
        """Run ``step(job)`` to prepare a :class:`Job` (or to do all of it, when it is no longer
        needed), the job's copy in a worker thread, then ``step(job)`` again to publish it."""
        job = Job()
        try:
            step(job)
            if job.dst is None:
                return
            await trio.to_thread.run_sync(job.run)
            step(job)
        finally:
            job.close()

    async def _scan_in_thread(self, li: int) -> None:
        layer = self.layers[li]
        version = self.base_version
        fd = osutil.reopen_dir(layer.fd)  # here: a drop may close the layer's fd meanwhile
        links = await trio.to_thread.run_sync(scan_links, fd, li > 0)
        if li == 0:
            if self.base_version == version:  # else a commit changed the base meanwhile
                self.hardlinks_base = links
        elif layer.sealed and any(x is layer for x in self.layers):
            layer.links = links

    # ------------------------------------------------------------------ whiteouts

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

    # ------------------------------------------------------------------ the top layer

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
            restore_times(pfd, pst)  # a copy-up is no change of the parent, in the view
            # the base's attributes as the saga found them: a commit carries over only those
            # the saga changed, and refuses one the base changed too (commit.dir_fields)
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

    # ------------------------------------------------------------------ copy-up of files

    def _materialize(self, node: Node, truncate: bool = False, job: Job | None = None) -> None:
        """Give the top layer's metacopy of *node* its own data (none if *truncate*). A large
        one is given it in a worker thread (:class:`Blocked`)."""
        if job is not None and job.dst is not None:  # the copy ran: finish it
            if job.kind == "materialize":
                os.utime(job.dst, ns=job.times)
                osutil.discard_xattr(job.dst, osutil.ORIGIN_XATTR)
                node.loc += 1  # read handles on the base file reopen the layer's copy
                node.mc = None  # asked again of the file the node shows now
            return
        origin = self._origin(node)
        if origin is None:
            return
        parent, name = self._link_of(node)
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd(parent, node.li))
        try:
            st = os.fstat(fd)
            if truncate:
                os.ftruncate(fd, 0)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                osutil.discard_xattr(fd, osutil.ORIGIN_XATTR)
            elif st.st_size >= THREAD_COPY:
                if job is None:
                    raise Blocked(node.ino, functools.partial(
                        self._in_thread, functools.partial(self._materialize, node, False)))
                job.prepare("materialize", None, osutil.open_origin(self.layers[0].fd, origin), fd,
                            st.st_size, (st.st_atime_ns, st.st_mtime_ns))
                fd = None
                return
            else:
                osutil.materialize(self.layers[0].fd, fd, origin)
        finally:
            if fd is not None:
                os.close(fd)
        node.loc += 1  # read handles on the base file reopen the layer's copy
        node.mc = (node.loc, None)

    def _copy_up(self, node: Node, truncate: bool = False, meta_only: bool = False,
                 job: Job | None = None) -> None:
        """Make the top layer hold *node*'s file (all its names, for hard links).

        With *meta_only* a regular file with a single name may become a metacopy (see
        :meth:`_origin`); otherwise the top copy has its own data when this returns. A copy of
        ``THREAD_COPY`` bytes or more raises :class:`Blocked`: its data is copied in a worker
        thread into a *job*, with which this runs twice more, to prepare and to publish it.
        """
        top = self.top
        if node.is_dir:
            self._copy_up_dir(node)
            return
        if job is None:
            self._wait_in_flight(node)
        elif job.dst is not None and not self.writable():
            return  # sealed or dropped while the data was copied: the request decides again
        if node.li == top:
            if not meta_only:
                self._materialize(node, truncate, job)
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
                # where the data comes from: a lower metacopy's is in the base
                data = None if metacopy or truncate else "origin" if origin is not None and src_li > 0 else "src"
                threaded = data is not None and st.st_size >= THREAD_COPY
                sig = (self.layers[top], src_li, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, origin, data)
                if threaded and not (job is not None and job.kind == "copyup" and job.sig == sig):
                    if job is None:
                        raise Blocked(node.ino, functools.partial(
                            self._in_thread, functools.partial(self._copy_up, node, truncate, meta_only)))
                    if job.dst is None:  # prepare: the thread fills a file nothing else sees
                        job.prepare("copyup", sig, os.dup(src) if data == "src" else
                                    osutil.open_origin(self.layers[0].fd, origin),
                                    os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dpfd),
                                    st.st_size)
                    return  # prepared; or the view changed under the copy: the request decides again
                if threaded:
                    dst, job.dst = job.dst, None  # its data is there
                else:
                    dst = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dpfd)
                try:
                    if metacopy:
                        os.ftruncate(dst, st.st_size)
                    elif threaded:
                        pass
                    elif data == "origin":
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
            restore_times(pfd, pst)
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
        """Every visible (parent, name) of the lower file *ident* living in layer *li*. The
        layer's (or the base's) link sets come from one scan of it, made in a worker thread on
        first need (:class:`Blocked`) and kept while the layer does not change."""
        layer = self.layers[li]
        links = self.hardlinks_base if li == 0 else layer.links
        if links is None:
            raise Blocked(("links", layer.serial), functools.partial(self._scan_in_thread, li))
        out = []
        for path in links.get(ident, []):
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

    # ------------------------------------------------------------------ moves

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

