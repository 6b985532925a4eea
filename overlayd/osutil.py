"""Thin wrappers over the system calls the layer code needs and Python lacks.

Everything here is plain, synchronous and relative to directory file
descriptors: the daemon never builds a long host path and never follows a
symlink while resolving a name.
"""

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import time

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
FICLONE = 0x40049409

NAME_MAX = 255
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Extended attributes in this namespace belong to overlayd; the view hides them.
PRIVATE_XATTR = b"user.overlayd."
OPAQUE_XATTR = "user.overlayd.opaque"
#: A *metacopy*: a layer file whose data is still the base file named here (see overlayd/layers).
ORIGIN_XATTR = "user.overlayd.origin"
#: On a layer's copy of a base directory: the base's attributes when it was copied up (dir_attrs),
#: so that a commit knows which of them the saga changed and which the base changed meanwhile.
BASE_ATTRS_XATTR = "user.overlayd.base"
#: On a layer's copy of a directory whose times were set (utime) in the view.
UTIME_XATTR = "user.overlayd.utime"


STALL_AT = os.environ.get("OVERLAYD_STALL_AT", "")  # fault injection: "label:seconds"


def stall_point(label: str) -> None:
    """Fault injection for the tests: sleep at *label* (OVERLAYD_STALL_AT=label:seconds).
    Only ever reached on worker threads."""
    if STALL_AT and STALL_AT.rpartition(":")[0] == label:
        time.sleep(float(STALL_AT.rpartition(":")[2]))


def same_dir_meta(fd_a: int, fd_b: int) -> bool:
    """Do two directories carry the same mode, owner, mtime and extended attributes?"""
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    if (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) != (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns):
        return False
    names = sorted(os.listxattr(fd_a))
    if names != sorted(os.listxattr(fd_b)):
        return False
    return all(os.getxattr(fd_a, n) == os.getxattr(fd_b, n) for n in names)


