"""The `--large` tree of bench/run.py: a generated 100,000-file git repository (issue 19), built
once and cached (its manifest says how it was built), and the daemon's peak RSS after walking it.

Files are small text files of varied sizes (0 to 6 KiB) under lib/pkgNNN/modNN/, 100 per
directory, committed; `git status` once after the commit so that the index has final stat data.
"""

import json
import subprocess
import time
from pathlib import Path

import tree

PER_DIR = 100
DIRS_PER_PKG = 20


def build(base: Path, files: int, log=print) -> dict:
    want = {"version": 1, "large": True, "max_files": files}
    have = tree.reuse(base, want)
    if have is not None:
        return have
    log(f"building the large tree at {base} ({files:,} files)")
    nbytes = 0
    ndirs = 1
    for i in range(files):
        d, f = divmod(i, PER_DIR)
        pkg, mod = divmod(d, DIRS_PER_PKG)
        sub = base / "lib" / f"pkg{pkg:03}" / f"mod{mod:02}"
        if f == 0:
            sub.mkdir(parents=True, exist_ok=True)
            ndirs += 1 + (mod == 0)
        size = (i * 7919) % 6144
        line = f"# file {i} of the overlayd large benchmark tree\n".encode()
        data = (line * (size // len(line) + 1))[:size]
        (sub / f"source_file_{f:03}.py").write_bytes(data)
        nbytes += size
    tree._git(base, "init", "-q")
    (base / ".git" / "info").mkdir(exist_ok=True)
    with open(base / ".git" / "info" / "exclude", "a") as fh:
        fh.write("/.bench/\n/" + tree.MANIFEST + "\n")
    tree._git(base, "add", "-A")
    tree._git(base, "commit", "-q", "-m", "base")
    tree._git(base, "gc", "-q", "--prune=now")
    subprocess.run(["git", "status", "--porcelain"], cwd=base, check=True, stdout=subprocess.DEVNULL)
    (base / ".bench").mkdir(exist_ok=True)
    manifest = {**want, "files": files, "bytes": nbytes, "dirs": ndirs, "libraries": []}
    (base / tree.MANIFEST).write_text(json.dumps(manifest, indent=1))
    subprocess.run(["sync"])
    log(f"large tree: {files:,} files, {ndirs} directories, {nbytes / 1e6:.0f} MB")
    return manifest


def peak_rss(target, run_child, workload, timeout: float, walks: int = 2, drop_caches=None) -> dict:
    """Mount *target*, walk the tree *walks* times (stat every file), and read the daemon's
    VmHWM (peak RSS) and VmRSS before unmounting; then, with *drop_caches*, make the kernel
    forget (FORGET of every node it drops) and read VmRSS again (``rss_after_forget``)."""
    out = {"target": target.name}
    try:
        root = target.mount()
        for _ in range(walks):
            run_child(workload, root, timeout)
        out.update(tree_proc_status(target.pid))
        if drop_caches is not None:
            drop_caches()
            time.sleep(3)
            out["rss_after_forget"] = tree_proc_status(target.pid).get("VmRSS")
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark goes on
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        target.unmount(force=bool(out.get("error")))
    return out


def tree_proc_status(pid):
    from targets import proc_status
    return proc_status(pid) if pid else {}



