"""The one lock of stack operations (step, rollback, abort, retry, commit, gc, push, drop, seal).

A request that finds it held is refused (``busy``), never queued: an agent learns at once
that another operation runs. Internal work that must follow the operation in flight (a budget
cut, the daemon's stop) waits for it instead (``wait_hold``, ``wait_idle``).
"""

import contextlib

import trio

from .errors import EngineError


class StackLock:
    def __init__(self):
        self._lock = trio.Lock()
        self.busy = None  # the name of the operation holding the lock
        self.stopping = False  # set by the daemon's stop: every new operation is refused

    def _check_stopping(self) -> None:
        if self.stopping:
            raise EngineError("stopping", "the daemon is stopping; run this again once it is back")

    def locked(self) -> bool:
        return self._lock.locked()

    @contextlib.contextmanager
    def hold(self, name: str):
        """Hold the lock for operation *name*; refuse (``busy``) if another one holds it."""
        self._check_stopping()
        if self._lock.locked():
            what = self.busy or "one that waited for the last"
            raise EngineError("busy", f"cannot {name} while another operation ({what}) is in progress; "
                                      "wait for it to finish and try again")
        self._lock.acquire_nowait()
        self.busy = name
        try:
            yield
        finally:
            self.busy = None
            self._lock.release()

    @contextlib.asynccontextmanager
    async def wait_hold(self, name: str):
        """Hold the lock for *name* once the operation in flight has finished."""
        async with self._lock:
            self._check_stopping()
            self.busy = name
            try:
                yield
            finally:
                self.busy = None

    async def wait_idle(self) -> None:
        """Return once no operation holds the lock."""
        async with self._lock:
            pass
