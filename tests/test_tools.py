"""Everyday tools on the mount: git, rm -rf, tar, compileall, sed -i, cp -a.

Each test mounts its own copy of the sample base (``tws``: a base in tmp_path, one layer
pushed) and, where it makes sense, runs the same commands in a plain copy of that base and
compares the two trees. Every test ends by checking that the base did not change (treecmp
snapshot plus conftest's tree_digest, which covers mtimes). The last test runs all the
tools one after another on the session's sample base and then drops the layer.
"""

import os
import stat
import subprocess
import sys

import pytest

from conftest import build_sample_base, tree_digest
from treecmp import diff, snapshot


def git_env(home):
    return {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid", "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z", "LC_ALL": "C"}


def run(cmd, cwd, env=None):
    """Run *cmd* (check=True); its stdout as text."""
    res = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=120)
    return res.stdout


def times(root):
    """rel path -> (mtime_ns, st_nlink or None for directories), for every entry below *root*."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, None if stat.S_ISDIR(st.st_mode) else st.st_nlink)
    return out


def nlinks(root):
    return {rel: v[1] for rel, v in times(root).items()}


def assert_same_tree(got_root, want_root, *, mtimes=True):
    problems = diff(snapshot(got_root), snapshot(want_root))
    assert not problems, "trees differ (mount first):\n" + "\n".join(problems[:20])
    got, want = (times(got_root), times(want_root)) if mtimes else (nlinks(got_root), nlinks(want_root))
    bad = [f"{k}: {got.get(k)} != {want.get(k)}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not bad, "mtimes / link counts differ (mount first):\n" + "\n".join(bad[:20])


class Base:
    """A sample base in tmp_path, with a record of it to check at the end."""

    def __init__(self, path):
        self.path = path
        build_sample_base(path)
        self.snap = snapshot(path)
        self.digest = tree_digest(path)

    def assert_unchanged(self):
        problems = diff(snapshot(self.path), self.snap)
        assert not problems, "the base changed:\n" + "\n".join(problems[:20])
        assert tree_digest(self.path) == self.digest, "the base changed (mtimes, owners or xattrs)"


@pytest.fixture
def base(tmp_path):
    b = Base(tmp_path / "base")
    yield b
    b.assert_unchanged()


@pytest.fixture
def tws(mount_factory, base):
    m = mount_factory(base.path)
    m.push()
    return m


@pytest.fixture
def plain(base, tmp_path):
    dst = tmp_path / "plain"
    subprocess.run(["cp", "-a", str(base.path), str(dst)], check=True)
    return dst


def test_git_workflow(tws, base, tmp_path):
    mp = tws.mp
    env = git_env(tmp_path)
    run(["git", "init", "-q", "-b", "main"], mp, env)
    run(["git", "add", "-A"], mp, env)
    run(["git", "commit", "-q", "-m", "base"], mp, env)
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    tracked = run(["git", "ls-files"], mp, env).split()
    assert "src/pkg/sub/deep.txt" in tracked and "docs/a-link.md" in tracked and "src/abs-link" in tracked
    run(["git", "checkout", "-q", "-b", "feature"], mp, env)
    with open(mp / "src/pkg/mod1.py", "a") as f:
        f.write("# feature\n")
    os.unlink(mp / "docs/a.md")
    (mp / "src/pkg/new.py").write_text("x = 1\n")
    run(["git", "add", "-A"], mp, env)
    run(["git", "commit", "-q", "-m", "feature"], mp, env)
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    run(["git", "checkout", "-q", "main"], mp, env)
    assert (mp / "src/pkg/mod1.py").read_bytes() == (base.path / "src/pkg/mod1.py").read_bytes()
    assert (mp / "docs/a.md").read_text() == "# a\n"
    assert not (mp / "src/pkg/new.py").exists()
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    run(["git", "checkout", "-q", "feature"], mp, env)
    assert (mp / "src/pkg/mod1.py").read_text().endswith("# feature\n")
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    assert len(run(["git", "log", "--oneline"], mp, env).splitlines()) == 2
    run(["git", "gc", "-q"], mp, env)
    run(["git", "fsck", "--no-progress"], mp, env)
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    # git status still clean with a fresh kernel cache and a fresh daemon
    tws.stop()
    tws.start()
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    run(["git", "checkout", "-q", "main"], mp, env)
    assert run(["git", "status", "--porcelain"], mp, env) == ""


def test_rm_rf_base_dir(tws, base):
    mp = tws.mp
    run(["rm", "-rf", "src"], mp)
    assert not os.path.lexists(mp / "src")
    os.mkdir(mp / "src")
    assert os.listdir(mp / "src") == []
    run(["rm", "-rf", "docs", "empty", "big.bin", "fifo", "dangling"], mp)
    assert sorted(os.listdir(mp)) == ["README", "src"]
    assert (mp / "README").read_text() == "sample base\n"
    assert os.stat(mp / "README").st_nlink == 1
    out = run(["find", ".", "-print"], mp).split()
    assert sorted(out) == [".", "./README", "./src"]


def test_tar_extract(tws, base, plain, tmp_path):
    archive = tmp_path / "sample.tar"
    run(["tar", "--xattrs", "--xattrs-include=user.*", "--format=posix", "-C", str(base.path), "-cf",
         str(archive), "."], tmp_path)
    # into a new directory: the same as extracting into a plain directory
    os.mkdir(tws.mp / "x")
    os.mkdir(tmp_path / "plainx")
    for dest in (tws.mp / "x", tmp_path / "plainx"):
        run(["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(archive)], dest)
    assert_same_tree(tws.mp / "x", tmp_path / "plainx")
    assert_same_tree(tws.mp / "x", base.path)
    # over the base itself (tar unlinks and re-creates what exists)
    run(["rm", "-rf", "x"], tws.mp)
    for dest in (tws.mp, plain):
        run(["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(archive)], dest)
    assert_same_tree(tws.mp, plain)
    assert_same_tree(tws.mp, base.path)


def test_compileall(tws, base, plain):
    for root in (tws.mp, plain):
        run([sys.executable, "-m", "compileall", "-q", "src"], root)
        out = run([sys.executable, "-c", "import pkg.mod5 as m, pkg.sub; print(m.f5(), m.__cached__)"],
                  root / "src")
        assert out.split()[0] == "5"
    pycs = sorted(p.relative_to(tws.mp) for p in (tws.mp / "src").rglob("*.pyc"))
    assert len(pycs) == 20
    # the .pyc headers hold the sources' mtimes and sizes: identical only if the view kept them
    assert_same_tree(tws.mp, plain, mtimes=False)
    # the cached bytecode is used (not rewritten) when the sources did not change
    before = {p: os.stat(tws.mp / p).st_mtime_ns for p in pycs}
    run([sys.executable, "-m", "compileall", "-q", "src"], tws.mp)
    assert {p: os.stat(tws.mp / p).st_mtime_ns for p in pycs} == before


def test_sed_in_place(tws, base, plain):
    for root in (tws.mp, plain):
        run(["sed", "-i", "s/return/yield/", "src/pkg/mod2.py", "src/pkg/mod3.py", "README"], root)
    mp = tws.mp
    assert "yield 2" in (mp / "src/pkg/mod2.py").read_text()
    assert "return" not in (mp / "src/pkg/mod3.py").read_text()
    assert stat.S_IMODE(os.stat(mp / "src/pkg/mod3.py").st_mode) == 0o755
    # sed -i replaces README with a new file: its hard link keeps the old content
    assert (mp / "src/README.hard").read_text() == "sample base\n"
    assert os.stat(mp / "README").st_nlink == 1
    assert os.stat(mp / "src/README.hard").st_nlink == 1
    assert_same_tree(mp, plain, mtimes=False)
    assert (base.path / "src/pkg/mod2.py").read_text().count("return") == 3


def test_cp_a(tws, base, plain):
    mp = tws.mp
    for root in (mp, plain):
        run(["cp", "-a", "src", "src-copy"], root)
        run(["cp", "-a", "docs", "docs-copy"], root)
        run(["cp", "-a", "big.bin", "fifo", "dangling", "src/pkg"], root)
    for copy, orig in (("src-copy", "src"), ("docs-copy", "docs")):
        problems = diff(snapshot(mp / copy), snapshot(base.path / orig))
        assert not problems, f"{copy} differs from the base's {orig}:\n" + "\n".join(problems[:20])
        got = {k: v[0] for k, v in times(mp / copy).items()}
        assert got == {k: v[0] for k, v in times(base.path / orig).items()}, f"{copy}: mtimes not kept"
        assert_same_tree(mp / copy, plain / copy)
    assert os.stat(mp / "docs-copy/a.md").st_ino == os.stat(mp / "docs-copy/a-link.md").st_ino
    assert os.getxattr(mp / "docs-copy/a.md", "user.colour") == b"blue"
    assert os.stat(mp / "docs-copy").st_uid == 1000
    assert (mp / "src/pkg/big.bin").read_bytes() == (base.path / "big.bin").read_bytes()
    assert_same_tree(mp, plain, mtimes=False)


def test_all_tools_on_sample_base(ws, sample_base, tmp_path):
    """git, rm -rf, tar x, compileall, sed -i and cp -a one after another; then the layer is
    dropped: the view and the (session-wide) base are as before."""
    before = snapshot(sample_base)
    digest = tree_digest(sample_base)
    mp = ws.mp
    env = git_env(tmp_path)
    archive = tmp_path / "a.tar"
    run(["tar", "--xattrs", "--xattrs-include=user.*", "-C", str(sample_base), "-cf", str(archive), "src"],
        tmp_path)
    run(["git", "init", "-q", "-b", "main"], mp, env)
    run(["git", "add", "-A"], mp, env)
    run(["git", "commit", "-q", "-m", "base"], mp, env)
    run(["rm", "-rf", "src"], mp)
    run(["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(archive)], mp)
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    run([sys.executable, "-m", "compileall", "-q", "src"], mp)
    run(["sed", "-i", "s/def/async def/", "src/pkg/mod0.py"], mp)
    run(["cp", "-a", "src", "docs", "empty"], mp)
    run(["git", "checkout", "-q", "-b", "work"], mp, env)
    run(["git", "add", "-A"], mp, env)
    run(["git", "commit", "-q", "-m", "work"], mp, env)
    assert run(["git", "status", "--porcelain"], mp, env) == ""
    assert diff(snapshot(sample_base), before) == []
    assert tree_digest(sample_base) == digest
    ws.drop(1)
    problems = diff(snapshot(mp), before)
    assert not problems, problems[:20]
    assert tree_digest(sample_base) == digest
