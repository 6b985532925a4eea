"""No committed byte may differ from the view (issue 15): metadata-only changes of small files
under long paths, mount points inside the base, a base reached through a bind mount, directory
attributes changed outside the workspace, and the times of the directories a commit creates.

Each test compares the base after the commit with the view before it (or with a plain copy that
had the same operations), byte for byte, with modes, owners, xattrs, hard links and mtimes, and
checks that no ``user.overlayd.*`` xattr reached the base. Real mounts throughout: bind mounts
and tmpfs mounts are made and always unmounted by the test that made them.
"""

import os
import stat
import subprocess
import threading
import time

import pytest

from overlayd.client import ClientError
from test_commit_move import private_xattrs
from test_saga import assert_same, expected_tree, put, read, restart, staged_names, wait_dead

SIZES = (0, 1, 18, 4095, 4096, 4097, 65535, 65536, 65537)
# a path of about 200 characters: ext4 cannot keep the origin xattr in the inode, so it takes a
# 4 KiB block and a metacopy of a small file no longer looks sparse
LONG = "very/long/directory/path/that/an/ordinary/project/might/have/src/components/widgets/internal/" \
       "and/then/some/more/levels/of/nesting/for/good/measure/x"
SHORT = "s"


@pytest.fixture(params=[True, False], ids=["moves", "no-moves"])
def moves(request, monkeypatch):
    monkeypatch.setenv("OVERLAYD_COMMIT_MOVES", "1" if request.param else "0")
    return request.param


def data(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(size))  # no NUL byte anywhere


def file_times(root) -> dict:
    """relative path -> mtime_ns of every entry that is not a directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns
    return out


def begin(m, name="s"):
    m.call("saga.begin", name=name)
    m.call("saga.step", name="one")


# ------------------------------------------------------------------------------------ item 1

TRIGGERS = {
    "chmod": lambda p: os.chmod(p, 0o755),
    "xattr": lambda p: os.setxattr(p, "user.note", b"n" * 100),
    "rename": lambda p: os.rename(p, p + ".renamed"),
    "utime": lambda p: os.utime(p, ns=(1_000_000_000_123, 1_000_000_000_456)),
    "chown": lambda p: os.chown(p, 1234, 5678),
    "link": lambda p: os.link(p, p + ".link"),
}


def small_files_base(root):
    for where in (SHORT, LONG):
        os.makedirs(root / where / "pkg")
        for size in SIZES:
            for t in TRIGGERS:
                put(root / where / f"{t}-{size}", data(size, size))
            put(root / where / "pkg" / f"m{size}.py", data(size, size + 1))
    return root


def small_files_ops(r):
    for where in (SHORT, LONG):
        for size in SIZES:
            for t, fn in TRIGGERS.items():
                fn(str(r / where / f"{t}-{size}"))
        os.rename(r / where / "pkg", r / where / "pkg2")  # git mv of a package of small files


def test_metadata_changes_of_small_files_commit_their_data(mount_factory, tmp_path, moves):
    """chmod, xattr, rename, utime, chown, hard link and directory rename of base files of every
    size around the block boundaries, under short and ~200-character paths: the base after the
    commit holds each file's data (not NULs), and no private xattr."""
    base = small_files_base(tmp_path / "base")
    expected = expected_tree(base, tmp_path / "expected", small_files_ops)
    m = mount_factory(base)
    begin(m)
    small_files_ops(m.mp)
    assert_same(m.mp, expected, "the view")
    view_times = file_times(m.mp)
    m.call("saga.commit")
    assert private_xattrs(base) == []
    assert staged_names(base) == []
    assert_same(base, expected, "the base after the commit")
    assert file_times(base) == view_times
    assert_same(m.mp, expected, "the view after the commit")


def test_the_view_counts_the_blocks_of_a_metacopy_under_a_long_path(mount_factory, tmp_path):
    """du in the view: a chmod-ed base file is a metacopy whose blocks are its origin's, even
    when its origin xattr takes a block of its own (a sparse base file shows 0 blocks)."""
    base = tmp_path / "base"
    os.makedirs(base / LONG)
    with open(base / LONG / "sparse", "wb") as f:
        f.truncate(4000)
    assert os.stat(base / LONG / "sparse").st_blocks == 0
    m = mount_factory(base)
    begin(m)
    os.chmod(m.mp / LONG / "sparse", 0o600)
    layer_copy = next((m.state / "layers").iterdir()) / LONG / "sparse"
    assert os.stat(layer_copy).st_blocks > 0  # the xattr's block
    assert os.stat(m.mp / LONG / "sparse").st_blocks == 0


