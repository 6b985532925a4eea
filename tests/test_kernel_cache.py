"""What the patched pyfuse3 (patches/pyfuse3, built by scripts/install.sh) gives overlayd, and
that overlayd keeps working without it.

- Directory listings cached by the kernel (opendir answers keep_cache + cache_readdir): a warm
  listing sends no READDIRPLUS, and every cache the kernel holds (a listing, an attribute, file
  data) shows the new view after a step, a rollback and a commit. The invalidation test runs on
  stock pyfuse3 too (nothing is cached there, and the answers must be the same).
- Without opendir (the first opendir answers ENOSYS): whole listings, found by inode, that
  follow the view.
- fallocate (sizes, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE) on a base file never copied up, on a
  metacopy, then commit, compared with the same calls on a plain directory.
"""

import ctypes
import errno
import itertools
import json
import os
import re

import pytest

from conftest import read, put
from overlayd import fusecaps
from test_cli import od
from test_saga import assert_same, snap

needs_cache = pytest.mark.skipif(
    not fusecaps.CACHE_READDIR,
    reason=f"{fusecaps.describe()}: opendir cannot ask the kernel to cache listings (scripts/install.sh builds "
           "pyfuse3 with patches/pyfuse3)")
needs_fallocate = pytest.mark.skipif(
    not fusecaps.FALLOCATE,
    reason=f"{fusecaps.describe()}: no fallocate handler (scripts/install.sh builds pyfuse3 with patches/pyfuse3)")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(path, mode, offset, length):
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def listing(path):
    return sorted(os.listdir(path))


def readdir_requests(m) -> int:
    return len(re.findall(r"opcode: READDIRPLUS", m.log_path.read_text(errors="replace")))


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "base"
    (root / "d").mkdir(parents=True)
    put(root / "d" / "a", "a\n")
    put(root / "d" / "b", "one\n")
    put(root / "big", os.urandom(256 << 10))
    put(root / "moved", os.urandom(128 << 10))
    return root


def test_the_daemon_says_which_pyfuse3_it_runs_on(mount_factory, base):
    m = mount_factory(base)
    assert fusecaps.describe() in m.log().splitlines()[0]
    assert m.call("status")["pyfuse3"] == fusecaps.describe()
    assert re.fullmatch(r"pyfuse3 \S+ \((stock|patched: [a-z_, ]+)\)", fusecaps.describe())
    rows = json.loads(od(m, "list", "--json", check=0).stdout)["workspaces"]
    assert [w["pyfuse3"] for w in rows if w["mountpoint"] == str(m.mp)] == [fusecaps.describe()]
    lines = od(m, "list", check=0).stdout.splitlines()
    assert lines[0].endswith("\tMOUNTPOINT\tFUSE\tBASE VIEW")
    assert [line.split("\t")[-2] for line in lines if f"\t{m.mp}\t" in line] == [fusecaps.describe()]


@needs_cache
def test_a_warm_listing_comes_from_the_kernel(mount_factory, base):
    m = mount_factory(base, extra_args=["--debug-fuse"])
    assert listing(m.mp / "d") == ["a", "b"]
    before = readdir_requests(m)
    assert before > 0
    for _ in range(3):
        assert listing(m.mp / "d") == ["a", "b"]
    assert readdir_requests(m) == before, "a warm listing reached the daemon"
    m.call("saga.begin", name="cache")
    m.call("saga.step", name="s1")
    put(m.mp / "d" / "c", "c\n")  # through the kernel: it drops its own cached listing
    assert listing(m.mp / "d") == ["a", "b", "c"]


def warm(mp):
    """Fill the kernel's caches: the listing, the attributes, the pages of d/b."""
    out = (listing(mp / "d"), os.lstat(mp / "d" / "a").st_mode & 0o777, read(mp / "d" / "b"))
    assert out == (listing(mp / "d"), os.lstat(mp / "d" / "a").st_mode & 0o777, read(mp / "d" / "b"))
    return out


