"""Before mounting: clear a dead mount, and claim the workspace's name and mountpoint with
flocks held for the daemon's life; after mounting: the mount's device number and readahead."""

import errno
import fcntl
import logging
import os
import subprocess

from ..paths import UsageError, ensure_private_dir, mounts_at, overlayd_mounts, runtime_dir, socket_path

log = logging.getLogger(__name__)


def clear_stale_mount(mountpoint: str) -> None:
    """A dead FUSE daemon leaves 'Transport endpoint is not connected': unmount it lazily."""
    try:
        os.statvfs(mountpoint)  # stat() may still be answered from the kernel's attribute cache
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    log.warning("clearing the stale mount at %s", mountpoint)
    subprocess.run(["fusermount3", "-uz", mountpoint], check=False)


def set_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Larger kernel readahead for the mount: 1 MiB read requests instead of 128 KiB ones."""
    try:
        for m in mounts_at(os.path.abspath(mountpoint))[-1:]:
            with open(f"/sys/class/bdi/{m.dev}/read_ahead_kb", "w") as bdi:
                bdi.write(str(kib))
    except OSError as exc:
        log.debug("readahead not raised: %s", exc)


def mount_dev(real_mountpoint: str, name: str) -> str | None:
    """The device number ("MAJOR:MINOR", as /proc/self/mountinfo gives it) of this daemon's own
    mount, read from the mount table (a stat() of the mountpoint would wait for the FUSE loop):
    the topmost overlayd mount of *name* at *real_mountpoint* (resolved before mounting: once
    mounted, resolving it would wait for the FUSE loop), which the mountpoint's lock makes ours."""
    found = None
    for m in overlayd_mounts():
        if m.point == real_mountpoint and m.name == name:
            found = m.dev
    return found


def is_mounted(mountpoint: str) -> bool:
    return bool(mounts_at(os.path.abspath(mountpoint)))


def _lock_name(path, name: str) -> int:
    """flock *path* (created 0600); returns the fd. The daemon that holds it unlinks it when it
    stops, so a lock taken on a file that was unlinked meanwhile is taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"the workspace name {name} is in use: another daemon serves it (socket "
                             f"{socket_path(name)}; see 'overlayd list'); unmount that workspace first, or "
                             "give this one another --name") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_name(name: str) -> None:
    """Unlink this daemon's name lock (it still holds it: nobody else can be using the file)."""
    try:
        os.unlink(runtime_dir() / f"{name}.lock")
    except OSError:
        pass


def claim(ws, group: str | None) -> list[int]:
    """Refuse a workspace name or a mountpoint that a live daemon serves; returns the fds of the
    flocks that prove this daemon is the only one (held for its lifetime, closed on exec).

    The name's lock lives beside its socket, in the runtime directory, which is created or
    verified here (a real directory of ours that nobody else may write): the socket cannot be
    stolen by a second daemon of the same name, nor served from a directory another user
    planted. The mountpoint's lock is on the directory the mount will cover.
    """
    mode = 0o755 if os.geteuid() == 0 else (0o711 if group else 0o700)
    rdir = ensure_private_dir(runtime_dir(), mode)
    fds = []
    try:
        fds.append(_lock_name(rdir / f"{ws.name}.lock", ws.name))
        if is_mounted(str(ws.mountpoint)):
            raise UsageError(f"{ws.mountpoint} is already a mount point; unmount it first "
                             f"(overlayd unmount {ws.mountpoint})")
        fd = os.open(ws.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another daemon is mounting a workspace at {ws.mountpoint}; "
                             "unmount it first") from None
        if is_mounted(str(ws.mountpoint)):  # mounted between the first check and the lock
            raise UsageError(f"{ws.mountpoint} is already a mount point; unmount it first "
                             f"(overlayd unmount {ws.mountpoint})")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
