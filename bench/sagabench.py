"""Saga operations on a real daemon over a small scratch base (a commit writes into its base, so
never the shared benchmark tree). One fresh daemon per run.

Measured per run: saga.begin; begin a step (saga.step on a new saga); roll back a step with 1
changed file and with N, and a 1-file step that follows an N-file step; commit of N new files
(in new directories: moved whole) vs ``cp -a`` of the same files + ``sync``, and of N new files
into directories the base has (entry by entry); journal transitions per second (K x saga.step on
an empty saga over one control connection).
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from saga_ops import make_files  # noqa: F401 - the same file layout as bench/saga_ops.py
from targets import BenchMount, _live, lazy_unmount, proc_status


class _Scratch:
    """Registered in targets._live so that cleanup_all() clears it on Ctrl-C."""

    name = "saga-scratch"

    def __init__(self, m):
        self.m = m

    def unmount(self, force=False):
        m = self.m
        if m.proc is not None:
            m.kill()
        lazy_unmount(str(m.mp), fuse=True)
        _live.pop(id(self), None)


def _t(fn, *a, **kw):
    t0 = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t0


def _settle(m, timeout: float = 60.0) -> None:
    """Wait until the daemon has deleted the layers it dropped (its reaper thread), then sync:
    a timed commit or `cp -a` + `sync` must not pay for the previous measurement's deletions."""
    deadline = time.monotonic() + timeout
    trash = [p for p in m.state.rglob("trash") if p.is_dir()]
    while time.monotonic() < deadline and any(any(t.iterdir()) for t in trash):
        time.sleep(0.05)
    subprocess.run(["sync"], check=True)


def run_once(work: Path, run: int, n: int, k: int, code: Path, log=print) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="saga-", dir=work))
    rec = {"run": run}
    m = None
    guard = None
    try:
        base = tmp / "base"
        base.mkdir()
        (base / "seed").write_text("x")
        (tmp / "m").mkdir()
        m = BenchMount(base, tmp / "m", name="sagabench", code=code)
        guard = _Scratch(m)
        _live[id(guard)] = guard
        m.start()
        call = m.call
        # begin a saga, begin a step
        rec["saga_begin"] = _t(call, "saga.begin", name=f"b{run}")
        rec["step_begin"] = _t(call, "saga.step", name="s1")
        call("saga.abort")
        # rollback with 1 and with n changed files
        for key, count in (("rollback_1", 1), ("rollback_n", n)):
            call("saga.begin", name=f"{key}{run}")
            call("saga.step", name="s")
            (m.mp / "w").mkdir()
            t0 = time.perf_counter()
            make_files(m.mp / "w", count)
            if count == n:
                rec["create_n"] = time.perf_counter() - t0
            rec[key] = _t(call, "saga.rollback")
            call("saga.abort")
        # commit of n files vs cp -a + sync of the same files
        src = tmp / "src"
        src.mkdir()
        make_files(src, n)
        # once untimed: on ext4 the first inodes allocated in a fresh block group cost ~0.3 ms
        # each (its inode table is initialised lazily), later ones ~0.02 ms; the baseline gets
        # the fast case (commit itself allocates no inode per file: it links or moves)
        subprocess.run(["cp", "-a", str(src), str(tmp / "warm")], check=True)
        shutil.rmtree(tmp / "warm")
        _settle(m)
        dst = tmp / "cp"
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
        subprocess.run(["sync"], check=True)
        rec["cp_n"] = time.perf_counter() - t0
        shutil.rmtree(dst)
        shutil.rmtree(src)
        call("saga.begin", name=f"c{run}")
        call("saga.step", name="s")
        (m.mp / "c").mkdir()
        make_files(m.mp / "c", n)
        # a 1-file step after the n-file one, rolled back: must not pay for the n files
        call("saga.step", name="small")
        (m.mp / "one").write_text("x")
        rec["rollback_1_after_n"] = _t(call, "saga.rollback")
        _settle(m)
        rec["commit_n"] = _t(call, "saga.commit")
        # the same n files into directories the base already has: committed entry by entry
        for i in range((n + 499) // 500):
            (base / "into" / f"d{i:03d}").mkdir(parents=True, exist_ok=True)
        call("saga.begin", name=f"i{run}")
        call("saga.step", name="s")
        make_files(m.mp / "into", n)
        _settle(m)
        rec["commit_n_into"] = _t(call, "saga.commit")
        # the daemon's own breakdown of the drops (rollbacks) and of the commit, from its log
        rec["log"] = [line.split("] ", 1)[-1] for line in m.log_path.read_text(errors="replace").splitlines()
                      if ("dropped " in line and "journal" in line) or " committed: " in line]
        # journal transitions per second: k steps on an empty saga over one connection
        call("saga.begin", name=f"t{run}")
        with m.client() as c:
            t0 = time.perf_counter()
            for i in range(k):
                c.call("saga.step", name=f"t{i}")
            dt = time.perf_counter() - t0
        rec["transitions_per_s"] = k / dt
        call("saga.abort")
        rec["rss"] = proc_status(m.proc.pid).get("VmRSS")
        m.stop()

    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"  saga ops run {run}: {rec['error'][:300]}")
    finally:
        if m is not None and m.proc is not None:
            m.kill()
        if m is not None and os.path.ismount(m.mp):
            lazy_unmount(str(m.mp), fuse=True)
        if guard is not None:
            _live.pop(id(guard), None)
        shutil.rmtree(tmp, ignore_errors=True)
    return rec
