#!/usr/bin/env python3
"""Where overlayd's time goes, per workload: FUSE request counts and the time spent in each
handler (bench/counting_daemon.py wraps the handlers; the daemon itself is not changed), a
py-spy profile of the daemon during the timed part, and for comparison the requests that
fuse-overlayfs receives for the same workload (its libfuse debug log, ``-d``).

    .venv/bin/python bench/profile.py [--quick] [--workloads stat_warm,git_status_warm,...]
        [--out bench/results/profile] [--code worktree|HEAD|DIR] [--no-pyspy] [--native]

Writes OUT/PROFILE.md, OUT/profile.json and OUT/<workload>.collapsed.gz (py-spy stacks).
The wrappers and py-spy slow the daemon down: these runs are for counting, not for timing.
"""

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
import tree  # noqa: E402
from targets import FuseOverlayfs, Overlayd, cleanup_all, proc_cpu  # noqa: E402

DEFAULT = "stat_cold,stat_warm,read_warm,git_status_cold,git_status_warm,grep,tar_x,create,rename,rm_rf,compileall"


def pyspy_bin():
    p = Path(sys.executable).parent / "py-spy"
    return str(p) if p.exists() else shutil.which("py-spy")


class CountingOverlayd(Overlayd):
    def __init__(self, base, work, code, counts_path):
        super().__init__(base, work, 1, code=code, entry=HERE / "counting_daemon.py",
                         env_extra={"OVERLAYD_BENCH_COUNTS": str(counts_path)})
        self.counts_path = Path(counts_path)

    def mount(self):
        self.counts_path.unlink(missing_ok=True)  # sequence numbers restart with each daemon
        return super().mount()

    def dump(self, timeout=10.0) -> dict:
        before = self._seq()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._seq() > before:
                return json.loads(self.counts_path.read_text())
            time.sleep(0.01)
        raise RuntimeError("the counting daemon did not dump its counts")

    def _seq(self):
        try:
            return json.loads(self.counts_path.read_text())["seq"]
        except (OSError, ValueError):
            return 0


class DebugFuseOverlayfs(FuseOverlayfs):
    """fuse-overlayfs -d: libfuse logs every request ("opcode: LOOKUP")."""

    def mount(self):
        t = self._new_tmp()
        for d in ("upper", "work", "mnt"):
            (t / d).mkdir()
        from targets import _live

        _live[id(self)] = self
        self.logf = t / "debug.log"
        self.proc = subprocess.Popen(
            ["fuse-overlayfs", "-d", "-o", f"lowerdir={self.base},upperdir={t / 'upper'},workdir={t / 'work'}",
             str(t / "mnt")], stdout=subprocess.DEVNULL, stderr=open(self.logf, "wb"), start_new_session=True)
        deadline = time.monotonic() + 15
        while not os.path.ismount(t / "mnt"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fuse-overlayfs -d did not mount")
            time.sleep(0.01)
        self.root = t / "mnt"
        return self.root

    def log_size(self):
        return self.logf.stat().st_size

    def opcodes(self, start: int) -> dict:
        with open(self.logf, "rb") as f:
            f.seek(start)
            data = f.read().decode(errors="replace")
        return dict(collections.Counter(m.lower() for m in re.findall(r"opcode: (\w+)", data)))


IDLE_LEAVES = ("EpollIOManager.get_events", "Condition.wait", "WorkerThread._work", "Event.wait",
               "select (", "poll (", "epoll_wait", "Lock.acquire")


def summarize_stacks(text: str, top: int = 25) -> dict:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output;
    samples of threads waiting (event loop idle, trio's idle worker threads) are counted apart."""
    self_c, incl_c = collections.Counter(), collections.Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [re.sub(r"\s+\(.*?/(site-packages/|overlayd/|journal/|lib/python3\.\d+/)", r" (\1", f)
                  for f in stack.split(";")]
        py = [f for f in frames if ".py:" in f] or frames
        if any(x in py[-1] for x in IDLE_LEAVES):
            idle += n
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    skip = ("main (", "run (overlayd/daemon.py", "<module>", "Daemon.main", "_run_code", "_run_module")
    project = [(f, n) for f, n in incl_c.most_common()
               if ("(overlayd/" in f or "(journal/" in f) and not f.startswith(skip)][:top]
    return {"samples": total, "idle_samples": idle, "self": self_c.most_common(top),
            "inclusive": project}


def profile_one(w, base, work, code, out: Path, use_pyspy: bool, native: bool, timeout: float, log) -> dict:
    rec = {"workload": w.name, "label": w.label}
    counts_path = out / f".counts-{os.getpid()}.json"
    t = CountingOverlayd(base, work, code, counts_path)
    t.prepare()
    spy = None
    try:
        root = t.mount()
        if w.cold:
            bench.drop_caches()
        state = {}

        def ready():
            t.dump()  # discard what the mount and the warm-up did
            state["cpu0"] = proc_cpu(t.pid)
            nonlocal spy
            if use_pyspy and pyspy_bin():
                args = [pyspy_bin(), "record", "-p", str(t.pid), "-r", "200", "--format", "raw", "-o",
                        str(out / f"{w.name}.collapsed")]
                if native:
                    args.append("--native")
                spy = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       start_new_session=True)
                time.sleep(1.0)  # let py-spy attach
        r = bench.run_child(w, root, timeout, on_ready=ready)
        rec["t_instrumented"] = r["t"]
        rec["daemon_cpu"] = proc_cpu(t.pid) - state["cpu0"]
        c = t.dump()
        rec["requests"] = c["counts"]
        rec["handler_seconds"] = {k: round(v, 4) for k, v in c["handler_seconds"].items()}
        rec["readdir_entries"] = c["readdir_entries"]
        rec["rss"] = bench.proc_status(t.pid).get("VmRSS")
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=60)
                if spy.returncode not in (0, None) and err:
                    rec["pyspy_error"] = err.decode(errors="replace")[-500:]
            except subprocess.TimeoutExpired:
                spy.kill()
        t.unmount()
        counts_path.unlink(missing_ok=True)
    col = out / f"{w.name}.collapsed"
    if col.exists():
        text = col.read_text(errors="replace")
        rec["pyspy"] = summarize_stacks(text)
        with gzip.open(str(col) + ".gz", "wt") as f:
            f.write(text)
        col.unlink()
    # the same workload on fuse-overlayfs -d: its request counts
    f = DebugFuseOverlayfs(base, work)
    if f.available() is None:
        try:
            root = f.mount()
            if w.cold:
                bench.drop_caches()
            mark = {}
            r = bench.run_child(w, root, timeout, on_ready=lambda: mark.setdefault("pos", f.log_size()))
            time.sleep(0.2)
            rec["fuse_overlayfs_requests"] = f.opcodes(mark.get("pos", 0))
        except Exception as exc:  # noqa: BLE001
            rec["fuse_overlayfs_error"] = str(exc)[:500]
        finally:
            f.unmount()
    n = sum(rec.get("requests", {}).values())
    log(f"  {w.name:16s} overlayd {n} requests, handlers {sum(rec.get('handler_seconds', {}).values()):.2f}s, "
        f"daemon cpu {rec.get('daemon_cpu', 0):.2f}s; fuse-overlayfs "
        f"{sum(rec.get('fuse_overlayfs_requests', {}).values())} requests")
    return rec


