"""Commit: merge a stack of layers into the base, crash-safely and idempotently.

Plain synchronous code, run on a worker thread (or before mounting, during recovery).

A *plan* is the redo list, computed from the layers alone and journaled before the base is
touched. Its ops, in path order (parents first):

- ``delete``: the entry at *path* goes.
- ``put``: a file, symlink, fifo, socket or device (root only) from a layer replaces whatever
  is at *path*.
- ``newdir``: a directory from a layer replaces whatever is at *path*; its whole subtree is
  part of it (ops with ``root`` = this op's index). With ``move``, the layer's directory is
  itself renamed into the base (its subtree is then not listed in the journaled plan).
- ``dir``: a directory present in the base and in the view; its attributes are taken from
  the top layer.

Execution has two phases, each idempotent and each ended by one ``syncfs`` of the base:

1. *stage*: every top-level ``put``/``newdir`` but the moves is built under a temporary name
   ``.overlayd-SAGA-N`` in its target directory (a hard link to the layer's file when layer
   and base share a filesystem, else a kernel-side copy);
2. *apply*: deletions; each staged entry, and each moved layer directory, renamed into place
   (a replaced directory is first renamed to ``.overlayd-SAGA-N-old``, then removed);
   directory attributes, deepest first.

A staged name that still exists (a moved directory still in its layer) means its rename has
not happened: re-running a phase after a crash converges to the same base. Every base path is opened beneath the base's fd with
O_NOFOLLOW at each component, so no symlink (nor a directory swapped for one) leads outside.
"""

import errno
import json
import logging
import os
import stat

from . import osutil
from .osutil import DIR_FLAGS

log = logging.getLogger(__name__)

STAGE_PREFIX = ".overlayd-"
# OVERLAYD_COMMIT_MOVES=0 builds every new directory entry by entry (the tests run both ways)
MOVES = os.environ.get("OVERLAYD_COMMIT_MOVES", "1") != "0"


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


class MergeError(Exception):
    """The commit cannot proceed; the message says why and what to do."""


class Refused(MergeError):
    """The commit is refused before it begins, like a conflict: ``conflicts`` (see refusals)."""

    def __init__(self, conflicts):
        super().__init__("; ".join(c["reason"] for c in conflicts[:3]) +
                         (f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""))
        self.conflicts = conflicts


def _kind(st) -> str:
    m = st.st_mode
    if stat.S_ISDIR(m):
        return "d"
    if stat.S_ISREG(m):
        return "f"
    if stat.S_ISLNK(m):
        return "l"
    if stat.S_ISFIFO(m):
        return "p"
    if stat.S_ISSOCK(m):
        return "s"
    return "dev"


def _scan(fd):
    """name -> stat of a directory fd's entries."""
    out = {}
    for name in os.listdir(fd):
        name = os.fsencode(name)
        out[name] = os.stat(name, dir_fd=fd, follow_symlinks=False)
    return out


def plan_commit(base_fd: int, layers) -> list[dict]:
    """The redo list for *layers* = [(layer_id, fd)] bottom to top, over the base at *base_fd*.

    Every entry is listed. A ``newdir`` whose whole subtree comes from one layer on the base's
    filesystem, holding no whiteout, no set-user/group-ID file and no opaque subdirectory, is
    marked ``move``: the commit renames the layer's directory into the base instead of building
    a copy (its children are then left out of the journaled plan, see `compact`)."""
    ops = []
    top_down = list(reversed(layers))
    # a layer on another mount than the base (a bind mount of the same filesystem: same st_dev)
    # cannot be renamed into it (EXDEV): its new directories are built entry by entry
    base_mnt = osutil.mount_id(base_fd)
    movable = {lid for lid, fd in layers if os.fstat(fd).st_dev == os.fstat(base_fd).st_dev
               and osutil.mount_id(fd) == base_mnt}
    _plan_dir(ops, b"", base_fd, [(lid, fd, False) for lid, fd in top_down], -1, movable)
    return ops


def compact(ops) -> list[dict]:
    """The plan to journal and execute: the entries below a ``move`` are not listed, since one
    rename moves them; ``root`` indices are renumbered. A move op keeps how many entries it
    carries in ``entries``."""
    out = []
    where = {}
    for i, op in enumerate(ops):
        r = op["root"]
        if r >= 0 and ops[r].get("move"):
            out[where[r]]["entries"] = out[where[r]].get("entries", 0) + 1
            continue
        op = dict(op)
        if r >= 0:
            op["root"] = where[r]
        where[i] = len(out)
        out.append(op)
    return out


