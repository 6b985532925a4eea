#!/usr/bin/env python3
"""overlayd benchmark: native directory vs kernel overlayfs vs fuse-overlayfs vs overlayd (one
step layer, and 10 stacked layers), then the saga operations. Run as root.

    .venv/bin/python bench/run.py [--quick] [--runs 5] [--out bench/results] [--work DIR]
        [--targets native,kernel-overlayfs,fuse-overlayfs,overlayd,overlayd-10]
        [--workloads stat_warm,read_cold,...] [--no-saga] [--no-soak] [--code worktree|HEAD|DIR]
        [--timeout SECONDS] [--large [DIR]] [--large-files N]

--large: a generated 100,000-file git repository (cached in DIR, default
/var/tmp/overlayd-bench-large): `git status` cold and warm and a warm `find`, native vs
fuse-overlayfs vs overlayd (interleaved), then each overlayd daemon's peak RSS (VmHWM) after
walking the tree twice (bench/large.py).

Writes OUT/results.json (raw timings), OUT/RESULTS.md (medians, ratios, the issue's targets)
and OUT/chart.png. See docs/PERFORMANCE.md for the method and bench/profile.py for profiling.
"""

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import tree  # noqa: E402
from targets import (FuseOverlayfs, KernelOverlay, Native, Overlayd, cleanup_all, proc_cpu,  # noqa: E402
                     proc_status)

ROOT = HERE.parent
WORK_PY = HERE / "work.py"

FULL = {"files": 7000, "bytes": 190 << 20, "seq_mib": 256, "create": 5000, "rename": 1000,
        "rmrf_files": 700, "saga_files": 10000, "transitions": 200, "timeout": 600, "runs": 5}
QUICK = {"files": 600, "bytes": 12 << 20, "seq_mib": 16, "create": 500, "rename": 100,
         "rmrf_files": 60, "saga_files": 1000, "transitions": 30, "timeout": 120, "runs": 1}


class Workload:
    def __init__(self, name, label, func, params=None, cold=False, warm=False):
        self.name, self.label, self.func = name, label, func
        self.params = dict(params or {})
        self.cold, self.warm = cold, warm

    def as_dict(self):
        return {"name": self.name, "label": self.label, "func": self.func, "cold": self.cold,
                "warm": self.warm, "params": {k: v for k, v in self.params.items() if k != "files"}}


