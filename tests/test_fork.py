"""saga fork (issue 20 item 5): a second workspace over the same base whose saga starts as a copy
of this one's finished steps, its layers shared (hard links), never copied with their data.

Real daemons and mounts; every view is checked against a reference tree built by applying the same
operations to a plain copy of the base (differential)."""

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Mount, put, read

SAGA = "from overlayd.cli.saga_cmd import main; main()"
OVERLAYD = "from overlayd.cli.overlayd_cmd import main; main()"


def snapshot(root: Path) -> dict:
    """{path: (kind, mode, content digest or link target, user xattrs)} of a tree (no times, no inode numbers)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(read(p)).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = None
            xattrs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)
                      if x.startswith("user.")}
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), what, xattrs)
    return out


def make_base(root: Path) -> None:
    root.mkdir()
    put(root / "a.txt", "a\n")
    put(root / "keep.txt", "keep\n")
    put(root / "mode.sh", "#!/bin/sh\n", 0o644)
    (root / "d").mkdir()
    put(root / "d" / "b.txt", "b\n")
    put(root / "d" / "c.bin", bytes(range(256)) * 40)
    (root / "old").mkdir()
    put(root / "old" / "x", "x\n")
    os.symlink("a.txt", root / "link")
    put(root / ("L" * 200), "long name\n")


def step_one(root: Path) -> None:
    """Changes of every kind: a rewrite, a rename (metacopy), a chmod, a delete (whiteout), a
    replaced directory (opaque), a new tree with a binary file across a page boundary."""
    put(root / "a.txt", "A from step one\n")
    os.rename(root / "keep.txt", root / "kept.txt")
    os.chmod(root / "mode.sh", 0o755)
    os.unlink(root / "d" / "b.txt")
    shutil.rmtree(root / "old")
    (root / "old").mkdir()
    put(root / "old" / "y", "y\n")
    (root / "new").mkdir()
    put(root / "new" / "big.bin", random.Random(1).randbytes(4097))
    os.setxattr(root / "new" / "big.bin", "user.tag", b"one")


def step_two(root: Path) -> None:
    put(root / "d" / "c.bin", b"two" * 5000)
    put(root / "two.txt", "two\n")


@pytest.fixture
def world(tmp_path):
    """A base, its reference copy, a source workspace; the forks' daemons are unmounted after."""
    base = tmp_path / "base"
    make_base(base)
    shutil.copytree(base, tmp_path / "pristine", symlinks=True)  # the references start from it
    (tmp_path / "s").mkdir()
    src = Mount(base, tmp_path / "s", name="src").start()
    w = {"base": base, "src": src, "tmp": tmp_path, "forks": []}
    yield w
    for mp in w["forks"]:
        subprocess.run([sys.executable, "-c", OVERLAYD, "unmount", str(mp)], env=src.env, capture_output=True)
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", str(mp)], check=False)
    src.stop()


def saga(w, *args, mp=None, json_out=False):
    mp = mp or w["src"].mp
    cmd = [sys.executable, "-c", SAGA, "-w", str(mp)] + (["--json"] if json_out else []) + list(args)
    p = subprocess.run(cmd, env=w["src"].env, capture_output=True, text=True, timeout=120)
    return p


def ok(p):
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def reference(w, *steps) -> Path:
    ref = w["tmp"] / f"ref{len(list(w['tmp'].glob('ref*')))}"
    shutil.copytree(w["tmp"] / "pristine", ref, symlinks=True)
    for fn in steps:
        fn(ref)
    return ref


def fork(w, name, *args):
    mp = w["tmp"] / f"mnt-{name.replace('/', '_')}"
    mp.mkdir(exist_ok=True)
    p = saga(w, "fork", name, "--mountpoint", str(mp), *args, json_out=True)
    if p.returncode == 0:
        w["forks"].append(mp)
    return p, mp


