"""Fault injection for the crash tests (docs/ARCHITECTURE.md, Recovery): OVERLAYD_CRASH_AT
makes the daemon SIGKILL itself at the n-th pass of a label; OVERLAYD_STALL_AT makes it sleep
there (osutil.stall_point)."""

import logging
import os
import signal

from . import osutil

log = logging.getLogger(__name__)

CRASH_AT = os.environ.get("OVERLAYD_CRASH_AT", "")  # "label" or "label:n"
_crash_counts = {}


def crash_point(label: str) -> None:
    """Fault injection for the tests: SIGKILL ourselves at the n-th pass of *label*
    (OVERLAYD_CRASH_AT), or sleep there (OVERLAYD_STALL_AT; only ever reached on worker threads)."""
    osutil.stall_point(label)
    if not CRASH_AT:
        return
    want, _, nth = CRASH_AT.partition(":")
    if want != label:
        return
    _crash_counts[label] = _crash_counts.get(label, 0) + 1
    if _crash_counts[label] >= int(nth or 1):
        log.warning("fault injection: crashing at %s", CRASH_AT)
        os.kill(os.getpid(), signal.SIGKILL)
