"""Bounded memory (issue 19 item 3): the daemon forgets the nodes the kernel forgot, so its
node count and RSS follow what the kernel holds, not how many files were ever looked at; and a
file whose node was forgotten comes back with the same st_ino (git compares it with its index):
base files, files created in a step, copied-up (chmod-ed) and renamed base files, hard links.

The kernel is made to forget with ``echo 2 > /proc/sys/vm/drop_caches`` (dentries and inodes).
"""

import os
import time

import pytest

from conftest import put, read

DIRS, PER_DIR = 100, 200  # 20,000 files


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def walk(mp):
    """lstat every entry (as find and git status do): every file gets a node."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(mp):
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def settle(m, most):
    """Drop the kernel's caches until the daemon holds at most *most* nodes (FORGETs are async)."""
    for _ in range(50):
        drop_caches()
        mem = m.call("status")["memory"]
        if mem["nodes"] <= most:
            return mem
        time.sleep(0.2)
    raise AssertionError(f"the daemon still holds {mem} after the kernel forgot")


@pytest.fixture
def big(tmp_path):
    root = tmp_path / "base"
    for d in range(DIRS):
        sub = root / f"d{d:03}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            (sub / f"file-with-a-longer-name-{i:04}.txt").write_bytes(b"x" * (i % 3))
    return root


def test_nodes_and_rss_stay_bounded_and_st_ino_survives(mount_factory, big):
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("needs root to drop the kernel's caches")
    m = mount_factory(big)
    pid = m.call("status")["pid"]
    mp = m.mp
    m.call("saga.begin", name="mem")
    m.call("saga.step", name="s1")
    put(mp / "d000" / "new-in-layer", "new\n")  # synthetic st_ino
    os.chmod(mp / "d001" / "file-with-a-longer-name-0001.txt", 0o600)  # a metacopy: base ino, layer ident
    os.rename(mp / "d002" / "file-with-a-longer-name-0002.txt", mp / "d002" / "renamed")
    os.link(mp / "d003" / "file-with-a-longer-name-0003.txt", mp / "d004" / "hardlink")
    os.mkdir(mp / "newdir")
    put(mp / "newdir" / "inside", "in\n")
    watched = ["d000/new-in-layer", "d001/file-with-a-longer-name-0001.txt", "d002/renamed",
               "d003/file-with-a-longer-name-0003.txt", "d004/hardlink", "newdir", "newdir/inside",
               "d005/file-with-a-longer-name-0005.txt", "d005"]
    inos = {p: os.lstat(mp / p).st_ino for p in watched}
    assert inos["d003/file-with-a-longer-name-0003.txt"] == inos["d004/hardlink"]
    held = open(mp / "d006" / "file-with-a-longer-name-0006.txt", "rb")  # an open file keeps its node
    held_ino = os.fstat(held.fileno()).st_ino
    settle(m, 200)

    counts, rss, peak_nodes = [], [], 0
    for _ in range(3):
        assert walk(mp) == DIRS * PER_DIR + 3
        peak_nodes = max(peak_nodes, m.call("status")["memory"]["nodes"])
        rss.append(rss_kib(pid))
        mem = settle(m, 200)
        counts.append(mem["nodes"])
        # every node forgotten: the watched ones come back with their numbers
        assert {p: os.lstat(mp / p).st_ino for p in watched} == inos
        assert os.lstat(mp / "d006" / "file-with-a-longer-name-0006.txt").st_ino == held_ino
        settle(m, 200)
    assert peak_nodes > DIRS * PER_DIR // 2  # the walk did hold them
    assert max(counts) <= 200, counts
    mem = m.call("status")["memory"]
    assert mem["evicted"] < 50, mem  # only nodes that carry a number of their own are remembered
    # the second and third walk take no more memory than the first (the allocator keeps its arenas)
    assert rss[2] - rss[0] < 8 << 10, rss
    assert held.read() == b"x" * (6 % 3)
    held.close()
    # the view is unchanged by all this
    assert read(mp / "d000" / "new-in-layer") == b"new\n"
    assert read(mp / "newdir" / "inside") == b"in\n"
    assert os.stat(mp / "d001" / "file-with-a-longer-name-0001.txt").st_mode & 0o777 == 0o600
    assert not os.path.exists(mp / "d002" / "file-with-a-longer-name-0002.txt")
    assert os.stat(mp / "d004" / "hardlink").st_nlink == 2
