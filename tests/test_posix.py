"""POSIX behaviour of the view, checked against a plain directory.

Most tests are parametrized over ``root``: the sample base mounted with one writable layer
(``ws.mp``), or a plain copy of the sample base (``copy_of_sample``). Each test asserts the
outcome POSIX prescribes where it is clear, and records its observations (results, errno
names) with ``rec``; ``rec.agree()`` at the end of the second run of a test compares the two
runs' observations, so the mount has to behave exactly like the plain directory.

Many tests end with ``assert_same_after_remount``: for the mount, the daemon is restarted over
the same state (fresh kernel caches, fresh inode table) and the whole view (contents, modes,
owners, xattrs, mtimes, link counts) must be what it was, so that a wrong answer of the daemon
cannot hide behind what the kernel cached (entry and attribute timeouts are 300 s).

The sample base is never written: the tests that modify base entries compare it with a
record taken before. Writes open with O_NOFOLLOW and go through ``_inside``, which refuses a
path whose directory resolves outside /tmp (the sample base has a symlink to an absolute
path outside it); the one deliberate write through a symlink (the relative ``dangling ->
missing``) first checks where the link resolves.

The tests at the end (mount only) cover the layer stack: dropping a layer restores the base
view, including for the kernel's page cache and for open file handles.
"""

import contextlib
import ctypes
import errno
import hashlib
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess

import pytest

from treecmp import diff, snapshot

O_NF = os.O_NOFOLLOW | os.O_CLOEXEC
N255 = "n" * 255
N256 = "n" * 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# ---------------------------------------------------------------------------------- helpers


