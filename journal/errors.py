"""The journal's exceptions."""

from pathlib import Path


class JournalError(Exception):
    """The journal could not be opened, read or written."""


class SchemaError(JournalError):
    """The journal was written with a schema this program does not support."""


class JournalDamaged(JournalError):
    """data.mdb is not a readable LMDB environment (empty, truncated, overwritten): the caller
    must refuse to go on, never start a fresh journal over it."""

    def __init__(self, data, reason):
        self.data = Path(data)
        self.reason = reason
        state = self.data.parent.parent
        super().__init__(
            f"the journal {self.data} cannot be read: {reason}. Nothing was changed. Restore it "
            f"from a backup (while no daemon runs); or, to start over without its sagas, move it "
            f"and the layers aside: mv {self.data.parent} {self.data.parent}.damaged && mv "
            f"{state / 'layers'} {state / 'layers'}.saved (the sagas' changes stay there, one "
            "directory per step)")


class JournalFull(JournalError):
    """The state filesystem has no room for a journal write (ENOSPC, or a map that cannot
    grow). Nothing was written: the caller's state is as before the call."""

