"""Renames copy no data: a renamed base file becomes a *metacopy* in the top layer (its metadata,
and the xattr ``user.overlayd.origin`` naming the base file) until something needs its own data.

Every test checks the view against a plain copy of the base with the same operations (or against
the data it wrote), the layer's file for the absence of data blocks where a metacopy is expected,
and the base after commit; the base is never written before commit.
"""

import errno
import os
import stat

import pytest

from conftest import tree_digest
from test_saga import O_NF, assert_same, expected_tree, put, read, snap, staged_names

ORIGIN = "user.overlayd.origin"
BIG = 1 << 20


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "base"
    (root / "d" / "sub").mkdir(parents=True)
    put(root / "big.bin", os.urandom(BIG))
    put(root / "small.txt", "small\n")
    put(root / "empty", b"")
    for i in range(20):
        put(root / "d" / f"f{i}", os.urandom(4096 + i))
    put(root / "d" / "sub" / "deep", "deep\n")
    os.chmod(root / "small.txt", 0o640)
    return root


def begin(m, steps=1):
    m.call("saga.begin", name="metacopy")
    for i in range(steps):
        m.call("saga.step", name=f"s{i + 1}")


def layer_files(m, name):
    """Every regular file called *name* in the workspace's layers: (path, lstat, origin xattr)."""
    out = []
    for dirpath, _, files in os.walk(m.state / "layers"):
        if name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue  # a whiteout
            try:
                origin = os.getxattr(p, ORIGIN, follow_symlinks=False)
            except OSError:
                origin = None
            out.append((p, st, origin))
    return out


def assert_metacopy(m, name, size):
    copies = layer_files(m, name)
    assert copies, f"{name} is in no layer"
    p, st, origin = copies[-1] if len(copies) == 1 else max(copies, key=lambda c: c[1].st_mtime_ns)
    assert origin is not None, f"{p}: no origin xattr: the rename copied the data"
    assert st.st_size == size and st.st_blocks * 512 < min(size, 65536), \
        f"{p}: {st.st_blocks} blocks for {size} bytes: data was copied"


def assert_own_data(m, name):
    for p, st, origin in layer_files(m, name):
        assert origin is None, f"{p} is still a metacopy"


def ops_renames(r):
    os.rename(r / "big.bin", r / "big.moved")
    os.rename(r / "small.txt", r / "d" / "small.txt")
    os.rename(r / "d", r / "e")
    os.rename(r / "empty", r / "empty.moved")


def test_rename_copies_no_data_and_commits(mount_factory, base, tmp_path):
    digest = tree_digest(base)
    want = snap(expected_tree(base, tmp_path / "exp", ops_renames))
    data = read(base / "big.bin")
    blocks = os.lstat(base / "big.bin").st_blocks
    m = mount_factory(base)
    begin(m)
    ops_renames(m.mp)
    assert_metacopy(m, "big.moved", BIG)
    assert os.lstat(m.mp / "big.moved").st_blocks == blocks > 0, "du must count a renamed file's data"
    assert_metacopy(m, "small.txt", 6)
    assert_metacopy(m, "f7", 4096 + 7)  # moved with its directory
    assert read(m.mp / "big.moved") == data
    assert_same(m.mp, want, "the view after renames")
    assert tree_digest(base) == digest, "the base was written before commit"
    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    assert_same(base, want, "the base after commit")
    assert staged_names(base) == []
    for dirpath, dirs, files in os.walk(base):
        for n in dirs + files:
            assert ORIGIN not in os.listxattr(os.path.join(dirpath, n), follow_symlinks=False)
    assert_same(m.mp, want, "the view after commit")


def test_write_after_rename_gets_own_data_and_readers_follow(mount_factory, base):
    orig = read(base / "big.bin")
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "big.moved")
    rfd = os.open(m.mp / "big.moved", os.O_RDONLY | O_NF)
    try:
        assert os.pread(rfd, 100, 0) == orig[:100]
        wfd = os.open(m.mp / "big.moved", os.O_WRONLY | O_NF)
        try:
            os.pwrite(wfd, b"X" * 10, BIG - 10)
        finally:
            os.close(wfd)
        assert_own_data(m, "big.moved")
        expect = orig[:-10] + b"X" * 10
        assert read(m.mp / "big.moved") == expect
        os.lseek(rfd, 0, os.SEEK_SET)
        got = b""
        while chunk := os.read(rfd, 1 << 16):
            got += chunk
        assert got == expect, "a reader opened before the write does not see it"
    finally:
        os.close(rfd)
    assert read(base / "big.bin") == orig


