"""Randomized differential tests: the same operations on the mount and on a plain directory.

What is drawn (issue 15, "vary the world"): names of 1 to 255 bytes (and 256: ENAMETOOLONG on
both sides), directories nested until the relative path nears ``PATH_MAX`` (every operation
resolves its parent one component at a time through directory fds, on the plain side too, so
depth is not limited by the absolute path of the test's tmp dir), file sizes around every
boundary (0, 1, 4095-4097, 65535-65537, a few MiB), xattr values from 1 byte to 4 KiB (and
beyond where both file systems take it), and create, write, truncate, rename (files and
directories), link, symlink, mkdir, rmdir, rm -r, unlink, chmod, chown, utime, setxattr,
removexattr.

``test_differential``: each sequence pushes a layer, applies random operations (with more
layer pushes, and sometimes a drop, in between) to both trees, and compares outcomes (success
or errno) and the whole trees. At the end of a sequence all its layers are dropped and the
view must equal the base again.

``test_differential_commit``: the same operations inside saga steps, on the file system
matrix (tests/fsmatrix.py: base and state directory on ext4, xfs, btrfs, tmpfs, on one or two
file systems, or the base through a bind mount), and each sequence ENDS WITH A COMMIT: the base
must then equal the plain directory byte for byte (content, mode, owner, user xattrs, no
private xattr, hard-link groups, symlink targets), and the view as it was just before the
commit in the mtimes of files and symlinks, and of the directories the commit created or moved
in (one the saga only passed through gets the commit's own mtime).

The seed is printed on failure. Environment: OVERLAYD_DIFF_SEQUENCES / OVERLAYD_DIFF_OPS (view
test; CI: 30 x 50), OVERLAYD_DIFF_COMMITS / OVERLAYD_DIFF_COMMIT_OPS (commit test, per combo;
CI: 4 x 40), OVERLAYD_DIFF_SEED, OVERLAYD_DIFF_STRICT=1 (compare trees after every op),
OVERLAYD_TORTURE=1 (every combo, 10x the commits), OVERLAYD_FS_COMBOS.
"""

import errno
import os
import random
import shutil
import stat
import time

import pytest

import fsmatrix
from overlayd.client import ClientError
from treecmp import DIR_FLAGS, clone, diff, snapshot, walk

TORTURE = fsmatrix.TORTURE
SEQUENCES = int(os.environ.get("OVERLAYD_DIFF_SEQUENCES", "300" if TORTURE else "30"))
OPS = int(os.environ.get("OVERLAYD_DIFF_OPS", "50"))
COMMITS = int(os.environ.get("OVERLAYD_DIFF_COMMITS", "40" if TORTURE else "4"))
COMMIT_OPS = int(os.environ.get("OVERLAYD_DIFF_COMMIT_OPS", "60" if TORTURE else "40"))
STRICT = bool(os.environ.get("OVERLAYD_DIFF_STRICT"))

PATH_MAX = 4096
NAME_MAX = 255
NAMES = ["a", "b", "c", "d", "f1", "f2", "dir", "x" * 255, "n" * 100 + "-" * 50]
TOO_LONG = "y" * 256
SIZES = [0, 1, 4095, 4096, 4097, 65535, 65536, 65537]
BIG_SIZES = [1 << 20, (3 << 20) + 17]
XATTR_SIZES = [1, 2, 100, 255, 256, 1024, 2048, 4000, 4096, 8192]
OWNERS = [(0, 0), (1000, 1000), (1234, 5678), (0, 1000)]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o640, 0o711]
O_NF = os.O_NOFOLLOW | os.O_CLOEXEC


def xattr_cost(name, size):
    """Bytes an xattr takes in an ext4 xattr block (entry header, name and value padded to 4)."""
    return 16 + (len(name) - 5 + 3) // 4 * 4 + (size + 3) // 4 * 4