def make_workloads(base: Path, sc: dict, archive: Path) -> list[Workload]:
    files = tree.files_of(base)
    first_lib = sorted((base / "lib").iterdir())[0].relative_to(base)
    # rm -rf: the directory whose file count is closest to sc["rmrf_files"]
    counts = {}
    for rel in files:
        parts = Path(rel).parts
        for i in range(3, len(parts)):
            counts[Path(*parts[:i])] = counts.get(Path(*parts[:i]), 0) + 1
    rmdir = min(counts, key=lambda d: (abs(counts[d] - sc["rmrf_files"]), str(d)))
    step = max(1, len(files) // sc["rename"])
    renames = files[::step][:sc["rename"]]
    compile_dir = str(first_lib)
    W = Workload
    return [
        W("stat_cold", "stat every file, cold", "stat", cold=True),
        W("stat_warm", "stat every file, warm", "stat", warm=True),
        W("read_cold", "read every file, cold", "read", cold=True),
        W("read_warm", "read every file, warm", "read", warm=True),
        W("git_status_cold", "`git status`, cold", "git_status", {"prewarm_tools": True}, cold=True),
        W("git_status_warm", "`git status`, warm", "git_status", warm=True),
        W("find_warm", "`find -type f`, warm", "find", warm=True),
        W("grep", "`grep -r` (warm)", "grep", {"needle": "overlayd-bench-needle"}, warm=True),
        W("compileall", f"`python -m compileall` ({compile_dir}, no tests)", "compileall",
          {"dir": compile_dir, "exclude": r"/(test|tests|idlelib|lib2to3|tkinter)/"}),
        W("tar_x", "`tar x` of the tree", "tar_x", {"archive": str(archive)}),
        W("create", f"create {sc['create']:,} x 4 KiB", "create", {"files": sc["create"], "size": 4096}),
        W("rm_rf", f"`rm -rf` of a base dir ({counts[rmdir]} files)", "rm_rf", {"dir": str(rmdir),
                                                                                "nfiles": counts[rmdir]}),
        W("rename", f"rename {len(renames):,} base files", "rename", {"files": renames}),
        W("seq_write", f"sequential write {sc['seq_mib']} MiB + fsync", "seq_write", {"mib": sc["seq_mib"]}),
        W("seq_read_cold", f"sequential read {sc['seq_mib']} MiB, cold", "seq_read", {}, cold=True),
    ]


def drop_caches() -> bool:
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_child(w: Workload, root: Path, timeout: float, on_ready=None) -> dict:
    """Run one workload in a child; *on_ready* is called after its warm-up, right before the
    timed part (the child waits for it)."""
    params = dict(w.params)
    params["warmup"] = w.warm
    params["handshake"] = True
    deadline = time.monotonic() + timeout
    p = subprocess.Popen([sys.executable, str(WORK_PY), w.func, str(root), json.dumps(params)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, cwd="/")
    try:
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(w.func, timeout)
            r, _, _ = select.select([p.stdout], [], [], left)
            if r:
                b = os.read(p.stdout.fileno(), 1)
                if not b:
                    break
                line += b
        if line.strip() == b"ready":
            if on_ready:
                on_ready()
            p.stdin.write(b"go\n")
            p.stdin.flush()
        out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {err.decode(errors='replace')[-1500:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def measure(target, w: Workload, run: int, timeout: float, log) -> dict:
    rec = {"run": run, "target": target.name, "workload": w.name, "t": None}
    try:
        root = target.mount()
        if w.cold:
            if not drop_caches():
                rec["note"] = "could not drop caches"
        else:
            subprocess.run(["sync"])
        pid = target.pid
        cpu0 = [None]

        def ready():
            cpu0[0] = proc_cpu(pid) if pid else None
            rec["load"] = os.getloadavg()[0]

        t0 = time.perf_counter()
        try:
            out = run_child(w, root, timeout, on_ready=ready)
        finally:
            rec["wall"] = time.perf_counter() - t0
            if pid:
                cpu1 = proc_cpu(pid)
                if cpu0[0] is not None and cpu1 is not None:
                    rec["daemon_cpu"] = cpu1 - cpu0[0]
                rec["rss"] = proc_status(pid).get("VmRSS")
        rec["t"] = out.pop("t")
        rec["extra"] = out
    except subprocess.TimeoutExpired:
        rec["error"] = f"timeout after {timeout:.0f} s"
    except KeyboardInterrupt:
        rec["error"] = "interrupted"  # unmount by force below: kill the daemon, lazy unmount
        raise
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        try:
            target.unmount(force=bool(rec.get("error")))
        except Exception as exc:  # noqa: BLE001
            rec["error"] = (rec.get("error") or "") + f" | unmount: {exc}"[:1000]
        try:
            target.restore(w)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = (rec.get("error") or "") + f" | restore: {exc}"[:1000]
    if rec.get("error"):
        log(f"  {target.name:17s} {w.name:16s} ERROR {rec['error'][:300]}")
    else:
        cpu = f" daemon cpu {rec['daemon_cpu']:.2f}s" if rec.get("daemon_cpu") is not None else ""
        log(f"  {target.name:17s} {w.name:16s} {rec['t']:9.3f}s{cpu}")
    return rec


def soak(target, workloads, timeout, log) -> dict:
    """Every workload in turn in ONE overlayd mount: the daemon's memory after all of them."""
    out = {"layers": target.layers, "steps": []}
    # rm -rf last: it removes a directory that other workloads use
    workloads = [w for w in workloads if w.func != "rm_rf"] + [w for w in workloads if w.func == "rm_rf"]
    try:
        root = target.mount()
        for w in workloads:
            if w.cold:
                drop_caches()
            try:
                r = run_child(w, root, timeout)
                t = r["t"]
            except subprocess.TimeoutExpired:
                t = None
            st = proc_status(target.pid)
            out["steps"].append({"workload": w.name, "t": t, **st})
            log(f"  soak {w.name:16s} {t if t is None else round(t, 3)}s VmRSS {st.get('VmRSS', 0) / 1e6:.0f} MB")
        st = proc_status(target.pid)
        out["rss_final"], out["hwm_final"] = st.get("VmRSS"), st.get("VmHWM")
    except KeyboardInterrupt:
        out["error"] = "interrupted"
        raise
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"  soak failed: {out['error'][:300]}")
    finally:
        target.unmount(force=bool(out.get("error")))
    return out


def snapshot_code(spec: str, work: Path) -> tuple[Path, str]:
    """The daemon's code: the work tree as it is, a snapshot of HEAD, or a directory."""
    desc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip()
    if spec == "worktree":
        return ROOT, f"work tree at {desc}"
    if spec == "HEAD":
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dst = work / f"code-{sha[:12]}"
        if not dst.exists():
            tmp = work / f"code-{sha[:12]}.tmp"
            subprocess.run(["rm", "-rf", str(tmp)])
            tmp.mkdir(parents=True)
            subprocess.run(f"git -C {ROOT} archive HEAD | tar x -C {tmp}", shell=True, check=True)
            tmp.rename(dst)
        return dst, f"HEAD {sha[:12]} (snapshot)"
    p = Path(spec).resolve()
    if p.name.startswith("code-") and p.parent == work.resolve():
        return p, f"HEAD {p.name[5:]} (snapshot in {p})"
    return p, f"directory {spec}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small tree, 1 run: a smoke test")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/overlayd-bench"))
    ap.add_argument("--targets", default="native,kernel-overlayfs,fuse-overlayfs,overlayd,overlayd-10")
    ap.add_argument("--workloads", help="comma-separated workload names (default: all)")
    ap.add_argument("--no-saga", action="store_true")
    ap.add_argument("--saga-only", action="store_true", help="only the saga operations")
    ap.add_argument("--no-soak", action="store_true")
    ap.add_argument("--code", default="worktree", help="daemon code: worktree (default), HEAD or a directory")
    ap.add_argument("--timeout", type=float, help="per-measurement time limit, seconds")
    ap.add_argument("--python", action="append", default=[], metavar="NAME=PYTHON",
                    help="another target: overlayd run by PYTHON (another venv: stock or patched pyfuse3)")
    ap.add_argument("--large", nargs="?", const=Path("/var/tmp/overlayd-bench-large"), type=Path,
                    metavar="DIR", help="the 100,000-file git repository (cached in DIR)")
    ap.add_argument("--large-files", type=int, default=100_000)
    a = ap.parse_args()
    if a.large is not None:
        return main_large(a)
    if os.geteuid() != 0:
        print("run as root (mounts, drop_caches)", file=sys.stderr)
        return 2
    sc = dict(QUICK if a.quick else FULL)
    runs = a.runs or sc["runs"]
    timeout = a.timeout or sc["timeout"]
    work = a.work / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    # Ctrl-C and SIGTERM both unwind through the finally blocks below
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.time()
    res = None
    try:
        manifest = tree.build(work / "base", sc["files"], sc["bytes"], sc["seq_mib"], log=log)
        base = work / "base"
        archive = work / "tree.tar"
        if not archive.exists() or archive.stat().st_mtime < (base / tree.MANIFEST).stat().st_mtime:
            subprocess.run(["tar", "cf", str(archive) + ".tmp", "-C", str(base), "lib"], check=True)
            os.replace(str(archive) + ".tmp", archive)
        code, code_desc = snapshot_code(a.code, a.work)
        workloads = make_workloads(base, sc, archive)
        if a.workloads:
            keep = set(a.workloads.split(","))
            workloads = [w for w in workloads if w.name in keep]
        if a.saga_only:
            workloads, a.targets, a.no_soak = [], "overlayd", True
        all_targets = {"native": lambda: Native(base, work),
                       "kernel-overlayfs": lambda: KernelOverlay(base, work),
                       "fuse-overlayfs": lambda: FuseOverlayfs(base, work),
                       "overlayd": lambda: Overlayd(base, work, 1, code=code),
                       "overlayd-10": lambda: Overlayd(base, work, 10, code=code)}
        for spec in a.python:  # e.g. overlayd-stock=.venv-stock/bin/python
            tname, _, python = spec.partition("=")
            all_targets[tname] = lambda tname=tname, python=python: Overlayd(base, work, 1, code=code,
                                                                             python=python, name=tname)
        targets, notes = [], []
        for name in a.targets.split(","):
            t = all_targets[name]()
            why = t.available()
            if why:
                notes.append(f"{name} skipped: {why}")
                log(f"{name} skipped: {why}")
                continue
            t.prepare()
            targets.append(t)
        res = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": a.quick, "runs": runs,
                        "machine": f"{platform.node()} {os.cpu_count()} CPUs, Linux {platform.release()}",
                        "code": code_desc, "python": sys.version.split()[0], "argv": sys.argv[1:]},
               "scale": {**sc, **{k: manifest[k] for k in ("files", "dirs", "bytes", "libraries")}},
               "targets": [t.name for t in targets], "workloads": [w.as_dict() for w in workloads],
               "fs": [], "saga": [], "notes": notes}
        log(f"{len(workloads)} workloads x {len(targets)} targets x {runs} run(s); work dir {work}")
        # interleaved: per run, per workload, every target in turn (rotated each run)
        for run in range(runs):
            order = targets[run % len(targets):] + targets[:run % len(targets)]
            log(f"run {run + 1}/{runs} ({time.time() - started:.0f} s elapsed)")
            for w in workloads:
                for t in order:
                    res["fs"].append(measure(t, w, run, timeout, log))
            if not a.no_saga:
                log("  saga operations")
                from sagabench import run_once

                rec = run_once(work, run, sc["saga_files"], sc["transitions"], code, log=log)
                import parallel_commit  # commits/s with 1, 4, 16 workspaces over one base

                try:
                    rec.update(parallel_commit.run_once(work, parallel_commit.QUICK if a.quick
                                                        else parallel_commit.FULL, code))
                except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
                    rec["error"] = f"parallel commits: {type(exc).__name__}: {exc}"[:2000]
                    log(f"  {rec['error'][:300]}")
                res["saga"].append(rec)
                if "error" not in rec:
                    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("run", "rss", "log")))
            report.write(res, a.out)  # partial results survive an interrupted run
        rss = [r["rss"] for r in res["fs"] if r.get("rss") and r["target"].startswith("overlayd")]
        res["max_rss"] = max(rss) if rss else None
        if not a.no_soak and any(t.name.startswith("overlayd") for t in targets):
            log("soak: every workload in one overlayd mount (daemon memory)")
            ref = next(t for t in reversed(targets) if t.name.startswith("overlayd"))
            res["soak"] = soak(ref, workloads, timeout, log)
        res["meta"]["elapsed_s"] = round(time.time() - started)
        report.write(res, a.out)
        log(f"done in {time.time() - started:.0f} s: {a.out / 'RESULTS.md'}")
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        if res is not None:
            res["notes"].append("interrupted")
            report.write(res, a.out)
        return 130
    finally:
        cleanup_all()


