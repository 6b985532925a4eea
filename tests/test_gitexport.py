"""saga export --git / saga commit --git against a real daemon and a real git repository: the
commits match the steps, and the work tree, the index and HEAD are never touched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import put, read
from test_commit_rules import GIT, saga_cli
from test_multiuser import place  # noqa: F401 - the fixture
from users import local_users  # noqa: F401 - the fixture



@pytest.mark.parametrize("command, module", [("overlayd.cli.saga_cmd", "overlayd.gitexport"), ("overlayd.cli.saga_cmd", "subprocess"),
                                             ("overlayd.cli.overlayd_cmd", "mcp"), ("overlayd.cli.overlayd_cmd", "overlayd.mcp_server")])
def test_the_git_and_mcp_commands_import_their_needs_only_when_run(command, module):
    """Every saga call loads cli.git_cmd, every overlayd call cli.mcp_cmd: the git plumbing
    (subprocess, tempfile) and the mcp SDK are imported by the commands that use them."""
    code = f"import sys, {command}; print({module!r} in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"import {command} imports {module}"


def git(repo, *args) -> str:
    return subprocess.run([*GIT, "-c", "safe.directory=*", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def repo_state(repo) -> dict:
    """What an export must not change: HEAD, the index, every ref but saga/*, the work tree."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = sorted(d for d in dirnames if d != ".git" or dirpath != str(repo))
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = os.readlink(p).encode() if os.path.islink(p) else read(p)
            files[os.path.relpath(p, repo)] = (st.st_mode, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
    refs = [r for r in git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
            if not r.startswith("refs/heads/saga/")]
    return {"HEAD": read(repo / ".git" / "HEAD"), "index": read(repo / ".git" / "index"), "refs": refs,
            "head": git(repo, "rev-parse", "HEAD"), "files": files}


def git_repo(root):
    root.mkdir()
    subprocess.run([*GIT, "init", "-q", str(root)], check=True)
    put(root / ".gitignore", "*.log\n")
    put(root / "app.py", "print(1)\n")
    put(root / "README", "readme\n")
    (root / "pkg").mkdir()
    put(root / "pkg" / "m.py", "x = 1\n")
    put(root / "pkg" / "n.py", "y = 1\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "base")
    put(root / "README", "readme, edited and not committed\n")  # a dirty work tree: not the saga's
    put(root / "untracked.txt", "not the saga's either\n")
    return root


def test_export_and_commit_as_git_history(mount_factory, tmp_path):
    base = git_repo(tmp_path / "base")
    head0 = git(base, "rev-parse", "HEAD").strip()
    m = mount_factory(base, name="gitx")
    mp = m.mp
    assert saga_cli(m, "begin", "feature").returncode == 0
    assert m.call("saga.status")["saga"]["base_head"] == head0
    assert saga_cli(m, "step", "one", "--compensate", "true").returncode == 0
    put(mp / "a.txt", "a\n")
    put(mp / "app.py", "print(2)\n")
    put(mp / "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    os.symlink("a.txt", mp / "link")
    put(mp / "debug.log", "ignored\n")
    os.rename(mp / "pkg" / "n.py", mp / "pkg" / "renamed.py")  # a metacopy: its data is the base's
    assert saga_cli(m, "step", "two").returncode == 0
    put(mp / "b.txt", "rolled back\n")
    assert saga_cli(m, "rollback").returncode == 0
    assert saga_cli(m, "step", "three").returncode == 0
    os.unlink(mp / "pkg" / "m.py")
    os.makedirs(mp / "d")
    put(mp / "d" / "e.txt", "e\n")
    assert saga_cli(m, "step", "four").returncode == 0  # open: not exported by 'saga export'
    put(mp / "c.txt", "c\n")

    before = repo_state(base)
    r = saga_cli(m, "export", "--git", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout)
    assert out["branch"] == "saga/feature" and out["parent"] == head0
    assert [c["name"] for c in out["commits"]] == ["one", "three"]
    assert repo_state(base) == before

    assert git(base, "log", "--format=%s", "saga/feature").split("\n")[:3] == ["three", "one", "base"]
    assert git(base, "rev-parse", "saga/feature~2").strip() == head0
    stat1 = git(base, "show", "--stat", "--format=", "saga/feature~1")
    for p in ("a.txt", "app.py", "run.sh", "link", "pkg/{n.py => renamed.py}"):
        assert p in stat1, (p, stat1)
    assert "debug.log" not in stat1 and "b.txt" not in stat1 and "README" not in stat1
    msg = git(base, "log", "-1", "--format=%B", "saga/feature~1")
    assert "Saga-Step: 1" in msg and "Compensate: true" in msg and f"Saga-Id: {out['saga']['id']}" in msg, msg
    assert "Saga-Process: python" in msg, msg  # the audit trail: this test's process wrote them
    names = git(base, "diff", "--no-renames", "--name-status", "saga/feature~2", "saga/feature").splitlines()
    assert sorted(names) == sorted(["A\ta.txt", "M\tapp.py", "A\tlink", "D\tpkg/m.py", "D\tpkg/n.py",
                                    "A\tpkg/renamed.py", "A\trun.sh", "A\td/e.txt"]), names
    tree = {line.split("\t")[1]: line.split()[0] for line in git(base, "ls-tree", "-r", "saga/feature").splitlines()}
    assert tree["run.sh"] == "100755" and tree["link"] == "120000" and tree["a.txt"] == "100644"
    assert git(base, "show", "saga/feature:pkg/renamed.py") == "y = 1\n"
    assert git(base, "show", "saga/feature:README") == "readme\n"  # HEAD's, not the dirty work tree's
    assert "untracked.txt" not in tree and "c.txt" not in tree and "b.txt" not in tree

    # the same export again: the same commits (the steps' own dates); elsewhere: refused, unless forced
    r = saga_cli(m, "export", "--git", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["head"] == out["head"], r.stdout
    r = saga_cli(m, "export", "--git", "--squash")
    assert r.returncode == 1 and "exists" in r.stderr and "--force" in r.stderr, r.stderr
    # squashed: one commit, the same tree; ignored files when asked
    r = saga_cli(m, "export", "--git", "--squash", "--branch", "saga/sq", "--json")
    assert r.returncode == 0, r.stderr
    assert git(base, "rev-parse", "saga/sq^{tree}") == git(base, "rev-parse", "saga/feature^{tree}")
    assert git(base, "rev-parse", "saga/sq~1").strip() == head0
    sq = git(base, "log", "-1", "--format=%B", "saga/sq")
    assert sq.startswith("feature\n") and "Saga-Step: 1 one" in sq and "Saga-Step: 3 three" in sq, sq
    r = saga_cli(m, "export", "--git", "--include-ignored", "--branch", "saga/all")
    assert r.returncode == 0, r.stderr
    assert git(base, "show", "saga/all~1:debug.log") == "ignored\n"
    assert repo_state(base) == before

    # commit --git: the open step too, and the branch points at what went into the base
    before_commit = {k: v for k, v in repo_state(base).items() if k != "files"}
    r = saga_cli(m, "commit", "--git", "--branch", "saga/final", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    res = json.loads(r.stdout)
    assert res["saga"]["state"] == "committed" and [c["name"] for c in res["git"]["commits"]] == ["one", "three", "four"]
    assert {k: v for k, v in repo_state(base).items() if k != "files"} == before_commit
    assert git(base, "log", "--format=%s", "saga/final").split("\n")[:4] == ["four", "three", "one", "base"]
    for p in ("a.txt", "app.py", "run.sh", "pkg/renamed.py", "d/e.txt", "c.txt"):
        assert git(base, "show", f"saga/final:{p}").encode() == read(base / p), p
    assert os.readlink(base / "link") == git(base, "show", "saga/final:link")
    assert not (base / "pkg" / "m.py").exists() and not (base / "debug.log").exists()  # ignored: left out


def test_export_refusals(mount_factory, tmp_path):
    base = tmp_path / "plain"
    base.mkdir()
    put(base / "f", "x\n")
    m = mount_factory(base, name="gitr")
    assert saga_cli(m, "begin", "s").returncode == 0
    assert saga_cli(m, "step", "one").returncode == 0
    put(m.mp / "g", "y\n")
    r = saga_cli(m, "export", "--git")
    assert r.returncode == 1 and "is not a git work tree" in r.stderr, r.stderr
    repo = git_repo(tmp_path / "other")
    r = saga_cli(m, "export", "--git", "--repo", str(repo))
    assert r.returncode == 1 and "no finished step" in r.stderr, r.stderr
    os.makedirs(m.mp / "many")
    for i in range(450):  # more fds than one reply carries (export.MAX_FDS)
        put(m.mp / "many" / f"{i:03}", f"{i}\n")
    assert saga_cli(m, "step", "two").returncode == 0
    before = repo_state(repo)
    r = saga_cli(m, "export", "--git", "--repo", str(repo), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parent"] == git(repo, "rev-parse", "HEAD").strip()
    assert git(repo, "show", "saga/s:g") == "y\n" and git(repo, "show", "saga/s:app.py") == "print(1)\n"
    assert repo_state(repo) == before
    many = git(repo, "ls-tree", "-r", "saga/s", "many/").splitlines()
    assert len(many) == 450 and git(repo, "show", "saga/s:many/449") == "449\n"
    r = saga_cli(m, "commit", "--git", "--dry-run", "--repo", str(repo), "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert [s["name"] for s in dry["git"]["steps"]] == ["one", "two"] and dry["git"]["branch"] == "saga/s"
    assert m.call("saga.status")["writable"] and m.call("saga.status")["saga"]["state"] == "active"
    # commit --git refused for a conflict: no branch moves, the open step is writable again
    put(m.mp / "f", "mine\n")
    put(base / "f", "theirs\n")
    r = saga_cli(m, "commit", "--git", "--repo", str(repo), "--branch", "saga/c")
    assert r.returncode == 3 and "conflict: f" in r.stderr, r.stderr
    assert subprocess.run(["git", "-C", str(repo), "rev-parse", "-q", "--verify", "saga/c"]).returncode != 0
    assert m.call("saga.status")["writable"]
    put(m.mp / "after", "still writable\n")
    r = saga_cli(m, "export")
    assert r.returncode == 2, r.stderr
    r = saga_cli(m, "commit", "--squash")
    assert r.returncode == 2 and "go with --git" in r.stderr, r.stderr


def test_a_user_exports_from_a_root_daemon(local_users, place):
    """The daemon runs as root with its state 0700; the user gets the content as fds and writes
    the objects: every file git wrote is the user's."""
    from test_multiuser import SystemMount

    alice = local_users["alice"]
    base = alice.mkdir(place.dir / "base", 0o755)
    alice.sh(f"cd {base} && git init -q -b main . && echo v0 > f && git add f && "
             "git -c user.name=a -c user.email=a@x commit -qm base", check=True)
    name = f"gx-{os.getpid()}"
    m = SystemMount(base, place.dir, name=name, extra_args=["--group", "overlayd-devs"])
    (place.dir / "mnt").chmod(0o755)
    m.start()
    try:
        env = alice.env()
        assert alice.saga("-w", m.mp, "begin", "mine", env=env).returncode == 0
        assert alice.saga("-w", m.mp, "step", "write", env=env).returncode == 0
        alice.sh(f"echo v1 > {m.mp}/f && echo new > {m.mp}/g && chmod 600 {m.mp}/g", check=True)
        assert alice.saga("-w", m.mp, "step", "next", env=env).returncode == 0
        before = repo_state(base)
        r = alice.saga("-w", m.mp, "export", "--git", "--json", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert repo_state(base) == before
        show = alice.sh(f"cd {base} && git show saga/mine:f saga/mine:g && git log -1 --format=%B saga/mine",
                        check=True).stdout
        assert show.startswith("v1\nnew\nwrite\n") and "Saga-Step: 1" in show, show
        assert json.loads(r.stdout)["parent"] == git(base, "rev-parse", "HEAD").strip()
        for dirpath, _dirs, files in os.walk(base / ".git"):
            for n in files:
                assert os.lstat(os.path.join(dirpath, n)).st_uid == alice.uid, os.path.join(dirpath, n)
        assert alice.saga("-w", m.mp, "abort", env=env).returncode == 0
    finally:
        m.stop()
