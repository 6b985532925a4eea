"""results.json -> RESULTS.md (medians, ratios, the issue's targets) and a PNG chart.

    python bench/report.py [bench/results/results.json]

Ratios are medians of per-run ratios: each run measures every target back to back, so a ratio
is taken between two figures of the same run (the machine is shared; load drifts between runs)
and the median of those is reported. Medians of the raw seconds are shown as well.
"""

import json
import statistics
import sys
from pathlib import Path

REF = "native"
PEER = "fuse-overlayfs"


def _series(res, target, workload):
    return {r["run"]: r["t"] for r in res["fs"] if r["target"] == target and r["workload"] == workload
            and r.get("t") is not None}


def median_of(res, target, workload):
    s = _series(res, target, workload)
    return statistics.median(s.values()) if s else None


def ratio(res, target, ref, workload):
    """Median over runs of t(target) / t(ref), both from the same run."""
    a, b = _series(res, target, workload), _series(res, ref, workload)
    rs = [a[k] / b[k] for k in a if k in b and b[k] > 0]
    return statistics.median(rs) if rs else None


def _fmt(x, unit=""):
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}{unit}"
    if x >= 10:
        return f"{x:.1f}{unit}"
    if x >= 1:
        return f"{x:.2f}{unit}"
    return f"{x:.3f}{unit}"


def _fmt_r(x):
    return "–" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def saga_summary(res) -> dict:
    rows = res.get("saga") or []
    out = {}
    keys = sorted({k for r in rows for k in r if k not in ("run", "rss", "error", "log")})
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    rb1 = [r["rollback_1"] for r in rows if r.get("rollback_1")]
    rbn = [r["rollback_n"] for r in rows if r.get("rollback_n")]
    if rb1 and rbn:
        out["rollback_ratio"] = statistics.median([b / a for a, b in zip(rb1, rbn)])
    cm = [(r["commit_n"], r["cp_n"]) for r in rows if r.get("commit_n") and r.get("cp_n")]
    if cm:
        out["commit_ratio"] = statistics.median([a / b for a, b in cm])
    cm = [(r["commit_n_into"], r["cp_n"]) for r in rows if r.get("commit_n_into") and r.get("cp_n")]
    if cm:
        out["commit_into_ratio"] = statistics.median([a / b for a, b in cm])
    return out


