"""What the installed pyfuse3 can do, found by feature (never by version).

scripts/install.sh builds pyfuse3 with the patches of patches/pyfuse3/series; overlayd runs on a
stock pyfuse3 too, without what the patches add:

- ``cache_readdir``: opendir may answer with a FileInfo carrying keep_cache and cache_readdir, and
  the kernel answers warm listings from its page cache (the daemon invalidates a directory's
  inode whenever its listing changes behind the kernel's back: a layer drop, a commit);
- ``fallocate``: the Operations.fallocate handler exists (stock: the kernel answers EOPNOTSUPP);
- ``inline_requests``: the request loop reads /dev/fuse until EAGAIN and runs a handler that does
  not suspend to completion without a task switch (nothing for overlayd to do: only reported);
- ``no_opendir``: an opendir answered ``ENOSYS`` makes the kernel send no opendir or releasedir
  again (Linux >= 5.1: ``pyfuse3.no_opendir_support``), cache every listing as with
  cache_readdir, and readdir gets the directory's inode (``pyfuse3.no_opendir``): one round trip
  less each way per directory opened.
"""

import importlib.metadata
import logging

import pyfuse3

log = logging.getLogger(__name__)

CACHE_READDIR = hasattr(pyfuse3.FileInfo(), "cache_readdir")
FALLOCATE = "fallocate" in vars(pyfuse3.Operations)
INLINE_REQUESTS = hasattr(pyfuse3._pyfuse3, "resume_suspended")
NO_OPENDIR = hasattr(pyfuse3, "no_opendir")


def features() -> list[str]:
    """The patched features present, in the series' order."""
    found = (("cache_readdir", CACHE_READDIR), ("fallocate", FALLOCATE), ("inline_requests", INLINE_REQUESTS),
             ("no_opendir", NO_OPENDIR))
    return [name for name, present in found if present]


def describe() -> str:
    """E.g. ``pyfuse3 3.5.0 (patched: cache_readdir, fallocate)`` or ``pyfuse3 3.5.0 (stock)``."""
    try:
        version = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    found = features()
    return f"pyfuse3 {version} ({'patched: ' + ', '.join(found) if found else 'stock'})"