def test_git_freshening_an_object_keeps_the_repository_sound(mount_factory, tmp_path):
    """`cp LICENSE L2; git add L2; git commit` in the workspace: git finds the blob it already has
    and only freshens its mtime (a metadata-only change of a small base file under a long path);
    the committed repository passes `git fsck`."""
    base = tmp_path / "base"
    base.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(cwd, *args):
        return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, check=True,
                              capture_output=True, text=True).stdout

    git(base, "init", "-q")
    put(base / "LICENSE", "Permission is hereby granted, free of charge.\n")
    git(base, "add", "LICENSE")
    git(base, "commit", "-q", "-m", "one")
    m = mount_factory(base)
    begin(m)
    put(m.mp / "L2", read(m.mp / "LICENSE"))
    git(m.mp, "add", "L2")
    git(m.mp, "commit", "-q", "-m", "two")
    m.call("saga.commit")
    assert private_xattrs(base) == []
    git(base, "fsck", "--full", "--strict")
    assert git(base, "show", "HEAD:L2") == "Permission is hereby granted, free of charge.\n"


@pytest.mark.parametrize("where", ["staged", "moved"])
def test_a_private_xattr_left_in_a_layer_refuses_the_commit(mount_factory, tmp_path, where, moves):
    """Defence in depth: a layer file that still carries an overlayd xattr (whatever left it
    there) is never staged nor moved into the base; the commit is refused, the saga stays active
    and can be committed once the file is clean."""
    base = tmp_path / "base"
    (base / "old").mkdir(parents=True)
    put(base / "old" / "f", "old\n")
    m = mount_factory(base)
    begin(m)
    rel = "old/new-file" if where == "staged" else "newdir/inner"
    if where == "moved":
        os.mkdir(m.mp / "newdir")
    put(m.mp / rel, "the data\n")
    layer = next((m.state / "layers").iterdir())
    os.setxattr(layer / rel, "user.overlayd.stray", b"x")
    with pytest.raises(ClientError) as exc:
        m.call("saga.commit")
    assert "user.overlayd.stray" in str(exc.value) and "still active" in str(exc.value)
    assert m.call("saga.status")["saga"]["state"] == "active"
    assert not os.path.lexists(base / rel) and staged_names(base) == [] and private_xattrs(base) == []
    os.removexattr(layer / rel, "user.overlayd.stray")
    m.call("saga.commit")
    assert read(base / rel) == b"the data\n" and private_xattrs(base) == []


# ------------------------------------------------------------------------------------ item 2


@pytest.fixture
def mounts():
    """Mounts made by a test, unmounted (lazily, in reverse) whatever happens."""
    made = []

    def mount(*args):
        target = args[-1]
        subprocess.run(["mount", *args], check=True)
        made.append(target)

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], check=False)