def leave_out(ops, paths) -> list[dict]:
    """The (uncompacted) plan without the ops of *paths*, which holds every path under a
    directory it holds (see rules.Rules.left_out); ``root`` indices are renumbered, and a new
    directory that loses an entry is no longer moved whole (the rename would take the entry
    along into the base)."""
    out = []
    where = {}
    for i, op in enumerate(ops):
        if op["path"] in paths:
            if op["root"] >= 0 and op["root"] in where:
                out[where[op["root"]]].pop("move", None)
            continue
        op = dict(op)
        if op["root"] >= 0:
            op["root"] = where[op["root"]]
        where[i] = len(out)
        out.append(op)
    return out


def count_entries(ops) -> int:
    """How many entries a (possibly compacted) plan changes."""
    return sum(1 + op.get("entries", 0) for op in ops)


def _plan_dir(ops, rel: bytes, base_fd, chain, root: int, same_mount: set, movable: dict | None = None) -> None:
    """*chain*: [(layer id, dir fd, close?)] top-down where the directory exists in the view.
    *same_mount*: the layers on the base's mount (whose directories can be renamed into it).
    *movable*: inside a newdir, {"ok": bool} cleared by whatever forbids moving it whole."""
    scans = []
    try:
        for lid, fd, _ in chain:
            scans.append((lid, fd, _scan(fd)))
        base_names = _scan(base_fd) if base_fd is not None else {}
        names = set()
        for _, _, sc in scans:
            names.update(sc)
        for name in sorted(names):
            path = rel + b"/" + name if rel else name
            top = None
            for i, (lid, fd, sc) in enumerate(scans):
                if name in sc:
                    top = i
                    break
            lid, fd, sc = scans[top]
            st = sc[name]
            if movable is not None and (top > 0 or osutil.is_whiteout(st)
                                        or st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(st.st_mode)):
                movable["ok"] = False
            if osutil.is_whiteout(st):
                if name in base_names and root < 0:
                    ops.append({"op": "delete", "path": os.fsdecode(path), "layer": lid, "root": root})
                continue
            kind = _kind(st)
            if kind == "dev" and os.geteuid() != 0:
                raise MergeError(f"{os.fsdecode(path)} in layer {lid} is a device file; only a daemon running "
                                 "as root can commit it: remove it from the view, or commit as root")
            if kind != "d":
                ops.append({"op": "put", "path": os.fsdecode(path), "layer": lid, "kind": kind, "root": root,
                            "ino": st.st_ino, "replaces": _kind(base_names[name]) if name in base_names else None})
                # a metacopy (see materialize): asked of every regular file, never guessed from
                # st_blocks (an xattr that does not fit in the inode takes a block of its own)
                if kind == "f" and osutil.get_origin(b"/proc/self/fd/%d/" % fd + name) is not None:
                    ops[-1]["origin"] = True
                continue
            # a directory: which lower copies merge with it?
            sub = []
            reaches_base = True
            for lid2, fd2, sc2 in scans[top:]:
                st2 = sc2.get(name)
                if st2 is None:
                    continue
                if _kind(st2) != "d":
                    reaches_base = False
                    break
                cfd = os.open(name, DIR_FLAGS, dir_fd=fd2)
                sub.append((lid2, cfd, True))
                if osutil.is_opaque(cfd):
                    reaches_base = False
                    if movable is not None:
                        movable["ok"] = False  # an opaque directory inside a new one: not moved whole
                    break
            base_child = None
            if reaches_base and root < 0 and name in base_names and _kind(base_names[name]) == "d":
                base_child = os.open(name, DIR_FLAGS, dir_fd=base_fd)
                ops.append({"op": "dir", "path": os.fsdecode(path), "layer": lid, "root": root,
                            **dir_fields(base_child, [cfd for _, cfd, _ in sub])})
                child_root = root
                child_movable = None
            else:
                ops.append({"op": "newdir", "path": os.fsdecode(path), "layer": lid, "root": root,
                            "replaces": _kind(base_names[name]) if name in base_names and root < 0 else None})
                child_root = len(ops) - 1 if root < 0 else root
                if root < 0:
                    # moved whole when one layer holds all of it, on the base's filesystem
                    child_movable = {"ok": len(sub) == 1 and lid in same_mount}
                    if len(sub) == 1 and osutil.is_opaque(sub[0][1]):
                        ops[-1]["opaque"] = True  # the xattr is removed once it is in the base
                else:
                    child_movable = movable
            newdir_at = len(ops) - 1
            try:
                _plan_dir(ops, path, base_child, sub, child_root, same_mount, child_movable)
            finally:
                if base_child is not None:
                    os.close(base_child)
            if root < 0 and child_movable is not None and child_movable["ok"] and MOVES:
                ops[newdir_at]["move"] = True
    finally:
        for lid, fd, close in chain:
            if close:
                os.close(fd)