def test_each_kernel_cache_follows_step_rollback_and_commit(mount_factory, base):
    m = mount_factory(base)
    m.call("saga.begin", name="cache")
    m.call("saga.step", name="s1")
    put(m.mp / "d" / "c", "c\n")
    os.chmod(m.mp / "d" / "a", 0o600)
    put(m.mp / "d" / "b", "two\n")
    v1 = (["a", "b", "c"], 0o600, b"two\n")
    assert warm(m.mp) == v1
    m.call("saga.step", name="s2")  # a step changes nothing in the view
    assert warm(m.mp) == v1
    os.unlink(m.mp / "d" / "c")
    put(m.mp / "d" / "e", "e\n")
    put(m.mp / "d" / "x.tmp", "left out\n")
    os.chmod(m.mp / "d" / "a", 0o640)
    with open(m.mp / "d" / "b", "r+b") as f:
        f.write(b"TWO")
    assert warm(m.mp) == (["a", "b", "e", "x.tmp"], 0o640, b"TWO\n")
    m.call("saga.rollback", to=1)  # drops s2: its names, attributes and data leave every cache
    assert warm(m.mp) == v1
    m.call("saga.step", name="s3")
    put(m.mp / "d" / "x.tmp", "left out\n")
    assert warm(m.mp) == (["a", "b", "c", "x.tmp"], 0o600, b"two\n")
    res = m.call("saga.commit", exclude=["*.tmp"])  # the view loses the left-out name only
    assert res["saga"]["state"] == "committed"
    assert warm(m.mp) == v1
    assert listing(base / "d") == ["a", "b", "c"] and read(base / "d" / "b") == b"two\n"
    assert_same(m.mp, base, "the view after commit")


@pytest.mark.skipif(not fusecaps.NO_OPENDIR, reason=f"{fusecaps.describe()}: no opendir-less listings "
                    "(scripts/install.sh builds pyfuse3 with patches/pyfuse3)")
def test_without_opendir_listings_are_whole_and_follow_the_view(mount_factory, base):
    """The first opendir answers ENOSYS: the kernel sends no opendir or releasedir again, and
    readdir finds each directory by its inode. Listings longer than one readdir reply (2,000
    names: several calls, continued at their offsets), several directories listed in turn, and
    the kernel's cached listing after a step, a rollback and a commit."""
    for i in range(2000):
        put(base / "d" / f"n{i:04d}-{'x' * (i % 40)}", "")
    m = mount_factory(base, extra_args=["--debug-fuse"])
    want_d = sorted(os.listdir(base / "d"))
    for _ in range(3):
        assert listing(m.mp / "d") == want_d
        assert listing(m.mp) == sorted(os.listdir(base))
    with os.scandir(m.mp / "d") as it1, os.scandir(m.mp) as it2:  # two listings in progress at once
        names = [e.name for e in itertools.islice(it1, 700)] + [e.name for e in it2] + [e.name for e in it1]
    assert sorted(names) == sorted(want_d + os.listdir(base))
    log = m.log_path.read_text(errors="replace")
    assert len(re.findall(r"opcode: OPENDIR\b", log)) == 1, "the kernel still opens directories"
    assert not re.findall(r"opcode: RELEASEDIR\b", log)
    assert "no_opendir" in m.call("status")["pyfuse3"]
    m.call("saga.begin", name="noopendir")
    m.call("saga.step", name="s1")
    os.unlink(m.mp / "d" / "n0000-")
    put(m.mp / "d" / "zz", "z\n")
    assert listing(m.mp / "d") == sorted(set(want_d) - {"n0000-"} | {"zz"})
    m.call("saga.rollback")  # the kernel's cached listing of d/ leaves with the step
    assert listing(m.mp / "d") == want_d
    m.call("saga.step", name="s2")
    os.mkdir(m.mp / "new")
    put(m.mp / "new" / "f", "f\n")
    assert listing(m.mp / "new") == ["f"]
    m.call("saga.commit")
    assert listing(m.mp) == sorted(os.listdir(base)) and "new" in listing(m.mp)
    assert_same(m.mp, base, "the view after commit")
    log = m.log_path.read_text(errors="replace")
    assert len(re.findall(r"opcode: OPENDIR\b", log)) == 1 and not re.findall(r"opcode: RELEASEDIR\b", log)


# ------------------------------------------------------------------------------------ fallocate