def _outside(tmp_path, kind, mounts, target):
    """A file system mounted at *target*, holding a file: a bind mount of a directory outside the
    base, or a tmpfs."""
    os.makedirs(target, exist_ok=True)
    if kind == "bind":
        outside = tmp_path / "outside"
        outside.mkdir()
        mounts("--bind", str(outside), str(target))
    else:
        mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target))
    put(target / "precious", "must survive\n")
    os.mkdir(target / "keepdir")
    put(target / "keepdir" / "x", "x\n")


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
@pytest.mark.parametrize("change", ["delete-parent", "replace-parent", "write-inside"])
def test_commit_never_crosses_a_mount_point_of_the_base(mount_factory, mounts, tmp_path, kind, change):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    put(base / "sub" / "plain", "plain\n")
    _outside(tmp_path, kind, mounts, base / "sub" / "cache")
    put(base / "other", "other\n")
    m = mount_factory(base)
    begin(m)
    put(m.mp / "other", "changed\n")
    if change == "write-inside":
        put(m.mp / "sub" / "cache" / "new", "new\n")
    else:
        subprocess.run(["rm", "-rf", str(m.mp / "sub")], check=True)
        if change == "replace-parent":
            os.mkdir(m.mp / "sub")
            put(m.mp / "sub" / "fresh", "fresh\n")
    dry = m.call("saga.commit", dry_run=True)
    assert [c["path"] for c in dry["conflicts"]] == ["sub/cache"]
    with pytest.raises(ClientError) as exc:
        m.call("saga.commit")
    assert exc.value.code == "conflict"
    assert "a file system is mounted at sub/cache inside the base" in str(exc.value)
    assert [c["path"] for c in exc.value.data["conflicts"]] == ["sub/cache"]
    # nothing was touched, the saga is active and writable, and it can be rolled back
    assert read(base / "sub" / "cache" / "precious") == b"must survive\n"
    assert read(base / "sub" / "cache" / "keepdir" / "x") == b"x\n"
    assert read(base / "sub" / "plain") == b"plain\n" and read(base / "other") == b"other\n"
    st = m.call("saga.status")
    assert st["saga"]["state"] == "active" and st["writable"] is True
    m.call("saga.rollback")
    assert read(m.mp / "sub" / "cache" / "precious") == b"must survive\n"
    m.call("saga.abort")
    m.stop()
    m.start()  # the daemon starts: nothing is left half-committed


def test_a_mount_made_during_the_commit_stops_it_before_it_crosses(mount_factory, mounts, tmp_path, monkeypatch):
    """A file system mounted after the plan was checked (the commit stalls before applying): the
    apply phase refuses before it changes anything, the saga stays committing with a message,
    and once it is unmounted `saga commit` finishes."""
    base = tmp_path / "base"
    (base / "sub" / "cache").mkdir(parents=True)
    put(base / "sub" / "plain", "plain\n")
    monkeypatch.setenv("OVERLAYD_STALL_AT", "commit.apply:2")
    m = mount_factory(base)
    begin(m)
    subprocess.run(["rm", "-rf", str(m.mp / "sub")], check=True)
    out = {}

    def commit():
        try:
            m.call("saga.commit")
        except ClientError as exc:
            out["error"] = exc

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.8)
    _outside(tmp_path, "tmpfs", mounts, base / "sub" / "cache")
    t.join(30)
    assert out["error"].code == "commit-incomplete"
    assert "a file system is mounted at sub/cache inside the base" in str(out["error"])
    assert read(base / "sub" / "cache" / "precious") == b"must survive\n"
    assert read(base / "sub" / "plain") == b"plain\n"
    assert m.call("saga.status")["saga"]["state"] == "committing"
    subprocess.run(["umount", str(base / "sub" / "cache")], check=True)
    m.call("saga.commit")
    assert not os.path.lexists(base / "sub")


# ------------------------------------------------------------------------------------ item 5


def bind_base(tmp_path, mounts):
    """A base reached through a bind mount of the state directory's file system: the same st_dev,
    another mount (link() and rename() between them fail with EXDEV). Returns (real, bound)."""
    real = tmp_path / "real"
    (real / "base" / "src").mkdir(parents=True)
    for i in range(5):
        put(real / "base" / "src" / f"m{i}.py", data(100 + i, i))
    put(real / "base" / "README", "readme\n")
    bound = tmp_path / "basebind"
    bound.mkdir()
    mounts("--bind", str(real), str(bound))
    assert os.stat(bound / "base").st_dev == os.stat(tmp_path).st_dev
    return real / "base", bound / "base"


def ops_bind(r):
    put(r / "README", "changed\n")
    put(r / "src" / "new.py", "new\n")
    os.link(r / "src" / "new.py", r / "src" / "new-link.py")
    os.rename(r / "src" / "m0.py", r / "src" / "m0-renamed.py")
    os.chmod(r / "src" / "m1.py", 0o700)
    os.makedirs(r / "pkg" / "sub")
    for i in range(3):
        put(r / "pkg" / "sub" / f"f{i}", data(4095 + i, i))
    os.rename(r / "src" / "m2.py", r / "pkg" / "m2.py")
    os.link(r / "pkg" / "sub" / "f0", r / "pkg" / "f0-link")
    os.symlink("sub/f1", r / "pkg" / "to-f1")