def daemon_pid(name: str) -> int:
    """The pid of the daemon serving workspace *name* (its command line has --name NAME)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"overlayd" in b" ".join(args) and b"--ready-fd" in args and \
                    args[args.index(b"--name") + 1:args.index(b"--name") + 2] == [name.encode()]:
                return int(pid)
    raise AssertionError(f"no daemon serves {name}")


def begin_two_steps(w):
    src = w["src"]
    ok(saga(w, "begin", "plan"))
    ok(saga(w, "step", "one", "--compensate", "echo undo-one"))
    step_one(src.mp)
    ok(saga(w, "step", "two", "--max-files", "50"))
    step_two(src.mp)


def test_fork_at_a_step_and_at_the_top_diverge(world):
    w = world
    begin_two_steps(w)
    # the open step has changes: a fork without --at is refused, and nothing is made
    p, _ = fork(w, "refused")
    assert p.returncode == 1 and "is open and has changes" in json.loads(p.stdout)["error"]["message"]
    assert not (w["src"].state_root / "refused").exists()
    # --at an earlier step: the fork shows the base and step one only
    p, mp1 = fork(w, "at-one", "--at", "one")
    ok(p)
    r = json.loads(p.stdout)
    assert r["steps"] == [1] and r["name"] == "at-one" and r["mountpoint"] == str(mp1)
    assert snapshot(mp1) == snapshot(reference(w, step_one))
    # the fork's journal: its own saga, the steps' names, compensation commands and budgets, the origin
    st = json.loads(ok(saga(w, "status", mp=mp1, json_out=True)).stdout)
    assert st["saga"]["name"] == "at-one" and st["saga"]["forked_from"]["saga_name"] == "plan"
    assert st["saga"]["forked_from"]["workspace"] == "src" and st["saga"]["forked_from"]["step"] == 1
    assert [(s["name"], s["state"], s["compensate"]) for s in st["steps"]] == [("one", "done", "echo undo-one")]
    # finish step two in the source; now a fork at the top has both steps
    ok(saga(w, "step", "three"))
    p, mp2 = fork(w, "top")
    ok(p)
    assert json.loads(p.stdout)["steps"] == [1, 2]
    st = json.loads(ok(saga(w, "status", mp=mp2, json_out=True)).stdout)
    mine = json.loads(ok(saga(w, "status", json_out=True)).stdout)["steps"][:2]
    keys = ("index", "name", "compensate", "budgets", "retries", "compensate_timeout", "layer")
    assert [{k: s.get(k) for k in keys} for s in st["steps"]] == [{k: s.get(k) for k in keys} for s in mine]
    assert st["steps"][1]["budgets"]["max_files"] == 50
    assert snapshot(mp2) == snapshot(reference(w, step_one, step_two))
    # the fork has no open step until one is begun; then all three diverge
    with pytest.raises(OSError):
        put(mp2 / "nope", "x")
    ok(saga(w, "step", "b", mp=mp2))
    ok(saga(w, "step", "c", mp=mp1))

    def src3(root):
        put(root / "a.txt", "source three\n")
        os.unlink(root / "two.txt")

    def top_b(root):
        put(root / "a.txt", "fork b\n")
        put(root / "new" / "big.bin", b"b" * 10000)
        os.rename(root / "d", root / "dd")

    def one_c(root):
        put(root / "kept.txt", "c\n")
        shutil.rmtree(root / "new")

    src3(w["src"].mp)
    top_b(mp2)
    one_c(mp1)
    assert snapshot(w["src"].mp) == snapshot(reference(w, step_one, step_two, src3))
    assert snapshot(mp2) == snapshot(reference(w, step_one, step_two, top_b))
    assert snapshot(mp1) == snapshot(reference(w, step_one, one_c))
    # the source's layers did not change under the forks (shared inodes are never written in place)
    assert read(w["src"].mp / "new" / "big.bin") == read(reference(w, step_one) / "new" / "big.bin")


def test_winner_commits_then_the_loser_gets_conflicts_and_disjoint_work_goes_in(world):
    w = world
    base, src = w["base"], w["src"]
    begin_two_steps(w)
    ok(saga(w, "step", "three"))
    p, mp = fork(w, "winner")
    ok(p)
    ok(saga(w, "step", "w", mp=mp))
    put(mp / "a.txt", "winner\n")
    ok(saga(w, "commit", mp=mp))
    expected = snapshot(reference(w, step_one, step_two, lambda r: put(r / "a.txt", "winner\n")))
    assert snapshot(base) == expected
    # the person edits committed files in place: the source's shared layer files must not change
    with open(base / "new" / "big.bin", "r+b") as f:
        f.write(b"EDITED")
    with open(base / "d" / "c.bin", "r+b") as f:
        f.write(b"EDITED")
    # (kept.txt and mode.sh, metacopies of base files the winner's commit renamed or replaced,
    # were given their data at the fork: they read as before)
    assert snapshot(src.mp) == snapshot(reference(w, step_one, step_two))
    # the loser's commit: every path both changed is a conflict (exit 3), nothing is merged
    before = snapshot(base)
    p = saga(w, "commit", json_out=True)
    assert p.returncode == 3, p.stdout + p.stderr
    assert snapshot(base) == before
    dry = json.loads(saga(w, "commit", "--dry-run", json_out=True).stdout)
    conflicts = {c["path"] if isinstance(c, dict) else c for c in dry["conflicts"]}
    assert {"a.txt", "d/c.bin", "new/big.bin", "two.txt", "kept.txt"} <= conflicts
    ok(saga(w, "abort"))

    # disjoint work: a fork of no steps (--at 0), then both commit
    ok(saga(w, "begin", "second"))
    ok(saga(w, "step", "s1"))
    put(src.mp / "src-only.txt", "s\n")
    ok(saga(w, "step", "s2"))
    p, mp0 = fork(w, "disjoint", "--at", "0")
    ok(p)
    assert snapshot(mp0) == snapshot(base)
    ok(saga(w, "step", "f", mp=mp0))
    put(mp0 / "fork-only.txt", "f\n")
    os.unlink(mp0 / "link")
    ok(saga(w, "commit", mp=mp0))
    ok(saga(w, "commit"))
    assert read(base / "src-only.txt") == b"s\n" and read(base / "fork-only.txt") == b"f\n"
    assert not os.path.lexists(base / "link")


def test_source_rollback_leaves_the_fork_whole_and_both_recover_from_sigkill(world):
    w = world
    src = w["src"]
    begin_two_steps(w)
    ok(saga(w, "step", "three"))
    p, mp = fork(w, "keeper")
    ok(p)
    state = Path(json.loads(p.stdout)["state_dir"])
    want = snapshot(reference(w, step_one, step_two))
    # the source aborts: its layers go to the trash and are deleted; the fork's view is unchanged
    ok(saga(w, "abort"))
    assert snapshot(src.mp) == snapshot(w["base"])
    for _ in range(100):
        if not any((src.state / "trash").iterdir()):
            break
        time.sleep(0.1)
    assert snapshot(mp) == want
    # SIGKILL both daemons, restart both: both recover their views and sagas
    os.kill(daemon_pid("keeper"), signal.SIGKILL)
    src.kill()
    subprocess.run(["fusermount3", "-uz", str(mp)], check=False, stderr=subprocess.DEVNULL)
    src.start()
    ok(subprocess.run([sys.executable, "-c", OVERLAYD, "mount", str(w["base"]), str(mp), "--name", "keeper",
                       "--state-dir", str(state)], env=src.env, capture_output=True, text=True))
    assert snapshot(mp) == want and snapshot(src.mp) == snapshot(w["base"])
    st = json.loads(ok(saga(w, "status", mp=mp, json_out=True)).stdout)
    assert st["saga"]["state"] == "active" and [s["name"] for s in st["steps"]] == ["one", "two"]
    ok(saga(w, "step", "more", mp=mp))
    ok(saga(w, "commit", mp=mp))
    assert snapshot(w["base"]) == want


def test_bad_requests_are_refused_and_lose_nothing(world):
    w = world
    src = w["src"]
    begin_two_steps(w)
    ok(saga(w, "step", "three"))
    before = snapshot(src.mp)
    status = json.loads(ok(saga(w, "status", json_out=True)).stdout)["steps"]
    roots = sorted(os.listdir(src.state_root))
    cases = [
        (("bad/name",), 2, "invalid workspace name"),
        (("src",), 1, "exists"),
        (("nostep", "--at", "nine"), 1, "no live step named 'nine'"),
        (("nostep", "--at", "7"), 1, "no live step 7"),
    ]
    for args, code, text in cases:
        p, _ = fork(w, *args)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        if text:
            assert text in p.stdout + p.stderr, (args, p.stdout, p.stderr)
    # a mountpoint in use (the source's own mount), a file as the mountpoint
    p = saga(w, "fork", "other", "--mountpoint", str(src.mp), json_out=True)
    assert p.returncode == 1 and "in use" in json.loads(p.stdout)["error"]["message"]
    f = w["tmp"] / "afile"
    put(f, "x")
    p = saga(w, "fork", "other", "--mountpoint", str(f))
    assert p.returncode == 1 and "not a directory" in p.stderr
    # an existing workspace name (a fork made before)
    ok(fork(w, "first")[0])
    p, _ = fork(w, "first")
    assert p.returncode == 1 and "exists" in p.stdout
    assert snapshot(src.mp) == before
    assert json.loads(ok(saga(w, "status", json_out=True)).stdout)["steps"] == status
    assert sorted(os.listdir(src.state_root)) == sorted(roots + ["first"])


def test_a_fork_shares_the_layers_data(world):
    """The fork's layer files are the source's inodes: a 64 MiB layer costs the fork almost nothing."""
    w = world
    src = w["src"]
    ok(saga(w, "begin", "big"))
    ok(saga(w, "step", "fill"))
    blob = os.urandom(1 << 20)
    (src.mp / "big").mkdir()
    for i in range(64):
        put(src.mp / "big" / f"f{i:02}.bin", blob[i:] + blob[:i])
    ok(saga(w, "step", "next"))
    p, mp = fork(w, "cheap")
    ok(p)
    r = json.loads(p.stdout)
    assert r["shared"]["links"] == 64
    state = Path(r["state_dir"])
    layer = json.loads(ok(saga(w, "status", mp=mp, json_out=True)).stdout)["steps"][0]["layer"]
    for i in range(64):
        a = os.stat(src.state / "layers" / layer / "big" / f"f{i:02}.bin")
        b = os.stat(state / "layers" / layer / "big" / f"f{i:02}.bin")
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2
    # du counts an inode once: what the fork's layers add beside the source's
    out = subprocess.run(["du", "-s", "-B1", str(src.state / "layers"), str(state / "layers")],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    src_bytes, fork_bytes = int(out[0].split()[0]), int(out[1].split()[0])
    assert src_bytes >= 64 << 20 and fork_bytes < 1 << 20, out
    assert read(mp / "big" / "f05.bin") == blob[5:] + blob[:5]


def test_a_source_killed_mid_fork_leaves_no_workspace_and_forks_again(world, monkeypatch):
    """SIGKILL of the source daemon after the fork's layers and journal are built, before the
    rename into place: no workspace appears; after a restart the same fork succeeds."""
    w = world
    src = w["src"]
    src.stop()
    monkeypatch.setenv("OVERLAYD_CRASH_AT", "fork.built")
    src.start()
    monkeypatch.delenv("OVERLAYD_CRASH_AT")
    begin_two_steps(w)
    p, mp = fork(w, "crashy", "--at", "one")
    assert p.returncode != 0
    src.proc.wait(timeout=30)
    src.kill()
    assert not (src.state_root / "crashy").exists() and (src.state_root / ".crashy.fork-tmp").is_dir()
    src.start()
    # the step open at the crash was rolled back; step one is whole
    assert snapshot(src.mp) == snapshot(reference(w, step_one))
    p, mp = fork(w, "crashy", "--at", "one")
    ok(p)
    assert not (src.state_root / ".crashy.fork-tmp").exists()
    assert snapshot(mp) == snapshot(reference(w, step_one))


def test_the_fork_merges_with_the_ancestor_the_shared_step_kept(world):
    """A shared step changed a text file (its base version at first touch was kept); the source
    commits another change of it; the fork's commit is refused, and ``saga resolve --merge`` in
    the fork merges against that kept version: the fork carries the step's base copies."""
    w = world
    base, src = w["base"], w["src"]
    lines = [f"line {i}\n" for i in range(12)]
    put(base / "t.txt", "".join(lines))
    ok(saga(w, "begin", "merge"))
    ok(saga(w, "step", "one"))
    put(src.mp / "t.txt", "".join(lines[:2] + ["line 2 by step one\n"] + lines[3:]))
    ok(saga(w, "step", "two"))
    p, mp = fork(w, "merger")
    ok(p)
    ok(saga(w, "step", "three", mp=mp))
    with open(mp / "t.txt", "a") as f:
        f.write("a line the fork adds\n")
    ok(saga(w, "step", "four"))
    put(src.mp / "t.txt", "".join(["line 0 by the source\n"] + lines[1:2] + ["line 2 by step one\n"] + lines[3:]))
    ok(saga(w, "commit"))
    p = saga(w, "commit", mp=mp)
    assert p.returncode == 3 and "t.txt" in p.stderr, p.stdout + p.stderr
    ok(saga(w, "resolve", str(mp / "t.txt"), "--merge", mp=mp))
    ok(saga(w, "commit", mp=mp))
    assert read(base / "t.txt") == "".join(["line 0 by the source\n"] + lines[1:2] + ["line 2 by step one\n"]
                                           + lines[3:] + ["a line the fork adds\n"]).encode()
