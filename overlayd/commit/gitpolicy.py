"""A git repository as the base, used from both sides (docs/ARCHITECTURE.md, "A git repository as
the base"): which conflicts on paths under the base's ``.git/`` settle by themselves, and how.

The person runs git in the base (``git status`` rewrites ``.git/index``, a commit moves a branch)
while an agent's saga runs git in its workspace. A path both sides changed is a conflict for the
commit (``Tracker.conflicts``); under ``.git/`` most of them are not real ones:

==================================  =====================================================
``.git/index``                      a cache of the work tree: the saga's (it describes the
                                    HEAD and work tree the commit writes; git re-hashes
                                    files whose stat data changed, so ``git status`` in
                                    the base shows them right)
``.git/objects/**``                 content-addressed: one name, one content; the saga's
                                    (``objects/info/*``, commit-graph: caches git checks)
``.git/logs/**`` (reflogs)          append-only: the base's lines, then the saga's lines
                                    after the last line both have
``.git/HEAD``, ``.git/refs/**``     the same value on both sides: settled. Else, both
                                    commit ids: if the base's is an ancestor of the saga's
                                    (the saga merged it) the saga's; if the saga's is an
                                    ancestor of the base's, the base's; else a real
                                    conflict, reported with both commit ids
``ORIG_HEAD``, ``FETCH_HEAD``,      notes about the last operation: the saga's
``COMMIT_EDITMSG``, ``AUTO_MERGE``
anything else (config, packed-refs, a real conflict, as for any file
hooks, MERGE_HEAD, ...)
==================================  =====================================================

A ref or reflog settled to a content that is not the saga's is written into the layer that holds
the saga's version (in place), before the plan is made: the commit then puts that content into
the base like any other change. Plain synchronous code, for a worker thread.
"""

import errno
import os
import re
import stat
import subprocess

from .. import osutil
from ..gitrun import run_git

GIT_TIMEOUT = 30.0
SCRATCH = {"ORIG_HEAD", "FETCH_HEAD", "COMMIT_EDITMSG", "AUTO_MERGE"}
OID = re.compile(rb"^[0-9a-f]{40}([0-9a-f]{24})?$")


def kind(path: str) -> str | None:
    """The policy class of a base path: cache, object, log, ref, scratch, or None (no policy)."""
    if not path.startswith(".git/"):
        return None
    rest = path[5:]
    if rest == "index":
        return "cache"
    if rest in SCRATCH:
        return "scratch"
    if rest == "objects" or rest.startswith("objects/"):
        return "object"
    if rest.startswith("logs/"):
        return "log"
    if rest == "HEAD" or rest.startswith("refs/"):
        return "ref"
    return None