def renameat2(old, new, flags):
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def ename(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


def outcome(fn, *args, **kwargs):
    """'ok' (or the function's result, when it is not None), or the errno name."""
    try:
        res = fn(*args, **kwargs)
    except OSError as exc:
        return ename(exc)
    return "ok" if res is None else res


def _inside(path):
    """Refuse to write to *path* if its directory resolves outside /tmp (a symlink escaped)."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(os.fsdecode(path))))
    assert parent.startswith("/tmp/"), f"refusing to write through {path} (resolves to {parent})"
    return path


def write(path, data: bytes, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644):
    fd = os.open(_inside(path), flags | O_NF, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def append(path, data: bytes):
    write(path, data, os.O_WRONLY | os.O_APPEND)


def read(path) -> bytes:
    fd = os.open(path, os.O_RDONLY | O_NF)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def read_follow(path) -> bytes:
    """Read through symlinks (reading is harmless wherever they point)."""
    with open(path, "rb") as f:
        return f.read()


def touch_open(path, flags, mode=0o644):
    """open()+close() with O_NOFOLLOW; returns None (so outcome() says 'ok')."""
    os.close(os.open(_inside(path), flags | O_NF, mode))


def kind(path) -> str:
    try:
        m = os.lstat(path).st_mode
    except OSError as exc:
        return ename(exc)
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}[stat.S_IFMT(m)]


def xattrs(path):
    return sorted((x, os.getxattr(path, x, follow_symlinks=False))
                  for x in os.listxattr(path, follow_symlinks=False))


def meta(path, *, nlink=True):
    """Everything copy-up must preserve (and st_nlink, except for directories)."""
    st = os.lstat(path)
    out = {"mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid), "mtime": st.st_mtime_ns,
           "size": st.st_size, "xattrs": xattrs(path) if not stat.S_ISLNK(st.st_mode) else None}
    if nlink and not stat.S_ISDIR(st.st_mode):
        out["nlink"] = st.st_nlink
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bind_socket(name):
    """Create a Unix socket file *name* (relative to the cwd, to keep sun_path short)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(name)
    finally:
        s.close()


def run_as(cwd, fn, uid=1000, gid=1000, umask=0o022, groups=()):
    """Run *fn()* in a forked child: chdir to *cwd* as root, then drop to uid/gid and set the umask.

    Changing into the directory first means the child needs no search permission on the
    (0700) pytest directories above it. Returns fn's (picklable) result; re-raises nothing:
    an exception in the child comes back as AssertionError.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            signal.alarm(60)  # a hung filesystem call must not hang the test run
            try:
                os.chdir(cwd)
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                os.umask(umask)
                data = pickle.dumps(("ok", fn()))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                data = pickle.dumps(("exc", repr(exc)))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, wstatus = os.waitpid(pid, 0)
    assert data, f"child process died (wait status {wstatus:#x})"
    status, value = pickle.loads(data)
    assert status == "ok", f"child process failed: {value}"
    return value


# ---------------------------------------------------------------------------------- fixtures

_OBSERVED = {}


class Recorder:
    """Observations of one run of a test; agree() compares them with the other root's run."""

    def __init__(self, test: str, which: str):
        self.test = test
        self.which = which
        self.items = []

    def __call__(self, label, value):
        self.items.append((label, value))
        return value

    def do(self, label, fn, *args, **kwargs):
        return self(label, outcome(fn, *args, **kwargs))

    def agree(self):
        runs = _OBSERVED.setdefault(self.test, {})
        runs[self.which] = self.items
        if len(runs) < 2:
            return
        mount, plain = runs["mount"], runs["plain"]
        problems = []
        for i in range(max(len(mount), len(plain))):
            m = mount[i] if i < len(mount) else (None, None)
            p = plain[i] if i < len(plain) else (None, None)
            if m != p:
                problems += _differences(m[1], p[1], f"[{m[0] or p[0]}]")
        assert not problems, "mount and plain directory disagree (mount != plain):\n" + "\n".join(problems[:20])


def _differences(a, b, where):
    """Leaf differences of two nested observations, as 'where: a != b' lines."""
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=repr):
            out += _differences(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}[{k!r}]")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _differences(x, y, f"{where}[{i}]")
        return out
    if isinstance(a, (set, frozenset)) and isinstance(b, (set, frozenset)):
        return [f"{where}: only in mount {sorted(map(repr, a - b))}, only in plain {sorted(map(repr, b - a))}"]
    return [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(params=["mount", "plain"])
def root(request):
    if request.param == "mount":
        return request.getfixturevalue("ws").mp
    return request.getfixturevalue("copy_of_sample")


@pytest.fixture
def rec(request, root):
    return Recorder(request.node.originalname, request.node.callspec.params["root"])


@pytest.fixture
def remount(request, root):
    """For the mount: restart the daemon over the same state (fresh kernel caches, fresh inode
    table); for the plain directory: nothing. What the view shows must not change."""
    if request.node.callspec.params["root"] == "plain":
        return lambda: None
    ws = request.getfixturevalue("ws")

    def again():
        ws.stop()
        ws.start()

    return again


def full_state(root):
    """treecmp's snapshot plus every entry's mtime and (for non-directories) st_nlink."""
    snap, groups = snapshot(root)
    extra = {".": meta(root)}
    for rel in snap:
        st = os.lstat(os.path.join(root, rel))
        extra[rel] = {"mtime": st.st_mtime_ns, "nlink": None if stat.S_ISDIR(st.st_mode) else st.st_nlink}
    return {"entries": snap, "links": groups, "times": extra}


def assert_same_after_remount(root, remount):
    before = full_state(root)
    remount()
    after = full_state(root)
    problems = _differences(before, after, "")
    assert not problems, "the view changed when the daemon was restarted (before != after):\n" + \
        "\n".join(problems[:20])


@pytest.fixture(scope="module")
def base_record(sample_base):
    """Contents and metadata of every sample base entry, taken before any test here writes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(sample_base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, sample_base)
            st = os.lstat(p)
            out[rel] = (meta(p), sha(read(p)) if stat.S_ISREG(st.st_mode) else None)
    return out


def assert_base_unchanged(sample_base, base_record):
    now = {}
    for rel in base_record:
        p = os.path.join(sample_base, rel)
        st = os.lstat(p)
        now[rel] = (meta(p), sha(read(p)) if stat.S_ISREG(st.st_mode) else None)
    assert now == base_record, "the sample base changed"


# ---------------------------------------------------------------------------------- copy-up


def test_copy_up_preserves_data_and_metadata(root, sample_base, base_record, rec, remount):
    files = ["src/pkg/mod3.py", "docs/a.md", "docs/a-link.md", "big.bin", "src/pkg/sub/deep.txt", "README",
             "fifo", "src/abs-link", "dangling"]
    dirs = ["docs", "src", "src/pkg", "src/pkg/sub"]
    # a shared writable mapping of a base file
    import mmap
    fd = os.open(root / "src/pkg/mod8.py", os.O_RDWR | O_NF)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[0:3] = b"DEF"
            mm.flush()
    finally:
        os.close(fd)
    assert read(root / "src/pkg/mod8.py") == b"DEF" + read(sample_base / "src/pkg/mod8.py")[3:]
    for rel in files:
        if kind(root / rel) == "file":
            # open for writing copies up without changing anything
            touch_open(root / rel, os.O_RDWR)
            assert read(root / rel) == read(sample_base / rel), f"{rel}: data changed by copy-up"
        else:  # a symlink or fifo: an xattr change copies it up (trusted.*: root may set it on anything)
            os.setxattr(root / rel, "trusted.t", b"1", follow_symlinks=False)
            os.removexattr(root / rel, "trusted.t", follow_symlinks=False)
        assert meta(root / rel) == meta(sample_base / rel), f"{rel}: metadata changed by copy-up"
    assert os.stat(root / "docs").st_uid == 1000 and os.stat(root / "docs").st_gid == 1000
    assert stat.S_IMODE(os.stat(root / "src/pkg/mod3.py").st_mode) == 0o755
    assert xattrs(root / "docs/a.md") == [("user.colour", b"blue")]

    # writes land on the copy
    append(root / "src/pkg/mod3.py", b"# more\n")
    assert read(root / "src/pkg/mod3.py") == read(sample_base / "src/pkg/mod3.py") + b"# more\n"
    assert stat.S_IMODE(os.stat(root / "src/pkg/mod3.py").st_mode) == 0o755
    pos = 1 << 20
    fd = os.open(root / "big.bin", os.O_WRONLY | O_NF)
    try:
        os.pwrite(fd, b"MIDDLE", pos)
    finally:
        os.close(fd)
    want = bytearray(read(sample_base / "big.bin"))
    want[pos:pos + 6] = b"MIDDLE"
    assert read(root / "big.bin") == bytes(want)
    # O_TRUNC truncates, also the first open of a base file, and of a hard-linked one
    touch_open(root / "docs/a-link.md", os.O_WRONLY | os.O_TRUNC)
    assert read(root / "docs/a.md") == b""
    assert os.stat(root / "docs/a.md").st_nlink == 2
    touch_open(root / "src/pkg/sub/deep.txt", os.O_WRONLY | os.O_TRUNC)
    assert os.stat(root / "src/pkg/sub/deep.txt").st_size == 0
    assert read(root / "src/pkg/sub/deep.txt") == b""
    write(root / "src/pkg/mod4.py", b"new\n")  # O_TRUNC on a never-opened base file
    assert os.stat(root / "src/pkg/mod4.py").st_mtime_ns > os.stat(sample_base / "src/pkg/mod4.py").st_mtime_ns
    touch_open(root / "src/pkg/mod5.py", os.O_WRONLY | os.O_TRUNC)
    assert os.stat(root / "src/pkg/mod5.py").st_mtime_ns > os.stat(sample_base / "src/pkg/mod5.py").st_mtime_ns, \
        "O_TRUNC did not update the mtime"
    assert read(root / "src/pkg/mod4.py") == b"new\n"
    rec("mod4 meta", {k: v for k, v in meta(root / "src/pkg/mod4.py").items() if k != "mtime"})
    for rel in files + dirs + ["src/pkg/mod4.py"]:
        rec(rel, (kind(root / rel), os.lstat(root / rel).st_size))
    assert_base_unchanged(sample_base, base_record)
    # the parent directories copied up on the way keep their metadata, mtime included
    # (nothing was added to or removed from them in the view)
    for rel in dirs:
        assert meta(root / rel) == meta(sample_base / rel), f"directory {rel}: metadata changed by copy-up"
    remount()  # what the kernel cached must be what the daemon says
    for rel in dirs:
        assert meta(root / rel) == meta(sample_base / rel), f"directory {rel}: metadata changed by copy-up"
    rec.agree()


def test_root_directory_metadata(root, sample_base, rec, remount):
    """The root of the view is the base's root directory: its mode, owner, mtime and xattrs."""
    assert meta(root) == meta(sample_base), "the root directory's metadata differs from the base's"
    remount()
    assert meta(root) == meta(sample_base), "the root directory's metadata differs from the base's"
    write(root / "new", b"n")  # changes the root's mtime, not its mode or owner
    st, bst = os.stat(root), os.stat(sample_base)
    assert (st.st_mode, st.st_uid, st.st_gid) == (bst.st_mode, bst.st_uid, bst.st_gid)
    assert st.st_mtime_ns > bst.st_mtime_ns
    os.chmod(root, 0o750)
    os.chown(root, 1000, 1000)
    os.utime(root, ns=(1_000_000_000_123, 2_000_000_000_456))
    os.setxattr(root, "user.root", b"r")
    want = {"mode": oct(stat.S_IFDIR | 0o750), "owner": (1000, 1000), "mtime": 2_000_000_000_456, "size": st.st_size,
            "xattrs": [("user.root", b"r")]}
    assert meta(root) | {"size": st.st_size} == want
    remount()
    assert meta(root) | {"size": st.st_size} == want
    rec("root", meta(root) | {"size": None})
    rec.agree()


def test_root_of_a_private_base(mount_factory, tmp_path):
    """A base whose root is 0750, owned by 1000:1000, with an xattr: the view's root is the same,
    before and after a layer is pushed, and after an entry is created in it (mount only)."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("f")
    os.setxattr(base, "user.r", b"v")
    os.chown(base, 1000, 1000)
    os.chmod(base, 0o750)
    os.utime(base, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_001))
    want = meta(base)
    m = mount_factory(base)
    assert meta(m.mp) == want, "before any layer"
    m.push()
    m.stop()
    m.start()
    assert meta(m.mp) == want, "after a layer was pushed"
    write(m.mp / "g", b"g")
    got = meta(m.mp)
    assert (got["mode"], got["owner"], got["xattrs"]) == (want["mode"], want["owner"], want["xattrs"]), \
        "after an entry was created in the root"
    m.drop(1)
    assert meta(m.mp) == want, "after the layer was dropped"


# ---------------------------------------------------------------------------------- creation


def test_create_and_mkdir(root, rec, remount):
    write(root / "new.txt", b"hello")
    os.mkdir(root / "newdir", 0o755)
    os.mkdir(root / "newdir/sub", 0o700)
    write(root / "newdir/sub/f", b"deep")
    os.mkdir(root / "src/pkg/newsub")  # inside a base directory
    write(root / "src/pkg/newsub/f", b"x" * 10000)
    assert read(root / "new.txt") == b"hello"
    assert read(root / "newdir/sub/f") == b"deep"
    assert kind(root / "newdir") == "dir"
    assert stat.S_IMODE(os.stat(root / "newdir/sub").st_mode) == 0o700
    assert sorted(os.listdir(root / "newdir")) == ["sub"]
    assert "newsub" in os.listdir(root / "src/pkg")
    assert os.listdir(root / "empty") == []
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    assert rec.do("O_EXCL on a new file", touch_open, root / "new.txt", excl) == "EEXIST"
    assert rec.do("O_EXCL on a base file", touch_open, root / "README", excl) == "EEXIST"
    assert rec.do("O_EXCL on a base dir", touch_open, root / "src", excl) == "EEXIST"
    assert rec.do("O_CREAT on a dir", touch_open, root / "src", os.O_CREAT | os.O_WRONLY) == "EISDIR"
    assert rec.do("mkdir existing", os.mkdir, root / "newdir") == "EEXIST"
    assert rec.do("mkdir over base file", os.mkdir, root / "README") == "EEXIST"
    assert rec.do("mkdir over base dir", os.mkdir, root / "src/pkg") == "EEXIST"
    assert rec.do("mkdir over symlink", os.mkdir, root / "dangling") == "EEXIST"
    assert rec.do("create in missing dir", touch_open, root / "nodir/f", os.O_CREAT | os.O_WRONLY) == "ENOENT"
    assert rec.do("create under a file", touch_open, root / "README/f", os.O_CREAT | os.O_WRONLY) == "ENOTDIR"
    assert rec.do("mkdir under a file", os.mkdir, root / "README/d") == "ENOTDIR"
    assert rec.do("open missing", touch_open, root / "missing", os.O_RDONLY) == "ENOENT"
    assert rec.do("O_DIRECTORY on file", touch_open, root / "README", os.O_RDONLY | os.O_DIRECTORY) == "ENOTDIR"
    rec("root listing", sorted(os.listdir(root)))
    rec("pkg listing", sorted(os.listdir(root / "src/pkg")))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_fifo_and_socket(root, rec, remount):
    os.mkfifo(root / "newfifo", 0o640)
    assert kind(root / "newfifo") == "fifo"
    assert stat.S_IMODE(os.lstat(root / "newfifo").st_mode) == 0o640
    assert kind(root / "fifo") == "fifo"  # from the base
    for name in ("newfifo", "fifo"):
        r = os.open(root / name, os.O_RDONLY | os.O_NONBLOCK | O_NF)
        try:
            w = os.open(root / name, os.O_WRONLY | O_NF)
            try:
                os.write(w, b"through the pipe")
            finally:
                os.close(w)
            assert rec(f"{name} data", os.read(r, 100)) == b"through the pipe"
        finally:
            os.close(r)
    assert rec.do("mkfifo existing", os.mkfifo, root / "fifo") == "EEXIST"
    os.mkdir(root / "sk")
    with contextlib.chdir(root / "sk"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind("s")
            s.listen(1)
            assert kind("s") == "socket"
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect("s")
                conn, _ = s.accept()
                with conn:
                    c.sendall(b"ping")
                    assert rec("socket data", conn.recv(10)) == b"ping"
            finally:
                c.close()
        finally:
            s.close()
        assert rec.do("bind existing", bind_socket, "s") == "EADDRINUSE"
        assert kind("s") == "socket"
        os.unlink("s")
        assert kind("s") == "ENOENT"
    rec("types", {n: kind(root / n) for n in ("newfifo", "fifo", "sk")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_device_nodes(root, rec, remount):
    """Root creates character and block devices; they keep their numbers through rename,
    hard link, chmod, chown and a copy-up into a new layer. (The mount is nodev: opening one
    through it is refused, which the plain directory does not do; see test_device_nodes_mount.)"""
    def dev(rel):
        st = os.lstat(root / rel)
        return kind(root / rel), os.major(st.st_rdev), os.minor(st.st_rdev), oct(stat.S_IMODE(st.st_mode)), \
            st.st_uid, st.st_nlink

    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "src/loop", stat.S_IFBLK | 0o640, os.makedev(7, 0))
    os.mknod(root / "tty", stat.S_IFCHR | 0o620, os.makedev(4, 1))
    rec("created", {n: dev(n) for n in ("null", "src/loop", "tty")})
    assert dev("null")[:3] == ("chr", 1, 3) and dev("src/loop")[:3] == ("blk", 7, 0)
    assert rec.do("mknod existing", os.mknod, root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 5)) == "EEXIST"
    os.rename(root / "src/loop", root / "docs/loop0")
    os.link(root / "docs/loop0", root / "loop-link")
    os.chmod(root / "null", 0o600)
    os.chown(root / "tty", 1000, 5)
    os.utime(root / "tty", ns=(1, 2))
    os.unlink(root / "loop-link")
    rec("changed", {n: dev(n) for n in ("null", "docs/loop0", "tty")})
    rec("unprivileged", run_as(root, lambda: outcome(os.mknod, "docs/mine", stat.S_IFCHR | 0o600,
                                                     os.makedev(1, 3))))
    rec("listing", sorted(os.listdir(root)))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_device_nodes_mount(ws):
    """What only the mount does: a 0/0 character device (a whiteout in a layer) is refused, as
    kernel overlayfs refuses it; devices cannot be opened (nodev); a device survives the drop
    of a layer above the one that holds it (copied up by a chmod in the next layer)."""
    mp = ws.mp
    with pytest.raises(PermissionError):
        os.mknod(mp / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert kind(mp / "wh") == "ENOENT"
    os.mknod(mp / "zero", stat.S_IFCHR | 0o644, os.makedev(1, 5))
    with pytest.raises(PermissionError):
        os.open(mp / "zero", os.O_RDONLY | O_NF)
    ws.push()
    os.chmod(mp / "zero", 0o600)
    st = os.lstat(mp / "zero")
    assert (stat.S_ISCHR(st.st_mode), st.st_rdev, stat.S_IMODE(st.st_mode)) == (True, os.makedev(1, 5), 0o600)
    ws.drop()
    st = os.lstat(mp / "zero")
    assert (stat.S_ISCHR(st.st_mode), st.st_rdev, stat.S_IMODE(st.st_mode)) == (True, os.makedev(1, 5), 0o644)


def test_symlinks(root, rec, remount):
    targets = {"rel": "pkg/mod1.py", "abs": "/nonexistent/overlayd-elsewhere", "dangling": "nothing-here",
               "dots": "../../..", "long": "t/" * 2047 + "t", "odd": "a b\tc\\\u00e9"}
    for name, target in targets.items():
        os.symlink(target, root / "src" / f"sl-{name}")
        assert os.readlink(root / "src" / f"sl-{name}") == target, f"{name}: target changed"
        st = os.lstat(root / "src" / f"sl-{name}")
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len(target.encode())
        rec(name, (os.readlink(root / "src" / f"sl-{name}"), st.st_size))
    assert read_follow(root / "src/sl-rel") == read(root / "src/pkg/mod1.py")
    assert rec.do("stat dangling", os.stat, root / "src/sl-dangling") == "ENOENT"
    assert rec.do("stat abs", os.stat, root / "src/sl-abs") == "ENOENT"
    assert os.readlink(root / "src/abs-link") == "/nonexistent/overlayd-outside"
    assert os.readlink(root / "dangling") == "missing"
    assert read_follow(root / "src/link-to-mod1") == read(root / "src/pkg/mod1.py")
    assert rec.do("symlink existing", os.symlink, "x", root / "src/sl-rel") == "EEXIST"
    assert rec.do("symlink over base", os.symlink, "x", root / "README") == "EEXIST"
    assert rec.do("O_NOFOLLOW open", touch_open, root / "src/sl-rel", os.O_RDONLY) == "ELOOP"
    # O_CREAT through a dangling symlink creates its (relative, in-tree) target
    assert os.path.realpath(root / "dangling") == os.path.join(os.path.realpath(root), "missing")
    with open(root / "dangling", "wb") as f:
        f.write(b"via the link")
    assert read(root / "missing") == b"via the link"
    assert kind(root / "dangling") == "symlink"
    assert rec.do("O_EXCL through symlink", touch_open, root / "dangling",
                  os.O_CREAT | os.O_EXCL | os.O_WRONLY) == "EEXIST"
    os.unlink(root / "src/sl-rel")
    os.symlink("pkg/mod2.py", root / "src/sl-rel")  # replaced: the new target is seen
    assert os.readlink(root / "src/sl-rel") == "pkg/mod2.py"
    assert read_follow(root / "src/sl-rel") == read(root / "src/pkg/mod2.py")
    assert_same_after_remount(root, remount)
    rec.agree()


def test_hard_links_new(root, rec, remount):
    write(root / "f", b"one")
    os.link(root / "f", root / "src/g")
    a, b = os.stat(root / "f"), os.stat(root / "src/g")
    assert (a.st_nlink, b.st_nlink) == (2, 2)
    assert a.st_ino == b.st_ino
    append(root / "src/g", b"+two")
    assert read(root / "f") == b"one+two"
    os.chmod(root / "f", 0o600)
    assert stat.S_IMODE(os.stat(root / "src/g").st_mode) == 0o600
    os.link(root / "src/g", root / "docs/h")
    assert os.stat(root / "f").st_nlink == 3
    os.unlink(root / "f")
    assert os.stat(root / "src/g").st_nlink == 2
    assert read(root / "docs/h") == b"one+two"
    # a new link to a base file
    os.link(root / "src/pkg/mod5.py", root / "mod5-link")
    a, b = os.stat(root / "src/pkg/mod5.py"), os.stat(root / "mod5-link")
    assert (a.st_nlink, b.st_nlink) == (2, 2)
    assert a.st_ino == b.st_ino
    write(root / "mod5-link", b"changed\n")
    assert read(root / "src/pkg/mod5.py") == b"changed\n"
    # a link to a symlink is a symlink with the same target
    os.link(root / "src/abs-link", root / "abs-link2", follow_symlinks=False)
    assert os.readlink(root / "abs-link2") == "/nonexistent/overlayd-outside"
    assert os.lstat(root / "src/abs-link").st_nlink == 2
    assert rec.do("link a dir", os.link, root / "src", root / "src2") == "EPERM"
    assert rec.do("link onto existing", os.link, root / "README", root / "docs/a.md") == "EEXIST"
    assert rec.do("link missing", os.link, root / "nope", root / "nope2") == "ENOENT"
    rec("nlinks", {p: os.lstat(root / p).st_nlink for p in ("src/g", "docs/h", "mod5-link", "src/pkg/mod5.py",
                                                             "abs-link2", "README")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_hard_links_from_base(root, sample_base, base_record, rec, remount):
    for one, other in (("docs/a.md", "docs/a-link.md"), ("src/README.hard", "README")):
        s1, s2 = os.stat(root / one), os.stat(root / other)
        assert (s1.st_nlink, s2.st_nlink) == (2, 2), f"{one}/{other} before writing"
        assert s1.st_ino == s2.st_ino
        old = read(root / other)
        # an fd opened on the other name before the write
        fd = os.open(root / other, os.O_RDONLY | O_NF)
        try:
            append(root / one, b"appended\n")
            assert read(root / other) == old + b"appended\n", f"write through {one} not visible via {other}"
            assert os.pread(fd, 1000, 0) == old + b"appended\n", f"fd on {other} opened before the write"
        finally:
            os.close(fd)
        s1, s2 = os.stat(root / one), os.stat(root / other)
        assert (s1.st_nlink, s2.st_nlink) == (2, 2), f"{one}/{other} after writing"
        assert s1.st_ino == s2.st_ino
        assert s1.st_size == s2.st_size == len(old) + 9
        os.setxattr(root / other, "user.tag", b"v")
        assert os.getxattr(root / one, "user.tag") == b"v"
        rec(one, (read(root / one), s1.st_nlink, s2.st_nlink))
    # a third name for a base pair
    os.link(root / "docs/a.md", root / "third")
    assert [os.stat(root / p).st_nlink for p in ("docs/a.md", "docs/a-link.md", "third")] == [3, 3, 3]
    os.unlink(root / "third")
    # unlink one name: the other's link count drops
    os.unlink(root / "docs/a-link.md")
    assert os.stat(root / "docs/a.md").st_nlink == 1
    # the same after the pair was copied up by the write
    os.unlink(root / "src/README.hard")
    assert os.stat(root / "README").st_nlink == 1
    assert read(root / "README") == b"sample base\nappended\n"
    # a base pair that is only unlinked (never written)
    os.link(root / "src/pkg/mod7.py", root / "src/pkg/mod7-twin")
    assert os.stat(root / "src/pkg/mod7.py").st_nlink == 2
    os.unlink(root / "src/pkg/mod7.py")
    assert os.stat(root / "src/pkg/mod7-twin").st_nlink == 1
    rec("final", {p: (os.stat(root / p).st_nlink, sha(read(root / p)))
                  for p in ("docs/a.md", "README", "src/pkg/mod7-twin")})
    assert_base_unchanged(sample_base, base_record)
    assert_same_after_remount(root, remount)
    rec.agree()


def test_base_hard_link_unlink_without_write(root, rec, remount):
    """Removing one name of a base hard-link pair before anything copied it up."""
    os.unlink(root / "docs/a.md")
    assert os.stat(root / "docs/a-link.md").st_nlink == 1
    assert read(root / "docs/a-link.md") == b"# a\n"
    os.rename(root / "README", root / "docs/readme-moved")
    assert os.stat(root / "src/README.hard").st_nlink == 2
    assert os.stat(root / "docs/readme-moved").st_ino == os.stat(root / "src/README.hard").st_ino
    rec("state", [(p, os.stat(root / p).st_nlink) for p in ("docs/a-link.md", "docs/readme-moved", "src/README.hard")])
    assert_same_after_remount(root, remount)
    rec.agree()


# ---------------------------------------------------------------------------------- removal


def test_unlink_and_rmdir(root, rec, remount):
    os.unlink(root / "README")
    assert rec.do("stat unlinked", os.stat, root / "README") == "ENOENT"
    assert "README" not in os.listdir(root)
    assert read(root / "src/README.hard") == b"sample base\n"
    write(root / "README", b"new one", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert read(root / "README") == b"new one"
    assert os.stat(root / "README").st_nlink == 1
    os.unlink(root / "dangling")
    os.unlink(root / "fifo")
    assert rec.do("unlink missing", os.unlink, root / "dangling") == "ENOENT"
    assert rec.do("unlink dir", os.unlink, root / "src") == "EISDIR"
    assert rec.do("rmdir non-empty", os.rmdir, root / "src") == "ENOTEMPTY"
    assert rec.do("rmdir non-empty 2", os.rmdir, root / "src/pkg/sub") == "ENOTEMPTY"
    assert rec.do("rmdir file", os.rmdir, root / "src/README.hard") == "ENOTDIR"
    assert rec.do("rmdir symlink", os.rmdir, root / "src/link-to-mod1") == "ENOTDIR"
    assert rec.do("rmdir missing", os.rmdir, root / "nothing") == "ENOENT"
    assert rec.do("rmdir empty base dir", os.rmdir, root / "empty") == "ok"
    assert rec.do("rmdir again", os.rmdir, root / "empty") == "ENOENT"
    os.mkdir(root / "empty")
    assert os.listdir(root / "empty") == []
    # empty a base dir file by file, then rmdir works
    os.unlink(root / "src/pkg/sub/deep.txt")
    assert os.listdir(root / "src/pkg/sub") == []
    assert rec.do("rmdir emptied base dir", os.rmdir, root / "src/pkg/sub") == "ok"
    assert "sub" not in os.listdir(root / "src/pkg")
    os.mkdir(root / "src/pkg/sub")
    assert os.listdir(root / "src/pkg/sub") == []
    rec("root", sorted(os.listdir(root)))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_rm_rf_and_recreate(root, rec, remount):
    shutil.rmtree(root / "src")
    assert rec.do("stat", os.stat, root / "src") == "ENOENT"
    os.mkdir(root / "src")
    assert os.listdir(root / "src") == [], "a re-created base dir shows old entries"
    assert rec.do("stat old child", os.lstat, root / "src/pkg") == "ENOENT"
    assert rec.do("stat old file", os.lstat, root / "src/README.hard") == "ENOENT"
    os.mkdir(root / "src/pkg")
    assert os.listdir(root / "src/pkg") == []
    write(root / "src/pkg/mod0.py", b"fresh")
    assert read(root / "src/pkg/mod0.py") == b"fresh"
    assert sorted(os.listdir(root / "src/pkg")) == ["mod0.py"]
    assert os.stat(root / "README").st_nlink == 1
    # the same for a directory holding hard links
    shutil.rmtree(root / "docs")
    os.mkdir(root / "docs")
    assert os.listdir(root / "docs") == []
    rec("tree", snapshot(root, data=True))
    assert_same_after_remount(root, remount)
    rec.agree()


# ---------------------------------------------------------------------------------- rename


def test_rename_files(root, sample_base, rec, remount):
    base_readme = read(sample_base / "README")
    os.rename(root / "docs/a.md", root / "docs/b.md")  # within a dir
    assert rec.do("old name", os.stat, root / "docs/a.md") == "ENOENT"
    assert read(root / "docs/b.md") == b"# a\n"
    assert os.stat(root / "docs/b.md").st_ino == os.stat(root / "docs/a-link.md").st_ino
    assert os.stat(root / "docs/b.md").st_nlink == 2
    assert xattrs(root / "docs/b.md") == [("user.colour", b"blue")]
    os.rename(root / "src/pkg/mod0.py", root / "docs/mod0.py")  # across dirs
    assert read(root / "docs/mod0.py") == read(sample_base / "src/pkg/mod0.py")
    assert "mod0.py" not in os.listdir(root / "src/pkg")
    write(root / "new", b"n")
    os.rename(root / "new", root / "src/pkg/sub/new")
    assert read(root / "src/pkg/sub/new") == b"n"
    # onto an existing file: the replaced name was one of two hard links
    os.rename(root / "src/pkg/mod1.py", root / "README")
    assert read(root / "README") == read(sample_base / "src/pkg/mod1.py")
    assert read(root / "src/README.hard") == base_readme
    assert rec("README.hard nlink after its twin was replaced", os.stat(root / "src/README.hard").st_nlink) == 1
    assert os.stat(root / "README").st_ino != os.stat(root / "src/README.hard").st_ino
    # onto a file created in the layer
    write(root / "t1", b"t1")
    write(root / "t2", b"t2")
    os.rename(root / "t1", root / "t2")
    assert read(root / "t2") == b"t1"
    # the symlink with an absolute target moves verbatim
    os.rename(root / "src/abs-link", root / "docs/abs-link")
    assert os.readlink(root / "docs/abs-link") == "/nonexistent/overlayd-outside"
    # rename to the same file (other hard link) is a no-op
    assert rec.do("onto own hard link", os.rename, root / "docs/b.md", root / "docs/a-link.md") == "ok"
    assert kind(root / "docs/b.md") == "file" and kind(root / "docs/a-link.md") == "file"
    assert rec.do("onto itself", os.rename, root / "docs/b.md", root / "docs/b.md") == "ok"
    # rename back and forth
    os.rename(root / "docs/mod0.py", root / "src/pkg/mod0.py")
    assert read(root / "src/pkg/mod0.py") == read(sample_base / "src/pkg/mod0.py")
    assert rec.do("missing", os.rename, root / "nope", root / "nope2") == "ENOENT"
    assert rec.do("into missing dir", os.rename, root / "t2", root / "nodir/t2") == "ENOENT"
    rec("tree", snapshot(root))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_rename_directories(root, sample_base, rec, remount):
    base_pkg = snapshot(sample_base / "src/pkg")
    dfd = os.open(root / "src/pkg/sub", os.O_RDONLY | os.O_DIRECTORY)
    mtimes = {p: os.lstat(sample_base / "src/pkg" / p).st_mtime_ns for p in base_pkg[0]
              if not os.path.isdir(sample_base / "src/pkg" / p)}
    # a base-only directory, across dirs: never EXDEV, contents intact
    assert rec.do("rename base dir", os.rename, root / "src/pkg", root / "pkg2") == "ok"
    assert rec.do("old", os.stat, root / "src/pkg") == "ENOENT"
    assert not diff(snapshot(root / "pkg2"), base_pkg), diff(snapshot(root / "pkg2"), base_pkg)
    rec("moved subdir mtime", os.lstat(root / "pkg2/sub").st_mtime_ns)  # the same as in the base
    try:  # a directory fd opened before the rename follows the directory
        assert os.listdir(dfd) == ["deep.txt"]
        write_fd = os.open("via-fd", os.O_WRONLY | os.O_CREAT | O_NF, 0o644, dir_fd=dfd)
        os.close(write_fd)
        assert sorted(os.listdir(root / "pkg2/sub")) == ["deep.txt", "via-fd"]
        os.unlink("via-fd", dir_fd=dfd)
    finally:
        os.close(dfd)
    got = {p: os.lstat(root / "pkg2" / p).st_mtime_ns for p in mtimes}
    assert got == mtimes, "file mtimes changed by the directory rename"
    assert rec.do("symlink into the moved dir", os.stat, root / "src/link-to-mod1") == "ENOENT"
    # and back into place, under a new name
    os.rename(root / "pkg2", root / "src/pkg-again")
    assert not diff(snapshot(root / "src/pkg-again"), base_pkg)
    # within a dir
    os.rename(root / "src/pkg-again/sub", root / "src/pkg-again/sub2")
    assert os.listdir(root / "src/pkg-again/sub2") == ["deep.txt"]
    # a dir made in the layer
    os.makedirs(root / "n1/n2")
    write(root / "n1/n2/f", b"f")
    os.rename(root / "n1", root / "docs/n1")
    assert read(root / "docs/n1/n2/f") == b"f"
    # a dir holding hard links
    os.rename(root / "docs", root / "docs-moved")
    assert os.stat(root / "docs-moved/a.md").st_ino == os.stat(root / "docs-moved/a-link.md").st_ino
    assert os.stat(root / "docs-moved").st_uid == 1000
    # onto an empty dir (from the base)
    os.rename(root / "src/pkg-again/sub2", root / "empty")
    assert os.listdir(root / "empty") == ["deep.txt"]
    assert read(root / "empty/deep.txt") == read(sample_base / "src/pkg/sub/deep.txt")
    # onto an empty dir made in the layer
    os.mkdir(root / "e2")
    os.rename(root / "empty", root / "e2")
    assert os.listdir(root / "e2") == ["deep.txt"]
    # a base dir onto a dir emptied in the view
    for f in os.listdir(root / "src/pkg-again"):
        os.unlink(root / "src/pkg-again" / f)
    os.rename(root / "docs-moved", root / "src/pkg-again")
    assert sorted(os.listdir(root / "src/pkg-again")) == ["a-link.md", "a.md", "n1"]
    # a renamed dir can be renamed again and written in
    write(root / "src/pkg-again/n1/n2/g", b"g")
    # a base dir holding one name of a hard-link pair whose other name stays outside
    os.rename(root / "src", root / "src-moved")
    assert os.stat(root / "src-moved/README.hard").st_ino == os.stat(root / "README").st_ino
    assert os.stat(root / "README").st_nlink == 2
    append(root / "README", b"more\n")
    assert read(root / "src-moved/README.hard") == b"sample base\nmore\n"
    assert os.readlink(root / "src-moved/abs-link") == "/nonexistent/overlayd-outside"
    rec("tree", snapshot(root))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_rename_errors(root, rec):
    os.mkdir(root / "newdir")
    write(root / "newdir/f", b"f")
    os.mkdir(root / "emptynew")
    checks = [
        ("dir onto non-empty dir", root / "empty", root / "src", "ENOTEMPTY"),
        ("dir onto non-empty base dir", root / "emptynew", root / "docs", "ENOTEMPTY"),
        ("dir onto non-empty new dir", root / "empty", root / "newdir", "ENOTEMPTY"),
        ("file onto dir", root / "README", root / "empty", "EISDIR"),
        ("new file onto dir", root / "newdir/f", root / "src", "EISDIR"),
        ("dir onto file", root / "empty", root / "README", "ENOTDIR"),
        ("new dir onto file", root / "emptynew", root / "newdir/f", "ENOTDIR"),
        ("dir onto symlink", root / "empty", root / "dangling", "ENOTDIR"),
        ("dir into own subdir", root / "src", root / "src/pkg/inside", "EINVAL"),
        ("dir into itself", root / "src", root / "src/inside", "EINVAL"),
        ("new dir into own subdir", root / "newdir", root / "newdir/x", "EINVAL"),
        ("under a file", root / "README", root / "src/README.hard/x", "ENOTDIR"),
    ]
    for label, a, b, want in checks:
        got = rec.do(label, os.rename, a, b)
        assert got == want, f"{label}: {got} (expected {want})"
    # nothing moved
    rec("tree", snapshot(root))
    assert sorted(os.listdir(root / "src")) == ["README.hard", "abs-link", "link-to-mod1", "pkg"]
    rec.agree()


def test_renameat2_noreplace(root, rec, remount):
    assert rec.do("file onto base file", renameat2, root / "README", root / "docs/a.md", RENAME_NOREPLACE) == "EEXIST"
    assert rec.do("file onto new file", renameat2, root / "README", root / "big.bin", RENAME_NOREPLACE) == "EEXIST"
    write(root / "x", b"x")
    assert rec.do("new onto base", renameat2, root / "x", root / "README", RENAME_NOREPLACE) == "EEXIST"
    assert rec.do("dir onto dir", renameat2, root / "empty", root / "docs", RENAME_NOREPLACE) == "EEXIST"
    assert rec.do("dir onto empty dir", renameat2, root / "src/pkg/sub", root / "empty", RENAME_NOREPLACE) == "EEXIST"
    assert rec.do("file onto symlink", renameat2, root / "x", root / "dangling", RENAME_NOREPLACE) == "EEXIST"
    assert read(root / "x") == b"x" and read(root / "README") == b"sample base\n"
    assert rec.do("file to free name", renameat2, root / "README", root / "docs/R", RENAME_NOREPLACE) == "ok"
    assert read(root / "docs/R") == b"sample base\n"
    assert os.stat(root / "docs/R").st_ino == os.stat(root / "src/README.hard").st_ino
    assert rec.do("dir to free name", renameat2, root / "src/pkg", root / "docs/pkg", RENAME_NOREPLACE) == "ok"
    assert len(os.listdir(root / "docs/pkg")) == 21
    assert rec.do("missing", renameat2, root / "nope", root / "nope2", RENAME_NOREPLACE) == "ENOENT"
    # a name freed by unlink can be taken with NOREPLACE
    os.unlink(root / "big.bin")
    assert rec.do("onto deleted base name", renameat2, root / "x", root / "big.bin", RENAME_NOREPLACE) == "ok"
    assert read(root / "big.bin") == b"x"
    rec("tree", snapshot(root))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_renameat2_exchange(root, sample_base, rec, remount):
    base_readme = read(sample_base / "README")
    # two base files, one of them hard-linked
    assert rec.do("exchange files", renameat2, root / "README", root / "docs/a.md", RENAME_EXCHANGE) == "ok"
    assert read(root / "README") == b"# a\n"
    assert read(root / "docs/a.md") == base_readme
    assert read(root / "src/README.hard") == base_readme
    assert read(root / "docs/a-link.md") == b"# a\n"
    assert os.stat(root / "README").st_ino == os.stat(root / "docs/a-link.md").st_ino
    assert os.stat(root / "docs/a.md").st_ino == os.stat(root / "src/README.hard").st_ino
    assert xattrs(root / "README") == [("user.colour", b"blue")]
    # a new file with a base file
    write(root / "n", b"new")
    assert rec.do("exchange new/base", renameat2, root / "n", root / "src/pkg/mod2.py", RENAME_EXCHANGE) == "ok"
    assert read(root / "src/pkg/mod2.py") == b"new"
    assert read(root / "n") == read(sample_base / "src/pkg/mod2.py")
    # two base dirs
    assert rec.do("exchange dirs", renameat2, root / "src/pkg", root / "docs", RENAME_EXCHANGE) == "ok"
    assert sorted(os.listdir(root / "src/pkg")) == ["a-link.md", "a.md"]
    assert len(os.listdir(root / "docs")) == 21
    assert os.stat(root / "src/pkg").st_uid == 1000
    assert read(root / "docs/sub/deep.txt") == read(sample_base / "src/pkg/sub/deep.txt")
    # a dir with a file
    assert rec.do("exchange dir/file", renameat2, root / "empty", root / "n", RENAME_EXCHANGE) == "ok"
    assert kind(root / "empty") == "file" and kind(root / "n") == "dir"
    assert rec.do("exchange with missing", renameat2, root / "n", root / "missing", RENAME_EXCHANGE) == "ENOENT"
    assert rec.do("exchange into own subdir", renameat2, root / "docs", root / "docs/sub", RENAME_EXCHANGE) == "EINVAL"
    assert rec.do("exchange both flags", renameat2, root / "n", root / "empty",
                  RENAME_EXCHANGE | RENAME_NOREPLACE) == "EINVAL"
    # exchange, then exchange back
    renameat2(root / "README", root / "big.bin", RENAME_EXCHANGE)
    renameat2(root / "README", root / "big.bin", RENAME_EXCHANGE)
    assert read(root / "README") == b"# a\n"
    assert read(root / "big.bin") == read(sample_base / "big.bin")
    rec("tree", snapshot(root))
    assert_same_after_remount(root, remount)
    rec.agree()


# ---------------------------------------------------------------------------------- attributes


def test_chmod_chown_utime(root, rec, remount):
    os.chmod(root / "README", 0o600)
    assert stat.S_IMODE(os.stat(root / "README").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "src/README.hard").st_mode) == 0o600
    os.chmod(root / "src", 0o700)
    assert stat.S_IMODE(os.stat(root / "src").st_mode) == 0o700
    assert read(root / "src/pkg/mod0.py").startswith(b"def f0")
    os.chmod(root / "src/pkg/mod1.py", 0o4755)
    assert stat.S_IMODE(os.stat(root / "src/pkg/mod1.py").st_mode) == 0o4755
    os.chmod(root / "fifo", 0o600)
    assert stat.S_IMODE(os.lstat(root / "fifo").st_mode) == 0o600
    os.chmod(root / "src/link-to-mod1", 0o640)  # follows the link
    assert stat.S_IMODE(os.stat(root / "src/pkg/mod1.py").st_mode) == 0o640

    os.chown(root / "README", 1000, 1000)
    assert (os.stat(root / "src/README.hard").st_uid, os.stat(root / "src/README.hard").st_gid) == (1000, 1000)
    os.chown(root / "src", 1000, 1000)
    assert os.stat(root / "src").st_uid == 1000
    assert os.stat(root / "src/pkg").st_uid == 0
    os.chown(root / "src/pkg/mod2.py", -1, 1000)
    assert (os.stat(root / "src/pkg/mod2.py").st_uid, os.stat(root / "src/pkg/mod2.py").st_gid) == (0, 1000)
    os.chown(root / "src/abs-link", 1000, 1000, follow_symlinks=False)  # the link, not its target
    assert os.lstat(root / "src/abs-link").st_uid == 1000
    os.chown(root / "docs", 0, 0)
    assert os.stat(root / "docs").st_uid == 0

    t_a, t_m = 1_111_111_111_123_456_789, 1_234_567_890_987_654_321
    for rel in ("src/pkg/mod3.py", "docs", "src/pkg/sub/deep.txt", "fifo"):
        os.utime(root / rel, ns=(t_a, t_m))
        st = os.stat(root / rel)
        assert (st.st_atime_ns, st.st_mtime_ns) == (t_a, t_m), rel
    os.utime(root / "dangling", ns=(t_a, t_m + 1), follow_symlinks=False)
    assert os.lstat(root / "dangling").st_mtime_ns == t_m + 1
    # utime on an open fd of a new file
    write(root / "new", b"abc")
    fd = os.open(root / "new", os.O_RDWR | O_NF)
    try:
        os.utime(fd, ns=(t_a + 1, t_m + 2))
        assert os.fstat(fd).st_mtime_ns == t_m + 2
    finally:
        os.close(fd)
    assert os.stat(root / "new").st_mtime_ns == t_m + 2
    rec("meta", {rel: meta(root / rel) for rel in ("README", "src", "src/pkg/mod1.py", "src/pkg/mod2.py",
                                                   "src/pkg/mod3.py", "docs", "fifo", "dangling",
                                                   "src/abs-link", "src/README.hard")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_truncate(root, sample_base, rec, remount):
    data = read(sample_base / "src/pkg/mod9.py")
    os.truncate(root / "src/pkg/mod9.py", 10000)  # by path, grow
    assert read(root / "src/pkg/mod9.py") == data + b"\0" * (10000 - len(data))
    os.truncate(root / "src/pkg/mod9.py", 5)  # shrink
    assert read(root / "src/pkg/mod9.py") == data[:5]
    big = read(sample_base / "big.bin")
    fd = os.open(root / "big.bin", os.O_RDWR | O_NF)
    try:
        os.ftruncate(fd, 100)
        assert os.fstat(fd).st_size == 100
        assert os.pread(fd, 200, 0) == big[:100]
        os.ftruncate(fd, 5 << 20)
        assert os.fstat(fd).st_size == 5 << 20
        assert os.pread(fd, 10, 4 << 20) == b"\0" * 10
        assert os.pread(fd, 10, 95) == big[95:100] + b"\0" * 5
    finally:
        os.close(fd)
    assert os.stat(root / "big.bin").st_size == 5 << 20
    os.truncate(root / "src/pkg/sub/deep.txt", 0)
    assert os.stat(root / "src/pkg/sub/deep.txt").st_size == 0
    os.truncate(root / "docs/a-link.md", 2)
    assert read(root / "docs/a.md") == b"# "
    fd = os.open(root / "src/pkg/mod10.py", os.O_RDWR | O_NF)
    try:
        os.posix_fallocate(fd, 0, 100000)  # glibc emulates it where fallocate(2) is not supported
        assert os.fstat(fd).st_size == 100000
    finally:
        os.close(fd)
    assert read(root / "src/pkg/mod10.py")[:6] == b"def f1"
    assert rec.do("truncate dir", os.truncate, root / "src", 0) == "EISDIR"
    assert rec.do("truncate missing", os.truncate, root / "nope", 0) == "ENOENT"
    assert rec.do("negative", os.truncate, root / "README", -1) == "EINVAL"
    fd = os.open(root / "README", os.O_RDONLY | O_NF)
    try:
        assert rec.do("ftruncate read-only fd", os.ftruncate, fd, 0) == "EINVAL"
    finally:
        os.close(fd)
    rec("sizes", {p: os.stat(root / p).st_size for p in ("src/pkg/mod9.py", "big.bin", "src/pkg/sub/deep.txt",
                                                          "docs/a.md", "README")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_xattrs(root, sample_base, rec, remount):
    assert xattrs(root / "docs/a.md") == [("user.colour", b"blue")]
    os.setxattr(root / "README", "user.one", b"1")
    os.setxattr(root / "README", "user.two", b"\0binary\xff")
    assert os.getxattr(root / "README", "user.two") == b"\0binary\xff"
    assert sorted(x for x in os.listxattr(root / "README") if x.startswith("user.")) == ["user.one", "user.two"]
    assert os.getxattr(root / "src/README.hard", "user.one") == b"1"
    assert read(root / "README") == b"sample base\n"
    os.setxattr(root / "src/pkg", "user.dir", b"d")
    assert os.getxattr(root / "src/pkg", "user.dir") == b"d"
    assert len(os.listdir(root / "src/pkg")) == 21
    os.setxattr(root / "docs/a.md", "user.size", b"L")  # copy-up keeps the existing one
    assert xattrs(root / "docs/a-link.md") == [("user.colour", b"blue"), ("user.size", b"L")]
    os.removexattr(root / "docs/a.md", "user.colour")
    assert xattrs(root / "docs/a-link.md") == [("user.size", b"L")]
    os.setxattr(root / "README", "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(root / "README", "user.one") == b"replaced"
    os.setxattr(root / "README", "user.empty", b"")
    assert os.getxattr(root / "README", "user.empty") == b""
    os.removexattr(root / "README", "user.one")
    assert rec.do("get removed", os.getxattr, root / "README", "user.one") == "ENODATA"
    assert rec.do("remove missing", os.removexattr, root / "README", "user.one") == "ENODATA"
    assert rec.do("get missing on base", os.getxattr, root / "src/pkg/mod1.py", "user.nope") == "ENODATA"
    assert rec.do("create existing", os.setxattr, root / "README", "user.two", b"x", os.XATTR_CREATE) == "EEXIST"
    assert rec.do("replace missing", os.setxattr, root / "README", "user.zz", b"x", os.XATTR_REPLACE) == "ENODATA"
    assert rec.do("user xattr on symlink", os.setxattr, root / "dangling", "user.x", b"x",
                  follow_symlinks=False) == "EPERM"
    assert rec.do("list symlink", os.listxattr, root / "dangling", follow_symlinks=False) == []
    assert rec.do("trusted on symlink", os.setxattr, root / "dangling", "trusted.x", b"t",
                  follow_symlinks=False) == "ok"
    assert rec.do("get trusted on symlink", os.getxattr, root / "dangling", "trusted.x",
                  follow_symlinks=False) == b"t"
    assert rec.do("list trusted on symlink", os.listxattr, root / "dangling", follow_symlinks=False) == ["trusted.x"]
    assert rec.do("trusted on file", os.setxattr, root / "src/pkg/mod1.py", "trusted.y", b"u") == "ok"
    assert os.getxattr(root / "src/pkg/mod1.py", "trusted.y") == b"u"
    assert rec.do("on missing", os.setxattr, root / "nope", "user.x", b"x") == "ENOENT"
    assert rec.do("on fifo", os.setxattr, root / "fifo", "user.x", b"x") == "EPERM"
    assert rec.do("bad namespace", os.setxattr, root / "README", "bogus.x", b"x") == "ENOTSUP"
    # on a new file, and via an fd
    write(root / "new", b"n")
    fd = os.open(root / "new", os.O_RDONLY | O_NF)
    try:
        os.setxattr(fd, "user.fd", b"via fd")
        assert os.getxattr(fd, "user.fd") == b"via fd"
    finally:
        os.close(fd)
    assert os.getxattr(root / "new", "user.fd") == b"via fd"
    # a larger value
    os.setxattr(root / "new", "user.big", b"v" * 4000)
    assert os.getxattr(root / "new", "user.big") == b"v" * 4000
    assert xattrs(sample_base / "docs/a.md") == [("user.colour", b"blue")]
    assert xattrs(sample_base / "README") == []
    rec("all", {p: xattrs(root / p) for p in ("README", "src/pkg", "docs/a.md", "new", "src/README.hard")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_statvfs(root, rec):
    sv = os.statvfs(root)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_blocks > 0
    rec("namemax", sv.f_namemax)
    rec.agree()


def test_private_xattrs_hidden(ws):
    """user.overlayd.* belongs to the daemon (opaque dirs): refused for writing, never shown."""
    mp = ws.mp
    for target in (mp / "README", mp / "src"):
        for name in ("user.overlayd.opaque", "user.overlayd.other"):
            with pytest.raises(OSError):
                os.setxattr(target, name, b"y")
            with pytest.raises(OSError) as ei:
                os.getxattr(target, name)
            assert ei.value.errno == errno.ENODATA
    # directories the daemon marks opaque: rm -rf + mkdir, and a rename over a base dir
    shutil.rmtree(mp / "src")
    os.mkdir(mp / "src")
    os.rename(mp / "docs", mp / "empty")
    for d in (mp / "src", mp / "empty"):
        names = os.listxattr(d)
        assert not [n for n in names if n.startswith("user.overlayd.")], names
        with pytest.raises(OSError) as ei:
            os.getxattr(d, "user.overlayd.opaque")
        assert ei.value.errno == errno.ENODATA
        with pytest.raises(OSError):
            os.removexattr(d, "user.overlayd.opaque")
    assert os.listdir(mp / "src") == [], "removing the opaque marker made the base show through"
    assert sorted(os.listdir(mp / "empty")) == ["a-link.md", "a.md"]
    with pytest.raises(OSError):
        os.setxattr(mp / "empty", "user.overlayd.opaque", b"n")
    assert sorted(os.listdir(mp / "empty")) == ["a-link.md", "a.md"]
    assert os.statvfs(mp).f_namemax == 255


# ---------------------------------------------------------------------------------- open files


def test_unlinked_open_file(root, sample_base, rec):
    # a file made in the layer
    fd = os.open(_inside(root / "tmpfile"), os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NF, 0o600)
    try:
        os.write(fd, b"before ")
        os.unlink(root / "tmpfile")
        assert kind(root / "tmpfile") == "ENOENT"
        os.write(fd, b"after")
        assert os.pread(fd, 100, 0) == b"before after"
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 12
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
        rec("new", (os.pread(fd, 100, 0), st.st_nlink))
        # the name can be reused meanwhile
        write(root / "tmpfile", b"other")
        assert os.pread(fd, 100, 0) == b"bef"
        assert read(root / "tmpfile") == b"other"
    finally:
        os.close(fd)
    # a base file opened for writing, then unlinked
    base = read(sample_base / "src/pkg/mod2.py")
    fd = os.open(root / "src/pkg/mod2.py", os.O_RDWR | O_NF)
    try:
        os.unlink(root / "src/pkg/mod2.py")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100000, 0) == base
        os.pwrite(fd, b"XX", 0)
        assert os.pread(fd, 4, 0) == b"XX" + base[2:4]
        rec("base rw", os.fstat(fd).st_nlink)
    finally:
        os.close(fd)
    # a base file opened read-only, then unlinked
    fd = os.open(root / "src/pkg/sub/deep.txt", os.O_RDONLY | O_NF)
    try:
        os.unlink(root / "src/pkg/sub/deep.txt")
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert os.pread(fd, 1 << 20, 0) == read(sample_base / "src/pkg/sub/deep.txt")
        rec("base ro", (st.st_nlink, st.st_size))
    finally:
        os.close(fd)
    # one name of a hard-linked pair: the file keeps one link
    fd = os.open(root / "docs/a.md", os.O_RDONLY | O_NF)
    try:
        os.unlink(root / "docs/a.md")
        assert os.fstat(fd).st_nlink == 1
        rec("pair", os.fstat(fd).st_nlink)
    finally:
        os.close(fd)
    assert "mod2.py" not in os.listdir(root / "src/pkg")
    # attribute changes through the fd of an unlinked file (fchmod, fchown, futimens), and a
    # second open of it through /proc/self/fd
    fd = os.open(_inside(root / "tmp2"), os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NF, 0o600)
    try:
        os.write(fd, b"still here")
        os.unlink(root / "tmp2")

        def reopen():
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                return os.read(fd2, 100)
            finally:
                os.close(fd2)

        res = [rec("fchmod", outcome(os.fchmod, fd, 0o640)),
               rec("fchown", outcome(os.fchown, fd, 1000, 1000)),
               rec("futimens", outcome(os.utime, fd, ns=(5, 6))),
               rec("reopen via /proc/self/fd", outcome(reopen))]
        assert res == ["ok", "ok", "ok", b"still here"], \
            f"fchmod, fchown, futimens, reopen via /proc/self/fd on an unlinked open file: {res}"
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, st.st_nlink) == (0o640, 1000, 6, 0)
    finally:
        os.close(fd)
    rec.agree()


# ---------------------------------------------------------------------------------- name limits


def test_name_length_limits(root, rec, remount):
    for n, ok in ((N256, False), (N255, True)):
        want = "ok" if ok else "ENAMETOOLONG"
        tag = len(n)
        assert rec.do(f"{tag} create", touch_open, root / n, os.O_CREAT | os.O_WRONLY) == want
        assert rec.do(f"{tag} mkdir", os.mkdir, root / "docs" / n) == want
        assert rec.do(f"{tag} symlink", os.symlink, "target", root / "src" / n) == want
        assert rec.do(f"{tag} link", os.link, root / "README", root / "src/pkg" / n) == want
        assert rec.do(f"{tag} rename", os.rename, root / "big.bin", root / "empty" / n) == want
        assert rec.do(f"{tag} stat", lambda p: os.stat(p) and None, root / n) == want
        assert rec.do(f"{tag} lstat in dir", lambda p: os.lstat(p) and None, root / "empty" / n) == want
        assert rec.do(f"{tag} rename from", os.rename, root / "src/pkg" / n, root / "src/pkg/short") == (
            "ok" if ok else "ENAMETOOLONG")
        assert rec.do(f"{tag} mkfifo", os.mkfifo, root / "src/pkg/sub" / n) == want
        assert rec.do(f"{tag} unlink", os.unlink, root / "src/pkg/sub" / n) == want
        assert rec.do(f"{tag} setxattr", os.setxattr, root / n, "user.a", b"1") == ("ok" if ok else "ENAMETOOLONG")
    assert N255 in os.listdir(root)
    assert kind(root / "docs" / N255) == "dir"
    assert os.readlink(root / "src" / N255) == "target"
    assert read(root / "empty" / N255) != b""
    assert os.stat(root / "src/pkg/short").st_ino == os.stat(root / "README").st_ino
    os.rename(root / N255, root / "docs" / N255 / ("m" * 255))
    assert kind(root / "docs" / N255 / ("m" * 255)) == "file"
    assert rec.do("256 in readlink target ok", os.symlink, N256, root / "s256") == "ok"
    assert os.readlink(root / "s256") == N256
    rec("listing", sorted(os.listdir(root)))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_path_near_path_max(root, rec):
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fds = []
    try:
        fd = rootfd
        rel = ""
        level = 0
        while len(rel) + 201 <= 3900:
            name = f"{level:02d}" + "d" * 198
            os.mkdir(name, 0o755, dir_fd=fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | O_NF, dir_fd=fd)
            fds.append(fd)
            rel += name + "/"
            level += 1
        fname = "f" * (4000 - len(rel))
        rel_file = rel + fname
        assert len(rel_file) == 4000
        ffd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NF, 0o644, dir_fd=fd)
        try:
            os.write(ffd, b"at the bottom")
        finally:
            os.close(ffd)
        # the whole 4000-byte relative path resolves from the root
        ffd = os.open(rel_file, os.O_RDONLY | O_NF, dir_fd=rootfd)
        try:
            assert os.read(ffd, 100) == b"at the bottom"
        finally:
            os.close(ffd)
        st = os.stat(rel_file, dir_fd=rootfd, follow_symlinks=False)
        rec("file", (level, len(rel_file), st.st_size, stat.S_ISREG(st.st_mode)))
        # one more level than PATH_MAX allows as a path; fine through fds
        deeper = "x" * 200
        os.mkdir(deeper, dir_fd=fd)
        assert rec.do("path over PATH_MAX", os.stat, rel + deeper + "/" + "y" * 100,
                      dir_fd=rootfd) == "ENAMETOOLONG"
        dfd = os.open(deeper, os.O_RDONLY | os.O_DIRECTORY | O_NF, dir_fd=fd)
        fds.append(dfd)
        write_at = os.open("y", os.O_WRONLY | os.O_CREAT | O_NF, 0o644, dir_fd=dfd)
        os.close(write_at)
        assert os.listdir(dfd) == ["y"]
        # with chdir: cwd deep inside, relative names
        with contextlib.chdir(f"/proc/self/fd/{dfd}"):
            write("z", b"zz")
            assert read("z") == b"zz"
            assert sorted(os.listdir(".")) == ["y", "z"]
            assert rec.do("dotdot walk", lambda: sorted(os.listdir("../.."))[:1]) == [f"{level - 1:02d}" + "d" * 198]
        # rename the top of the deep tree and find the file again
        top = "00" + "d" * 198
        os.rename(top, "renamed", src_dir_fd=rootfd, dst_dir_fd=rootfd)
        st = os.stat("renamed" + rel_file[len(top):], dir_fd=rootfd)
        rec("after rename", st.st_size)
        shutil.rmtree(os.path.join(root, "renamed"))
        assert rec.do("gone", os.stat, "renamed", dir_fd=rootfd) == "ENOENT"
    finally:
        for f in fds:
            os.close(f)
        os.close(rootfd)
    rec.agree()


# ---------------------------------------------------------------------------------- ownership


def test_new_entries_get_caller_ids_and_umask(root, rec, remount):
    os.mkdir(root / "pub")
    os.chmod(root / "pub", 0o777)

    def create():
        out = {}
        out["file"] = outcome(touch_open, "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        out["exec file"] = outcome(touch_open, "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777)
        out["dir"] = outcome(os.mkdir, "d", 0o777)
        out["fifo"] = outcome(os.mkfifo, "p", 0o666)
        out["symlink"] = outcome(os.symlink, "f", "l")
        out["socket"] = outcome(bind_socket, "s")
        out["write own"] = outcome(write, "f", b"mine", os.O_WRONLY)
        out["chmod own"] = outcome(os.chmod, "f", 0o600)
        out["mkdir nested"] = outcome(os.mkdir, "d/e", 0o755)
        return out

    res = run_as(root / "pub", create, umask=0o027)
    assert res == {k: "ok" for k in res}, res
    want = {"f": (1000, 1000, 0o600), "x": (1000, 1000, 0o750), "d": (1000, 1000, 0o750),
            "p": (1000, 1000, 0o640), "s": (1000, 1000, 0o750), "d/e": (1000, 1000, 0o750)}
    for rel, (uid, gid, mode) in want.items():
        st = os.lstat(root / "pub" / rel)
        assert (st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))) == (uid, gid, oct(mode)), rel
    st = os.lstat(root / "pub/l")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (kind(root / "pub/f"), kind(root / "pub/d"), kind(root / "pub/p"), kind(root / "pub/l"),
            kind(root / "pub/s")) == ("file", "dir", "fifo", "symlink", "socket")
    assert read(root / "pub/f") == b"mine"
    rec("entries", {rel: meta(root / "pub" / rel, nlink=False) | {"mtime": None}
                    for rel in ("f", "x", "d", "p", "l", "s", "d/e")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_setgid_directory(root, rec, remount):
    os.mkdir(root / "sg")
    os.chown(root / "sg", 0, 1234)
    os.chmod(root / "sg", 0o2777)
    assert stat.S_IMODE(os.stat(root / "sg").st_mode) == 0o2777

    def create():
        return [outcome(touch_open, "f", os.O_WRONLY | os.O_CREAT, 0o644),
                outcome(os.mkdir, "d", 0o755),
                outcome(os.mkfifo, "p", 0o644),
                outcome(os.mkdir, "d/nested", 0o755)]

    assert run_as(root / "sg", create, umask=0o022) == ["ok"] * 4
    write(root / "sg/rootfile", b"r")
    os.mkdir(root / "sg/rootdir", 0o755)
    for rel in ("f", "p", "rootfile"):
        st = os.lstat(root / "sg" / rel)
        assert st.st_gid == 1234, f"{rel}: gid {st.st_gid}"
        assert not st.st_mode & stat.S_ISGID, rel
    for rel in ("d", "rootdir", "d/nested"):
        st = os.lstat(root / "sg" / rel)
        assert st.st_gid == 1234, f"{rel}: gid {st.st_gid}"
        assert st.st_mode & stat.S_ISGID, f"{rel}: no setgid bit ({oct(st.st_mode)})"
    assert os.lstat(root / "sg/f").st_uid == 1000
    # a setgid base directory (copied up): made so in the layer, then used
    os.chown(root / "src", 0, 1234)
    os.chmod(root / "src", 0o2755)
    os.mkdir(root / "src/newdir")
    st = os.stat(root / "src/newdir")
    assert (st.st_gid, bool(st.st_mode & stat.S_ISGID)) == (1234, True)
    rec("entries", {rel: meta(root / "sg" / rel, nlink=False) | {"mtime": None}
                    for rel in ("f", "d", "p", "d/nested", "rootfile", "rootdir")})
    assert_same_after_remount(root, remount)
    rec.agree()


def test_permissions_enforced(root, rec):
    """default_permissions: the kernel checks modes and owners for an unprivileged caller."""
    def attempts():
        out = {}
        out["read root file"] = outcome(lambda: read("README") and None)
        out["write root file"] = outcome(touch_open, "README", os.O_WRONLY)
        out["write root file in user dir"] = outcome(touch_open, "docs/a.md", os.O_WRONLY)
        out["append"] = outcome(touch_open, "src/pkg/mod0.py", os.O_WRONLY | os.O_APPEND)
        out["truncate"] = outcome(os.truncate, "README", 0)
        out["create in root dir"] = outcome(touch_open, "src/new", os.O_WRONLY | os.O_CREAT)
        out["mkdir in root dir"] = outcome(os.mkdir, "src/newdir")
        out["unlink in root dir"] = outcome(os.unlink, "src/pkg/mod0.py")
        out["rename in root dir"] = outcome(os.rename, "README", "README2")
        out["chmod root file"] = outcome(os.chmod, "README", 0o666)
        out["chown root file"] = outcome(os.chown, "README", 1000, 1000)
        out["utime root file"] = outcome(os.utime, "README", (1, 1))
        out["utime now root file"] = outcome(os.utime, "README")
        out["setxattr root file"] = outcome(os.setxattr, "README", "user.x", b"x")
        out["create in user dir"] = outcome(touch_open, "docs/mine", os.O_WRONLY | os.O_CREAT, 0o600)
        out["unlink root file in user dir"] = outcome(os.unlink, "docs/a-link.md")
        out["read private"] = outcome(lambda: read("src/pkg/private") and None)
        out["list private dir"] = outcome(os.listdir, "src/closed")
        out["enter private dir"] = outcome(os.stat, "src/closed/x")
        out["create in sticky dir"] = outcome(touch_open, "sticky/mine", os.O_WRONLY | os.O_CREAT)
        out["unlink own in sticky dir"] = outcome(os.unlink, "sticky/mine")
        out["unlink other in sticky dir"] = outcome(os.unlink, "sticky/rootfile")
        out["rename other in sticky dir"] = outcome(os.rename, "sticky/rootfile", "sticky/moved")
        return out

    os.mkdir(root / "sticky")
    os.chmod(root / "sticky", 0o1777)
    write(root / "sticky/rootfile", b"r")
    write(root / "src/pkg/private", b"secret", mode=0o600)
    os.chmod(root / "src/pkg/private", 0o600)
    os.mkdir(root / "src/closed", 0o700)
    write(root / "src/closed/x", b"x")
    res = run_as(root, attempts)
    want = {"read root file": "ok", "write root file": "EACCES", "write root file in user dir": "EACCES",
            "append": "EACCES", "truncate": "EACCES", "create in root dir": "EACCES",
            "mkdir in root dir": "EACCES", "unlink in root dir": "EACCES", "rename in root dir": "EACCES",
            "chmod root file": "EPERM", "chown root file": "EPERM", "utime root file": "EPERM",
            "utime now root file": "EACCES", "setxattr root file": "EACCES", "create in user dir": "ok",
            "unlink root file in user dir": "ok", "read private": "EACCES", "list private dir": "EACCES",
            "enter private dir": "EACCES", "create in sticky dir": "ok", "unlink own in sticky dir": "ok",
            "unlink other in sticky dir": "EPERM", "rename other in sticky dir": "EPERM"}
    assert res == want
    rec("attempts", res)
    assert read(root / "README") == b"sample base\n"
    assert os.stat(root / "docs/mine").st_uid == 1000
    assert kind(root / "docs/a-link.md") == "ENOENT"
    assert os.stat(root / "docs/a.md").st_nlink == 1
    rec.agree()


def test_setuid_bits_cleared(root, rec):
    """chown clears set-user-ID; a write by an unprivileged owner clears it too."""
    os.chmod(root / "src/pkg/mod1.py", 0o6755)
    os.chown(root / "src/pkg/mod1.py", 1000, 1000)
    mode = rec("after chown", oct(stat.S_IMODE(os.stat(root / "src/pkg/mod1.py").st_mode)))
    assert not int(mode, 8) & stat.S_ISUID, mode
    os.mkdir(root / "pub")
    os.chmod(root / "pub", 0o777)

    def user():
        touch_open("f", os.O_WRONLY | os.O_CREAT, 0o755)
        os.chmod("f", 0o4755)
        before = oct(stat.S_IMODE(os.stat("f").st_mode))
        write("f", b"data", os.O_WRONLY)
        return before, oct(stat.S_IMODE(os.stat("f").st_mode))

    before, after = rec("user write", run_as(root / "pub", user))
    assert before == "0o4755"
    assert after == "0o755"
    os.chown(root / "pub/f", 1000, 1234)  # a group the user is not in

    def user_chmod():
        os.chmod("f", 0o2755)
        return oct(stat.S_IMODE(os.stat("f").st_mode))

    assert rec("chmod g+s by a non-member", run_as(root / "pub", user_chmod)) == "0o755"
    rec.agree()


def test_odd_names(root, rec, remount):
    names = [b"with\nnewline", b"\xff\xfe not utf-8", b" leading space", b"-dash", b"tab\there", b"..dots",
             b"\xc3\xa9t\xc3\xa9", b"*?[glob]", b"back\\slash"]
    d = os.fsencode(root / "src")
    for n in names:
        write(d + b"/" + n, n)
    for n in names:
        assert read(d + b"/" + n) == n
    listed = set(os.listdir(d))
    assert set(names) <= listed
    for n in names:
        os.rename(d + b"/" + n, d + b"/pkg/" + n + b".moved")
    assert {n + b".moved" for n in names} <= set(os.listdir(d + b"/pkg"))
    for n in names:
        os.mkdir(d + b"/" + n)
        os.unlink(d + b"/pkg/" + n + b".moved")
    rec("listing", sorted(os.listdir(d)))
    rec("pkg", sorted(os.listdir(d + b"/pkg")))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_readdir_inodes_match_stat(root, rec):
    """d_ino from readdir is what stat says (ls -i, find -inum, du depend on it)."""
    write(root / "src/new", b"n")
    os.link(root / "README", root / "src/pkg/readme-link")
    os.rename(root / "docs/a.md", root / "docs/a-renamed.md")
    mismatches = []
    for dirpath, dirnames, filenames in os.walk(root):
        with os.scandir(dirpath) as it:
            for de in it:
                if de.inode() != os.lstat(de.path).st_ino:
                    mismatches.append(os.path.relpath(de.path, root))
    assert not mismatches
    assert os.stat(root / "src/pkg/readme-link").st_ino == os.stat(root / "src/README.hard").st_ino
    rec("ok", True)
    rec.agree()


# ---------------------------------------------------------------------------------- re-typing


def test_retype_names_repeatedly(root, rec, remount):
    """Delete a name and create it as another type, many times, on one long-lived mount."""
    cycle = ["file", "fifo", "socket", "dir", "file"]
    names = ["fresh", "README.hard", "link-to-mod1", "pkg"]  # new, hard-linked base file, base symlink, base dir

    def remove(name):
        if kind(name) == "dir":
            shutil.rmtree(name)
        else:
            os.unlink(name)

    def create(name, k, tag):
        if k == "file":
            write(name, tag.encode(), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        elif k == "fifo":
            os.mkfifo(name)
        elif k == "socket":
            bind_socket(name)
        elif k == "dir":
            os.mkdir(name)
            write(f"{name}/inner", tag.encode(), os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    with contextlib.chdir(root / "src"):
        for rnd in range(4):
            for name in names:
                for i, k in enumerate(cycle):
                    if kind(name) != "ENOENT":
                        remove(name)
                    assert kind(name) == "ENOENT", f"round {rnd}: {name} still there after removal"
                    tag = f"{rnd}-{name}-{i}"
                    create(name, k, tag)
                    got = kind(name)
                    assert got == k, f"round {rnd} step {i}: {name} is a {got}, expected {k}"
                    if k == "file":
                        assert read(name) == tag.encode()
                        assert os.stat(name).st_nlink == 1
                    elif k == "dir":
                        assert os.listdir(name) == ["inner"], f"round {rnd}: new dir {name} not empty"
                        assert read(f"{name}/inner") == tag.encode()
                    assert sorted(os.listdir(".")).count(name) == 1
                    rec(f"{rnd} {name} {i}", got)
        assert sorted(os.listdir(".")) == sorted(names + ["abs-link"])
    assert os.stat(root / "README").st_nlink == 1
    assert read(root / "README") == b"sample base\n"
    rec("tree", snapshot(root))
    assert_same_after_remount(root, remount)
    rec.agree()


def test_directory_link_counts(root, rec, remount):
    """st_nlink of a directory is 2 + its subdirectories, also for a directory whose entries
    come from several layers (a base directory the saga changed)."""
    dirs = [".", "src", "src/pkg", "src/pkg/sub", "docs", "moved", "empty-again", "new", "new/a"]

    def nlinks():
        out = {}
        for d in dirs:
            out[d] = outcome(lambda: os.lstat(root / d).st_nlink)
        with os.scandir(root) as it:  # readdirplus answers too
            out["scandir"] = sorted((e.name, e.stat(follow_symlinks=False).st_nlink) for e in it if e.is_dir())
        return out

    before = rec("base", nlinks())
    assert before["src"] == 3 and before["."] == 5
    write(root / "src/new.py", b"x")  # src and the root now have entries in two layers
    os.mkdir(root / "src/one")
    os.makedirs(root / "src/two/deeper")
    os.mkdir(root / "new")
    os.mkdir(root / "new/a")
    rec("after mkdir", nlinks())
    shutil.rmtree(root / "src/pkg/sub")
    os.rmdir(root / "src/one")
    os.rename(root / "docs", root / "moved")
    os.rename(root / "src/two", root / "moved/two")
    shutil.rmtree(root / "empty")
    os.mkdir(root / "empty-again")
    os.rename(root / "src/pkg", root / "src/pkg2")
    os.rename(root / "src/pkg2", root / "src/pkg")
    write(root / "src/pkg/mod0.py", b"y")
    os.mkdir(root / "src/pkg/sub")
    renameat2(root / "src/pkg", root / "moved/two", RENAME_EXCHANGE)
    renameat2(root / "src/pkg", root / "moved/two", RENAME_EXCHANGE)
    after = rec("after changes", nlinks())
    assert after["src"] == 3 and after["moved"] == 3 and after["src/pkg"] == 3 and after["."] == 6, after
    assert_same_after_remount(root, remount)
    rec("after remount", nlinks())
    rec.agree()


def test_directory_link_count_after_drop(ws, sample_base):
    mp = ws.mp
    assert os.lstat(mp / "src").st_nlink == 3
    os.mkdir(mp / "src/extra")
    assert os.lstat(mp / "src").st_nlink == 4
    ws.drop(1)
    assert os.lstat(mp / "src").st_nlink == os.lstat(sample_base / "src").st_nlink == 3


# ---------------------------------------------------------------------------------- layers (mount only)


def test_drop_restores_base_view(ws, sample_base):
    base_snap = snapshot(sample_base)
    mp = ws.mp
    # read and stat plenty first, so that the kernel caches names, attributes and pages
    before = snapshot(mp)
    assert not diff(before, base_snap), diff(before, base_snap)
    append(mp / "README", b"x")
    write(mp / "src/pkg/mod1.py", b"changed")
    os.chmod(mp / "src/pkg/mod3.py", 0o600)
    os.chown(mp / "docs", 0, 0)
    os.setxattr(mp / "docs/a.md", "user.colour", b"red")
    os.unlink(mp / "big.bin")
    write(mp / "big.bin", b"small now")
    os.rename(mp / "src/pkg/sub", mp / "sub-moved")
    shutil.rmtree(mp / "empty")
    write(mp / "empty", b"a file now")
    os.mkdir(mp / "newdir")
    write(mp / "newdir/f", b"f")
    os.unlink(mp / "dangling")
    os.symlink("elsewhere", mp / "dangling")
    os.unlink(mp / "fifo")
    os.mkdir(mp / "fifo")
    shutil.rmtree(mp / "src/pkg")
    os.mkdir(mp / "src/pkg")
    os.chmod(mp, 0o700)
    assert diff(snapshot(mp), base_snap)
    ws.drop(1)
    assert meta(mp) == meta(sample_base), "the root directory's metadata after the drop"
    after = snapshot(mp)
    problems = diff(after, base_snap)
    assert not problems, problems
    for rel in ("src/pkg/mod1.py", "README", "big.bin", "src/pkg/sub/deep.txt"):
        assert meta(mp / rel) == meta(sample_base / rel), rel
    # the view is read-only again; a new layer makes it writable, and it starts from the base
    with pytest.raises(OSError) as ei:
        write(mp / "README", b"no")
    assert ei.value.errno == errno.EROFS
    ws.push()
    write(mp / "README", b"yes")
    assert read(mp / "README") == b"yes"
    assert read(mp / "src/README.hard") == b"yes"


def test_drop_invalidates_page_cache(ws, sample_base):
    """A reader of a file sees the base content again after the layer holding its change is dropped."""
    mp = ws.mp
    rel = "src/pkg/mod4.py"
    base = read(sample_base / rel)
    cat = lambda: subprocess.run(["cat", str(mp / rel)], check=True, capture_output=True).stdout  # noqa: E731
    assert cat() == base
    early = os.open(mp / rel, os.O_RDONLY | O_NF)  # opened before the change, kept across the drop
    try:
        assert os.pread(early, 1 << 16, 0) == base
        same_size = bytes(b ^ 0x20 if 0x61 <= b <= 0x7a else b for b in base)  # same length, different bytes
        fd = os.open(mp / rel, os.O_WRONLY | O_NF)
        try:
            os.pwrite(fd, same_size, 0)
        finally:
            os.close(fd)
        mtime = os.stat(mp / rel).st_mtime_ns
        os.utime(mp / rel, ns=(mtime, os.stat(sample_base / rel).st_mtime_ns))  # even the mtime matches
        assert cat() == same_size
        assert os.pread(early, 1 << 16, 0) == same_size
        # a big file, partly read (pages cached), modified in the middle
        big = read(sample_base / "big.bin")
        assert read(mp / "big.bin") == big
        fd = os.open(mp / "big.bin", os.O_WRONLY | O_NF)
        try:
            os.pwrite(fd, b"Z" * 8192, 1 << 20)
        finally:
            os.close(fd)
        assert read(mp / "big.bin")[1 << 20:(1 << 20) + 4] == b"ZZZZ"
        ws.drop(1)
        assert cat() == base, "stale page cache: the dropped layer's content is still read"
        assert read(mp / "big.bin") == big, "stale page cache in big.bin"
        assert os.pread(early, 1 << 16, 0) == base, "a handle opened before does not follow the view"
        assert os.stat(mp / rel).st_size == len(base)
    finally:
        os.close(early)


def test_file_of_dropped_layer(ws):
    """A file created in a dropped layer is gone; handles follow the view, so an fd opened on it
    before the drop gets ESTALE on read and on write (also once a new layer is pushed)."""
    mp = ws.mp
    write(mp / "docs/new.txt", b"created in the layer")
    os.mkdir(mp / "newdir")
    write(mp / "newdir/inner", b"inner")
    fd = os.open(mp / "docs/new.txt", os.O_RDWR | O_NF)
    fd2 = os.open(mp / "newdir/inner", os.O_RDONLY | O_NF)
    try:
        assert os.pread(fd, 100, 0) == b"created in the layer"
        assert os.pread(fd2, 100, 0) == b"inner"
        ws.drop(1)
        for p in ("docs/new.txt", "newdir", "newdir/inner"):
            with pytest.raises(OSError) as ei:
                os.stat(mp / p)
            assert ei.value.errno == errno.ENOENT, p
        assert "new.txt" not in os.listdir(mp / "docs")
        with pytest.raises(OSError) as ei:
            os.pread(fd, 100, 0)
        assert ei.value.errno == errno.ESTALE, f"read: {ename(ei.value)}"
        with pytest.raises(OSError) as ei:
            os.pread(fd2, 100, 0)
        assert ei.value.errno == errno.ESTALE, f"read: {ename(ei.value)}"
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", 0)
        assert ei.value.errno in (errno.ESTALE, errno.EROFS), f"write: {ename(ei.value)}"
        ws.push()
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", 0)
        assert ei.value.errno == errno.ESTALE, f"write after push: {ename(ei.value)}"
        with pytest.raises(OSError) as ei:
            os.pread(fd, 100, 0)
        assert ei.value.errno == errno.ESTALE, f"read after push: {ename(ei.value)}"
        # the name is free again in the new layer, and unrelated to the old fd
        write(mp / "docs/new.txt", b"second", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        assert read(mp / "docs/new.txt") == b"second"
        with pytest.raises(OSError) as ei:
            os.pread(fd, 100, 0)
        assert ei.value.errno == errno.ESTALE
    finally:
        os.close(fd)
        os.close(fd2)


def test_no_layer_is_read_only(mount_factory, sample_base):
    m = mount_factory(sample_base)
    mp = m.mp
    assert read(mp / "README") == b"sample base\n"
    assert len(os.listdir(mp / "src/pkg")) == 21
    attempts = {
        "create": lambda: touch_open(mp / "new", os.O_WRONLY | os.O_CREAT),
        "open for write": lambda: touch_open(mp / "README", os.O_WRONLY),
        "open O_TRUNC": lambda: touch_open(mp / "README", os.O_WRONLY | os.O_TRUNC),
        "mkdir": lambda: os.mkdir(mp / "d"),
        "mkfifo": lambda: os.mkfifo(mp / "p"),
        "symlink": lambda: os.symlink("x", mp / "s"),
        "link": lambda: os.link(mp / "README", mp / "l"),
        "unlink": lambda: os.unlink(mp / "README"),
        "rmdir": lambda: os.rmdir(mp / "empty"),
        "rename": lambda: os.rename(mp / "README", mp / "R"),
        "chmod": lambda: os.chmod(mp / "README", 0o600),
        "chown": lambda: os.chown(mp / "README", 1000, 1000),
        "utime": lambda: os.utime(mp / "README", ns=(1, 1)),
        "truncate": lambda: os.truncate(mp / "README", 0),
        "setxattr": lambda: os.setxattr(mp / "README", "user.x", b"x"),
        "removexattr": lambda: os.removexattr(mp / "docs/a.md", "user.colour"),
    }
    got = {k: outcome(fn) for k, fn in attempts.items()}
    assert got == {k: "EROFS" for k in attempts}
    assert read(mp / "README") == b"sample base\n"
    assert os.getxattr(mp / "docs/a.md", "user.colour") == b"blue"
    m.push()
    assert outcome(attempts["create"]) == "ok"


def test_handles_follow_the_view(ws, sample_base):
    """An fd writes into whatever layer is on top; after a drop it sees the view (mount only)."""
    mp = ws.mp
    rel = "src/pkg/mod6.py"
    base = read(sample_base / rel)
    fd = os.open(mp / rel, os.O_RDWR | O_NF)
    try:
        os.pwrite(fd, b"L1", 0)
        ws.push()
        os.pwrite(fd, b"L2", 2)
        assert read(mp / rel) == b"L1L2" + base[4:]
        assert os.pread(fd, 4, 0) == b"L1L2"
        ws.drop(1)
        assert read(mp / rel) == b"L1" + base[2:]
        assert os.pread(fd, 4, 0) == b"L1" + base[2:4]
        with pytest.raises(OSError) as ei:  # the remaining layer is sealed
            os.pwrite(fd, b"X", 0)
        assert ei.value.errno == errno.EROFS
        ws.push()
        os.pwrite(fd, b"L3", 0)
        assert read(mp / rel) == b"L3" + base[2:]
    finally:
        os.close(fd)
    ws.drop(2)
    assert read(mp / rel) == base


def test_hard_links_across_layers(ws):
    """Hard links made in a lower (sealed) layer behave as one file in the layer above."""
    mp = ws.mp
    write(mp / "f", b"layer one")
    os.link(mp / "f", mp / "docs/g")
    ws.push()
    assert os.stat(mp / "f").st_nlink == 2
    append(mp / "docs/g", b" + two")
    assert read(mp / "f") == b"layer one + two"
    s1, s2 = os.stat(mp / "f"), os.stat(mp / "docs/g")
    assert (s1.st_nlink, s2.st_nlink, s1.st_ino == s2.st_ino) == (2, 2, True)
    os.unlink(mp / "docs/g")
    assert os.stat(mp / "f").st_nlink == 1
    ws.drop(1)
    assert read(mp / "docs/g") == b"layer one"
    s1, s2 = os.stat(mp / "f"), os.stat(mp / "docs/g")
    assert (s1.st_nlink, s2.st_nlink, s1.st_ino == s2.st_ino) == (2, 2, True)


def test_drop_reopen_keeps_lower_layer_writable(ws, sample_base):
    mp = ws.mp
    write(mp / "one", b"1")
    ws.push()
    write(mp / "two", b"2")
    os.unlink(mp / "one")
    ws.drop(1, reopen=True)
    assert read(mp / "one") == b"1"
    assert kind(mp / "two") == "ENOENT"
    write(mp / "three", b"3")  # writable without a push
    assert sorted(os.listdir(mp)) == sorted(os.listdir(sample_base) + ["one", "three"])
