"""Saga operation timings: rollback of a step with 1 vs N changed files, commit of N files vs
`cp -a` + `sync` of the same files. Real daemon, real mount; medians of several runs.

    python bench/saga_ops.py [--files 10000] [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Mount  # noqa: E402


def make_files(root: Path, n: int, size: int = 4096) -> None:
    data = os.urandom(size)
    per_dir = 500
    for i in range(n):
        d = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(exist_ok=True)
        (d / f"f{i:05d}").write_bytes(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overlayd-bench-", dir="/var/tmp"))
    try:
        base = tmp / "base"
        base.mkdir()
        (base / "seed").write_text("x")
        (tmp / "m").mkdir()
        m = Mount(base, tmp / "m", name="bench")
        m.start()
        rb = {1: [], a.files: []}
        step_t = []
        commit_t, cp_t = [], []
        try:
            for run in range(a.runs):
                for n in (1, a.files):
                    m.call("saga.begin", name=f"rb{run}-{n}")
                    t0 = time.perf_counter()
                    m.call("saga.step", name="s")
                    step_t.append(time.perf_counter() - t0)
                    (m.mp / "w").mkdir()
                    make_files(m.mp / "w", n)
                    t0 = time.perf_counter()
                    m.call("saga.rollback")
                    rb[n].append(time.perf_counter() - t0)
                    m.call("saga.abort")
                # commit of N files vs cp -a + sync
                src = tmp / "src"
                if src.exists():
                    shutil.rmtree(src)
                src.mkdir()
                make_files(src, a.files)
                dst = tmp / f"cp{run}"
                subprocess.run(["sync"])
                t0 = time.perf_counter()
                subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
                subprocess.run(["sync"], check=True)
                cp_t.append(time.perf_counter() - t0)
                shutil.rmtree(dst)
                m.call("saga.begin", name=f"c{run}")
                m.call("saga.step", name="s")
                (m.mp / f"c{run}").mkdir()
                make_files(m.mp / f"c{run}", a.files)
                subprocess.run(["sync"])
                t0 = time.perf_counter()
                m.call("saga.commit")
                commit_t.append(time.perf_counter() - t0)
        finally:
            m.stop()
        if os.environ.get("BENCH_VERBOSE"):
            for line in m.log_path.read_text().splitlines():
                if "dropped 0" in line or "committed:" in line:
                    print(line)
        med = statistics.median
        print(f"begin a step:                      median {med(step_t) * 1000:8.1f} ms")
        print(f"rollback of a step, 1 file:        median {med(rb[1]) * 1000:8.1f} ms")
        print(f"rollback of a step, {a.files} files: median {med(rb[a.files]) * 1000:8.1f} ms "
              f"(ratio {med(rb[a.files]) / med(rb[1]):.2f})")
        print(f"commit of {a.files} files:          median {med(commit_t) * 1000:8.1f} ms")
        print(f"cp -a + sync of the same files:    median {med(cp_t) * 1000:8.1f} ms "
              f"(commit / cp ratio {med(commit_t) / med(cp_t):.2f})")
    finally:
        subprocess.run(["fusermount3", "-uz", str(tmp / "m" / "mnt")], stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
