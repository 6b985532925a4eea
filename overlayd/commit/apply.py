"""Applying a commit: the plan (plan.py) executed against the base, crash-safely and
idempotently. Plain synchronous code, run on a worker thread (or before mounting, during
recovery).

Before the plan is journaled, `materialize` gives every metacopy it puts its own data in its
layer. Execution then has two phases, each idempotent and each ended by one ``syncfs`` of the
base:

1. *stage*: every top-level ``put``/``newdir`` but the moves is built under a temporary name
   ``.overlayd-SAGA-TOKEN-N`` in its target directory (a hard link to the layer's file when
   layer and base share a filesystem, else a kernel-side copy);
2. *apply*: deletions; each staged entry, and each moved layer directory, renamed into place
   (a replaced directory is first renamed to ``...-old``, then removed); directory attributes,
   deepest first.

A staged name that still exists (a moved directory still in its layer) means its rename has
not happened: re-running a phase after a crash converges to the same base. Every base path is
opened beneath the base's fd with O_NOFOLLOW at each component, so no symlink (nor a directory
swapped for one) leads outside.
"""

import errno
import json
import logging
import os
import secrets
import stat

from .. import osutil
from ..osutil import DIR_FLAGS
from .identity import mount_points, mounted_message
from .plan import MergeError, entry_kind

log = logging.getLogger(__name__)

STAGE_PREFIX = ".overlayd-"


# fault injection for the tests: "label:ERRNO[:n]" raises OSError(ERRNO) at the n-th pass (once)
FAIL_AT = os.environ.get("OVERLAYD_FAIL_AT", "")
FAULT_LABELS = ("stage.link", "stage.copy", "stage.mkdir", "setxattr", "rename", "unlink", "syncfs")
_fault_counts = {}


def fault(label: str) -> None:
    """Fault injection (tests/test_commit_faults.py): with OVERLAYD_FAIL_AT=label:ERRNO[:n]
    (ERRNO a name such as ENOSPC or EIO) the n-th pass (default 1st) of *label* raises that
    OSError instead of doing the system call that follows, once. Each label names one kind of
    system call of a commit, at every place it is made: stage.link (a hard link from a layer),
    stage.copy (a copy's data), stage.mkdir, setxattr (an entry's xattrs and attributes),
    rename, unlink (a deletion) and syncfs (a phase's flush)."""
    if not FAIL_AT:
        return
    want, _, rest = FAIL_AT.partition(":")
    if want != label:
        return
    name, _, nth = rest.partition(":")
    _fault_counts[label] = _fault_counts.get(label, 0) + 1
    if _fault_counts[label] == int(nth or 1):
        code = getattr(errno, name)
        log.warning("fault injection: %s fails with %s", label, name)
        raise OSError(code, f"{os.strerror(code)} (injected at {label})")


