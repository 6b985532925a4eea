"""Planning and applying a commit without a mount: the layers are plain directories (whiteouts
and opaque marks made by hand, as the filesystem makes them), the plan is checked against a
reference computed independently from the merged view, and the plan applied to a copy of the
base must give exactly the view. Milliseconds per case: no daemon, no FUSE, no journal.

The reference (`view` and `expected_ops`) is written from the layer encoding of
docs/ARCHITECTURE.md, not from overlayd.commit.plan: a path-keyed merge of the layers, top-down.
"""

import os
import random
import stat

import pytest

from overlayd import commit
from overlayd.osutil import DIR_FLAGS, OPAQUE_XATTR

# ---------------------------------------------------------------------- building layers by hand


def whiteout(path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, 0)


def opaque(path) -> None:
    os.setxattr(path, OPAQUE_XATTR, b"y")


def put(path, data=b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------- the reference


def _kind(st) -> str:
    m = st.st_mode
    return ("d" if stat.S_ISDIR(m) else "f" if stat.S_ISREG(m) else "l" if stat.S_ISLNK(m)
            else "p" if stat.S_ISFIFO(m) else "wh" if stat.S_ISCHR(m) and st.st_rdev == 0 else "other")


def _opaque(path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def view(base, layers) -> dict:
    """path -> (kind, source, reaches_base) of the merged view; source is the id of the top layer
    that holds the entry, or None for a base entry; reaches_base: a directory merged with the
    base's directory of the same path."""
    out = {}
    sources = [(lid, root) for lid, root in reversed(layers)] + [(None, str(base))]

    def walk(rel, dirs):  # dirs: [(source, physical dir)] top-down, ending at an opaque one
        names = set()
        for _, d in dirs:
            names.update(os.listdir(d))
        for name in sorted(names):
            path = f"{rel}/{name}" if rel else name
            chain = []
            for src, d in dirs:
                p = os.path.join(d, name)
                if not os.path.lexists(p):
                    continue
                k = _kind(os.lstat(p))
                if not chain:
                    if k == "wh":
                        break
                    chain.append((src, p, k))
                    if k != "d" or _opaque(p):
                        break
                    continue
                if k != "d":
                    break
                chain.append((src, p, k))
                if _opaque(p):
                    break
            if not chain:
                continue
            src, p, k = chain[0]
            out[path] = (k, src, k == "d" and chain[-1][0] is None)
            if k == "d":
                walk(path, [(s, q) for s, q, _ in chain])

    walk("", sources)
    return out


def expected_ops(base, layers) -> set:
    """(op, path, layer, replaces) the plan must hold, from the view alone."""
    v = view(base, layers)
    out = set()
    new_dirs = []  # paths of directories replaced or created whole: their subtrees are theirs

    def base_kind(path):
        p = os.path.join(base, path)
        return _kind(os.lstat(p)) if os.path.lexists(p) else None

    for path, (k, src, reaches) in sorted(v.items()):
        under_new = any(path.startswith(d + "/") for d in new_dirs)
        if src is None:
            continue
        replaces = None if under_new else base_kind(path)
        if k == "d":
            if reaches and not under_new:
                out.add(("dir", path, src, None))
            else:
                out.add(("newdir", path, src, replaces))
                if not under_new:
                    new_dirs.append(path)
        else:
            out.add(("put", path, src, replaces))
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.relpath(os.path.join(dirpath, name), base)
            parent = os.path.dirname(path)
            if path not in v and (parent == "" or (parent in v and v[parent][2])):
                out.add(("delete", path, None, None))
    return out


def plan_of(base, layers) -> list:
    base_fd = os.open(base, DIR_FLAGS)
    fds = [(lid, os.open(root, DIR_FLAGS)) for lid, root in layers]
    try:
        return commit.plan_commit(base_fd, fds)
    finally:
        for _, fd in fds:
            os.close(fd)
        os.close(base_fd)


def as_set(ops) -> set:
    return {(op["op"], op["path"], None if op["op"] == "delete" else op["layer"],
             op.get("replaces") if op["op"] in ("put", "newdir") and op["root"] < 0 else None) for op in ops}


def tree(root) -> dict:
    """path -> (kind, data or link target, mode) of a plain tree (no overlayd encoding)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            k = _kind(st)
            body = (open(p, "rb").read() if k == "f" else os.readlink(p) if k == "l" else None)
            out[os.path.relpath(p, root)] = (k, body, stat.S_IMODE(st.st_mode))
    return out


def view_tree(base, layers) -> dict:
    out = {}
    roots = dict(layers)
    for path, (k, src, _) in view(base, layers).items():
        p = os.path.join(roots[src] if src is not None else base, path)
        st = os.lstat(p)
        body = open(p, "rb").read() if k == "f" else os.readlink(p) if k == "l" else None
        out[path] = (k, body, stat.S_IMODE(st.st_mode))
    return out


def apply_plan(base, layers, saga=1) -> list:
    """Plan, stage, apply, as the engine does (without rules and journal); returns the plan."""
    base_fd = os.open(base, DIR_FLAGS)
    fds = {lid: os.open(root, DIR_FLAGS) for lid, root in layers}
    try:
        full = commit.plan_commit(base_fd, list(fds.items()))
        assert not commit.refusals(base_fd, full)
        commit.materialize(base_fd, fds, full)
        ops = commit.compact(full)
        m = commit.Merger(base_fd, fds, saga, ops, commit.new_token(full))
        try:
            m.stage()
            m.apply()
        finally:
            m.close()
        return full
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(base_fd)


# ---------------------------------------------------------------------- cases


@pytest.fixture
def stack(tmp_path):
    base = tmp_path / "base"
    layers = [("0001", tmp_path / "l1"), ("0002", tmp_path / "l2")]
    for p in [base] + [p for _, p in layers]:
        p.mkdir()
    put(base / "keep.txt", b"keep")
    put(base / "gone.txt", b"gone")
    put(base / "src" / "a.py", b"a")
    put(base / "src" / "b.py", b"b")
    put(base / "src" / "deep" / "c.py", b"c")
    put(base / "file-to-dir", b"f")
    put(base / "dir-to-file" / "x", b"x")
    put(base / "opaqued" / "old", b"old")
    return base, [(lid, str(p)) for lid, p in layers]


def test_plan_matches_the_reference(stack):
    base, layers = stack
    l1, l2 = layers[0][1], layers[1][1]
    whiteout(f"{l1}/gone.txt")
    put(f"{l1}/src/a.py", b"a changed")
    put(f"{l1}/new/n1", b"n1")                      # a new directory, all in one layer: a move
    put(f"{l2}/src/b.py", b"b changed above")
    os.makedirs(f"{l2}/src/deep")
    whiteout(f"{l2}/src/deep/c.py")
    put(f"{l2}/new/n2", b"n2")                      # the new directory continues in layer 2
    os.makedirs(f"{l2}/file-to-dir")
    put(f"{l2}/file-to-dir/inside", b"i")
    put(f"{l1}/dir-to-file", b"now a file")
    os.makedirs(f"{l1}/opaqued")
    opaque(f"{l1}/opaqued")
    put(f"{l1}/opaqued/fresh", b"fresh")
    os.symlink("keep.txt", f"{l2}/link")
    os.mkfifo(f"{l2}/fifo")
    ops = plan_of(base, layers)
    assert as_set(ops) == expected_ops(base, layers)
    paths = [op["path"] for op in ops]
    for i, op in enumerate(ops):  # parents first, and root indices point at the enclosing newdir
        if op["root"] >= 0:
            assert ops[op["root"]]["op"] == "newdir" and op["path"].startswith(ops[op["root"]]["path"] + "/")
        if "/" in op["path"] and os.path.dirname(op["path"]) in paths:
            assert paths.index(os.path.dirname(op["path"])) < i
    by_path = {op["path"]: op for op in ops}
    assert not by_path["new"].get("move")  # two layers hold it: built entry by entry
    assert by_path["opaqued"]["op"] == "newdir" and by_path["opaqued"]["replaces"] == "d"
    assert {c["path"]: c["change"] for c in commit.summarize(ops)} == {
        "gone.txt": "deleted", "src/a.py": "modified", "src/b.py": "modified", "src/deep/c.py": "deleted",
        "new": "added", "new/n1": "added", "new/n2": "added", "file-to-dir": "modified",
        "file-to-dir/inside": "added", "dir-to-file": "modified", "opaqued": "modified", "opaqued/fresh": "added",
        "link": "added", "fifo": "added"}


def test_move_compact_and_leave_out(stack):
    base, layers = stack
    l1 = layers[0][1]
    for i in range(5):
        put(f"{l1}/tree/sub{i % 2}/f{i}", b"%d" % i)
    ops = plan_of(base, layers)
    tree_op = next(op for op in ops if op["path"] == "tree")
    assert tree_op["op"] == "newdir" and tree_op.get("move") == commit.plan.MOVES
    if commit.plan.MOVES:
        small = commit.compact(ops)
        assert [op["path"] for op in small] == ["tree"] and small[0]["entries"] == 7
        assert commit.count_entries(small) == commit.count_entries(ops) == 8
    cut = commit.leave_out(ops, {"tree/sub0", "tree/sub0/f0", "tree/sub0/f2", "tree/sub0/f4"})
    assert [op["path"] for op in cut] == ["tree", "tree/sub1", "tree/sub1/f1", "tree/sub1/f3"]
    assert not cut[0].get("move") and [op["root"] for op in cut] == [-1, 0, 0, 0]


def test_a_whiteout_of_nothing_and_an_unchanged_base_plan_nothing(stack):
    base, layers = stack
    whiteout(f"{layers[1][1]}/never-existed")
    assert plan_of(base, layers) == []
    assert expected_ops(base, layers) == set()


@pytest.mark.parametrize("seed", range(12))
def test_random_stacks_plan_and_apply_to_the_view(tmp_path, seed):
    """Random stacks of three layers over a random base: the plan is the reference's, and
    applying it to the base gives the view (kinds, data, link targets, file modes)."""
    rnd = random.Random(seed)
    base = tmp_path / "base"
    layers = [(f"{i:04x}", str(tmp_path / f"l{i}")) for i in range(1, 4)]
    names = ["a", "b", "c", "d"]

    def rand_path(depth=3):
        return "/".join(rnd.choice(names) for _ in range(rnd.randint(1, depth)))

    base.mkdir()
    for _ in range(12):
        p = base / rand_path()
        try:
            put(p, rnd.randbytes(rnd.randint(0, 20)))
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            pass
    for lid, root in layers:
        os.mkdir(root)
        for _ in range(rnd.randint(2, 8)):
            p = os.path.join(root, rand_path())
            what = rnd.choice(["file", "file", "whiteout", "dir", "opaque", "symlink"])
            try:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                if os.path.lexists(p):
                    continue
                if what == "file":
                    put(p, rnd.randbytes(rnd.randint(0, 20)))
                    os.chmod(p, rnd.choice([0o644, 0o600, 0o755]))
                elif what == "whiteout":
                    whiteout(p)
                elif what == "symlink":
                    os.symlink(rand_path(), p)
                else:
                    os.mkdir(p)
                    if what == "opaque":
                        opaque(p)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                continue
    want = view_tree(base, layers)
    ops = plan_of(base, layers)
    assert as_set(ops) == expected_ops(base, layers)
    apply_plan(base, layers)
    assert tree(base) == want
    assert not [n for n in os.listdir(base) if n.startswith(".overlayd-")]
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            assert not [x for x in os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
                        if x.startswith("user.overlayd.")]


def test_same_identity_rules():
    f = ["f", 10, 3, 100, 200, 2, 0o100644, 0, 0]
    assert commit.same_identity(f, list(f))
    assert commit.same_identity(f, f[:4] + [300, 1] + f[6:])      # lost a hard link: ctime says nothing
    assert not commit.same_identity(f, f[:4] + [300, 2] + f[6:])  # same links, new ctime: changed
    assert not commit.same_identity(f, f[:4] + [300, 1, 0o100600, 0, 0])  # chmod-ed meanwhile
    assert commit.same_identity(f[:5], f)                          # a version-1 identity
    assert not commit.same_identity(None, f) and commit.same_identity(None, None)
    assert commit.same_identity(["d"], ["d"]) and not commit.same_identity(["d"], f)
