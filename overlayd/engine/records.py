"""Trio-free reads of the journal and checks of request arguments, shared by the engine and
by the CLI reading a stopped workspace's journal (status_of)."""

import time

from ..commit.changes import live_steps
from ..protocol import name_problem
from .errors import EngineError

__all__ = ["check_name", "live_steps", "now", "number", "status_of"]


def now() -> float:
    return time.time()


def check_name(kind: str, name) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise EngineError("bad-name", f"invalid {kind} name {name!r}: {problem}")
    return name


def number(args: dict, key: str, default, kind, lo, hi):
    """A numeric request argument, checked: EngineError('bad-request') instead of a crash."""
    v = args.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise EngineError("bad-request", f"{key} must be a number between {lo} and {hi}, not {v!r}")
    return kind(v)


def status_of(journal, writable=None, busy=None) -> dict:
    """The active saga and its steps; with none active, ``last``: the saga that ended last (a
    budget cut that aborted it is in its ``cut``)."""
    sid = journal.meta("active_saga")
    saga = journal.saga(sid) if sid else None
    steps = journal.steps(sid) if sid else []
    last = None
    if saga is None and journal.meta("last_saga_id"):
        last = journal.saga(journal.meta("last_saga_id"))
    return {"saga": saga, "steps": steps, "last": last,
            "writable": writable, "busy": busy}
