"""The layers room: the FUSE view of a stack of directories (see docs/ARCHITECTURE.md).

Modules, each importing only those listed after it:
``ops`` (the pyfuse3 handlers) -> ``entries`` (create, remove, rename, handles) ->
``copyup`` (copy-up, metacopies, whiteouts, work in threads) -> ``stack`` (push, seal, drop,
adopt) -> ``resolve`` (nodes, listings, identities, attributes) -> ``model``; ``kernel``
(cache invalidation) beside ``stack``.
"""

from .kernel import find_fuse_fd
from .ops import OverlayFS

__all__ = ["OverlayFS", "find_fuse_fd"]
