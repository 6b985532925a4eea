"""The data model of the view: layers, the raw listing of a layer's directory, view inodes
(nodes) and open file handles, with the constants every room of the package shares.

Nothing here does I/O beyond an ``fstat`` of a layer's root: resolution lives in
:mod:`.resolve`, stack changes in :mod:`.stack`, copy-up in :mod:`.copyup`.
"""

import errno
import itertools
import logging
import os

import pyfuse3
from pyfuse3 import FUSEError

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 300.0  # entry and attribute timeout given to the kernel, in seconds
FD_CACHE = 1024  # directory fds kept open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
K_DIR, K_FILE, K_WHITEOUT, K_OTHER = 1, 2, 3, 4
SYNTHETIC_INO = 1 << 48
WHITEOUT = "whiteout"  # the shared whiteout's name in the work directory
THREAD_COPY = 1 << 20  # copies of this many bytes or more run in a worker thread (copyup.Blocked)


class Layer:
    """One directory of the stack."""

    __slots__ = ("id", "path", "fd", "dev", "serial", "sealed", "idents", "inos", "entries", "same_root",
                 "links")

    _serials = itertools.count(1)

    def __init__(self, layer_id: str, path: str, fd: int, sealed: bool = False, base: bool = False):
        self.id = layer_id
        self.path = path
        self.fd = fd
        self.dev = os.fstat(fd).st_dev
        self.serial = 0 if base else next(Layer._serials)  # part of every identity (see _key)
        self.sealed = sealed
        self.idents = set()  # identities (see _key) registered in by_ident while this layer lives
        self.inos = set()  # view inodes present below this layer whose attributes or data it changed
        self.entries = {}  # parent ino -> {names this layer changed in that directory}
        self.same_root = None  # does its root directory still look as the one below? (None: unknown)
        self.links = None  # (dev, ino) -> [path tuples] of its files with several links, once scanned


class Listing:
    """The raw content of one physical directory of one layer."""

    __slots__ = ("names", "whiteouts")

    def __init__(self):
        self.names = {}  # name -> (kind, d_ino)
        self.whiteouts = set()


class Node:
    """A view inode. Directories have one (parent, name); files may have several."""

    __slots__ = ("ino", "is_dir", "parent", "name", "links", "lookups", "idents", "epoch",
                 "li", "loc", "dlayers", "merged", "opens", "dead", "st", "mc", "nsub")

    def __init__(self, ino: int, is_dir: bool):
        self.ino = ino
        self.is_dir = is_dir
        self.parent = None  # dirs only
        self.name = None  # dirs only
        self.links = set()  # files: {(parent Node, name)}
        self.lookups = 0
        self.idents = set()
        self.epoch = -1
        self.li = 0  # layer index of the top copy (files), of the top dir (dirs)
        self.loc = 0  # bumped whenever the backing file changes; handles reopen on mismatch
        self.dlayers = None  # dirs: [(layer index, d_ino)] top-down
        self.merged = None  # dirs: name -> layer index of the visible entry
        self.opens = 0
        self.dead = False
        self.st = None  # (epoch, stat) of an entry that lives in the base: it does not change
        self.mc = None  # files: (loc, origin or None[, its st_blocks]): is the top copy a metacopy (_origin)
        self.nsub = None  # dirs: (merged, how many of its entries are directories), see _dir_nlink


class Handle:
    """An open file of the view: the fd of its node's current copy, reopened when ``loc`` moves."""

    __slots__ = ("node", "fd", "flags", "loc", "li", "wrote", "base")

    def __init__(self, node, fd, flags, li, base):
        self.node = node
        self.fd = fd
        self.flags = flags
        self.loc = node.loc
        self.li = li
        self.wrote = False
        self.base = base  # fd is a base file (read-only): never to be written, chmod-ed, reopened for writing


def inconsistent(msg, *args) -> FUSEError:
    """An internal inconsistency: log it with a stack, answer EIO."""
    log.error("inconsistency: " + msg, *args, stack_info=True)
    return FUSEError(errno.EIO)


def restore_times(fd: int, st: os.stat_result) -> None:
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
