"""Randomized differential test: the same operations on the mount and on a plain directory.

Each sequence pushes a layer, applies random operations (with more layer pushes, and
sometimes a drop, in between) to both trees, and compares outcomes (success or errno) and
the whole trees. At the end of a sequence all its layers are dropped and the view must equal
the base again. The seed is printed on failure; OVERLAYD_DIFF_SEQUENCES and
OVERLAYD_DIFF_OPS scale the run (CI: 200 x 50).
"""

import errno
import os
import random
import shutil
import subprocess
import time


from treecmp import diff, snapshot

SEQUENCES = int(os.environ.get("OVERLAYD_DIFF_SEQUENCES", "200"))
OPS = int(os.environ.get("OVERLAYD_DIFF_OPS", "50"))
STRICT = bool(os.environ.get("OVERLAYD_DIFF_STRICT"))
NAMES = ["a", "b", "c", "d", "f1", "f2", "dir", "x" * 255]


def build_diff_base(root):
    root.mkdir()
    for d in ("d1", "d1/d2", "d1/d2/d3", "e", "dir"):
        (root / d).mkdir()
    for i, p in enumerate(["f1", "d1/a", "d1/b", "d1/d2/c", "d1/d2/d3/f2", "e/a", "dir/f1"]):
        (root / p).write_bytes(bytes([65 + i]) * (i * 1000 + 10))
    os.link(root / "d1/a", root / "e/hard")
    os.symlink("../f1", root / "d1/ln")
    os.setxattr(root / "f1", "user.k", b"v")
    os.chmod(root / "d1/b", 0o600)


