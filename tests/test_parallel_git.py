"""A git repository as the base, used from both sides (issue 20 item 4; overlayd.commit.gitpolicy):
the person runs git in the base while the agent's saga runs git in its workspace; the saga's
commit goes in without a manual step and loses neither side's commits, and a branch both sides
moved apart is a real conflict reported with both commit ids. Real git on both sides, then
`git fsck --full` and `git log` on the base."""

import os
import subprocess
import sys

import pytest

from conftest import put as put_file, read
from overlayd.client import ClientError
from overlayd.commit import gitpolicy

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main",
       "-c", "safe.directory=*", "-c", "gc.auto=0"]

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    put_file(path, data)


def git(where, *args) -> str:
    r = subprocess.run([*GIT, "-C", str(where), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"git {' '.join(args)} in {where}: {r.stderr}"
    return r.stdout


def repo(root):
    root.mkdir()
    git(root, "init", "-q")
    put(root / "README", "readme\n")
    for i in range(20):  # enough objects that both sides' new loose objects share fan-out directories
        put(root / "src" / f"m{i}.py", f"x = {i}\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "base")
    return root


def agent_commit(mp, name, text, msg):
    put(mp / name, text)
    git(mp, "add", name)
    git(mp, "commit", "-qm", msg)
    return git(mp, "rev-parse", "HEAD").strip()


def person_commit(base, name, text, msg):
    put(base / name, text)
    git(base, "add", name)
    git(base, "commit", "-qm", msg)
    return git(base, "rev-parse", "HEAD").strip()


def check_repo(base):
    fsck = subprocess.run([*GIT, "-C", str(base), "fsck", "--full", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "dangling commit" not in fsck.stdout, fsck.stdout


def ident(p):
    st = os.stat(p)
    return st.st_ino, st.st_mtime_ns


def test_person_runs_git_status_while_the_agent_commits(mount_factory, tmp_path):
    base = repo(tmp_path / "base")
    c0 = git(base, "rev-parse", "HEAD").strip()
    m = mount_factory(base, name="gitstat")
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="work")
    a1 = agent_commit(m.mp, "feature.py", "def f():\n    return 1\n", "agent: feature")
    a2 = agent_commit(m.mp, "src/m3.py", "x = 'agent'\n", "agent: m3")
    # the person: an editor saves README unchanged (new mtime), then git status rewrites .git/index
    before = ident(base / ".git" / "index")
    os.utime(base / "README", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert git(base, "status", "--porcelain") == ""
    assert ident(base / ".git" / "index") != before, "git status did not rewrite the index: the test proves nothing"

    r = subprocess.run([sys.executable, "-c", "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())",
                        "commit", "--dry-run"], cwd=m.mp, env=m.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "settled   .git/index  (git: saga's)" in r.stdout.splitlines(), r.stdout + r.stderr
    dry = m.call("saga.commit", dry_run=True)
    assert dry["conflicts"] == [], dry["conflicts"]
    assert {s["path"]: s["how"] for s in dry["settled"]}.get(".git/index") == "saga's", dry["settled"]
    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    assert ".git/index" in {s["path"] for s in res["settled"]}

    assert git(base, "log", "--format=%H", "main").split() == [a2, a1, c0]
    assert git(base, "status", "--porcelain") == ""  # the work tree files the saga committed show right
    assert read(base / "feature.py") == b"def f():\n    return 1\n" and read(base / "src/m3.py") == b"x = 'agent'\n"
    check_repo(base)


def test_person_commits_while_the_agent_commits_on_its_branch(mount_factory, tmp_path):
    base = repo(tmp_path / "base")
    c0 = git(base, "rev-parse", "HEAD").strip()
    m = mount_factory(base, name="gitboth")
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="work")
    git(m.mp, "checkout", "-q", "-b", "agent")
    a1 = agent_commit(m.mp, "feature.py", "def f():\n    return 1\n", "agent: feature")
    m.call("saga.step", name="more")
    a2 = agent_commit(m.mp, "src/m7.py", "x = 'agent'\n", "agent: m7")
    p1 = person_commit(base, "person.txt", "the person's\n", "person: notes")
    p2 = person_commit(base, "src/m1.py", "x = 'person'\n", "person: m1")

    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    settled = {s["path"]: s["how"] for s in res["settled"]}
    assert settled[".git/index"] == "saga's" and settled[".git/logs/HEAD"] == "appended", settled

    # neither side's commits are lost; HEAD is the saga's (only the saga moved it)
    assert git(base, "rev-parse", "main").strip() == p2
    assert git(base, "rev-parse", "agent").strip() == a2
    assert read(base / ".git" / "HEAD") == b"ref: refs/heads/agent\n"
    assert git(base, "log", "--format=%H", "main").split() == [p2, p1, c0]
    assert git(base, "log", "--format=%H", "agent").split() == [a2, a1, c0]
    # both sides' moves are in HEAD's reflog
    heads = git(base, "log", "-g", "--format=%H", "HEAD").split()
    assert {a1, a2, p1, p2} <= set(heads), heads
    assert read(m.mp / ".git" / "logs" / "HEAD") == read(base / ".git" / "logs" / "HEAD")  # the view is the base
    # the index is the saga's branch's: the saga's files are clean; the work tree also holds the
    # person's work, which is on main, not on the branch now checked out
    assert sorted(git(base, "status", "--porcelain").splitlines()) == [" M src/m1.py", "?? person.txt"]
    assert read(base / "src/m1.py") == b"x = 'person'\n" and read(base / "src/m7.py") == b"x = 'agent'\n"
    check_repo(base)


def test_a_branch_both_sides_moved_is_a_conflict_then_a_merge_settles_it(mount_factory, tmp_path):
    base = repo(tmp_path / "base")
    m = mount_factory(base, name="gitconf")
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="work")
    a1 = agent_commit(m.mp, "feature.py", "def f():\n    return 1\n", "agent: feature")
    p1 = person_commit(base, "person.txt", "the person's\n", "person: notes")

    with pytest.raises(ClientError) as err:
        m.call("saga.commit")
    assert err.value.code == "conflict"
    conflicts = {c["path"]: c for c in err.value.data["conflicts"]}
    assert set(conflicts) == {".git/refs/heads/main"}, conflicts  # the index, objects, reflogs settled
    c = conflicts[".git/refs/heads/main"]
    assert (c["base_commit"], c["saga_commit"]) == (p1, a1)
    assert p1[:12] in c["reason"] and a1[:12] in c["reason"] and "branch main" in c["reason"]
    assert git(base, "rev-parse", "main").strip() == p1  # nothing was applied
    assert not os.path.exists(base / "feature.py")

    # the agent does what the message says: fetches the base's branch and merges it
    # the view is live (issue 20 item 1): the person's new file is already in the agent's
    # working tree, untracked by the saga's index (git merge alone refuses to overwrite it)
    assert (m.mp / "person.txt").read_text() == "the person's\n"
    hint = c["reason"][c["reason"].index("(git fetch") + 1:c["reason"].index(") and commit again")]
    assert hint.startswith(f"git fetch {base} refs/heads/main && "), hint
    subprocess.run(hint.replace("git merge FETCH_HEAD", "git merge -q --no-edit FETCH_HEAD"), shell=True,
                   cwd=m.mp, check=True, env={**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x",
                                              "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x"})
    merge = git(m.mp, "rev-parse", "HEAD").strip()
    res = m.call("saga.commit")
    assert res["saga"]["state"] == "committed"
    assert {s["path"]: s["how"] for s in res["settled"]}[".git/refs/heads/main"] == "saga's (fast-forward)"
    assert git(base, "rev-parse", "main").strip() == merge
    assert set(git(base, "log", "--format=%H", "main").split()) >= {a1, p1, merge}
    assert git(base, "status", "--porcelain") == ""
    check_repo(base)


def test_policy_units(tmp_path):
    assert [gitpolicy.kind(p) for p in (".git/index", ".git/objects/ab/cd", ".git/logs/HEAD", ".git/HEAD",
                                        ".git/refs/heads/x", ".git/ORIG_HEAD", ".git/config", ".git/packed-refs",
                                        "src/.git/index", "a")] == \
        ["cache", "object", "log", "ref", "ref", "scratch", None, None, None, None]
    # the base's lines, then the saga's after the last line both have
    assert gitpolicy.merge_log(b"a\nb\np\n", b"a\nb\ns1\ns2\n") == b"a\nb\np\ns1\ns2\n"
    assert gitpolicy.merge_log(b"p\n", b"a\nb\ns1\n") == b"p\na\nb\ns1\n"  # the base expired its lines
    assert gitpolicy.merge_log(b"a\nb\n", b"a\nb\n") == b"a\nb\n"
    # the saga's version: the top layer's, a whiteout or an opaque directory hides lower layers
    lower, upper = tmp_path / "l1", tmp_path / "l2"
    put(lower / ".git" / "refs" / "heads" / "x", "1\n")
    put(lower / ".git" / "refs" / "heads" / "y", "1\n")
    put(upper / ".git" / "refs" / "heads" / "y", "2\n")
    fds = [os.open(lower, os.O_RDONLY), os.open(upper, os.O_RDONLY)]
    try:
        found = gitpolicy.saga_file(fds, ".git/refs/heads/y")
        assert found[0] == fds[1]
        os.close(found[1])
        found = gitpolicy.saga_file(fds, ".git/refs/heads/x")
        assert found[0] == fds[0]
        os.close(found[1])
        os.setxattr(upper / ".git" / "refs" / "heads", "user.overlayd.opaque", b"y")
        assert gitpolicy.saga_file(fds, ".git/refs/heads/x") is None
        assert gitpolicy.saga_file(fds, ".git/nothing") is None
        os.setxattr(upper / ".git" / "refs" / "heads" / "y", "user.overlayd.origin", b"x")  # a metacopy
        assert gitpolicy.saga_file(fds, ".git/refs/heads/y") is None
        (upper / ".git" / "logs").mkdir()  # an opaque directory above one missing in this layer
        os.setxattr(upper / ".git" / "logs", "user.overlayd.opaque", b"y")
        put(lower / ".git" / "logs" / "refs" / "HEAD", "1\n")
        assert gitpolicy.saga_file(fds, ".git/logs/refs/HEAD") is None
    finally:
        for fd in fds:
            os.close(fd)


def test_an_object_directory_both_sides_created_keeps_both_sides_objects(mount_factory, tmp_path):
    """objects/xx made by both sides (a fan-out directory is made by whichever side first writes an
    object whose id starts with xx): settled, and the commit merges the directory entry by entry."""
    base = repo(tmp_path / "base")
    m = mount_factory(base, name="gitfan")
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="work")
    put(m.mp / ".git/objects/zz/saga", "s")
    put(base / ".git/objects/zz/person", "p")
    res = m.call("saga.commit")
    assert res["settled"] == [{"path": ".git/objects/zz", "how": "saga's"}]
    assert sorted(os.listdir(base / ".git/objects/zz")) == ["person", "saga"]