def _proc_stat(pid) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (index 0 is field 3, the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def process_start_time(pid: int) -> int:
    """A process's start time (clock ticks after boot): with its pid, it names one process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else 0


def group_alive(pgid: int, start: int) -> bool:
    """Does a live (not zombie) process remain in process group *pgid*, which is also its session
    (start_new_session), started no earlier than the group's leader (*start*)?"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _proc_stat(entry)
        if f and f[0] != "Z" and int(f[2]) == pgid and int(f[3]) == pgid and int(f[19]) >= start:
            return True
    return False


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int = 0) -> None:
    if _libc.renameat2(olddirfd, old, newdirfd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def make_whiteout(dirfd: int, name: bytes) -> None:
    """A whiteout is a character device 0/0, as kernel overlayfs writes it.

    Since Linux 5.8 an unprivileged process may create one.
    """
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy *size* bytes between two fds in the kernel: reflink, else copy_file_range, else sendfile."""
    if size == 0:
        return
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    off = 0
    try:
        while off < size:
            n = os.copy_file_range(src, dst, size - off, off, off)
            if n == 0:
                break
            off += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(dst, off, os.SEEK_SET)
    while off < size:
        n = os.sendfile(dst, src, off, size - off)
        if n == 0:
            break
        off += n


def copy_xattrs(src, dst, *, skip_private: bool = True) -> None:
    """Copy extended attributes between two fds (or paths, for directories)."""
    try:
        names = os.listxattr(src)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if skip_private and name.encode().startswith(PRIVATE_XATTR):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                log.debug("xattr %s not copied: %s", name, exc)
                continue
            raise


def drop_missing_xattrs(src, dst) -> None:
    """Remove from *dst* the user xattrs *src* lacks (private ones are left alone): what
    copy_xattrs leaves behind when *dst* already existed, as a base directory a commit updates."""
    keep = set(os.listxattr(src))
    for name in os.listxattr(dst):
        if name.startswith("user.") and name not in keep and not name.encode().startswith(PRIVATE_XATTR):
            discard_xattr(dst, name)


def private_xattrs(target) -> list[str]:
    """The names of *target*'s xattrs in overlayd's private namespace (an fd, or a path whose last
    component is not followed)."""
    try:
        names = os.listxattr(target) if isinstance(target, int) else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    return [n for n in names if n.encode().startswith(PRIVATE_XATTR)]


def visible_xattrs(fd: int) -> dict:
    """name -> value of *fd*'s xattrs outside overlayd's namespace."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for name in names:
        if not name.encode().startswith(PRIVATE_XATTR):
            try:
                out[name] = os.getxattr(fd, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return out


def dir_attrs(fd: int, st: os.stat_result | None = None) -> dict:
    """The attributes of a directory that a commit may carry over: mode, owner, xattrs (a digest)."""
    import hashlib

    st = st or os.fstat(fd)
    h = hashlib.sha256()
    for name, value in sorted(visible_xattrs(fd).items()):
        h.update(name.encode() + b"\0" + value + b"\0")
    return {"mode": stat.S_IMODE(st.st_mode), "owner": [st.st_uid, st.st_gid], "xattrs": h.hexdigest()[:32]}


def get_private(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def is_opaque(dirfd: int) -> bool:
    try:
        return os.getxattr(dirfd, OPAQUE_XATTR) == b"y"
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise


def set_opaque(dirfd: int) -> None:
    os.setxattr(dirfd, OPAQUE_XATTR, b"y")


def check_name(name: bytes) -> None:
    """Raise OSError(ENAMETOOLONG/EINVAL) for a name that must not become a path."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid name")


def rmtree_at(dirfd: int, name: bytes, on_dir=None) -> None:
    """Remove *name* (a file, or a directory tree) relative to *dirfd*, never following a symlink
    and never entering a mount point (EBUSY, before anything below it is removed).

    *on_dir(st)* is called with the stat of every directory removed (for cache purges).
    """
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    if is_mount_root(dirfd, name, st):  # never remove what another file system (or a bind mount) holds
        raise OSError(errno.EBUSY, "a file system is mounted there: unmount it first", name)
    fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    try:
        if on_dir is not None:
            on_dir(st)
        for child in os.listdir(fd):
            rmtree_at(fd, os.fsencode(child), on_dir)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def encode_origin(ino: int, path: bytes) -> bytes:
    """The value of ORIGIN_XATTR: the base file's inode number and its path below the base."""
    return b"%d:" % ino + path


def get_origin(target, follow_symlinks: bool = False):
    """(ino, path) recorded on a metacopy file (fd or path), or None for a file with its own data."""
    try:
        value = os.getxattr(target, ORIGIN_XATTR, **({} if isinstance(target, int) else
                                                     {"follow_symlinks": follow_symlinks}))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    ino, _, path = value.partition(b":")
    if not ino.isdigit() or not path or path.startswith(b"/"):
        raise OSError(errno.EIO, f"malformed {ORIGIN_XATTR} value {value[:80]!r}")
    return int(ino), path


def open_origin(base_fd: int, origin) -> int:
    """A read-only fd of a metacopy's data in the base, opened beneath the base without following
    any symlink; EIO if the base file is not the one the metacopy was made from any more."""
    ino, path = origin
    dirpath, _, name = path.rpartition(b"/")
    dfd = open_beneath(base_fd, dirpath)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EIO, f"the base file {os.fsdecode(path)} that a renamed file still reads its data "
                                 "from was replaced behind the workspace's back")
    return fd


def materialize(base_fd: int, fd: int, origin=None) -> bool:
    """Give the metacopy open read-write at *fd* its own data (copied from the base), keeping its
    times, then drop its origin. Idempotent; False if it was no metacopy."""
    origin = origin or get_origin(fd)
    if origin is None:
        return False
    st = os.fstat(fd)
    src = open_origin(base_fd, origin)
    try:
        copy_data(src, fd, st.st_size)
    finally:
        os.close(src)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    discard_xattr(fd, ORIGIN_XATTR)
    return True


def discard_xattr(fd: int, name: str) -> None:
    """Remove the xattr *name* of *fd* if it has one."""
    try:
        os.removexattr(fd, name)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def reopen_dir(fd: int) -> int:
    """A new open file description of the directory *fd*, to read its entries: a long-lived
    one must not be read (btrfs ends a directory stream at the last index the directory had
    when its description was opened or last rewound, so entries added since would be missed)."""
    return os.open(".", DIR_FLAGS, dir_fd=fd)


def open_beneath(rootfd: int, relpath: bytes) -> int:
    """Open the directory *relpath* below *rootfd*, refusing any symlink on the way (ELOOP/ENOTDIR)."""
    fd = os.dup(rootfd)
    try:
        for part in relpath.split(b"/"):
            if not part or part == b".":
                continue
            if part == b"..":
                raise OSError(errno.EPERM, "'..' in a path to resolve beneath a root", relpath)
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000


def _statx(dirfd: int, name: bytes, mask: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not name else 0)
    if _libc.statx(dirfd, name, flags, mask, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return buf.raw


def mount_id(dirfd: int, name: bytes = b"") -> int:
    """The id of the mount *name* (relative to *dirfd*; *dirfd* itself if empty) is on: two
    mounts of one file system (a bind mount) have the same st_dev but not the same mount id,
    and link() or rename() between them fails with EXDEV."""
    raw = _statx(dirfd, name, STATX_MNT_ID)
    if not struct.unpack_from("=I", raw, 0)[0] & STATX_MNT_ID:
        return os.stat(name or ".", dir_fd=dirfd, follow_symlinks=False).st_dev  # a kernel before 5.8
    return struct.unpack_from("=Q", raw, 144)[0]


def is_mount_root(dirfd: int, name: bytes, st: os.stat_result | None = None) -> bool:
    """True if a file system is mounted at *name* in *dirfd* (a bind mount or another file system):
    a commit must never enter, remove or replace it."""
    raw = _statx(dirfd, name, 0)
    attributes, mask = struct.unpack_from("=Q", raw, 8)[0], struct.unpack_from("=Q", raw, 56)[0]
    if mask & STATX_ATTR_MOUNT_ROOT:
        return bool(attributes & STATX_ATTR_MOUNT_ROOT)
    st = st or os.stat(name, dir_fd=dirfd, follow_symlinks=False)  # a kernel before 5.8
    return st.st_dev != os.fstat(dirfd).st_dev


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any *mode* (os.posix_fallocate knows only mode 0). The layer's file
    system's refusal (EOPNOTSUPP for a mode it lacks) is raised as is."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding *fd*. A failure is reported, never retried silently."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


def raise_nofile_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