def payload(rng, size):
    if size > 65537:
        return rng.randbytes(4096) * (size // 4096) + rng.randbytes(size % 4096)
    return rng.randbytes(size)


def build_diff_base(root, *, deep=True):
    """The base every sequence starts from: small files under long paths (commit's metacopy
    cases), hard links, a symlink, xattrs, an odd mode, and one chain of directories nested
    to ~3 KiB of path."""
    root.mkdir(exist_ok=True)
    for d in ("d1", "d1/d2", "d1/d2/d3", "e", "dir"):
        (root / d).mkdir()
    for i, p in enumerate(["f1", "d1/a", "d1/b", "d1/d2/c", "d1/d2/d3/f2", "e/a", "dir/f1"]):
        (root / p).write_bytes(bytes([65 + i]) * (i * 1000 + 10))
    os.link(root / "d1/a", root / "e/hard")
    os.symlink("../f1", root / "d1/ln")
    os.setxattr(root / "f1", "user.k", b"v")
    os.chmod(root / "d1/b", 0o600)
    long_dir = root / "very/long/directory/path/that/an/ordinary/project/might/have/src"
    long_dir.mkdir(parents=True)
    (long_dir / "build.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (long_dir / "page").write_bytes(b"p" * 4096)
    (long_dir / "page+1").write_bytes(b"q" * 4097)
    (long_dir / "empty").write_bytes(b"")
    if deep:
        fd = os.open(root, DIR_FLAGS)
        try:
            for i in range(12):  # 12 * 241 bytes: ~2.9 KiB of relative path
                name = f"{i:02d}" + "z" * 238
                os.mkdir(name, 0o755, dir_fd=fd)
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            nfd = os.open("deep-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NF, 0o644, dir_fd=fd)
            os.write(nfd, b"at the bottom\n")
            os.close(nfd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------- operations


def open_parent(root, rel):
    """(fd of *rel*'s directory, last name), resolved one component at a time with O_NOFOLLOW."""
    parts = rel.split("/")
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def open_entry(root, rel, flags):
    dfd, name = open_parent(root, rel)
    try:
        return os.open(name, flags | O_NF, 0o644, dir_fd=dfd)
    finally:
        os.close(dfd)


class Runner:
    def __init__(self, rng, mnt, ref, xattr_max=4096):
        self.rng = rng
        self.roots = (str(mnt), str(ref))
        self.xattr_max = xattr_max
        self.xattr_sizes = [s for s in XATTR_SIZES if s <= xattr_max] or [1]
        self.log = []

    def xattr_used(self, path, skip):
        """The room the user xattrs of *path* in the reference tree take (but *skip*)."""
        try:
            fd = open_entry(self.roots[1], path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return 0
        try:
            return sum(xattr_cost(x, len(os.getxattr(fd, x))) for x in os.listxattr(fd) if x != skip)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def entries(self):
        """Existing paths of the reference tree: files (anything but directories), dirs
        ("" is the root), and the length of the longest path below each directory."""
        files, dirs = [], [""]
        for rel, _, _, st in walk(self.roots[1]):
            (dirs if stat.S_ISDIR(st.st_mode) else files).append(rel)
        return files, dirs

    def newpath(self, dirs, room=0):
        """A new path in one of *dirs* whose length leaves *room* bytes below it within PATH_MAX."""
        rng = self.rng
        for _ in range(10):
            d = rng.choice(dirs)
            name = TOO_LONG if rng.random() < 0.02 else rng.choice(NAMES)
            p = f"{d}/{name}" if d else name
            if len(p) + room < PATH_MAX:
                return p
        return rng.choice(NAMES[:5])

    @staticmethod
    def subtree_room(files, dirs, top):
        """How many bytes of path the entries below *top* add to it."""
        n = len(top)
        return max([len(p) - n for p in files + dirs if p.startswith(top + "/")] or [0])

    def pick_op(self):
        rng = self.rng
        files, dirs = self.entries()
        anyp = files + dirs[1:]
        kind = rng.choice(["create", "create", "write", "write", "truncate", "rename", "rename", "unlink",
                           "rmdir", "mkdir", "mkdir", "link", "symlink", "chmod", "chown", "utime", "setxattr",
                           "setxattr", "removexattr", "rmtree", "rename_dir", "deepen"])
        if kind == "create":
            size = rng.choice(SIZES + SIZES + BIG_SIZES[:1]) if rng.random() < 0.97 else rng.choice(BIG_SIZES)
            return ("create", self.newpath(dirs), payload(rng, size))
        if kind == "write" and files:
            off = max(0, rng.choice(SIZES) + rng.randint(-3, 3))
            return ("write", rng.choice(files), off, payload(rng, rng.choice([1, 2, 100, 4095, 4096, 4097, 9000])))
        if kind == "truncate" and files:
            return ("truncate", rng.choice(files), rng.choice(SIZES + [100, 6000]))
        if kind == "rename" and anyp:
            src = rng.choice(anyp)
            room = self.subtree_room(files, dirs, src)
            target = rng.choice(anyp) if rng.random() < 0.3 else self.newpath(dirs, room)
            if len(target) + room >= PATH_MAX:
                target = self.newpath(dirs, room)
            return ("rename", src, target)
        if kind == "rename_dir" and len(dirs) > 1:
            src = rng.choice(dirs[1:])
            return ("rename", src, self.newpath(dirs, self.subtree_room(files, dirs, src)))
        if kind == "unlink" and anyp:
            return ("unlink", rng.choice(anyp))
        if kind == "rmdir" and len(dirs) > 1:
            return ("rmdir", rng.choice(dirs[1:]))
        if kind == "rmtree" and len(dirs) > 1 and rng.random() < 0.5:
            return ("rmtree", rng.choice(dirs[1:]))
        if kind == "deepen":
            # a chain of long-named directories down to just under PATH_MAX, a file at the bottom
            top = max(dirs, key=len) if rng.random() < 0.7 else rng.choice(dirs)
            names = []
            length = len(top)
            while True:
                name = rng.choice(["x" * NAME_MAX, "m" * 128, "s" * 20])
                if length + 1 + len(name) + 1 + 10 >= PATH_MAX:
                    break
                names.append(name)
                length += 1 + len(name)
            return ("deepen", top, names, payload(rng, rng.choice([0, 1, 4096, 4097])))
        if kind == "link" and files:
            return ("link", rng.choice(files), self.newpath(dirs))
        if kind == "symlink":
            target = rng.choice(["f1", "../a", "/nonexistent/overlayd-test", "x" * 100, "t" * 1000])
            return ("symlink", target, self.newpath(dirs))
        if kind == "chmod" and anyp:
            return ("chmod", rng.choice(anyp), rng.choice(MODES))
        if kind == "chown" and anyp:
            return ("chown", rng.choice(anyp), *rng.choice(OWNERS))
        if kind == "utime" and anyp:
            t = rng.choice([0, 1, 10**9 * 1_500_000_000 + 123_456_789, 10**9 * 1_700_000_000])
            return ("utime", rng.choice(anyp), t, t + rng.choice([0, 1, 999_999_999]))
        if kind == "setxattr" and anyp:
            path, name = rng.choice(anyp), rng.choice(["user.a", "user.b", "user." + "k" * 200])
            # within what every file system involved holds for all of an inode's xattrs
            # together (ext4: one 4 KiB block), so that the commit can store them too
            room = self.xattr_max - 64 - self.xattr_used(path, name)
            sizes = [n for n in self.xattr_sizes if xattr_cost(name, n) <= room] or [1]
            return ("setxattr", path, name, rng.randbytes(rng.choice(sizes)))
        if kind == "removexattr" and anyp:
            return ("removexattr", rng.choice(anyp), rng.choice(["user.a", "user.b", "user.k"]))
        return ("mkdir", self.newpath(dirs))

    @staticmethod
    def apply(root, op):
        """Apply *op* below *root*; "ok", "skip" or the errno's name. Every path is resolved from
        *root* one directory fd at a time, never following a symlink: a symlink in the tree may
        point outside it (even to /etc), and the test process must never write there."""
        kind, args = op[0], op[1:]
        try:
            if kind == "create":
                fd = open_entry(root, args[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                try:
                    view = memoryview(args[1])
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            elif kind == "write":
                fd = open_entry(root, args[0], os.O_WRONLY)
                try:
                    os.pwrite(fd, args[2], args[1])
                finally:
                    os.close(fd)
            elif kind == "truncate":
                fd = open_entry(root, args[0], os.O_WRONLY)
                try:
                    os.ftruncate(fd, args[1])
                finally:
                    os.close(fd)
            elif kind == "deepen":
                top, names, data = args
                fd = os.open(root, DIR_FLAGS)
                try:
                    for part in top.split("/") if top else ():
                        nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = nfd
                    for name in names:
                        try:
                            os.mkdir(name, 0o755, dir_fd=fd)
                        except FileExistsError:
                            pass
                        nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = nfd
                    ffd = os.open("bottom", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NF, 0o644, dir_fd=fd)
                    try:
                        os.write(ffd, data)
                    finally:
                        os.close(ffd)
                finally:
                    os.close(fd)
            elif kind in ("rename", "link"):
                sfd, sname = open_parent(root, args[0])
                try:
                    dfd, dname = open_parent(root, args[1])
                    try:
                        if kind == "rename":
                            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                        else:
                            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
            elif kind == "symlink":
                dfd, name = open_parent(root, args[1])
                try:
                    os.symlink(args[0], name, dir_fd=dfd)
                finally:
                    os.close(dfd)
            else:
                dfd, name = open_parent(root, args[0])
                try:
                    return Runner._apply_at(dfd, name, kind, args)
                finally:
                    os.close(dfd)
            return "ok"
        except OSError as exc:
            if exc.errno == errno.EEXIST and kind == "rename":
                return "ENOTEMPTY"  # xfs answers EEXIST for a non-empty target; POSIX allows both
            return errno.errorcode.get(exc.errno, exc.errno)

    @staticmethod
    def _apply_at(dfd, name, kind, args):
        if kind == "unlink":
            os.unlink(name, dir_fd=dfd)
        elif kind == "rmdir":
            os.rmdir(name, dir_fd=dfd)
        elif kind == "rmtree":
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a dir")
            shutil.rmtree(name, dir_fd=dfd)
        elif kind == "mkdir":
            os.mkdir(name, 0o755, dir_fd=dfd)
        elif kind == "chown":
            os.chown(name, args[1], args[2], dir_fd=dfd, follow_symlinks=False)
        elif kind == "utime":
            os.utime(name, ns=(args[1], args[2]), dir_fd=dfd, follow_symlinks=False)
        elif kind in ("chmod", "setxattr", "removexattr"):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return "skip"  # Linux has no lchmod, and no user xattrs on symlinks
            flags = DIR_FLAGS if stat.S_ISDIR(st.st_mode) else os.O_RDONLY | O_NF
            fd = os.open(name, flags, dir_fd=dfd)
            try:
                if kind == "chmod":
                    os.fchmod(fd, args[1])
                elif kind == "setxattr":
                    os.setxattr(fd, args[1], args[2])
                else:
                    os.removexattr(fd, args[1])
            finally:
                os.close(fd)
        else:
            raise AssertionError(f"unknown op {kind}")
        return "ok"


def describe(op):
    """An op for the failure message: byte strings by their length, long names shortened."""
    def short(x):
        if isinstance(x, bytes):
            return f"<{len(x)} bytes>"
        if isinstance(x, str) and len(x) > 60:
            return f"{x[:20]}...({len(x)})...{x[-20:]}"
        if isinstance(x, list):
            return [short(y) for y in x]
        return x
    return (op[0],) + tuple(short(x) for x in op[1:])


def copy_tree(src, dst):
    clone(src, dst)


# ---------------------------------------------------------------------------------- view test


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
        copy_tree(base, ref)
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
                copy_tree(ref, copy)
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
            history.append(describe(op))
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


# ---------------------------------------------------------------------------------- commit test


def test_xattr_removed_from_a_base_directory_is_committed(mount_factory, tmp_path):
    """removexattr on a directory the base has, then a commit: the base directory loses the
    xattr too. The commit only copied the layer copy's xattrs onto the base directory, so a
    removed one stayed (found by test_differential_commit)."""
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    os.setxattr(base / "d", "user.gone", b"x" * 100)
    os.setxattr(base / "d", "user.kept", b"k")
    m = mount_factory(base)
    m.call("saga.begin", name="rmxattr")
    m.call("saga.step", name="s1")
    os.removexattr(m.mp / "d", "user.gone")
    os.setxattr(m.mp / "d", "user.new", b"n")
    m.call("saga.commit")
    assert sorted(os.listxattr(base / "d")) == ["user.kept", "user.new"]
    assert sorted(os.listxattr(m.mp / "d")) == ["user.kept", "user.new"]


@pytest.mark.parametrize("kind", ["btrfs", "ext4"])
def test_committed_entries_of_a_listed_directory_are_visible(filesystems, mount_factory, kind):
    """A base directory renamed to a new name at the root of the view, then committed: the view
    must still show it. On btrfs it vanished from the view (ENOENT, missing from listings) until
    a restart: the daemon read the base root through the directory fd it keeps open, and btrfs
    ends a directory stream at the last index the directory had when that fd was opened or
    rewound; entries the commit added were past it (found by test_differential_commit[btrfs])."""
    root = filesystems.dir(kind, "visible")
    base = root / "base"
    (base / "d1" / "sub" / "deeper").mkdir(parents=True)
    (base / "d1" / "sub" / "f").write_text("f\n")
    m = mount_factory(base, where=root)
    m.call("saga.begin", name="visible")
    m.call("saga.step", name="s1")
    assert sorted(os.listdir(m.mp)) == ["d1"]
    os.rename(m.mp / "d1" / "sub", m.mp / "d")
    m.call("saga.commit")
    assert sorted(os.listdir(base)) == ["d", "d1"]
    assert sorted(os.listdir(m.mp)) == ["d", "d1"]
    assert (m.mp / "d" / "f").read_text() == "f\n"
    assert sorted(os.listdir(m.mp / "d")) == ["deeper", "f"]


def check_commit(problems_where, base, ref, view_before, old_dirs, seed, seq, history):
    """The committed base against the plain tree (everything but mtimes), and against the view
    just before the commit: the mtimes of files and symlinks, and of the directories the commit
    created or moved in (*old_dirs*: the base's directories before the saga; a directory the
    saga only passed through gets the commit's own mtime, see docs/ARCHITECTURE.md)."""
    where = f"seed={seed} seq={seq} ({problems_where})"
    lines = diff(snapshot(base), snapshot(ref))
    assert not lines, (f"{where}: the committed base differs from the plain directory:\n  "
                       + "\n  ".join(lines[:20]) + f"\nhistory={history}")
    files_before, groups_before, dirs_before = view_before
    lines = diff(snapshot(base, mtimes=True), (files_before, groups_before))
    assert not lines, (f"{where}: the committed base differs from the view before the commit in the mtimes "
                       "of files or symlinks:\n  " + "\n  ".join(lines[:20]) + f"\nhistory={history}")
    got, _ = snapshot(base, dir_mtimes=True)
    new = {p for p, d in dirs_before[0].items() if d["type"] == stat.S_IFDIR and p not in old_dirs}
    lines = diff(({p: got.get(p) for p in new}, set()), ({p: dirs_before[0][p] for p in new}, set()))
    assert not lines, (f"{where}: a directory the commit created has another mtime than the view showed:\n  "
                       + "\n  ".join(lines[:20]) + f"\nhistory={history}")


def view_snapshot(mp):
    """(snapshot with file mtimes, groups, snapshot with directory mtimes) of the view."""
    a, g = snapshot(mp, mtimes=True)
    return a, g, snapshot(mp, dir_mtimes=True)


COMMIT_COMBOS = fsmatrix.combos(["ext4", "tmpfs", "ext4/tmpfs", "bind:ext4"])


@pytest.mark.parametrize("combo", COMMIT_COMBOS)
def test_differential_commit(filesystems, mount_factory, combo):
    seed = int(os.environ.get("OVERLAYD_DIFF_SEED", random.randrange(1 << 30)))
    place = fsmatrix.Place(filesystems, combo, "diffc")
    build_diff_base(place.base)
    build_diff_base(place.ref)
    m = mount_factory(place.base, name=f"dc{os.getpid()}", where=place.work)
    try:
        run_commit_sequences(m, place, combo, seed)
    except BaseException:
        print(f"--- daemon log ({combo}) ---\n{m.log()}")
        raise


def run_commit_sequences(m, place, combo, seed):
    total_ops = 0
    t0 = time.monotonic()
    for seq in range(COMMITS):
        rng = random.Random(seed + seq)
        runner = Runner(rng, m.mp, place.ref, place.xattr_max)
        history = []
        old_dirs = {p for p, d in snapshot(place.base, data=False)[0].items() if d["type"] == stat.S_IFDIR}
        m.call("saga.begin", name=f"seq{seq}")
        m.call("saga.step", name="s1")
        for i in range(COMMIT_OPS):
            if rng.random() < 0.05:
                m.call("saga.step", name=f"s{i + 2}")
                history.append(("step",))
                continue
            op = runner.pick_op()
            history.append(describe(op))
            got = Runner.apply(str(m.mp), op)
            want = Runner.apply(str(place.ref), op)
            total_ops += 1
            assert got == want, (f"seed={seed} seq={seq} op#{i} {history[-1]}: mount {got} != plain {want}"
                                 f"\nhistory={history}")
        lines = diff(snapshot(m.mp), snapshot(place.ref))
        assert not lines, f"seed={seed} seq={seq}: view != plain before the commit: {lines[:10]}\nhistory={history}"
        view_before = view_snapshot(m.mp)
        try:
            res = m.call("saga.commit")
        except ClientError as exc:
            pytest.fail(f"seed={seed} seq={seq} [{combo}]: the commit failed: {exc.code}: {exc.message} "
                        f"{str(exc.data)[:2000]}\nhistory={history}")
        assert res["saga"]["state"] == "committed", res
        check_commit(combo, place.base, place.ref, view_before, old_dirs, seed, seq, history)
        lines = diff(snapshot(m.mp), snapshot(place.ref))
        assert not lines, f"seed={seed} seq={seq}: view != plain after the commit: {lines[:10]}\nhistory={history}"
    print(f"differential commit [{combo}]: seed={seed} {COMMITS} commits, {total_ops} ops "
          f"in {time.monotonic() - t0:.1f}s")
