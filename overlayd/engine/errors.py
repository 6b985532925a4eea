"""The engine's domain error. The daemon's wire (overlayd.daemon.wire) turns it into a reply
with the same code, message and fields; the engine never raises the transport's OpError."""

import os


class EngineError(Exception):
    """A saga operation refused or failed: *code* (``conflict``, ``busy``, ``stuck``,
    ``no-saga``, ...; docs/ARCHITECTURE.md lists them), a message that says what to do, extra
    fields for machines (``conflicts``, ``saga``, ``step``, ...)."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def no_space_message(state_dir, exc) -> str:
    """What a refusal for lack of room on the state filesystem says."""
    try:
        sv = os.statvfs(state_dir)
        free = f"{(sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize // 1024} KiB free"
    except OSError:
        free = "free space unknown"
    return (f"the state file system is full: {state_dir} has {free} ({exc}); "
            "roll back a step (saga rollback) or free space on it, then try again")