def targets_check(res) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, limit, met) per issue target."""
    out = []
    wl = [w["name"] for w in res["workloads"]]
    names = {w["name"]: w for w in res["workloads"]}
    tnames = [t for t in res["targets"]]
    for od in [t for t in tnames if t.startswith("overlayd")]:
        for w in wl:
            r = ratio(res, od, PEER, w)
            if names[w]["func"] in ("seq_read", "seq_write"):
                limit = 1.0
                label = f"{od}: {w} throughput >= fuse-overlayfs (time ratio <= 1.0)"
            elif w in ("stat_warm", "read_warm", "git_status_warm"):
                limit, label = 1.2, f"{od}: {w} <= 1.2x fuse-overlayfs"
            elif names[w]["func"] == "rename":
                limit, label = 1.0, f"{od}: {w} <= 1.0x fuse-overlayfs"
            else:
                limit, label = 1.5, f"{od}: {w} <= 1.5x fuse-overlayfs"
            out.append((label, _fmt_r(r), f"{limit}", None if r is None else r <= limit))
    if "overlayd" in tnames and "overlayd-10" in tnames:
        for w in wl:
            r = ratio(res, "overlayd-10", "overlayd", w)
            out.append((f"10 layers / 1 layer: {w} <= 1.3x", _fmt_r(r), "1.3", None if r is None else r <= 1.3))
    s = saga_summary(res)
    n = res.get("scale", {}).get("saga_files", 10000)
    if "step_begin" in s:
        out.append(("begin a step < 20 ms", _fmt(s["step_begin"] * 1000, " ms"), "20 ms", s["step_begin"] < 0.020))
    if "rollback_n" in s:
        out.append((f"roll back a step with {n} files < 50 ms", _fmt(s["rollback_n"] * 1000, " ms"), "50 ms",
                    s["rollback_n"] < 0.050))
    if "rollback_ratio" in s:
        out.append((f"roll back {n} files within 2x of 1 file", _fmt_r(s["rollback_ratio"]), "2.0",
                    s["rollback_ratio"] <= 2.0))
    if "commit_ratio" in s:
        out.append((f"commit {n} files <= 1.5x cp -a + sync", _fmt_r(s["commit_ratio"]), "1.5",
                    s["commit_ratio"] <= 1.5))
    if "commit_into_ratio" in s:
        out.append((f"commit {n} files into existing directories <= 1.5x cp -a + sync",
                    _fmt_r(s["commit_into_ratio"]), "1.5", s["commit_into_ratio"] <= 1.5))
    rss = (res.get("soak") or {}).get("rss_final")
    if rss:
        out.append(("daemon RSS after the whole benchmark < 200 MB", f"{rss / 1e6:.0f} MB", "200 MB", rss < 200e6))
    return out


def markdown(res) -> str:
    targets = res["targets"]
    L = []
    m = res["meta"]
    sc = res["scale"]
    L.append(f"# Benchmark results ({'quick' if m.get('quick') else 'full'} run)\n")
    L.append(f"- date: {m.get('date')}; machine: {m.get('machine')}; code: {m.get('code')}")
    L.append(f"- base tree: {sc.get('files')} files, {sc.get('dirs')} directories, "
             f"{sc.get('bytes', 0) / 1e6:.0f} MB ({', '.join(sc.get('libraries', []))}), a git repository")
    L.append(f"- runs: {m.get('runs')} interleaved (every target in turn, per workload, per run); "
             "figures are medians; ratios are medians of same-run ratios")
    L.append("- cold = fresh mount + `sync; echo 3 > /proc/sys/vm/drop_caches`; warm = fresh mount, "
             "the workload once untimed, then timed; every measurement on a fresh mount / upper / layer\n")
    L.append("## Median seconds\n")
    L.append("| workload | " + " | ".join(targets) + " |")
    L.append("|---|" + "---:|" * len(targets))
    for w in res["workloads"]:
        cells = [_fmt(median_of(res, t, w["name"])) for t in targets]
        L.append(f"| {w['label']} | " + " | ".join(cells) + " |")
    for ref, title in ((REF, "Ratio to native"), (PEER, "Ratio to fuse-overlayfs")):
        if ref not in targets:
            continue
        others = [t for t in targets if t not in (ref, REF)]
        L.append(f"\n## {title}\n")
        L.append("| workload | " + " | ".join(others) + " |")
        L.append("|---|" + "---:|" * len(others))
        for w in res["workloads"]:
            cells = [_fmt_r(ratio(res, t, ref, w["name"])) for t in others]
            L.append(f"| {w['label']} | " + " | ".join(cells) + " |")
    if "overlayd" in targets and "overlayd-10" in targets:
        L.append("\n## 10 layers / 1 layer\n")
        L.append("| workload | ratio |")
        L.append("|---|---:|")
        for w in res["workloads"]:
            L.append(f"| {w['label']} | {_fmt_r(ratio(res, 'overlayd-10', 'overlayd', w['name']))} |")
    cpu_rows = [(w, t) for w in res["workloads"] for t in targets if t.startswith(("overlayd", "fuse"))]
    if cpu_rows:
        L.append("\n## File-system daemon CPU seconds during the workload (median)\n")
        fuse_t = [t for t in targets if t.startswith(("overlayd", "fuse"))]
        L.append("| workload | " + " | ".join(fuse_t) + " |")
        L.append("|---|" + "---:|" * len(fuse_t))
        for w in res["workloads"]:
            cells = []
            for t in fuse_t:
                v = [r["daemon_cpu"] for r in res["fs"] if r["target"] == t and r["workload"] == w["name"]
                     and r.get("daemon_cpu") is not None]
                cells.append(_fmt(statistics.median(v)) if v else "–")
            L.append(f"| {w['label']} | " + " | ".join(cells) + " |")
    s = saga_summary(res)
    if s:
        n = sc.get("saga_files")
        L.append("\n## Saga operations (overlayd, medians)\n")
        L.append("| operation | median |")
        L.append("|---|---:|")
        lab = [("saga_begin", "saga.begin", 1000, " ms"), ("step_begin", "begin a step (saga.step)", 1000, " ms"),
               ("rollback_1", "roll back a step with 1 changed file", 1000, " ms"),
               ("rollback_n", f"roll back a step with {n} changed files", 1000, " ms"),
               ("rollback_ratio", f"ratio rollback {n} / 1", None, ""),
               ("rollback_1_after_n", f"roll back a 1-file step that follows a {n}-file step", 1000, " ms"),
               ("commit_n", f"commit {n} new files (in new directories, moved whole)", 1000, " ms"),
               ("cp_n", "`cp -a` of the same files + `sync`", 1000, " ms"),
               ("commit_ratio", "ratio commit / cp -a + sync", None, ""),
               ("commit_n_into", f"commit {n} new files into existing directories (entry by entry)", 1000, " ms"),
               ("commit_into_ratio", "ratio commit into existing / cp -a + sync", None, ""),
               ("create_n", f"(creating the {n} files through the mount)", 1000, " ms"),
               ("transitions_per_s", "journal transitions per second (saga.step on an empty saga)", None, "/s"),
               ("commit_tput_1", "commit throughput, 1 workspace (commits/s)", None, "/s"),
               ("commit_tput_4", "commit throughput, 4 workspaces over one base, committing at once", None, "/s"),
               ("commit_tput_16", "commit throughput, 16 workspaces over one base, committing at once", None, "/s")]
        for k, label, mul, unit in lab:
            if k in s:
                v = s[k] * mul if mul else s[k]
                L.append(f"| {label} | {_fmt(v, unit)} |")
    soak = res.get("soak") or {}
    if soak.get("rss_final"):
        L.append(f"\nDaemon memory: VmRSS {soak['rss_final'] / 1e6:.0f} MB after every workload in one "
                 f"overlayd mount with {soak.get('layers')} layers (VmHWM {soak.get('hwm_final', 0) / 1e6:.0f} MB); "
                 f"largest VmRSS seen in any per-workload daemon: {res.get('max_rss', 0) / 1e6:.0f} MB.")
    chk = targets_check(res)
    if chk:
        L.append("\n## The issue's targets\n")
        L.append("| target | measured | limit | met |")
        L.append("|---|---:|---:|:---:|")
        for label, val, lim, met in chk:
            L.append(f"| {label} | {val} | {lim} | {'–' if met is None else 'yes' if met else '**no**'} |")
    errs = [r for r in res["fs"] if r.get("error")]
    if errs:
        L.append("\n## Errors and timeouts\n")
        for r in errs:
            L.append(f"- run {r['run']} {r['target']} {r['workload']}: {r['error'][:300]}")
    notes = res.get("notes") or []
    if notes:
        L.append("\n## Notes\n")
        L.extend(f"- {n}" for n in notes)
    return "\n".join(L) + "\n"


def chart(res, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        svg = path.with_suffix(".svg")
        svg.write_text(chart_svg(res))
        return f"matplotlib not installed (pip install matplotlib): chart written by hand as {svg.name}"
    targets = [t for t in res["targets"] if t != REF]
    wls = res["workloads"]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(wls) * max(1, len(targets)) / 2 + 2))
    h = 0.8 / max(1, len(targets))
    colors = {"kernel-overlayfs": "#4c72b0", "fuse-overlayfs": "#55a868", "overlayd": "#c44e52",
              "overlayd-10": "#dd8452"}
    for i, t in enumerate(targets):
        ys, xs = [], []
        for j, w in enumerate(wls):
            r = ratio(res, t, REF, w["name"])
            if r is not None:
                ys.append(j + i * h - 0.4 + h / 2)
                xs.append(r)
        ax.barh(ys, xs, height=h, label=t, color=colors.get(t))
    ax.set_yticks(range(len(wls)))
    ax.set_yticklabels([w["label"].replace("`", "") for w in wls])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("time relative to the native directory (log scale; lower is better)")
    ax.set_title(f"overlayd benchmark: medians of {res['meta'].get('runs')} interleaved run(s)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def chart_svg(res) -> str:
    """The same chart without matplotlib: horizontal bars, log scale, hand-written SVG."""
    import math

    targets = [t for t in res["targets"] if t != REF]
    wls = res["workloads"]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2"]
    bar, gap, left, width = 9, 8, 330, 560
    lo, hi = -1.0, 3.0  # log10 of the ratio: 0.1x .. 1000x
    rows = []
    y = 40
    for w in wls:
        rows.append(f'<text x="{left - 8}" y="{y + bar * len(targets) / 2 + 4}" text-anchor="end" '
                    f'font-size="12">{w["label"].replace("`", "").replace("&", "&amp;").replace("<", "&lt;")}</text>')
        for i, t in enumerate(targets):
            r = ratio(res, t, REF, w["name"])
            if r:
                x1 = left + (min(max(math.log10(r), lo), hi) - lo) / (hi - lo) * width
                x0 = left + (0 - lo) / (hi - lo) * width
                rows.append(f'<rect x="{min(x0, x1):.1f}" y="{y + i * bar}" width="{abs(x1 - x0):.1f}" '
                            f'height="{bar - 1}" fill="{colors[i % len(colors)]}"><title>{t}: {r:.2f}x</title></rect>')
        y += bar * len(targets) + gap
    axis = []
    for e in range(int(lo), int(hi) + 1):
        x = left + (e - lo) / (hi - lo) * width
        axis.append(f'<line x1="{x:.1f}" y1="30" x2="{x:.1f}" y2="{y}" stroke="#bbb" stroke-width="{2 if e == 0 else 1}"/>'
                    f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle" font-size="11">{10 ** e:g}x</text>')
    legend = [f'<rect x="{left + i * 130}" y="{y + 24}" width="10" height="10" fill="{colors[i % len(colors)]}"/>'
              f'<text x="{left + i * 130 + 14}" y="{y + 33}" font-size="11">{t}</text>' for i, t in enumerate(targets)]
    h = y + 50
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{h}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="10" y="18" font-size="14">time relative to the native directory (log scale; lower is better)</text>'
            + "".join(axis) + "".join(rows) + "".join(legend) + "</svg>\n")


def write(res, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    note = chart(res, out / "chart.png")
    if note:
        res.setdefault("notes", []).append(note)
    (out / "RESULTS.md").write_text(markdown(res))


def main():
    p = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    res = json.loads(p.read_text())
    write(res, p.parent)
    print((p.parent / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
