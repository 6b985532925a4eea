"""``python -m overlayd`` with every FUSE handler wrapped to count requests and the time spent
in each handler (for bench/profile.py; never used for the timed benchmark). The daemon's code
is not changed: the handlers of ``overlayd.layers.OverlayFS`` are wrapped at import time.

SIGUSR1 writes the counts since the previous SIGUSR1 to $OVERLAYD_BENCH_COUNTS (JSON, with a
sequence number) and resets them. Same arguments as ``python -m overlayd``.
"""

import collections
import inspect
import json
import os
import signal
import sys
import time

import pyfuse3

from overlayd import layers as ofs

COUNTS = collections.Counter()
TIMES = collections.Counter()
STATE = {"seq": 0, "entries": 0}


def _wrap(name, orig):
    async def handler(self, *args):
        COUNTS[name] += 1
        t0 = time.perf_counter()
        try:
            return await orig(self, *args)
        finally:
            TIMES[name] += time.perf_counter() - t0

    handler.__name__ = name
    handler.__qualname__ = f"OverlayFS.{name}"
    return handler


for _name, _member in inspect.getmembers(pyfuse3.Operations):
    if _name.startswith("_"):
        continue
    _orig = getattr(ofs.OverlayFS, _name, None)
    if _orig is not None and inspect.iscoroutinefunction(_orig):
        setattr(ofs.OverlayFS, _name, _wrap(_name, _orig))

_reply = pyfuse3.readdir_reply


def _readdir_reply(token, name, attr, next_id):
    ok = _reply(token, name, attr, next_id)
    if ok:
        STATE["entries"] += 1
    return ok


pyfuse3.readdir_reply = _readdir_reply


def _dump(signum, frame):
    STATE["seq"] += 1
    path = os.environ.get("OVERLAYD_BENCH_COUNTS")
    if path:
        data = {"seq": STATE["seq"], "counts": dict(COUNTS), "handler_seconds": dict(TIMES),
                "readdir_entries": STATE["entries"]}
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(data, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:  # never take the daemon down
            print(f"counting_daemon: cannot write {path}: {exc}", file=sys.stderr)
    COUNTS.clear()
    TIMES.clear()
    STATE["entries"] = 0


signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    from overlayd.__main__ import main

    sys.exit(main())
