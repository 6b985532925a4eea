"""Cost of the audit trail on write workloads: create N x 4 KiB files and `tar x` a small tree in a
step, with the audit trail on and off (OVERLAYD_AUDIT=0), interleaved, medians.

    python bench/audit_overhead.py [--files 5000] [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Mount  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overlayd-audit-", dir="/var/tmp"))
    times = {"on": [], "off": []}
    try:
        base = tmp / "base"
        base.mkdir()
        data = os.urandom(4096)
        for run in range(a.runs):
            for mode in ("on", "off"):
                sub = tmp / f"{mode}{run}"
                sub.mkdir()
                os.environ["OVERLAYD_AUDIT"] = "1" if mode == "on" else "0"
                m = Mount(base, sub, name=f"a{mode}{run}").start()
                try:
                    m.call("saga.begin", name="w")
                    m.call("saga.step", name="s")
                    t0 = time.perf_counter()
                    for i in range(a.files):
                        with open(m.mp / f"f{i}", "wb") as f:
                            f.write(data)
                    times[mode].append(time.perf_counter() - t0)
                    m.call("saga.abort")
                finally:
                    m.stop()
                    os.environ.pop("OVERLAYD_AUDIT", None)
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"create {a.files} x 4 KiB: audit on {on:.3f}s, off {off:.3f}s, overhead {100 * (on / off - 1):+.1f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
