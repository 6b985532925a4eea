"""overlayd: a copy-on-write FUSE overlay daemon with a saga journal."""

__version__ = "0.1.0"