class Runner:
    def __init__(self, rng, mnt, ref):
        self.rng = rng
        self.roots = (str(mnt), str(ref))
        self.log = []

    def entries(self):
        """Existing paths of the reference tree (files and dirs), and its dirs."""
        files, dirs = [], [""]
        for dirpath, dirnames, filenames in os.walk(self.roots[1]):
            rel = os.path.relpath(dirpath, self.roots[1])
            rel = "" if rel == "." else rel
            for d in dirnames:
                dirs.append(os.path.join(rel, d))
            for f in filenames:
                files.append(os.path.join(rel, f))
        return files, dirs

    def newpath(self, dirs):
        return os.path.join(self.rng.choice(dirs), self.rng.choice(NAMES))

    def pick_op(self):
        rng = self.rng
        files, dirs = self.entries()
        anyp = files + dirs[1:]
        kind = rng.choice(["create", "create", "write", "write", "truncate", "rename", "rename", "unlink",
                           "rmdir", "mkdir", "link", "symlink", "chmod", "setxattr", "rmtree", "rename_dir"])
        if kind == "create":
            return ("create", self.newpath(dirs), rng.randbytes(rng.randint(0, 3000)))
        if kind == "write" and files:
            return ("write", rng.choice(files), rng.randint(0, 5000), rng.randbytes(rng.randint(1, 2000)))
        if kind == "truncate" and files:
            return ("truncate", rng.choice(files), rng.randint(0, 6000))
        if kind == "rename" and anyp:
            target = rng.choice(anyp) if rng.random() < 0.3 else self.newpath(dirs)
            return ("rename", rng.choice(anyp), target)
        if kind == "rename_dir" and len(dirs) > 1:
            return ("rename", rng.choice(dirs[1:]), self.newpath(dirs))
        if kind == "unlink" and anyp:
            return ("unlink", rng.choice(anyp))
        if kind == "rmdir" and len(dirs) > 1:
            return ("rmdir", rng.choice(dirs[1:]))
        if kind == "rmtree" and len(dirs) > 1:
            return ("rmtree", rng.choice(dirs[1:]))
        if kind == "mkdir":
            return ("mkdir", self.newpath(dirs))
        if kind == "link" and anyp:
            return ("link", rng.choice(anyp), self.newpath(dirs))
        if kind == "symlink":
            return ("symlink", rng.choice(["f1", "../a", "/nonexistent/overlayd-test", "x" * 100]), self.newpath(dirs))
        if kind == "chmod" and anyp:
            return ("chmod", rng.choice(anyp), rng.choice([0o644, 0o600, 0o755, 0o700, 0o444]))
        if kind == "setxattr" and anyp:
            return ("setxattr", rng.choice(anyp), rng.choice(["user.a", "user.b"]), rng.randbytes(rng.randint(0, 50)))
        return ("mkdir", self.newpath(dirs))

    @staticmethod
    def apply(root, op):
        kind, args = op[0], op[1:]
        p = lambda rel: os.path.join(root, rel)  # noqa: E731
        try:
            # O_NOFOLLOW everywhere: a symlink in the tree may point outside it (even to /etc),
            # and the test process must never write there.
            if kind == "create":
                fd = os.open(p(args[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                try:
                    os.write(fd, args[1])
                finally:
                    os.close(fd)
            elif kind == "write":
                fd = os.open(p(args[0]), os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, args[2], args[1])
                finally:
                    os.close(fd)
            elif kind == "truncate":
                fd = os.open(p(args[0]), os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.ftruncate(fd, args[1])
                finally:
                    os.close(fd)
            elif kind == "rename":
                os.rename(p(args[0]), p(args[1]))
            elif kind == "unlink":
                os.unlink(p(args[0]))
            elif kind == "rmdir":
                os.rmdir(p(args[0]))
            elif kind == "rmtree":
                if os.path.islink(p(args[0])) or not os.path.isdir(p(args[0])):
                    raise OSError(errno.ENOTDIR, "not a dir")
                shutil.rmtree(p(args[0]))
            elif kind == "mkdir":
                os.mkdir(p(args[0]), 0o755)
            elif kind == "link":
                os.link(p(args[0]), p(args[1]), follow_symlinks=False)
            elif kind == "symlink":
                os.symlink(args[0], p(args[1]))
            elif kind == "chmod":
                if os.path.islink(p(args[0])):
                    return "skip"  # Linux has no lchmod
                os.chmod(p(args[0]), args[1])
            elif kind == "setxattr":
                if os.path.islink(p(args[0])):
                    return "skip"
                os.setxattr(p(args[0]), args[1], args[2])
            return "ok"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, exc.errno)


def test_differential(mount_factory, tmp_path):
    seed = int(os.environ.get("OVERLAYD_DIFF_SEED", random.randrange(1 << 30)))
    base = tmp_path / "base"
    build_diff_base(base)
    base_snap = snapshot(base)
    m = mount_factory(base)
    ref = tmp_path / "ref"
    total_ops = 0
    t0 = time.monotonic()
    for seq in range(int(os.environ.get("OVERLAYD_DIFF_FROM", "0")), SEQUENCES):
        rng = random.Random(seed + seq)
        if ref.exists():
            shutil.rmtree(ref)
        subprocess.run(["cp", "-a", str(base), str(ref)], check=True)
        runner = Runner(rng, m.mp, ref)
        m.push()
        pushed = 1
        saved = []  # reference snapshots (copies) taken at each extra push
        history = []
        for i in range(OPS):
            r = rng.random()
            if r < 0.06:
                copy = tmp_path / f"save{len(saved)}"
                if copy.exists():
                    shutil.rmtree(copy)
                subprocess.run(["cp", "-a", str(ref), str(copy)], check=True)
                saved.append(copy)
                m.push()
                pushed += 1
                history.append(("push",))
                continue
            if r < 0.08 and saved:
                copy = saved.pop()
                m.drop(1, reopen=True)
                pushed -= 1
                shutil.rmtree(ref)
                os.rename(copy, ref)
                history.append(("drop",))
                got, want = snapshot(m.mp), snapshot(ref)
                problems = diff(got, want)
                assert not problems, f"seed={seed} seq={seq} after drop: {problems[:10]}\nhistory={history}"
                continue
            op = runner.pick_op()
            history.append(op[:1] + tuple(x if not isinstance(x, bytes) else len(x) for x in op[1:]))
            got = Runner.apply(str(m.mp), op)
            want = Runner.apply(str(ref), op)
            total_ops += 1
            assert got == want, f"seed={seed} seq={seq} op#{i} {history[-1]}: mount {got} != plain {want}\nhistory={history}"
            if STRICT:
                problems = diff(snapshot(m.mp), snapshot(ref))
                assert not problems, f"seed={seed} seq={seq} op#{i}: trees differ: {problems[:10]}\nhistory={history}"
        problems = diff(snapshot(m.mp), snapshot(ref))
        assert not problems, f"seed={seed} seq={seq}: trees differ: {problems[:10]}\nhistory={history}"
        m.drop(pushed)
        for copy in saved:
            shutil.rmtree(copy)
        problems = diff(snapshot(m.mp), base_snap)
        assert not problems, f"seed={seed} seq={seq}: view after dropping all layers != base: {problems[:10]}"
    assert snapshot(base) == base_snap, "the base was written"
    print(f"differential: seed={seed} {SEQUENCES} sequences, {total_ops} ops in {time.monotonic() - t0:.1f}s")
