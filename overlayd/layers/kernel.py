"""Telling the kernel what changed behind its caches: expiring names, invalidating inodes.

Only stack changes (a drop, a commit) change the view behind the kernel's back; every other
change goes through a request, which the kernel already accounts for. The calls here block on
the kernel (it may need the directory locks that a request in flight holds): they run in a
worker thread, never in a handler (see docs/ARCHITECTURE.md, "Kernel caching").
"""

import errno
import logging
import os
import struct

import pyfuse3

log = logging.getLogger(__name__)

FUSE_NOTIFY_INVAL_ENTRY = 3  # linux/fuse.h
FUSE_EXPIRE_ONLY = 1


def expire_entry(fuse_fd: int, parent: int, name: bytes) -> None:
    """``fuse_lowlevel_notify_expire_entry``: a FUSE_NOTIFY_INVAL_ENTRY message with the
    FUSE_EXPIRE_ONLY flag (protocol 7.38), written to the session's /dev/fuse fd in one write, as
    libfuse does. pyfuse3 exposes only the evicting variant."""
    body = struct.pack("=QII", parent, len(name), FUSE_EXPIRE_ONLY) + name + b"\0"
    msg = struct.pack("=IiQ", 16 + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body
    if os.write(fuse_fd, msg) != len(msg):
        raise OSError(errno.EIO, "short write of a FUSE notification")


def find_fuse_fd() -> int | None:
    """The fd of /dev/fuse that pyfuse3.init opened in this process (one mount per daemon)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "/dev/fuse":
                found.append(int(entry))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def invalidate(fuse_fd: int | None, inos, entries) -> int | None:
    """Tell the kernel to forget names and attributes/pages. Call from a worker thread.

    Names are *expired* where the kernel allows it (Linux >= 6.2, through *fuse_fd*): the kernel
    asks again at the next use of the name (one lookup) instead of evicting, there and then,
    every dentry and inode it cached below it. A drop of a step that created 10,000 files then
    costs the same as a drop of a step that created one. Returns *fuse_fd*, or None once the
    kernel refused an expiry (the names are invalidated instead, from then on).
    """
    for parent, name in entries:
        if fuse_fd is not None:
            try:
                expire_entry(fuse_fd, parent, name)
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # the kernel has nothing cached under that parent
                log.info("expiring kernel entries failed (%s): invalidating them instead", exc.strerror)
                fuse_fd = None
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            pass
    for ino in inos:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError:
            pass
    return fuse_fd
