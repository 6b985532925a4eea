"""Snapshots of directory trees for differential comparisons (mount vs plain directory).

Trees are walked through directory fds (``openat`` with ``O_NOFOLLOW`` at each level), never
through whole paths, so trees nested down to ``PATH_MAX`` below a root whose own path is long
(a mountpoint in pytest's tmp dir) can be compared, and no symlink is ever followed.
"""

import hashlib
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PRIVATE_XATTR = "user.overlayd."


def walk(root):
    """Yield (relative path, parent dir fd, name, lstat) of every entry under *root*, parents
    first. The fd is valid only until the generator resumes."""
    fd = os.open(os.fspath(root), DIR_FLAGS)
    yield from _walk(fd, "")


def _walk(fd, rel):
    try:
        names = sorted(os.listdir(fd))
        for name in names:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            path = f"{rel}/{name}" if rel else name
            yield path, fd, name, st
            if stat.S_ISDIR(st.st_mode):
                yield from _walk(os.open(name, DIR_FLAGS, dir_fd=fd), path)
    finally:
        os.close(fd)


def _xattrs(fd, name, st, private):
    """User xattrs of an entry (none for symlinks: Linux allows no user xattrs on them)."""
    if stat.S_ISLNK(st.st_mode):
        return None
    flags = DIR_FLAGS if stat.S_ISDIR(st.st_mode) else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        efd = os.open(name, flags, dir_fd=fd)
    except OSError:
        return "unreadable"
    try:
        return sorted((x, os.getxattr(efd, x)) for x in os.listxattr(efd)
                      if x.startswith("user.") and (private or not x.startswith(PRIVATE_XATTR)))
    except OSError:
        return None
    finally:
        os.close(efd)


def _digest(fd, name):
    h = hashlib.sha256()
    efd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        while chunk := os.read(efd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(efd)
    return h.hexdigest()


def snapshot(root, *, data=True, owners=True, mtimes=False, dir_mtimes=False, private_xattrs=True):
    """path -> description; plus the hard-link groups as a set of frozensets of paths.

    *mtimes*: include the mtime (ns) of files and symlinks; *dir_mtimes*: of directories too.
    *private_xattrs*: include ``user.overlayd.*`` (a base must never hold one: compare with it)."""
    out = {}
    inodes = {}
    for rel, fd, name, st in walk(root):
        kind = stat.S_IFMT(st.st_mode)
        desc = {"type": kind}
        if not stat.S_ISLNK(st.st_mode):
            desc["mode"] = stat.S_IMODE(st.st_mode)
        if owners:
            desc["owner"] = (st.st_uid, st.st_gid)
        if stat.S_ISREG(st.st_mode):
            desc["size"] = st.st_size
            if data:
                desc["sha"] = _digest(fd, name)
            inodes.setdefault(st.st_ino, set()).add(rel)
        elif stat.S_ISLNK(st.st_mode):
            desc["target"] = os.readlink(name, dir_fd=fd)
        if not stat.S_ISLNK(st.st_mode) and kind in (stat.S_IFREG, stat.S_IFDIR):
            desc["xattrs"] = _xattrs(fd, name, st, private_xattrs)
        if (mtimes and not stat.S_ISDIR(st.st_mode)) or (dir_mtimes and stat.S_ISDIR(st.st_mode)):
            desc["mtime"] = st.st_mtime_ns
        out[rel] = desc
    groups = {frozenset(v) for v in inodes.values() if len(v) > 1}
    return out, groups


def diff(a, b) -> list[str]:
    """Human-readable differences between two snapshots."""
    (sa, ga), (sb, gb) = a, b
    lines = []
    for path in sorted(set(sa) | set(sb)):
        if path not in sa:
            lines.append(f"only in second: {_short(path)} {_short_desc(sb[path])}")
        elif path not in sb:
            lines.append(f"only in first: {_short(path)} {_short_desc(sa[path])}")
        elif sa[path] != sb[path]:
            keys = sorted(k for k in set(sa[path]) | set(sb[path]) if sa[path].get(k) != sb[path].get(k))
            lines.append(f"differs: {_short(path)}: " + ", ".join(
                f"{k}: {_short(sa[path].get(k))} != {_short(sb[path].get(k))}" for k in keys))
    if ga != gb:
        lines.append(f"hard-link groups differ: {sorted(map(sorted, ga))} != {sorted(map(sorted, gb))}")
    return lines


def diff_keys(a, b) -> set:
    """The description keys that differ (``"only"`` for a path on one side, ``"links"`` for the
    hard-link groups): what kind of difference two snapshots have."""
    (sa, ga), (sb, gb) = a, b
    keys = set()
    for path in set(sa) | set(sb):
        if path not in sa or path not in sb:
            keys.add("only")
        elif sa[path] != sb[path]:
            keys.update(k for k in set(sa[path]) | set(sb[path]) if sa[path].get(k) != sb[path].get(k))
    if ga != gb:
        keys.add("links")
    return keys


def _short(x, n=160):
    s = str(x)
    return s if len(s) <= n else f"{s[:n // 2]}...({len(s)} chars)...{s[-n // 4:]}"


def _short_desc(d):
    return _short(d)


def clone(src, dst):
    """Copy the tree *src* to the new directory *dst* through directory fds (``cp -a`` stops at
    PATH_MAX): data, modes, owners, user xattrs, symlinks, hard links, times."""
    sfd = os.open(os.fspath(src), DIR_FLAGS)
    os.mkdir(os.fspath(dst), 0o700)
    dfd = os.open(os.fspath(dst), DIR_FLAGS)
    try:
        _clone(sfd, dfd, {})
        _meta(sfd, dfd, os.fstat(sfd))
    finally:
        os.close(sfd)
        os.close(dfd)


def _meta(sfd, dfd, st):
    for x in os.listxattr(sfd):
        if x.startswith("user."):
            os.setxattr(dfd, x, os.getxattr(sfd, x))
    os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _clone(sfd, dfd, links):
    dirs = []
    for name in sorted(os.listdir(sfd)):
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dfd)
            cs = os.open(name, DIR_FLAGS, dir_fd=sfd)
            cd = os.open(name, DIR_FLAGS, dir_fd=dfd)
            try:
                _clone(cs, cd, links)
                dirs.append((cs, cd, st))
            except BaseException:
                os.close(cs)
                os.close(cd)
                raise
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            if st.st_ino in links:
                ldfd, lname = links[st.st_ino]
                os.link(lname, name, src_dir_fd=ldfd, dst_dir_fd=dfd)
                continue
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dfd)
            try:
                while chunk := os.read(src, 1 << 20):
                    os.write(dst, chunk)
                _meta(src, dst, st)
            finally:
                os.close(src)
                os.close(dst)
            if st.st_nlink > 1:
                links[st.st_ino] = (os.dup(dfd), name)
        else:
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dfd)
    for cs, cd, st in dirs:  # directory times last: creating entries changed them
        try:
            _meta(cs, cd, st)
        finally:
            os.close(cs)
            os.close(cd)