def materialize(base_fd: int, layer_fds: dict, ops) -> int:
    """Give every metacopy the plan puts (``origin`` ops) its own data, in its layer, before the
    plan is journaled: the base is not written, a crash only leaves layer files with their data
    already copied, and staging then treats them as any other file. Returns how many."""
    done = set()
    for op in ops:
        if not op.get("origin") or (op["layer"], op["ino"]) in done:
            continue
        done.add((op["layer"], op["ino"]))
        path = os.fsencode(op["path"])
        dfd = osutil.open_beneath(layer_fds[op["layer"]], os.path.dirname(path))
        try:
            fd = os.open(os.path.basename(path), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            osutil.materialize(base_fd, fd)
        except OSError as exc:
            raise MergeError(f"cannot copy the data of renamed file {op['path']} from the base: {exc}") from exc
        finally:
            os.close(fd)
    return len(done)



class Merger:
    """Executes a plan. *layer_fds*: layer id -> fd of the layer's root."""

    def __init__(self, base_fd: int, layer_fds: dict, saga_id: int, ops: list[dict], token: str = ""):
        self.base_fd = base_fd
        self.layer_fds = layer_fds
        self.saga = saga_id
        self.token = token  # random, journaled with the plan: no name in the view can collide
        self.rerun = False  # True when applying again after a crash
        self.ops = ops
        self.base_dev = os.fstat(base_fd).st_dev
        self._dirs = {}
        self._dir_times = []  # (dir fd, name, layer stat) of the staged directories
        # (layer dev, layer ino) -> base ino of every entry staged as a new inode (directories,
        # symlinks, fifos, copies); linked files and moved directories keep their inode
        self.inomap = {}
        self._shared = None  # ids of this commit's layers a fork shares (shared_layers)

    def is_shared(self, layer: str) -> bool:
        """Whether a fork's layer shares the files of *layer* (engine/fork.py): they are then
        copied into the base, never linked or moved, so that an edit of the base file in place
        cannot change the other workspace's layer."""
        if self._shared is None:
            self._shared = set()
            for lid, fd in self.layer_fds.items():
                try:
                    if shared_layer(os.readlink(f"/proc/self/fd/{fd}")):
                        self._shared.add(lid)
                except OSError as exc:
                    log.warning("layer %s: cannot tell whether a fork shares it (%s): copied", lid, exc)
                    self._shared.add(lid)
        return layer in self._shared

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _base_dir(self, rel: bytes) -> int:
        fd = self._dirs.get(rel)
        if fd is None:
            try:
                fd = osutil.open_beneath(self.base_fd, rel)
            except OSError as exc:
                raise MergeError(f"cannot open {os.fsdecode(rel) or '.'} in the base without following a "
                                 f"symlink ({exc.strerror}); was the base changed during the commit?") from exc
            self._dirs[rel] = fd
        return fd

    def _layer_parent(self, layer: str, path: bytes) -> int:
        """An fd of *path*'s directory in *layer*, cached per directory (closed by close())."""
        parent = os.path.dirname(path)
        key = ("layer", layer, parent)
        fd = self._dirs.get(key)
        if fd is None:
            fd = osutil.open_beneath(self.layer_fds[layer], parent)
            self._dirs[key] = fd
        return fd

    def stage_name(self, i: int) -> bytes:
        return f"{STAGE_PREFIX}{self.saga}-{self.token}-{i}".encode()

    # -- phase 1

    def stage(self, progress=None) -> None:
        """Build every top-level put/newdir under its temporary name. Idempotent."""
        links = {}  # (layer, ino) -> (dir fd, name) of the first staged copy, for hard links
        for i, op in enumerate(self.ops):
            if op.get("move"):
                self._check_move(op)
                continue
            if op["op"] in ("delete", "dir"):
                continue
            path = os.fsencode(op["path"])
            name = os.path.basename(path)
            if op["root"] < 0:
                dst_fd, dst_name = self._base_dir(os.path.dirname(path)), self.stage_name(i)
            else:
                root_op = self.ops[op["root"]]
                rel = os.path.relpath(path, os.fsencode(root_op["path"]))
                rfd = os.open(self.stage_name(op["root"]), DIR_FLAGS,
                              dir_fd=self._base_dir(os.path.dirname(os.fsencode(root_op["path"]))))
                try:
                    dst_fd = osutil.open_beneath(rfd, os.path.dirname(rel)) if os.path.dirname(rel) else os.dup(rfd)
                finally:
                    os.close(rfd)
                self._dirs[(i, "staged")] = dst_fd
                dst_name = name
            try:
                self._stage_one(op, path, dst_fd, dst_name, links)
            except FileExistsError:
                # left by a stage that crashed (a re-run): built again from scratch
                osutil.rmtree_at(dst_fd, dst_name)
                self._stage_one(op, path, dst_fd, dst_name, links)
            if progress:
                progress(i + 1, len(self.ops))
        # a directory's times once its entries are in place (creating them changed its mtime),
        # deepest first: the base shows the times the view showed
        for dst_fd, dst_name, st in reversed(self._dir_times):
            os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)

    def _check_move(self, op) -> None:
        """Refuse to move a layer directory into the base if anything in it still carries a
        private xattr (a metacopy that was not given its data, say): only its own opaque mark,
        which the move removes, may be there."""
        lfd = self._layer_parent(op["layer"], os.fsencode(op["path"]))
        name = os.path.basename(os.fsencode(op["path"]))
        fd = os.open(name, DIR_FLAGS, dir_fd=lfd)
        try:
            self._strip_dir_marks(fd)
            allowed = {osutil.OPAQUE_XATTR} if op.get("opaque") else set()
            self._refuse_private(fd, op, os.fsencode(op["path"]), allowed)
            self._check_tree(fd, op, os.fsencode(op["path"]))
        finally:
            os.close(fd)

    def _check_tree(self, fd: int, op, rel: bytes) -> None:
        for de in os.scandir(fd):
            name = os.fsencode(de.name)
            path = rel + b"/" + name
            if de.is_dir(follow_symlinks=False):
                cfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    self._strip_dir_marks(cfd)
                    self._refuse_private(cfd, op, path)
                    self._check_tree(cfd, op, path)
                finally:
                    os.close(cfd)
            elif de.is_file(follow_symlinks=False):
                self._refuse_private(b"/proc/self/fd/%d/" % fd + name, op, path)

    @staticmethod
    def _strip_dir_marks(fd: int) -> None:
        """A directory copied up from the base carries marks for dir_fields; moved into the base
        as part of a new directory, it needs none of them."""
        for name in (osutil.BASE_ATTRS_XATTR, osutil.UTIME_XATTR):
            osutil.discard_xattr(fd, name)

    @staticmethod
    def _refuse_private(target, op, path: bytes, allowed=()) -> None:
        private = [x for x in osutil.private_xattrs(target) if x not in allowed]
        if private:
            raise MergeError(f"{os.fsdecode(path)} in layer {op['layer']} still carries overlayd's private xattr "
                             f"{', '.join(private)}: committing it would put wrong data or private marks into the "
                             "base, so the commit is refused; nothing was applied and the saga is still active "
                             "(this is a bug of overlayd: please report it)")

    def _stage_one(self, op, path: bytes, dst_fd: int, dst_name: bytes, links) -> None:
        lfd = self._layer_parent(op["layer"], path)
        name = os.path.basename(path)
        st = os.stat(name, dir_fd=lfd, follow_symlinks=False)
        if op["op"] == "newdir":
            fault("stage.mkdir")
            os.mkdir(dst_name, 0o700, dir_fd=dst_fd)
            src = os.open(name, DIR_FLAGS, dir_fd=lfd)
            dst = os.open(dst_name, DIR_FLAGS, dir_fd=dst_fd)
            try:
                self._meta(src, dst, st)
                self.inomap[(st.st_dev, st.st_ino)] = os.fstat(dst).st_ino
            finally:
                os.close(src)
                os.close(dst)
            self._dir_times.append((dst_fd, dst_name, st))
            return
        kind = op["kind"]
        key = (op["layer"], st.st_ino)
        if st.st_nlink > 1 and key in links:
            first_fd, first_name = links[key]
            fault("stage.link")
            os.link(first_name, dst_name, src_dir_fd=first_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        if kind == "l":
            os.symlink(os.readlink(name, dir_fd=lfd), dst_name, dir_fd=dst_fd)
            self._lmeta(dst_fd, dst_name, st)
        elif kind in ("p", "s", "dev"):
            os.mknod(dst_name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev if kind == "dev" else 0, dir_fd=dst_fd)
            self._lmeta(dst_fd, dst_name, st)
            os.chmod(dst_name, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID), dir_fd=dst_fd)
        linked = False
        if kind == "f":
            self._refuse_private(b"/proc/self/fd/%d/" % lfd + name, op, path)
            linked = self._stage_file(lfd, name, st, dst_fd, dst_name, op["layer"])
        if not linked:
            self.inomap[(st.st_dev, st.st_ino)] = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False).st_ino
        if st.st_nlink > 1:
            links[key] = (dst_fd, dst_name)

    def _stage_file(self, lfd, name, st, dst_fd, dst_name, layer) -> bool:
        """Stage a regular file; True if the layer's file itself was linked (same inode)."""
        if st.st_dev == self.base_dev and not self.is_shared(layer):
            # same filesystem: the layer's file becomes the base's, no data is copied; unless
            # the base is another mount of it (a bind mount): link() then fails with EXDEV.
            # A file a fork's layer shares (``is_shared``) is copied, so that an edit of the
            # base file in place never changes another workspace's layer.
            try:
                fault("stage.link")
                os.link(name, dst_name, src_dir_fd=lfd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            else:
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(dst_name, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID), dir_fd=dst_fd)
                return True
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lfd)
        try:
            dst = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dst_fd)
            try:
                fault("stage.copy")
                osutil.copy_data(src, dst, st.st_size)
                self._meta(src, dst, st)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return False

    @staticmethod
    def _meta(src_fd, dst_fd, st) -> None:
        fault("setxattr")
        osutil.copy_xattrs(src_fd, dst_fd)
        if os.geteuid() == 0:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISDIR(st.st_mode):
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        os.fchmod(dst_fd, mode)
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    @staticmethod
    def _dir_meta(src_fd, dst_fd, st, fields) -> None:
        """The attributes *fields* (see dir_fields) of a layer directory given to the base's."""
        fault("setxattr")
        if "xattrs" in fields:
            want = osutil.visible_xattrs(src_fd)
            for name in osutil.visible_xattrs(dst_fd):
                if name not in want and name.startswith("user."):
                    osutil.discard_xattr(dst_fd, name)
            osutil.copy_xattrs(src_fd, dst_fd)
        if "owner" in fields and os.geteuid() == 0:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        if "mode" in fields:
            os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
        if "times" in fields:
            os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    @staticmethod
    def _lmeta(dfd, name, st) -> None:
        if os.geteuid() == 0:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)

    # -- phase 2

    def apply(self, progress=None) -> None:
        """Deletions, renames of staged entries into place, directory attributes. Idempotent.
        Refused before any change if a file system is mounted where the plan writes (a mount made
        after the plan was checked): the commit stays to be finished once it is unmounted."""
        mounted = mount_points(self.base_fd, self.ops)
        if mounted:
            raise MergeError(mounted_message(mounted))
        dir_ops = []
        for i, op in enumerate(self.ops):
            if op["root"] >= 0:
                continue
            path = os.fsencode(op["path"])
            name = os.path.basename(path)
            if op["op"] == "dir":
                dir_ops.append(op)
                continue
            try:
                pfd = self._base_dir(os.path.dirname(path))
            except MergeError:
                if op["op"] == "delete":
                    continue  # its parent went with an earlier replacement
                raise
            if op["op"] == "delete":
                try:
                    fault("unlink")
                    osutil.rmtree_at(pfd, name)
                except FileNotFoundError:
                    pass
            elif op.get("move"):
                self._move_in(op, pfd, name, self.stage_name(i))
            elif op["op"] == "put" and op.get("replaces") != "d" and not self.rerun:
                fault("rename")
                try:  # a file over a file or nothing: one atomic rename (the general path on a surprise)
                    os.rename(self.stage_name(i), name, src_dir_fd=pfd, dst_dir_fd=pfd)
                except OSError:
                    self._install(pfd, name, self.stage_name(i))
            else:
                self._install(pfd, name, self.stage_name(i))
            if progress:
                progress(i + 1, len(self.ops))
        for op in reversed(dir_ops):  # deepest first: after every entry is in place
            if op.get("set") == []:
                continue  # passed through: the base's attributes stay
            path = os.fsencode(op["path"])
            lfd = osutil.open_beneath(self.layer_fds[op["layer"]], path)
            try:
                dfd = self._base_dir(path)
                if "set" in op:
                    self._dir_meta(lfd, dfd, os.fstat(lfd), op["set"])
                else:
                    self._meta(lfd, dfd, os.fstat(lfd))  # a plan journaled before dir_fields
                    osutil.drop_missing_xattrs(lfd, dfd)  # an xattr the saga removed goes too
            finally:
                os.close(lfd)

    def _move_in(self, op, pfd: int, name: bytes, tmp: bytes) -> None:
        """A ``move``: the layer's directory itself becomes the base's, by one rename (no copy).
        The layer is not needed afterwards: the commit drops it. Idempotent: a directory no
        longer in the layer has been moved (nothing else removes names from a sealed layer)."""
        lfd = self._layer_parent(op["layer"], os.fsencode(op["path"]))
        try:
            cross = osutil.mount_id(lfd, name) != osutil.mount_id(pfd)
        except FileNotFoundError:
            cross = False  # moved by the run that crashed
        if not cross and self.is_shared(op["layer"]):
            # a file in it is shared with a fork's layer (engine/fork.py): moved, the base would
            # hold that inode, and an edit in place would change the fork's layer; built entry
            # by entry instead, copying the shared files (_stage_file)
            self._copy_in(op, pfd, tmp)
            self._install(pfd, name, tmp)
            return
        if cross:
            # the base is on another mount now (it was not when planned): a rename would fail
            # with EXDEV, so the directory is built in the base entry by entry, then renamed into
            # place (a re-run builds it again from the layer, which still holds it)
            log.warning("%s: the base is on another mount than its layer now; built entry by entry", op["path"])
            self._copy_in(op, pfd, tmp)
            self._install(pfd, name, tmp)
            return
        self._install(pfd, name, tmp, src=(lfd, name))
        if op.get("opaque"):
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                osutil.discard_xattr(fd, osutil.OPAQUE_XATTR)
            finally:
                os.close(fd)

    def _copy_in(self, op, pfd: int, tmp: bytes) -> None:
        """Build a copy of the moved directory of *op* at *tmp* in *pfd*, as staging builds one."""
        try:
            osutil.rmtree_at(pfd, tmp)
        except FileNotFoundError:
            pass
        links = {}

        def build(path: bytes, dst_fd: int, dst_name: bytes, st) -> None:
            kind = entry_kind(st)
            if kind == "dev":
                raise MergeError(f"{os.fsdecode(path)} in layer {op['layer']} is a device file; devices are never "
                                 "committed")
            sub = {"op": "newdir" if kind == "d" else "put", "kind": kind, "layer": op["layer"],
                   "path": os.fsdecode(path), "root": -1}
            self._stage_one(sub, path, dst_fd, dst_name, links)
            if kind != "d":
                return
            src = osutil.open_beneath(self.layer_fds[op["layer"]], path)
            try:
                dst = os.open(dst_name, DIR_FLAGS, dir_fd=dst_fd)
                opened.append(dst)  # kept open: *links* may name a file in it
                for name in os.listdir(src):
                    name = os.fsencode(name)
                    build(path + b"/" + name, dst, name, os.stat(name, dir_fd=src, follow_symlinks=False))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))  # its entries changed its mtime
            finally:
                os.close(src)

        opened = []
        path = os.fsencode(op["path"])
        lfd = self._layer_parent(op["layer"], path)
        try:
            build(path, pfd, tmp, os.stat(os.path.basename(path), dir_fd=lfd, follow_symlinks=False))
        finally:
            for fd in opened:
                os.close(fd)

    def _install(self, pfd: int, name: bytes, tmp: bytes, src=None) -> None:
        """Rename the staged entry *tmp* (or *src* = (dir fd, name)) to *name* in *pfd*."""
        old = tmp + b"-old"
        src_fd, src_name = src or (pfd, tmp)
        try:
            staged = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            # already renamed into place (a re-run after a crash); finish removing the old entry
            try:
                osutil.rmtree_at(pfd, old)
            except FileNotFoundError:
                pass
            return
        try:
            cur = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            cur = None
        moved = False
        if cur is not None and (stat.S_ISDIR(cur.st_mode) or stat.S_ISDIR(staged.st_mode)):
            try:
                osutil.renameat2(pfd, name, pfd, old, osutil.RENAME_NOREPLACE)
            except FileExistsError:
                osutil.rmtree_at(pfd, old)
                osutil.renameat2(pfd, name, pfd, old, osutil.RENAME_NOREPLACE)
            moved = True
        fault("rename")
        os.rename(src_name, name, src_dir_fd=src_fd, dst_dir_fd=pfd)  # atomic replacement of a file
        if moved or self.rerun:  # a re-run may find the old entry moved aside by the crashed run
            try:
                osutil.rmtree_at(pfd, old)
            except FileNotFoundError:
                pass

    def sync(self) -> None:
        fault("syncfs")
        osutil.syncfs(self.base_fd)