def main_large(a) -> int:
    """--large: three workloads on a 100,000-file git repository, then peak RSS."""
    import large

    if os.geteuid() != 0:
        print("run as root (mounts, drop_caches)", file=sys.stderr)
        return 2
    runs = a.runs or 3
    timeout = a.timeout or 900
    work = a.large
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    def log(msg):
        print(msg, flush=True)

    started = time.time()
    try:
        manifest = large.build(work / "base", a.large_files, log=log)
        base = work / "base"
        code, code_desc = snapshot_code(a.code, work)
        W = Workload
        workloads = [W("git_status_cold", "`git status`, cold", "git_status", {"prewarm_tools": True}, cold=True),
                     W("git_status_warm", "`git status`, warm", "git_status", warm=True),
                     W("find_warm", "`find -type f`, warm", "find", warm=True)]
        if a.workloads:
            workloads = [w for w in workloads if w.name in set(a.workloads.split(","))]
        all_targets = {"native": lambda: Native(base, work),
                       "fuse-overlayfs": lambda: FuseOverlayfs(base, work),
                       "overlayd": lambda: Overlayd(base, work, 1, code=code)}
        for spec in a.python:
            tname, _, python = spec.partition("=")
            all_targets[tname] = lambda tname=tname, python=python: Overlayd(base, work, 1, code=code,
                                                                             python=python, name=tname)
        names = a.targets if a.targets != ap_default_targets() else "native,fuse-overlayfs,overlayd"
        targets = []
        for name in names.split(","):
            t = all_targets[name]()
            why = t.available()
            if why:
                log(f"{name} skipped: {why}")
                continue
            t.prepare()
            targets.append(t)
        fs = []
        for run in range(runs):
            order = targets[run % len(targets):] + targets[:run % len(targets)]
            log(f"run {run + 1}/{runs} ({time.time() - started:.0f} s elapsed)")
            for w in workloads:
                for t in order:
                    fs.append(measure(t, w, run, timeout, log))
        walk = Workload("stat_warm", "stat every file", "stat", warm=True)
        rss = []
        for t in targets:
            if t.name.startswith("overlayd"):
                rec = large.peak_rss(t, run_child, walk, timeout, drop_caches=drop_caches)
                log(f"  {t.name}: peak RSS after two walks {rec.get('VmHWM', 0) / 1e6:.0f} MB"
                    f" (now {rec.get('VmRSS', 0) / 1e6:.0f} MB, after the kernel forgot"
                    f" {(rec.get('rss_after_forget') or 0) / 1e6:.0f} MB) {rec.get('error', '')}")
                rss.append(rec)
        res = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": runs, "code": code_desc,
                        "machine": f"{platform.node()} {os.cpu_count()} CPUs, Linux {platform.release()}",
                        "argv": sys.argv[1:], "elapsed_s": round(time.time() - started)},
               "scale": manifest, "fs": fs, "peak_rss": rss}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "large.json").write_text(json.dumps(res, indent=1))
        log("medians (s) and ratios to fuse-overlayfs:")
        for w in workloads:
            med = {}
            for t in targets:
                ts = sorted(r["t"] for r in fs if r["workload"] == w.name and r["target"] == t.name
                            and r.get("t") is not None)
                if ts:
                    med[t.name] = ts[len(ts) // 2]
            ref = med.get("fuse-overlayfs")
            log(f"  {w.name:16s} " + "  ".join(
                f"{k} {v:.3f}" + (f" ({v / ref:.2f}x)" if ref else "") for k, v in med.items()))
        log(f"done in {time.time() - started:.0f} s: {a.out / 'large.json'}")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        cleanup_all()


def ap_default_targets() -> str:
    return "native,kernel-overlayfs,fuse-overlayfs,overlayd,overlayd-10"


if __name__ == "__main__":
    sys.exit(main())
