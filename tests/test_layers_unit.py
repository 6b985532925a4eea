"""The layers room without a mount: a stack of plain directories, resolved and copied up by the
synchronous helpers the FUSE handlers call (overlayd/layers). Milliseconds each.

Layers are built by hand as the daemon would leave them: whiteouts (character devices 0/0),
opaque directories (``user.overlayd.opaque``), files replacing directories. The work that runs
in worker threads (large copies, hard-link scans) is driven as the handlers' wrapper drives
it: a helper raises ``Blocked``, ``unblock`` does the work, the helper runs again.
"""

import os
import stat

import pytest
import trio

from overlayd import osutil
from overlayd.layers import OverlayFS, copyup
from overlayd.layers.copyup import Blocked
from overlayd.layers.model import ROOT


def mkfile(path, data=b"", mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def whiteout(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, osutil.DIR_FLAGS)
    try:
        osutil.make_whiteout(fd, os.fsencode(path.name))
    finally:
        os.close(fd)


@pytest.fixture
def stack(tmp_path):
    """base, layer 1 (sealed), layer 2 (the writable top), and a work directory."""
    base, l1, l2, work = (tmp_path / n for n in ("base", "l1", "l2", "work"))
    for d in (base, l1, l2, work):
        d.mkdir()
    mkfile(base / "a" / "x", b"base x")
    mkfile(base / "a" / "y", b"base y")
    mkfile(base / "b", b"base b")
    mkfile(base / "d" / "old", b"old")
    (base / "e").mkdir()
    mkfile(base / "e" / "inside", b"in e")
    mkfile(base / "h1", b"linked")
    os.link(base / "h1", base / "h2")
    # layer 1: a/x deleted, a/z created, d replaced by an opaque directory, e replaced by a file
    whiteout(l1 / "a" / "x")
    mkfile(l1 / "a" / "z", b"l1 z")
    (l1 / "d").mkdir()
    os.setxattr(l1 / "d", osutil.OPAQUE_XATTR, b"y")
    mkfile(l1 / "d" / "new", b"new")
    mkfile(l1 / "e", b"e is a file now")
    # layer 2: b overwritten
    mkfile(l2 / "b", b"l2 b")

    fs = OverlayFS(str(base), [("1", str(l1), True), ("2", str(l2), False)], workdir=str(work))
    fs.paths = {"base": base, "l1": l1, "l2": l2}
    yield fs
    fs.close()


def node_at(fs, path: bytes):
    parts = tuple(path.split(b"/"))
    parent = fs._walk(parts[:-1])
    res = fs._lookup_node(parent, parts[-1])
    return None if res is None else res[0]


def drive(fs, fn, *args, **kwargs):
    """Run a synchronous helper as a handler runs it: do what it is Blocked on, then again."""
    async def go():
        while True:
            try:
                return fn(*args, **kwargs)
            except Blocked as blocked:
                await fs.unblock(blocked)

    return trio.run(go)


def test_resolution_through_whiteouts_opaque_dirs_and_replaced_dirs(stack):
    fs = stack
    a = fs._walk((b"a",))
    assert fs._merged(a) == {b"y": 0, b"z": 1}  # x is whited out in layer 1
    d = fs._walk((b"d",))
    assert fs._merged(d) == {b"new": 1}  # the opaque directory hides the base's d/old
    assert [li for li, _ in d.dlayers] == [1]
    assert fs._walk((b"e",)) is None  # a file in layer 1 hides the base's directory
    e = node_at(fs, b"e")
    assert not e.is_dir and e.li == 1
    assert node_at(fs, b"a/x") is None
    assert node_at(fs, b"b").li == 2
    assert sorted(fs._merged(fs.root)) == [b"a", b"b", b"d", b"e", b"h1", b"h2"]


def test_base_entries_keep_their_inode_numbers_and_others_get_synthetic_ones(stack):
    fs = stack
    y = node_at(fs, b"a/y")
    assert y.ino == os.stat(fs.paths["base"] / "a" / "y").st_ino
    z = node_at(fs, b"a/z")
    assert z.ino >= 1 << 48
    assert node_at(fs, b"a/z") is z  # one node per identity
    assert fs._attrs(z, fs._stat(z)).st_size == len(b"l1 z")


def test_copy_up_into_the_top_layer_keeps_the_node_and_never_writes_the_base(stack):
    fs = stack
    base_st = os.stat(fs.paths["base"] / "a" / "y")
    y = node_at(fs, b"a/y")
    changes = []
    fs.on_change = lambda kind, path, listing: changes.append((kind, path))
    drive(fs, fs._copy_up, y)
    assert y.li == 2 and node_at(fs, b"a/y") is y
    assert (fs.paths["l2"] / "a" / "y").read_bytes() == b"base y"
    assert stat.S_IMODE(os.stat(fs.paths["l2"] / "a" / "y").st_mode) == 0o644
    assert changes == [("copyup", (b"a", b"y"))]
    assert os.stat(fs.paths["base"] / "a" / "y").st_mtime_ns == base_st.st_mtime_ns
    # the parent was copied up with its merged view intact
    assert fs._merged(fs._walk((b"a",))) == {b"y": 2, b"z": 1}


def test_metacopy_holds_metadata_only(stack):
    fs = stack
    y = node_at(fs, b"a/y")
    drive(fs, fs._copy_up, y, meta_only=True)
    layer_file = fs.paths["l2"] / "a" / "y"
    assert os.stat(layer_file).st_blocks == 0  # sparse: no data
    assert fs._origin(y) == (os.stat(fs.paths["base"] / "a" / "y").st_ino, b"a/y")
    drive(fs, fs._materialize, y)
    assert layer_file.read_bytes() == b"base y" and fs._origin(y) is None


def test_copy_up_of_a_hard_link_links_every_visible_name_after_a_scan_in_a_thread(stack):
    fs = stack
    h1 = node_at(fs, b"h1")
    with pytest.raises(Blocked) as info:
        fs._copy_up(h1)
    assert info.value.key == ("links", 0) and fs.hardlinks_base is None
    drive(fs, fs._copy_up, h1)
    assert fs.hardlinks_base is not None
    l2 = fs.paths["l2"]
    assert os.stat(l2 / "h1").st_ino == os.stat(l2 / "h2").st_ino
    assert node_at(fs, b"h2") is h1


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(copyup, "THREAD_COPY", 4)


def test_a_large_copy_runs_in_a_thread_and_other_requests_flow_meanwhile(stack, small_threshold, monkeypatch):
    fs = stack
    monkeypatch.setattr(osutil, "STALL_AT", "copyup:0.3")  # the thread's copy takes 0.3 s at least
    y = node_at(fs, b"a/y")
    other = node_at(fs, b"a/z")
    events = []

    async def request(name, fn):  # the loop of ops.fuse_errors
        while True:
            try:
                fn()
                events.append(name)
                return
            except Blocked as blocked:
                events.append(f"{name} blocked")
                await fs.unblock(blocked)

    async def reader():
        await trio.sleep(0.05)  # while the copy runs
        for _ in range(5):
            fs._stat(other)
            fs._merged(fs.root)
            events.append("stat")
            await trio.sleep(0)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(request, "copy", lambda: fs._copy_up(y))
            await trio.sleep(0.01)
            n.start_soon(request, "copy again", lambda: fs._copy_up(y))
            n.start_soon(reader)

    trio.run(main)
    # the second request for the node waited for the first copy; stats ran while it was in flight
    assert events.index("copy again blocked") < events.index("copy")
    assert events.count("stat") == 5 and events.index("stat") < events.index("copy")
    assert events.index("copy") < events.index("copy again")
    assert y.li == 2 and (fs.paths["l2"] / "a" / "y").read_bytes() == b"base y"
    assert fs.in_flight == {}


def test_a_copy_whose_layer_was_sealed_meanwhile_is_thrown_away(stack, small_threshold, monkeypatch):
    fs = stack
    monkeypatch.setattr(osutil, "STALL_AT", "copyup:0.2")
    y = node_at(fs, b"a/y")

    async def main():
        with pytest.raises(Blocked) as info:
            fs._copy_up(y)
        async with trio.open_nursery() as n:
            n.start_soon(fs.unblock, info.value)
            await trio.sleep(0.05)
            fs.seal_top()  # a step transition while the data is copied

    trio.run(main)
    assert y.li == 0 and not (fs.paths["l2"] / "a" / "y").exists()
    assert (fs.paths["base"] / "a" / "y").read_bytes() == b"base y"


def test_merged_listing_follows_creation_and_removal_in_the_top_layer(stack):
    fs = stack
    a = fs._walk((b"a",))
    fs._remove_entry(a, b"y", False)  # a base entry: removed by a whiteout
    assert b"y" not in fs._merged(a)
    assert osutil.is_whiteout(os.lstat(fs.paths["l2"] / "a" / "y"))
    fs._remove_entry(a, b"z", False)  # a layer-1 entry: a whiteout too
    assert fs._merged(a) == {}
    fs2 = OverlayFS(str(fs.paths["base"]), [("1", str(fs.paths["l1"]), True), ("2", str(fs.paths["l2"]), True)])
    try:
        assert fs2._merged(fs2._walk((b"a",))) == {}  # what is on disk says the same
        assert fs2._node(ROOT) is fs2.root
    finally:
        fs2.close()


def test_wait_idle_returns_once_the_work_in_threads_is_done(stack, small_threshold, monkeypatch):
    fs = stack
    monkeypatch.setattr(osutil, "STALL_AT", "copyup:0.2")
    y = node_at(fs, b"a/y")
    order = []

    async def main():
        with pytest.raises(Blocked) as info:
            fs._copy_up(y)

        async def work():
            await fs.unblock(info.value)
            order.append("copied")

        async def idle():
            await trio.sleep(0.05)
            await fs.wait_idle()
            order.append("idle")

        async with trio.open_nursery() as n:
            n.start_soon(work)
            n.start_soon(idle)

    trio.run(main)
    assert order == ["copied", "idle"] and y.li == 2