def test_meta_changes_keep_the_metacopy_truncate_does_not(mount_factory, base):
    orig = read(base / "big.bin")
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "b")
    os.chmod(m.mp / "b", 0o600)
    os.setxattr(m.mp / "b", "user.colour", b"red", follow_symlinks=False)
    os.utime(m.mp / "b", ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
    assert_metacopy(m, "b", BIG)
    st = os.lstat(m.mp / "b")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000 and st.st_size == BIG
    assert os.getxattr(m.mp / "b", "user.colour", follow_symlinks=False) == b"red"
    assert ORIGIN not in os.listxattr(m.mp / "b", follow_symlinks=False)
    assert read(m.mp / "b") == orig
    os.truncate(m.mp / "b", 1000)
    assert_own_data(m, "b")
    assert read(m.mp / "b") == orig[:1000]
    assert read(base / "big.bin") == orig


def test_rename_across_steps_and_rollback(mount_factory, base, tmp_path):
    orig = read(base / "big.bin")
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "one")
    m.call("saga.step", name="s2")
    os.rename(m.mp / "one", m.mp / "two")  # copied up from a lower metacopy: still no data
    assert [c[2] is not None for c in layer_files(m, "two")] == [True]
    assert read(m.mp / "two") == orig
    m.call("saga.step", name="s3")
    put(m.mp / "two", b"rewritten")  # O_TRUNC: no data copied at all
    assert read(m.mp / "two") == b"rewritten"
    m.call("saga.rollback", to=2)
    assert read(m.mp / "two") == orig
    m.call("saga.rollback", to=1)
    assert not os.path.lexists(m.mp / "two") and read(m.mp / "one") == orig
    m.call("saga.step", name="s4")
    with open(m.mp / "one", "r+b") as f:  # writing into a lower metacopy copies the base's data
        f.seek(5)
        f.write(b"!!")
    expect = orig[:5] + b"!!" + orig[7:]
    assert read(m.mp / "one") == expect
    m.call("saga.commit")
    assert read(base / "one") == expect and not os.path.lexists(base / "big.bin")


def test_hard_link_of_a_base_file(mount_factory, base, tmp_path):
    def ops(r):
        os.link(r / "small.txt", r / "hard")
        with open(r / "hard", "ab") as f:
            f.write(b"more\n")

    want = snap(expected_tree(base, tmp_path / "exp", ops))
    m = mount_factory(base)
    begin(m)
    ops(m.mp)
    assert read(m.mp / "small.txt") == b"small\nmore\n"
    assert_same(m.mp, want, "the view after link + append")
    m.call("saga.commit")
    assert_same(base, want, "the base after commit")


def test_unlink_of_an_open_metacopy_keeps_its_data(mount_factory, base):
    orig = read(base / "big.bin")
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "b")
    fd = os.open(m.mp / "b", os.O_RDONLY | O_NF)
    try:
        os.unlink(m.mp / "b")
        assert os.pread(fd, BIG, 0) == orig
        fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # reopen the unlinked file for writing
        try:
            os.pwrite(fd2, b"ZZ", 0)
            assert os.pread(fd2, 4, 0) == b"ZZ" + orig[2:4]
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
    assert read(base / "big.bin") == orig, "a write to an unlinked renamed file reached the base"


def test_survives_a_daemon_restart(mount_factory, base):
    orig = read(base / "big.bin")
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "b")
    m.call("saga.step", name="s2")
    m.kill()
    m.start()
    assert read(m.mp / "b") == orig
    assert_metacopy(m, "b", BIG)
    m.call("saga.commit")
    assert read(base / "b") == orig


def test_base_file_replaced_behind_the_workspace(mount_factory, base):
    """The base must not change under a workspace; if it does, a renamed file's data is refused
    (EIO), never silently taken from the new file, and the commit reports the conflict."""
    m = mount_factory(base)
    begin(m)
    os.rename(m.mp / "big.bin", m.mp / "b")
    put(base / "other", b"not the renamed file")
    os.rename(base / "other", base / "big.bin")
    with pytest.raises(OSError) as exc:
        read(m.mp / "b")
    assert exc.value.errno == errno.EIO
    res = m.call("saga.commit", dry_run=True)
    assert [c["path"] for c in res["conflicts"]] == ["big.bin"]


@pytest.mark.parametrize("order", ["xattr-after-rename", "xattr-in-base"])
def test_big_xattr_next_to_the_origin(filesystems, mount_factory, order):
    """On ext4 all of a file's xattrs share one 4 KiB block: a metacopy's origin xattr (its base
    path, here ~80 bytes) and a 4000-byte user xattr do not fit together. A metadata change must
    not fail for that (it did with ENOSPC, where a plain directory takes it): the file is copied
    up with its data instead, and the commit gives the base the xattr and the data."""
    root = filesystems.dir("ext4", "bigxattr")
    base = root / "base"
    long_dir = base / "very/long/directory/path/that/an/ordinary/project/might/have"
    long_dir.mkdir(parents=True)
    data = b"#!/bin/sh\necho hi\n" * 300
    put(long_dir / "f", data)
    big = os.urandom(4000)
    if order == "xattr-in-base":
        os.setxattr(long_dir / "f", "user.big", big)
    m = mount_factory(base, where=root)
    begin(m)
    rel = long_dir.relative_to(base)
    os.rename(m.mp / rel / "f", m.mp / rel / "g")  # a metacopy, if it fits
    if order == "xattr-after-rename":
        os.setxattr(m.mp / rel / "g", "user.big", big)
    assert os.getxattr(m.mp / rel / "g", "user.big") == big
    assert read(m.mp / rel / "g") == data
    m.call("saga.commit")
    assert read(base / rel / "g") == data
    assert os.getxattr(base / rel / "g", "user.big") == big
    assert ORIGIN not in os.listxattr(base / rel / "g")
    assert not os.path.lexists(base / rel / "f")