def profile_saga(work: Path, code: Path, n: int, k: int, reps: int, out: Path, log) -> list[dict]:
    """py-spy on the daemon during saga.rollback / saga.commit of a step with *n* new files and
    during *k* saga.step on an empty saga (the stacks of *reps* repetitions are merged)."""
    import tempfile

    from saga_ops import make_files
    from targets import BenchMount, lazy_unmount

    tmp = Path(tempfile.mkdtemp(prefix="saga-prof-", dir=work))
    base = tmp / "base"
    base.mkdir()
    (base / "seed").write_text("x")
    (tmp / "m").mkdir()
    m = BenchMount(base, tmp / "m", name="sagaprof", code=code)
    recs = []
    try:
        m.start()
        for op in ("rollback", "commit", "steps"):
            texts, times = [], []
            for rep in range(reps):
                m.call("saga.begin", name=f"{op}{rep}")
                if op != "steps":
                    m.call("saga.step", name="s")
                    (m.mp / f"{op}{rep}").mkdir()
                    make_files(m.mp / f"{op}{rep}", n)
                    subprocess.run(["sync"])
                colp = out / f"saga-{op}-{rep}.collapsed"
                spy = None
                if pyspy_bin():
                    spy = subprocess.Popen([pyspy_bin(), "record", "-p", str(m.proc.pid), "-r", "1000",
                                            "--format", "raw", "-o", str(colp)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
                    time.sleep(1.0)
                t0 = time.perf_counter()
                if op == "rollback":
                    m.call("saga.rollback")
                elif op == "commit":
                    m.call("saga.commit")
                else:
                    with m.client() as c:
                        for i in range(k):
                            c.call("saga.step", name=f"t{i}")
                times.append(time.perf_counter() - t0)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                    if colp.exists():
                        texts.append(colp.read_text(errors="replace"))
                        colp.unlink()
                if op != "commit":
                    m.call("saga.abort")
            label = {"rollback": f"saga.rollback of a step with {n} new files",
                     "commit": f"saga.commit of {n} new files",
                     "steps": f"{k} x saga.step on an empty saga"}[op]
            rec = {"workload": f"saga_{op}", "label": label, "seconds": times,
                   "pyspy": summarize_stacks("\n".join(texts))}
            if texts:
                with gzip.open(out / f"saga_{op}.collapsed.gz", "wt") as f:
                    f.write("\n".join(texts))
            log(f"  {label}: {', '.join(f'{t * 1000:.0f} ms' for t in times)}")
            recs.append(rec)
        m.stop()
    finally:
        if m.proc is not None:
            m.kill()
        if os.path.ismount(m.mp):
            lazy_unmount(str(m.mp), fuse=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return recs


def markdown(recs, meta) -> str:
    L = ["# Where overlayd's time goes\n",
         f"- {meta['date']}; code: {meta['code']}; tree: {meta['files']} files. overlayd with one step layer, "
         "handlers wrapped for counting (bench/counting_daemon.py)"
         f"{' and py-spy attached at 200 Hz' if meta.get('pyspy', True) else ''}; "
         f"pyfuse3: {meta.get('pyfuse3', '?')}; "
         "fuse-overlayfs with `-d` for its request counts. Instrumented: slower than the timed runs.\n"]
    L.append("## Requests per workload (timed part only)\n")
    L.append("| workload | overlayd requests | fuse-overlayfs requests | overlayd handler s | daemon CPU s | "
             "µs per request (handler) | readdirplus entries |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in [r for r in recs if "requests" in r]:
        n = sum(r.get("requests", {}).values())
        h = sum(r.get("handler_seconds", {}).values())
        nf = sum(r.get("fuse_overlayfs_requests", {}).values())
        L.append(f"| {r['label']} | {n} | {nf} | {h:.2f} | {r.get('daemon_cpu', 0):.2f} | "
                 f"{(h / n * 1e6) if n else 0:.0f} | {r.get('readdir_entries', 0)} |")
    L.append("\n## Requests by type\n")
    for r in [r for r in recs if "requests" in r]:
        ops = sorted(set(r.get("requests", {})) | set(r.get("fuse_overlayfs_requests", {})),
                     key=lambda k: -r.get("requests", {}).get(k, 0))
        L.append(f"**{r['label']}**: " + ", ".join(
            f"{k} {r.get('requests', {}).get(k, 0)}/{r.get('fuse_overlayfs_requests', {}).get(k, 0)}"
            f" ({r.get('handler_seconds', {}).get(k, 0):.2f}s)" for k in ops) + "  ")
    L.append("\n(overlayd count / fuse-overlayfs count (overlayd handler seconds); fuse-overlayfs names are "
             "libfuse opcodes: `readdirplus` there is overlayd's `readdir`, `forget`/`batch_forget` likewise)\n")
    L.append("## py-spy: top functions by self time (samples)\n")
    for r in recs:
        p = r.get("pyspy")
        if not p or not p["samples"]:
            continue
        secs = f"; op took {', '.join(f'{t * 1000:.0f} ms' for t in r['seconds'])}" if r.get("seconds") else ""
        L.append(f"### {r['label']} ({p['samples']} busy samples, {p.get('idle_samples', 0)} idle{secs})\n")
        L.append("| self samples | % | function |")
        L.append("|---:|---:|---|")
        for fn, n in p["self"][:12]:
            L.append(f"| {n} | {100 * n / p['samples']:.0f} | `{fn}` |")
        L.append("")
        L.append("| inclusive samples | % | function (overlayd and journal code only) |")
        L.append("|---:|---:|---|")
        for fn, n in p["inclusive"][:14]:
            L.append(f"| {n} | {100 * n / p['samples']:.0f} | `{fn}` |")
        L.append("")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workloads", default=DEFAULT)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "profile")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/overlayd-bench"))
    ap.add_argument("--code", default="worktree")
    ap.add_argument("--no-pyspy", action="store_true")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--no-saga", action="store_true")
    a = ap.parse_args()
    a.out = a.out.resolve()  # the daemon runs in /
    sc = dict(bench.QUICK if a.quick else bench.FULL)
    work = a.work / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        manifest = tree.build(work / "base", sc["files"], sc["bytes"], sc["seq_mib"], log=print)
        base = work / "base"
        archive = work / "tree.tar"
        if not archive.exists():
            subprocess.run(["tar", "cf", str(archive), "-C", str(base), "lib"], check=True)
        code, code_desc = bench.snapshot_code(a.code, a.work)
        keep = a.workloads.split(",")
        wl = {w.name: w for w in bench.make_workloads(base, sc, archive)}
        recs = []
        for name in keep:
            w = wl[name]
            recs.append(profile_one(w, base, work, code, a.out, not a.no_pyspy, a.native, sc["timeout"], print))
        if not a.no_saga:
            recs += profile_saga(work, code, sc["saga_files"], sc["transitions"], 3, a.out, print)
        from overlayd.fusecaps import describe
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code": code_desc, "files": manifest["files"],
                "pyspy": not a.no_pyspy, "pyfuse3": describe()}
        (a.out / "profile.json").write_text(json.dumps({"meta": meta, "workloads": recs}, indent=1))
        (a.out / "PROFILE.md").write_text(markdown(recs, meta))
        print(f"wrote {a.out / 'PROFILE.md'}")
        return 0
    except KeyboardInterrupt:
        print("interrupted: cleaning up")
        return 130
    finally:
        cleanup_all()


if __name__ == "__main__":
    sys.exit(main())
