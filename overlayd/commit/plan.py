"""Planning a commit: the redo list computed from the layers alone, before the base is touched.

Plain synchronous code with no daemon in it (tests/test_commit_unit.py runs it over plain
directories). A *plan* is a list of ops in path order (parents first):

- ``delete``: the entry at *path* goes.
- ``put``: a file, symlink, fifo, socket or device (root only) from a layer replaces whatever
  is at *path*.
- ``newdir``: a directory from a layer replaces whatever is at *path*; its whole subtree is
  part of it (ops with ``root`` = this op's index). With ``move``, the layer's directory is
  itself renamed into the base (its subtree is then not listed in the journaled plan).
- ``dir``: a directory present in the base and in the view; its attributes are taken from
  the top layer (only those ``set`` names, see dir_fields).

The plan is executed by apply.Merger; identity.py says what in the base it would cross or
overwrite (conflicts, mount points).
"""

import json
import os
import stat

from .. import osutil
from ..osutil import DIR_FLAGS

# OVERLAYD_COMMIT_MOVES=0 builds every new directory entry by entry (the tests run both ways)
MOVES = os.environ.get("OVERLAYD_COMMIT_MOVES", "1") != "0"


class MergeError(Exception):
    """The commit cannot proceed; the message says why and what to do."""


class Refused(MergeError):
    """The commit is refused before it begins, like a conflict: ``conflicts`` (see refusals)."""

    def __init__(self, conflicts):
        super().__init__("; ".join(c["reason"] for c in conflicts[:3]) +
                         (f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""))
        self.conflicts = conflicts


def entry_kind(st) -> str:
    """The kind of an entry as plans and identities spell it: d, f, l, p, s or dev."""
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


def scan(fd):
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
            scans.append((lid, fd, scan(fd)))
        base_names = scan(base_fd) if base_fd is not None else {}
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
            kind = entry_kind(st)
            if kind == "dev" and os.geteuid() != 0:
                raise MergeError(f"{os.fsdecode(path)} in layer {lid} is a device file; only a daemon running "
                                 "as root can commit it: remove it from the view, or commit as root")
            if kind != "d":
                ops.append({"op": "put", "path": os.fsdecode(path), "layer": lid, "kind": kind, "root": root,
                            "ino": st.st_ino, "replaces": entry_kind(base_names[name]) if name in base_names else None})
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
                if entry_kind(st2) != "d":
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
            if reaches_base and root < 0 and name in base_names and entry_kind(base_names[name]) == "d":
                base_child = os.open(name, DIR_FLAGS, dir_fd=base_fd)
                ops.append({"op": "dir", "path": os.fsdecode(path), "layer": lid, "root": root,
                            **dir_fields(base_child, [cfd for _, cfd, _ in sub])})
                child_root = root
                child_movable = None
            else:
                ops.append({"op": "newdir", "path": os.fsdecode(path), "layer": lid, "root": root,
                            "replaces": entry_kind(base_names[name]) if name in base_names and root < 0 else None})
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