def fallocate_ops(r, skip_punch=False):
    """The same calls on the view and on a plain directory."""
    fallocate(r / "d" / "a", 0, 0, 10000)  # grows a base file never copied up
    fallocate(r / "big", FALLOC_FL_KEEP_SIZE, 0, 1 << 20)  # allocates past EOF, size kept
    fallocate(r / "big", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 65536)
    fallocate(r / "big", FALLOC_FL_ZERO_RANGE, 200000, 100000)  # zeroes, and grows past EOF
    os.rename(r / "moved", r / "renamed")  # a metacopy in the view
    fallocate(r / "renamed", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8192)
    fallocate(r / "renamed", 0, 0, 300000)
    put(r / "new", b"")
    fallocate(r / "new", 0, 0, 5000)


def blocks(p):
    return os.lstat(p).st_blocks


@needs_fallocate
def test_fallocate_modes_copy_up_and_commit(mount_factory, base, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    fallocate_ops(plain)
    want = snap(plain)
    m = mount_factory(base)
    before = snap(base)
    m.call("saga.begin", name="falloc")
    m.call("saga.step", name="s1")
    fallocate_ops(m.mp)
    assert_same(m.mp, want, "the view after fallocate")
    assert_same(base, before, "the base before commit")
    assert os.lstat(m.mp / "new").st_size == 5000 and os.lstat(m.mp / "d" / "a").st_size == 10000
    assert blocks(m.mp / "big") == blocks(plain / "big") >= ((1 << 20) - 65536) // 512 \
        and os.lstat(m.mp / "big").st_size == 300000, "KEEP_SIZE allocates, ZERO_RANGE sets the size"
    assert read(m.mp / "big")[4096:4096 + 65536] == bytes(65536)
    assert read(m.mp / "renamed")[:8192] == bytes(8192)
    assert m.call("saga.commit")["saga"]["state"] == "committed"
    assert_same(base, want, "the base after commit")
    assert_same(m.mp, want, "the view after commit")


@needs_fallocate
def test_fallocate_follows_rollback_and_needs_a_step(mount_factory, base):
    m = mount_factory(base)
    with pytest.raises(OSError) as ei:  # no step open: the view is read-only
        fallocate(m.mp / "big", 0, 0, 1 << 20)
    assert ei.value.errno == errno.EROFS
    orig = read(m.mp / "big")
    m.call("saga.begin", name="falloc")
    m.call("saga.step", name="s1")
    m.call("saga.step", name="s2")
    fallocate(m.mp / "big", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 65536)
    fallocate(m.mp / "big", 0, 0, 1 << 20)
    assert read(m.mp / "big") == bytes(65536) + orig[65536:] + bytes((1 << 20) - len(orig))
    m.call("saga.rollback", to=1)  # drops s2: the pages the kernel cached go with it
    assert read(m.mp / "big") == orig and os.lstat(m.mp / "big").st_size == len(orig)
    assert read(base / "big") == orig


@pytest.mark.skipif(fusecaps.FALLOCATE, reason="pyfuse3 has the fallocate patch: see the tests above")
def test_fallocate_is_not_supported_on_stock_pyfuse3(mount_factory, base):
    m = mount_factory(base)
    m.call("saga.begin", name="falloc")
    m.call("saga.step", name="s1")
    with pytest.raises(OSError) as ei:
        fallocate(m.mp / "big", 0, 0, 1 << 20)
    assert ei.value.errno == errno.EOPNOTSUPP


def test_a_commit_that_strips_set_id_bits_shows_it(mount_factory, base):
    m = mount_factory(base)
    m.call("saga.begin", name="setid")
    m.call("saga.step", name="s1")
    os.mkdir(m.mp / "new")  # a directory of the step: the drop expires no name inside it
    put(m.mp / "new" / "s", "s\n", mode=0o755)
    os.chmod(m.mp / "new" / "s", 0o4755)
    assert os.lstat(m.mp / "new" / "s").st_mode & 0o7777 == 0o4755  # cached by the kernel
    assert m.call("saga.commit")["saga"]["state"] == "committed"
    assert os.lstat(base / "new" / "s").st_mode & 0o7777 == 0o755
    assert os.lstat(m.mp / "new" / "s").st_mode & 0o7777 == 0o755, "the kernel kept the attributes from before"
