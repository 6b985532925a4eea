"""The daemon's wire: control operations -> their handlers, and the handlers' errors -> replies.

Handlers (the daemon's own and the saga engine's) raise domain errors: EngineError keeps its
code, message and fields; a journal or filesystem out of room becomes ``no-space`` with what to
do. Anything else is a bug: the control server answers ``internal`` and logs it.
"""

import errno

from overlayd.journal import JournalFull

from ..engine.errors import EngineError, no_space_message
from ..protocol import OpError


class Wire:
    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.ops = {}  # op name -> async handler(args, peer)

    def add(self, ops: dict) -> None:
        self.ops.update(ops)

    async def dispatch(self, op, args, peer):
        fn = self.ops.get(op)
        if fn is None:
            raise OpError("unknown-op", f"unknown operation {op!r}")
        try:
            return await fn(args, peer)
        except EngineError as exc:
            raise OpError(exc.code, exc.message, **exc.extra) from None
        except JournalFull as exc:
            raise OpError("no-space", no_space_message(self.state_dir, exc)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OpError("no-space", no_space_message(self.state_dir, exc)) from None