def is_git_base(base_fd: int) -> bool:
    """Does the base's root hold a ``.git`` directory (a repository, not a linked work tree)?"""
    try:
        return stat.S_ISDIR(os.stat(".git", dir_fd=base_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def saga_file(layer_fds, path: str):
    """(layer fd, the parent's fd, name) of the saga's visible version of *path*, a regular file;
    None if the saga's view has no regular file there (deleted, another kind, not in a layer).
    *layer_fds*: the saga's layers' directory fds, bottom to top. The caller closes the parent fd."""
    rel = os.fsencode(path)
    parent, name = os.path.split(rel)
    for lfd in reversed(list(layer_fds)):
        # an opaque or whited-out ancestor in this layer hides every lower layer
        hidden = False
        cur = lfd
        parts = [p for p in parent.split(b"/") if p]
        opened = []
        try:
            for part in parts:
                try:
                    st = os.stat(part, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    cur = None
                    break
                if not stat.S_ISDIR(st.st_mode):  # a whiteout, or a file: nothing below
                    return None
                cur = os.open(part, osutil.DIR_FLAGS, dir_fd=cur)
                opened.append(cur)
                if osutil.is_opaque(cur):
                    hidden = True
            if cur is None:
                if hidden:
                    return None
                continue
            try:
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                if hidden:
                    return None
                continue
            if not stat.S_ISREG(st.st_mode):  # a whiteout, or another kind
                return None
            if _is_metacopy(cur, name):
                return None  # its data is still the base file's: nothing of the saga's to read
            pfd = os.dup(cur)
            return lfd, pfd, name
        finally:
            for fd in opened:
                os.close(fd)
    return None


def _is_metacopy(dirfd: int, name: bytes) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.getxattr(fd, osutil.ORIGIN_XATTR)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read_at(dirfd: int, name: bytes) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None
        raise
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def base_file(base_fd: int, path: str) -> bytes | None:
    rel = os.fsencode(path)
    try:
        pfd = osutil.open_beneath(base_fd, os.path.dirname(rel))
    except OSError:
        return None
    try:
        return _read_at(pfd, os.path.basename(rel))
    finally:
        os.close(pfd)


def merge_log(base: bytes, saga: bytes) -> bytes:
    """A reflog both sides appended to: the base's lines, then the saga's lines after the last
    line the base also has (every line, if none: the base expired them)."""
    blines = base.splitlines(keepends=True)
    slines = saga.splitlines(keepends=True)
    have = set(blines)
    last = -1
    for i, line in enumerate(slines):
        if line in have:
            last = i
    out = base
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out + b"".join(slines[last + 1:])


class Git:
    """Ancestry questions about commit ids, asked of the base's repository with the saga's objects
    (the view's ``.git/objects``) as an alternate, as the saga's user."""

    def __init__(self, base: str, mountpoint: str | None, uid=None, gid=None):
        self.base, self.mountpoint, self.uid, self.gid = base, mountpoint, uid, gid

    def is_ancestor(self, a: str, b: str) -> bool | None:
        """Is commit *a* an ancestor of (or equal to) *b*? None: git cannot tell (not installed,
        an object missing, ...)."""
        env = {"GIT_CONFIG_NOSYSTEM": "1"}
        if self.mountpoint:
            env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = os.path.join(self.mountpoint, ".git", "objects")
        try:
            r = run_git(["-c", "safe.directory=*", "--git-dir", os.path.join(self.base, ".git"), "merge-base",
                         "--is-ancestor", a, b], uid=self.uid, gid=self.gid, env=env, timeout=GIT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return {0: True, 1: False}.get(r.returncode)


def _short(v: bytes | None) -> str:
    if v is None:
        return "(none)"
    s = v.decode(errors="replace").strip()
    return s[:12] if OID.match(v.strip()) else s


def settle(base_fd: int, layer_fds, conflicts: list, git: Git | None, write: bool = True):
    """(the conflicts that stand, the ones the policy settled) for a base that is a git
    repository: see the module's table. A settled conflict is {"path", "how"} (and "rewritten":
    its layer file now holds other content than the view showed); a ref both sides
    moved apart stays a conflict with a ``reason`` naming both commit ids (``base_commit``,
    ``saga_commit``). *write*: write the settled content into the saga's layer (False for a
    dry run)."""
    stand, settled = [], []
    for c in conflicts:
        k = kind(c["path"])
        if k is None:
            stand.append(c)
            continue
        if k in ("cache", "object", "scratch"):
            settled.append({"path": c["path"], "how": "saga's"})
            continue
        found = saga_file(layer_fds, c["path"])
        if found is None:
            stand.append(c)  # the saga removed it, or made it something else: no policy
            continue
        _, pfd, name = found
        try:
            ours = _read_at(pfd, name)
            theirs = base_file(base_fd, c["path"])
            if ours is None or theirs is None:
                stand.append(c)
                continue
            if k == "log":
                merged = merge_log(theirs, ours)
                settled.append({"path": c["path"], "how": "appended"})
                if write and merged != ours:
                    _rewrite(pfd, name, merged)
                    settled[-1]["rewritten"] = True
                continue
            # a ref (HEAD, refs/**)
            if ours.strip() == theirs.strip():
                settled.append({"path": c["path"], "how": "same"})
                continue
            o, t = ours.strip(), theirs.strip()
            if OID.match(o) and OID.match(t) and git is not None:
                if git.is_ancestor(t.decode(), o.decode()):
                    settled.append({"path": c["path"], "how": "saga's (fast-forward)"})
                    continue
                if git.is_ancestor(o.decode(), t.decode()):
                    settled.append({"path": c["path"], "how": "base's (fast-forward)"})
                    if write:
                        _rewrite(pfd, name, theirs)
                        settled[-1]["rewritten"] = True
                    continue
            ref = c["path"][5:]
            what = f"branch {ref[11:]}" if ref.startswith("refs/heads/") else ref
            stand.append(dict(c, base_commit=t.decode(errors="replace"), saga_commit=o.decode(errors="replace"),
                              reason=f"{what} moved on both sides: the base is at {_short(t)}, the saga at "
                                     f"{_short(o)}; merge the base's into the saga's in the workspace ("
                                     f"{_merge_hint(git, ref)}) and commit again, or roll back the step"))
        finally:
            os.close(pfd)
    return stand, settled


def _merge_hint(git: Git | None, ref: str) -> str:
    if git is None or not ref.startswith("refs/"):
        return "git merge"
    # the view is live (layers/basewatch.py): files the base's commits added already show in the
    # workspace, untracked by the saga's index, and git merge refuses to overwrite them; they are
    # the base's own: removing them in the view first lets the merge write them back
    return (f"git fetch {git.base} {ref} && git diff -z --name-only --diff-filter=A HEAD FETCH_HEAD "
            "| xargs -0r rm -f -- && git merge FETCH_HEAD")


def _rewrite(pfd: int, name: bytes, data: bytes) -> None:
    """Replace a layer file's content in place (the same inode, mode and owner)."""
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