def test_base_through_a_bind_mount_commits_by_copying(mount_factory, mounts, tmp_path, moves):
    real, bound = bind_base(tmp_path, mounts)
    expected = expected_tree(real, tmp_path / "expected", ops_bind)
    m = mount_factory(bound)
    begin(m)
    ops_bind(m.mp)
    assert_same(m.mp, expected, "the view")
    m.call("saga.commit")
    assert_same(real, expected, "the base after the commit")
    assert private_xattrs(real) == [] and staged_names(real) == []
    assert_same(m.mp, expected, "the view after the commit")


def test_a_move_journaled_on_one_mount_is_built_when_the_base_comes_through_another(
        mount_factory, mounts, tmp_path, monkeypatch):
    """A commit planned with the base on the layers' mount (a new directory moved whole) crashes
    after its intent is journaled; the daemon comes back with the base through a bind mount: the
    rename would fail with EXDEV, so recovery builds the directory entry by entry."""
    real, bound = bind_base(tmp_path, mounts)
    expected = expected_tree(real, tmp_path / "expected", ops_bind)
    monkeypatch.setenv("OVERLAYD_COMMIT_MOVES", "1")
    monkeypatch.setenv("OVERLAYD_CRASH_AT", "commit.intent")
    m = mount_factory(real)
    begin(m)
    ops_bind(m.mp)
    with pytest.raises((ClientError, OSError)):
        m.call("saga.commit")
    wait_dead(m)
    monkeypatch.delenv("OVERLAYD_CRASH_AT")
    m.base = bound
    restart(m)
    assert "pkg: the base is on another mount than its layer now; built entry by entry" in m.log()
    assert_same(real, expected, "the base after the recovered commit")
    assert private_xattrs(real) == [] and staged_names(real) == []
    assert m.call("saga.status")["saga"] is None


# ------------------------------------------------------------------------------------ item 7


def attrs_base(root):
    for d in ("secrets", "mine", "both", "tags"):
        (root / d).mkdir(parents=True)
        os.chmod(root / d, 0o755)
        put(root / d / "a", "a\n")
    os.setxattr(root / "tags", "user.old", b"1")
    os.setxattr(root / "secrets", "user.keep", b"k")
    return root


def test_directory_attributes_follow_who_changed_them(mount_factory, tmp_path, moves):
    """A directory the saga only passes through keeps what the base holds now (mode, owner and
    xattrs changed outside the workspace meanwhile); what the saga changed itself is committed;
    a change of the same attribute on both sides refuses the commit."""
    base = attrs_base(tmp_path / "base")
    m = mount_factory(base)
    begin(m)
    mp = m.mp
    put(mp / "secrets" / "new", "new\n")  # passes through secrets
    os.chmod(mp / "mine", 0o750)  # the saga's own changes
    os.chown(mp / "mine", 1000, 1000)
    put(mp / "mine" / "new", "new\n")
    os.setxattr(mp / "tags", "user.new", b"2")
    os.removexattr(mp / "tags", "user.old")
    os.chmod(mp / "both", 0o700)
    # outside the workspace, meanwhile
    os.chmod(base / "secrets", 0o700)
    os.chown(base / "secrets", 2000, 2000)
    os.setxattr(base / "secrets", "user.outside", b"o")
    os.chmod(base / "both", 0o711)
    with pytest.raises(ClientError) as exc:
        m.call("saga.commit")
    assert exc.value.code == "conflict"
    assert [c["path"] for c in exc.value.data["conflicts"]] == ["both"]
    assert "both changed the mode of the directory both" in str(exc.value)
    assert m.call("saga.status")["saga"]["state"] == "active"
    assert not os.path.exists(base / "secrets" / "new")
    os.chmod(base / "both", 0o755)  # the base's change undone: the saga's stands
    m.call("saga.commit")
    st = os.stat(base / "secrets")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 2000, 2000)
    assert sorted(os.listxattr(base / "secrets")) == ["user.keep", "user.outside"]
    assert read(base / "secrets" / "new") == b"new\n"
    st = os.stat(base / "mine")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1000)
    assert sorted(os.listxattr(base / "tags")) == ["user.new"]
    assert stat.S_IMODE(os.stat(base / "both").st_mode) == 0o700
    assert private_xattrs(base) == []