def shared_layer(layer_dir: str) -> bool:
    """Whether the layer at *layer_dir* (``STATE/layers/ID``) is shared with a fork: its state
    directory's ``shared/ID`` (written by engine/fork.py, a JSON list of the other state
    directories) names one whose ``layers/ID`` still exists (a dropped layer shares nothing)."""
    state, lid = os.path.dirname(os.path.dirname(layer_dir)), os.path.basename(layer_dir)
    try:
        with open(os.path.join(state, "shared", lid), "rb") as f:
            others = json.loads(f.read() or b"[]")
    except FileNotFoundError:
        return False
    return any(os.path.isdir(os.path.join(o, "layers", lid)) for o in others if isinstance(o, str))


def new_token(ops) -> str:
    """A random part for the temporary names that no path of the plan can collide with."""
    while True:
        token = secrets.token_hex(8)
        if not any(token in op["path"] for op in ops):
            return token


def cleanup_stage(base_fd: int, ops, saga_id: int, token: str = "") -> None:
    """Remove what an abandoned stage phase left (temporary names). Idempotent."""
    m = Merger(base_fd, {}, saga_id, ops, token)
    try:
        for i, op in enumerate(ops):
            if op["root"] >= 0 or op["op"] not in ("put", "newdir") or op.get("move"):
                continue
            try:
                pfd = m._base_dir(os.path.dirname(os.fsencode(op["path"])))
                osutil.rmtree_at(pfd, m.stage_name(i))
            except (FileNotFoundError, MergeError):
                pass
    finally:
        m.close()
