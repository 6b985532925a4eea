"""Commit throughput with 1, 4 and 16 workspaces over one base (issue 20 item 2): every commit into
a base takes its lock (overlayd.commit.run.BaseLock), so this measures how commits from many
daemons queue, not how fast one is. One fresh base and W fresh daemons per measurement; each
round every workspace begins a saga, writes F new files in a directory of its own (no overlaps)
and all commit at once; commits/s = W x rounds / the wall time of the commits alone.

    python bench/parallel_commit.py [--quick] [--workspaces 1,4,16] [--rounds 5] [--files 20]

bench/run.py runs it with the saga operations (keys commit_tput_W in each saga row).
"""

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from targets import ROOT, BenchMount, _live, lazy_unmount  # noqa: E402

FULL = {"workspaces": (1, 4, 16), "rounds": 5, "files": 20}
QUICK = {"workspaces": (1, 4, 16), "rounds": 2, "files": 5}


class _Scratch:
    name = "parallel-commit-scratch"

    def __init__(self, mounts):
        self.mounts = mounts

    def unmount(self, force=False):
        for m in self.mounts:
            if m.proc is not None:
                m.kill()
            lazy_unmount(str(m.mp), fuse=True)
        _live.pop(id(self), None)


def throughput(work: Path, w: int, rounds: int, files: int, code: Path = ROOT) -> float:
    """Commits per second of *w* workspaces committing at once into one base."""
    tmp = Path(tempfile.mkdtemp(prefix=f"pcommit{w}-", dir=work))
    base = tmp / "base"
    base.mkdir()
    (base / "seed").write_text("x")
    mounts = []
    guard = _Scratch(mounts)
    _live[id(guard)] = guard
    try:
        for i in range(w):
            (tmp / f"m{i}").mkdir()
            m = BenchMount(base, tmp / f"m{i}", name=f"pc{i}", code=code, log_level="warning")
            mounts.append(m)
            m.start()
        total = 0.0
        for r in range(rounds):
            for i, m in enumerate(mounts):
                m.call("saga.begin", name=f"r{r}")
                m.call("saga.step", name="s")
                d = m.mp / f"ws{i}" / f"r{r}"
                d.mkdir(parents=True)
                for k in range(files):
                    (d / f"f{k}").write_bytes(b"x" * 4096)
            errors = []

            def commit(m):
                try:
                    m.call("saga.commit")
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(f"{m.name}: {exc}")

            threads = [threading.Thread(target=commit, args=(m,)) for m in mounts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total += time.perf_counter() - t0
            if errors:
                raise RuntimeError("; ".join(errors))
        return w * rounds / total
    finally:
        for m in mounts:
            try:
                m.stop()
            except Exception:  # noqa: BLE001 - the guard clears what is left
                pass
        guard.unmount()
        shutil.rmtree(tmp, ignore_errors=True)


def run_once(work: Path, sc: dict, code: Path = ROOT) -> dict:
    return {f"commit_tput_{w}": throughput(work, w, sc["rounds"], sc["files"], code) for w in sc["workspaces"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workspaces", help="comma-separated counts (default 1,4,16)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--files", type=int)
    a = ap.parse_args()
    sc = dict(QUICK if a.quick else FULL)
    if a.workspaces:
        sc["workspaces"] = tuple(int(x) for x in a.workspaces.split(","))
    if a.rounds:
        sc["rounds"] = a.rounds
    if a.files:
        sc["files"] = a.files
    work = Path(tempfile.mkdtemp(prefix="overlayd-pcommit-", dir="/var/tmp"))
    try:
        for w in sc["workspaces"]:
            t0 = time.perf_counter()
            tput = throughput(work, w, sc["rounds"], sc["files"])
            print(f"{w:3d} workspace(s): {tput:6.2f} commits/s ({w * sc['rounds']} commits of {sc['files']} files; "
                  f"{time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