def test_directory_attributes_across_steps_and_a_rollback(mount_factory, tmp_path):
    """The base's attributes recorded at the first copy-up travel with later layers' copies; a
    change made in a rolled-back step is not committed."""
    base = attrs_base(tmp_path / "base")
    m = mount_factory(base)
    begin(m)
    put(m.mp / "secrets" / "one", "1\n")
    m.call("saga.step", name="two")
    os.chmod(m.mp / "secrets", 0o751)  # rolled back below
    m.call("saga.rollback", to=1)
    m.call("saga.step", name="three")
    put(m.mp / "secrets" / "three", "3\n")
    os.chmod(base / "secrets", 0o700)
    m.call("saga.commit")
    assert stat.S_IMODE(os.stat(base / "secrets").st_mode) == 0o700
    assert read(base / "secrets" / "one") == b"1\n" and read(base / "secrets" / "three") == b"3\n"


# ------------------------------------------------------------------------------------ item 14


def test_created_and_moved_directories_keep_the_times_the_view_showed(mount_factory, tmp_path, moves):
    """New directories (moved whole or built entry by entry), a renamed base directory and a
    base directory whose times were set in the view get the mtimes the view showed; a directory
    the saga only passed through gets the mtime the commit's changes give it."""
    base = tmp_path / "base"
    (base / "old" / "deep").mkdir(parents=True)
    put(base / "old" / "deep" / "f", "f\n")
    put(base / "old" / "g", "g\n")
    (base / "touched").mkdir()
    (base / "through").mkdir()
    for d in ("old/deep", "old", "touched", "through"):
        os.utime(base / d, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    m = mount_factory(base)
    begin(m)
    mp = m.mp
    os.makedirs(mp / "new" / "a" / "b")
    put(mp / "new" / "a" / "b" / "x", "x\n")
    put(mp / "new" / "a" / "y", "y\n")
    os.mkdir(mp / "new" / "c")
    os.utime(mp / "new" / "c", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    os.rename(mp / "old", mp / "renamed")
    os.utime(mp / "touched", ns=(1_300_000_000_000_000_000, 1_300_000_000_000_000_000))
    put(mp / "through" / "z", "z\n")
    view = {d: os.stat(mp / d).st_mtime_ns for d in ("new", "new/a", "new/a/b", "new/c", "renamed",
                                                      "renamed/deep", "touched")}
    before = time.time_ns()
    m.call("saga.commit")
    got = {d: os.stat(base / d).st_mtime_ns for d in view}
    assert got == view
    assert os.stat(base / "through").st_mtime_ns >= before  # passed through: the commit's time
    assert private_xattrs(base) == []


def test_recovery_never_crosses_a_mount_point(mount_factory, mounts, tmp_path, monkeypatch):
    """A commit interrupted after staging; a file system is mounted where it deletes before the
    daemon comes back: the daemon refuses to start, saying so, and deletes nothing; once it is
    unmounted, the next start finishes the commit."""
    base = tmp_path / "base"
    (base / "sub" / "cache").mkdir(parents=True)
    put(base / "sub" / "plain", "plain\n")
    monkeypatch.setenv("OVERLAYD_CRASH_AT", "commit.staged")
    m = mount_factory(base)
    begin(m)
    subprocess.run(["rm", "-rf", str(m.mp / "sub")], check=True)
    with pytest.raises((ClientError, OSError)):
        m.call("saga.commit")
    wait_dead(m)
    monkeypatch.delenv("OVERLAYD_CRASH_AT")
    _outside(tmp_path, "bind", mounts, base / "sub" / "cache")
    with pytest.raises(RuntimeError) as exc:
        m.start()
    m.proc = None
    assert "a file system is mounted at sub/cache inside the base" in str(exc.value)
    assert read(base / "sub" / "cache" / "precious") == b"must survive\n"
    assert read(base / "sub" / "plain") == b"plain\n"
    subprocess.run(["umount", str(base / "sub" / "cache")], check=True)
    restart(m)
    assert not os.path.lexists(base / "sub") and staged_names(base) == []
    assert m.call("saga.status")["saga"] is None
