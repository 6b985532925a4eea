"""The benchmark's base tree: Python standard libraries found on this machine, committed as a
git repository, plus one 256 MiB file for the sequential read (ignored by git).

Layout of the base::

    lib/python3.11/...      first library (the compileall workload compiles this one)
    lib/python3.10/...      further libraries until the file or byte budget is reached
    .bench/seq.bin          the sequential-read file (listed in .git/info/exclude)
    .git/                   packed (git gc) so that it holds few files

The tree is built once and reused while its manifest (parameters) is unchanged.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = ".bench-manifest.json"
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
MAX_FILE = 4 << 20  # skip libpython*.a and the like: the tree is meant to look like source


def library_dirs() -> list[Path]:
    """Standard libraries on this machine, the running interpreter's version first."""
    found = []
    for pattern in ("/root/.pyenv/versions/*/lib/python3.*/", "/usr/lib/python3.*/",
                    "/usr/local/lib/python3.*/", f"{sys.base_prefix}/lib/python3.*/"):
        for d in glob.glob(pattern):
            p = Path(d).resolve()
            if p.is_dir() and (p / "os.py").exists() and p not in found:
                found.append(p)
    me = f"python{sys.version_info.major}.{sys.version_info.minor}"

    def key(p: Path):
        minor = int(p.name.split(".")[1]) if p.name.split(".")[1].isdigit() else 0
        return (p.name != me, -minor, str(p))

    found.sort(key=key)
    return found


def _select(max_files: int, max_bytes: int):
    """(source path, relative destination) pairs, deterministic."""
    out, nfiles, nbytes = [], 0, 0
    used_names = set()
    for lib in library_dirs():
        name = lib.name
        if name in used_names:
            name = f"{lib.name}-{len(used_names)}"
        used_names.add(name)
        for dirpath, dirnames, filenames in os.walk(lib):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for fn in sorted(filenames):
                src = Path(dirpath) / fn
                try:
                    st = src.lstat()
                except OSError:
                    continue
                if not src.is_file() or src.is_symlink() or st.st_size > MAX_FILE:
                    continue
                if nfiles >= max_files or nbytes + st.st_size > max_bytes:
                    return out, nfiles, nbytes
                out.append((src, Path("lib") / name / src.relative_to(lib)))
                nfiles += 1
                nbytes += st.st_size
    return out, nfiles, nbytes


def _git(base: Path, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
    subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "gc.auto=0", *args], cwd=base,
                   check=True, env=env, stdout=subprocess.DEVNULL)


def reuse(base: Path, want: dict) -> dict | None:
    """The manifest of the tree at *base* if it was built as *want* says; else None, and a
    tree built otherwise is removed (to be built again)."""
    mf = base / MANIFEST
    if mf.exists():
        try:
            have = json.loads(mf.read_text())
            if all(have.get(k) == v for k, v in want.items()):
                return have
        except ValueError:
            pass
    if base.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)
    return None


def build(base: Path, max_files: int, max_bytes: int, seq_mib: int, log=print) -> dict:
    """Build (or reuse) the base tree at *base*; returns its manifest."""
    want = {"version": 3, "max_files": max_files, "max_bytes": max_bytes, "seq_mib": seq_mib}
    have = reuse(base, want)
    if have is not None:
        return have
    log(f"building the base tree at {base} (up to {max_files} files / {max_bytes >> 20} MiB)")
    pairs, nfiles, nbytes = _select(max_files, max_bytes)
    dirs = set()
    for src, rel in pairs:
        dst = base / rel
        if dst.parent not in dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(dst.parent)
        shutil.copy2(src, dst)
        os.chmod(dst, 0o644 | (dst.stat().st_mode & 0o111))
    _git(base, "init", "-q")
    (base / ".git" / "info").mkdir(exist_ok=True)
    with open(base / ".git" / "info" / "exclude", "a") as f:
        f.write("/.bench/\n/" + MANIFEST + "\n")
    _git(base, "add", "-A")
    _git(base, "commit", "-q", "-m", "base")
    _git(base, "gc", "-q", "--prune=now")
    # git status once so that the index carries the final stat data (racy-git safe)
    subprocess.run(["git", "status", "--porcelain"], cwd=base, check=True, stdout=subprocess.DEVNULL)
    (base / ".bench").mkdir()
    chunk = os.urandom(1 << 20)
    with open(base / ".bench" / "seq.bin", "wb") as f:
        for _ in range(seq_mib):
            f.write(chunk)
        os.fsync(f.fileno())
    ndirs = sum(1 for _ in (base / "lib").rglob("*") if _.is_dir()) + 1
    manifest = {**want, "files": nfiles, "bytes": nbytes, "dirs": ndirs,
                "libraries": sorted({str(rel.parts[1]) for _, rel in pairs})}
    (base / MANIFEST).write_text(json.dumps(manifest, indent=1))
    subprocess.run(["sync"])
    log(f"base tree: {nfiles} files, {ndirs} directories, {nbytes / 1e6:.0f} MB")
    return manifest


def files_of(base: Path) -> list[str]:
    """Relative paths of the tree's regular files (under lib/), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(base / "lib"):
        dirnames.sort()
        for fn in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, fn), base))
    return out