DIR_FIELDS = ("mode", "owner", "xattrs")


def dir_fields(base_dir: int, copies) -> dict:
    """Which attributes of a base directory the saga changed (``set``: taken from the top layer
    by the commit) and which of those the base changed too since the saga first copied it up
    (``clash``: the commit is refused). *copies*: the directory's fds in the layers, top-down.

    Changed means: the top copy differs from the base's attributes recorded at copy-up
    (BASE_ATTRS_XATTR) for mode, owner and xattrs; for times, an explicit utime in the view
    (UTIME_XATTR). A directory the saga only passed through (entries changed in it) keeps the
    base's current attributes; its mtime is the one the commit's changes give it. A copy made
    before the base's attributes were recorded gives every attribute (``set`` absent)."""
    recorded, times = None, False
    for fd in copies:
        if recorded is None:
            recorded = osutil.get_private(fd, osutil.BASE_ATTRS_XATTR)
        times = times or osutil.get_private(fd, osutil.UTIME_XATTR) is not None
    if recorded is None:
        return {}
    then = json.loads(recorded)
    mine = osutil.dir_attrs(copies[0])
    now = osutil.dir_attrs(base_dir)
    out = {"set": [f for f in DIR_FIELDS if mine[f] != then[f]] + (["times"] if times else [])}
    clash = [f for f in out["set"] if f != "times" and now[f] != then[f] and now[f] != mine[f]]
    if clash:
        out["clash"] = clash
    return out


def refusals(base_fd: int, ops) -> list[dict]:
    """What refuses a commit of *ops* before anything is journaled, as conflicts: a file system
    mounted where the plan writes (mount_points), a directory attribute both the saga and the
    base changed (dir_fields)."""
    out = [{"path": p, "recorded": None, "now": "mount point", "reason": mounted_message([p])}
           for p in mount_points(base_fd, ops)]
    for op in ops:
        if op.get("clash"):
            out.append({"path": op["path"], "recorded": "directory", "now": "directory",
                        "reason": f"the saga and the base both changed the {' and '.join(op['clash'])} of the "
                                  f"directory {op['path']}: make them the same on both sides, or roll back "
                                  "the step that changed it"})
    return out


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


def summarize(ops) -> list[dict]:
    """added / modified / deleted per path, for diffs and dry runs."""
    out = []
    for op in ops:
        if op["op"] == "delete":
            out.append({"path": op["path"], "change": "deleted", "layer": op["layer"]})
        elif op["op"] in ("put", "newdir"):
            replaces = op.get("replaces")
            change = "added" if op["root"] >= 0 or replaces is None else "modified"
            out.append({"path": op["path"], "change": change, "layer": op["layer"],
                        "kind": op.get("kind", "d")})
    return out


# ---------------------------------------------------------------------- execution


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
            linked = self._stage_file(lfd, name, st, dst_fd, dst_name)
        if not linked:
            self.inomap[(st.st_dev, st.st_ino)] = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False).st_ino
        if st.st_nlink > 1:
            links[key] = (dst_fd, dst_name)

    def _stage_file(self, lfd, name, st, dst_fd, dst_name) -> bool:
        """Stage a regular file; True if the layer's file itself was linked (same inode)."""
        if st.st_dev == self.base_dev:
            # same filesystem: the layer's file becomes the base's, no data is copied; unless
            # the base is another mount of it (a bind mount): link() then fails with EXDEV
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
            kind = _kind(st)
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


def new_token(ops) -> str:
    """A random part for the temporary names that no path of the plan can collide with."""
    import secrets

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


