"""What a commit finds in the base: base identities (conflict detection), the mount points a
plan would cross, and the base entries it replaces.

A step records the base identity of every path it changed (`base_identity`); at commit, a path
whose identity differs (`same_identity`) is a conflict. A commit never writes across a mount
point (`mount_points`), and refuses a directory attribute both sides changed (`refusals`).
"""

import errno
import hashlib
import os
import stat

from .. import osutil
from ..osutil import DIR_FLAGS
from .plan import entry_kind


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
    k = entry_kind(st)
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
