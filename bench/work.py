"""One workload, run in a child process so that the harness can time-box it (a process stuck on
a FUSE request cannot be interrupted from inside) and so that interpreter start-up is not
timed: the child measures itself and prints one JSON line ``{"t": seconds, ...}``.

    python bench/work.py WORKLOAD ROOT 'JSON-PARAMS'

ROOT is the top of the tree under test (the mount, or the native copy). The harness drops the
caches before starting a child for a cold workload; "warm" workloads run once untimed first.
"""

import json
import os
import subprocess
import sys
import time

CHUNK = 1 << 20


def walk_files(root: str):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "lib")):
        for fn in filenames:
            yield os.path.join(dirpath, fn)


def stat_all(root: str, p: dict) -> dict:
    n = 0
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "lib")):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return {"entries": n}


def read_all(root: str, p: dict) -> dict:
    n = total = 0
    for path in walk_files(root):
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(CHUNK)
                if not b:
                    break
                total += len(b)
        n += 1
    return {"files": n, "bytes": total}


def git_status(root: str, p: dict) -> dict:
    r = subprocess.run(["git", "status", "--porcelain"], cwd=root, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, check=True)
    return {"dirty_lines": len(r.stdout.splitlines())}


def find(root: str, p: dict) -> dict:
    """`find lib -type f`: listings only (d_type answers -type), the cost cached listings save."""
    r = subprocess.run(["find", "lib", "-type", "f"], cwd=root, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, check=True)
    return {"files": len(r.stdout.splitlines())}


def grep(root: str, p: dict) -> dict:
    r = subprocess.run(["grep", "-r", "-c", p["needle"], "lib"], cwd=root, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"grep failed: {r.stderr.decode()[-500:]}")
    return {"files": len(r.stdout.splitlines())}


def compileall(root: str, p: dict) -> dict:
    target = os.path.join(root, p["dir"])
    r = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "1", "-x", p.get("exclude", "$^"),
                        target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # rc 1 = some file had a syntax error (the stdlib ships a few on purpose): not a failure here
    if r.returncode not in (0, 1):
        raise RuntimeError(f"compileall failed: {r.stdout.decode()[-500:]}")
    return {"rc": r.returncode}


def tar_x(root: str, p: dict) -> dict:
    dst = os.path.join(root, "xt")
    os.mkdir(dst)
    subprocess.run(["tar", "xf", p["archive"], "-C", dst], check=True)
    return {}


def create(root: str, p: dict) -> dict:
    data = os.urandom(p["size"])
    top = os.path.join(root, "new")
    os.mkdir(top)
    per_dir = p.get("per_dir", 100)
    d = None
    for i in range(p["files"]):
        if i % per_dir == 0:
            d = os.path.join(top, f"d{i // per_dir:03d}")
            os.mkdir(d)
        fd = os.open(os.path.join(d, f"f{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    return {}


def rm_rf(root: str, p: dict) -> dict:
    subprocess.run(["rm", "-rf", os.path.join(root, p["dir"])], check=True)
    return {}


def rename(root: str, p: dict) -> dict:
    for rel in p["files"]:
        path = os.path.join(root, rel)
        os.rename(path, path + ".moved")
    return {"files": len(p["files"])}


def seq_write(root: str, p: dict) -> dict:
    buf = os.urandom(CHUNK)
    fd = os.open(os.path.join(root, "seq.out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(p["mib"]):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": p["mib"] * CHUNK}


def seq_read(root: str, p: dict) -> dict:
    total = 0
    fd = os.open(os.path.join(root, ".bench", "seq.bin"), os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                break
            total += len(b)
    finally:
        os.close(fd)
    return {"bytes": total}


FUNCS = {"stat": stat_all, "read": read_all, "git_status": git_status, "find": find, "grep": grep,
         "compileall": compileall, "tar_x": tar_x, "create": create, "rm_rf": rm_rf,
         "rename": rename, "seq_write": seq_write, "seq_read": seq_read}


def main() -> int:
    func_name, root, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    fn = FUNCS[func_name]
    if params.get("warmup"):
        fn(root, params)
    if params.get("prewarm_tools"):
        # after a cache drop: bring the tools' own binaries back, not the tree under test
        subprocess.run(["git", "--version"], stdout=subprocess.DEVNULL)
        subprocess.run(["grep", "--version"], stdout=subprocess.DEVNULL)
    if params.get("handshake"):
        # let the harness sample the daemon's CPU time between the warm-up and the timed part
        print("ready", flush=True)
        sys.stdin.readline()
    t0 = time.perf_counter()
    extra = fn(root, params)
    t = time.perf_counter() - t0
    print(json.dumps({"t": t, **(extra or {})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