def _walk_names(fd: int, prefix: bytes, out: list) -> None:
    """Relative paths of a directory's whole subtree (closes *fd*)."""
    try:
        for de in os.scandir(fd):
            rel = prefix + os.fsencode(de.name)
            out.append(rel)
            if de.is_dir(follow_symlinks=False):
                try:
                    cfd = os.open(de.name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                _walk_names(cfd, rel + b"/", out)
    finally:
        os.close(fd)


def listing_digest(names) -> str:
    import hashlib

    return hashlib.sha256(b"\0".join(sorted(names))).hexdigest()


def base_identity(base_fd: int, path: str, with_listing: bool = False, dirs: dict | None = None):
    """What the base holds at *path* now: None, ["d"] (["D", digest of the entry names] with
    *with_listing*), or [kind, ino, size, mtime_ns, ctime_ns, nlink]. *dirs*: a cache of directory
    fds (relative path -> fd) kept across calls; the caller closes them."""
    rel = os.fsencode(path)
    parent = os.path.dirname(rel)
    pfd = dirs.get(parent) if dirs is not None else None
    if pfd is None:
        try:
            pfd = osutil.open_beneath(base_fd, parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                return ["parent-not-a-directory"]  # a directory on the way became a file or a symlink
            raise
        if dirs is not None:
            dirs[parent] = pfd
    try:
        st = os.stat(os.path.basename(rel), dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        if dirs is None:
            os.close(pfd)
    k = _kind(st)
    if k == "d":
        if with_listing:
            fd = osutil.open_beneath(base_fd, rel)
            out = []
            _walk_names(fd, b"", out)
            return ["D", listing_digest(out)]
        return ["d"]
    return [k, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink,
            st.st_mode, st.st_uid, st.st_gid]


def same_identity(then, now) -> bool:
    """Whether the base entry a saga recorded (`base_identity`) is still there, unchanged. A file
    that only lost hard links is: a file committed by a hard link from its layer keeps that
    link until the reaper deletes the dropped layer, and the unlink changes its ctime, maybe
    after the next saga recorded it. Since the ctime then says nothing, mode and owner are
    compared on their own (a chmod behind the workspace's back changes nothing else).
    Identities of older journals have no nlink (5 fields) or no mode and owner (6)."""
    if then == now:
        return True
    if then is None or now is None or then[0] in ("d", "D") or len(now) != 9:
        return False
    if len(then) == 5:
        return then == now[:5]
    if len(then) == 6:
        return then[:4] == now[:4] and now[5] < then[5]
    return then[:4] == now[:4] and then[6:] == now[6:] and (then[4:6] == now[4:6] or now[5] < then[5])


def mount_points(base_fd: int, ops) -> list[str]:
    """The paths in the base where a file system is mounted (a bind mount, another file system)
    that the plan *ops* would write in (a ``dir``), replace or delete (whole subtrees): a commit
    never crosses a mount point, so these refuse it."""
    out = []

    def walk(pfd: int, name: bytes, rel: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if osutil.is_mount_root(pfd, name, st):
                out.append(os.fsdecode(rel))
                return
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                for child in os.listdir(fd):
                    child = os.fsencode(child)
                    walk(fd, child, rel + b"/" + child)
            finally:
                os.close(fd)

    for op, pfd, path in _base_parents(base_fd, ops, lambda op: op["op"] == "dir" or op.get("replaces") is not None
                                       or op["op"] == "delete"):
        try:
            if op["op"] == "dir":
                if osutil.is_mount_root(pfd, os.path.basename(path)):
                    out.append(op["path"])
            else:
                walk(pfd, os.path.basename(path), path)
        except FileNotFoundError:
            pass
    return out


def _base_parents(base_fd: int, ops, wanted):
    """(op, fd of its parent directory in the base, its path) for each top-level op of *ops*
    that *wanted* selects and whose parent exists in the base; the fd is closed after the
    caller's turn."""
    for op in ops:
        if op["root"] >= 0 or not wanted(op):
            continue
        path = os.fsencode(op["path"])
        try:
            pfd = osutil.open_beneath(base_fd, os.path.dirname(path))
        except OSError:
            continue
        try:
            yield op, pfd, path
        finally:
            os.close(pfd)


def mounted_message(paths) -> str:
    return (f"a file system is mounted at {paths[0]} inside the base" +
            (f" (and at {len(paths) - 1} more path(s))" if len(paths) > 1 else "") +
            ": a commit never writes across a mount point; unmount it, or roll back the step that changed or "
            "removed it")


def base_idents(base_fd: int, ops) -> list:
    """(st_dev, st_ino) of every base entry a plan replaces or deletes (whole subtrees)."""
    out = []
    dev = os.fstat(base_fd).st_dev

    def walk(pfd, name):
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        out.append((dev, st.st_ino))
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                for child in os.listdir(fd):
                    walk(fd, os.fsencode(child))
            finally:
                os.close(fd)

    for _, pfd, path in _base_parents(base_fd, ops, lambda op: op["op"] == "delete"
                                      or (op["op"] != "dir" and op.get("replaces") is not None)):
        walk(pfd, os.path.basename(path))
    return out
