"""Commit rules against a real daemon: paths git ignores (by the rules of the view) and paths
matching exclude patterns are left out of the base and dropped with the layers."""

import json
import os
import subprocess
import sys

import pytest

from conftest import put, read
from overlayd.client import ClientError

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]


def git_base(root):
    root.mkdir()
    subprocess.run([*GIT, "init", "-q", str(root)], check=True)
    put(root / ".gitignore", "__pycache__/\n*.log\n")
    put(root / "app.py", "print(1)\n")
    put(root / "keep.log", "tracked, though it matches *.log\n")
    put(root / "old.log", "ignored, in the base\n")
    (root / "pkg").mkdir()
    put(root / "pkg" / "m.py", "x = 1\n")
    subprocess.run([*GIT, "-C", str(root), "add", ".gitignore", "app.py", "pkg"], check=True)
    subprocess.run([*GIT, "-C", str(root), "add", "-f", "keep.log"], check=True)
    subprocess.run([*GIT, "-C", str(root), "commit", "-qm", "base"], check=True)
    return root


def saga_cli(m, *args):
    env = {**m.env, "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=m.mp, env=env, capture_output=True, text=True,
                          timeout=120)


def make_changes(mp):
    """What an agent leaves behind: a venv (ignored by a .gitignore line the saga adds), caches,
    logs, build output, scratch files, next to real changes."""
    put(mp / ".gitignore", read(mp / ".gitignore") + b".venv/\n")
    os.makedirs(mp / ".venv" / "bin")
    for i in range(30):
        put(mp / ".venv" / "bin" / f"tool{i}", "#!/bin/sh\n")
    os.makedirs(mp / "pkg" / "__pycache__")
    put(mp / "pkg" / "__pycache__" / "m.cpython-311.pyc", b"\0pyc")
    put(mp / "pkg" / "m.py", "x = 2\n")
    os.makedirs(mp / "proj" / "__pycache__")  # a new directory, moved whole when nothing in it is left out
    put(mp / "proj" / "a.py", "a = 1\n")
    put(mp / "proj" / "__pycache__" / "a.pyc", b"\0pyc")
    put(mp / "new.log", "ignored\n")
    put(mp / "keep.log", "tracked: committed\n")
    os.unlink(mp / "old.log")  # an ignored deletion: left out too, the base keeps the file
    os.makedirs(mp / "build")
    put(mp / "build" / "out.txt", "built\n")
    put(mp / "notes.tmp", "scratch\n")


def test_ignored_and_excluded_paths_are_left_out(mount_factory, tmp_path):
    base = git_base(tmp_path / "base")
    m = mount_factory(base, name="rules")
    (m.state / "commit.json").write_text(json.dumps({"exclude": ["/build/"]}))
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="work")
    make_changes(m.mp)

    dry = m.call("saga.commit", dry_run=True, exclude=["*.tmp"])
    left = {c["path"]: (c["reason"], c["entries"]) for c in dry["left_out"]}
    assert left == {".venv": ("ignored", 31), "pkg/__pycache__": ("ignored", 1), "proj/__pycache__": ("ignored", 1),
                    "new.log": ("ignored", 0), "old.log": ("ignored", 0), "build": ("exclude", 1),
                    "notes.tmp": ("exclude", 0)}, left
    assert all(c["step_name"] == "work" for c in dry["left_out"])
    changed = {c["path"] for c in dry["changes"]}
    assert changed == {".gitignore", "keep.log", "pkg/m.py", "proj", "proj/a.py"}, changed
    taken = {c["path"] for c in m.call("saga.commit", dry_run=True, include_ignored=True)["changes"]}
    assert {".venv", ".venv/bin/tool0", "pkg/__pycache__", "new.log", "old.log"} <= taken
    assert "build" not in taken and "notes.tmp" in taken  # exclude patterns hold; --exclude was not given

    r = saga_cli(m, "commit", "--dry-run", "--exclude", "*.tmp")
    assert r.returncode == 0, r.stderr
    assert "left out  .venv  (ignored by git, and 31 entries in it; step 1 work)" in r.stdout.splitlines(), r.stdout
    assert "left out  notes.tmp  (excluded; step 1 work)" in r.stdout.splitlines(), r.stdout

    put(base / "new.log", "the base's, made meanwhile\n")  # a conflict on a left-out path does not count
    res = m.call("saga.commit", exclude=["*.tmp"])
    assert res["saga"]["state"] == "committed"
    assert sum(1 + c["entries"] for c in res["left_out"]) == 41
    assert read(base / "new.log") == read(m.mp / "new.log") == b"the base's, made meanwhile\n"
    assert read(base / "pkg" / "m.py") == b"x = 2\n" and read(base / "proj" / "a.py") == b"a = 1\n"
    assert read(base / "keep.log") == b"tracked: committed\n"
    assert read(base / "old.log") == read(m.mp / "old.log") == b"ignored, in the base\n"
    assert read(base / ".gitignore").endswith(b".venv/\n")
    for gone in (".venv", "pkg/__pycache__", "proj/__pycache__", "build", "notes.tmp"):
        assert not os.path.lexists(base / gone), gone
        assert not os.path.lexists(m.mp / gone), gone  # dropped with the layers
    assert sorted(os.listdir(base / "proj")) == ["a.py"]
    assert not [n for n in os.listdir(base) if n.startswith(".overlayd-")]


def test_rules_without_git_and_bad_rules(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / ".gitignore", "*.log\n")  # not a git work tree: no git rules
    m = mount_factory(base, name="nogit")
    m.call("saga.begin", name="s")
    m.call("saga.step", name="one")
    put(m.mp / "a.log", "kept\n")
    put(m.mp / "b.tmp", "excluded\n")
    (m.state / "commit.json").write_text('{"exclude": "*.tmp"}')
    with pytest.raises(ClientError) as ei:
        m.call("saga.commit")
    assert ei.value.code == "bad-request" and "commit.json" in ei.value.message and "list" in ei.value.message
    with pytest.raises(ClientError) as ei:
        m.call("saga.commit", exclude=[""])
    assert ei.value.code == "bad-request"
    assert m.call("saga.status")["saga"]["state"] == "active"
    (m.state / "commit.json").write_text('{"exclude": ["*.tmp"]}')
    res = m.call("saga.commit")
    assert [c["path"] for c in res["left_out"]] == ["b.tmp"]
    assert read(base / "a.log") == b"kept\n" and not os.path.lexists(base / "b.tmp")


def test_diff_attribution_ignored_paths_and_summary(mount_factory, tmp_path):
    base = git_base(tmp_path / "base")
    m = mount_factory(base, name="diffs")
    m.call("saga.begin", name="agent")
    m.call("saga.step", name="first")
    os.makedirs(m.mp / "cache" / "v")
    put(m.mp / "cache" / "v" / "a", "1\n")
    os.makedirs(m.mp / "pkg" / "__pycache__")
    put(m.mp / "pkg" / "__pycache__" / "m.pyc", b"\0")
    m.call("saga.step", name="second")
    put(m.mp / "cache" / "v" / "a", "2\n")
    put(m.mp / "cache" / "v" / "b", "new\n")
    put(m.mp / "app.py", "print(2)\n")

    d = m.call("saga.diff")
    who = {c["path"]: (c["step"], c.get("last_step")) for c in d["changes"]}
    # made in step 1 and changed again in step 2: step 1's change (the layer holding it is step 2's)
    assert who == {"cache": (1, 2), "cache/v": (1, 2), "cache/v/a": (1, 2), "cache/v/b": (2, None),
                   "app.py": (2, None)}, who
    assert all(c["process"]["comm"] for c in d["changes"])
    assert [(c["path"], c["reason"]) for c in d["left_out"]] == [("pkg/__pycache__", "ignored")]
    assert {c["path"] for c in m.call("saga.diff", step="first")["changes"]} == {"cache", "cache/v", "cache/v/a"}
    taken = {c["path"] for c in m.call("saga.diff", include_ignored=True)["changes"]}
    assert {"pkg/__pycache__", "pkg/__pycache__/m.pyc"} <= taken

    r = saga_cli(m, "diff")
    assert r.returncode == 0, r.stderr
    assert "added     cache  (step 1 first, again in step 2 second, by " in r.stdout, r.stdout
    assert "+++ b/app.py" in r.stdout and "left out  pkg/__pycache__  (ignored by git" in r.stdout

    os.makedirs(m.mp / "gen")
    for i in range(150):
        put(m.mp / "gen" / f"f{i:03}.txt", f"{i}\n")
    r = saga_cli(m, "diff")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "156 changes (155 added, 1 modified) in step(s) 1, 2", lines[0]
    assert any(x.startswith("added     gen/  (step 2 second") and x.endswith(", 150 entries in it)") for x in lines), lines
    assert "+++ b/" not in r.stdout and len(lines) < 20, r.stdout
    assert "saga diff --full" in lines[-1]
    r = saga_cli(m, "diff", "--full")
    assert r.stdout.count("+++ b/gen/") == 150


def test_git_config_of_the_view_runs_no_command(mount_factory, tmp_path):
    """The saga may write the view's .git/config: git check-ignore, which the daemon runs there,
    reads it, and reading the index runs core.fsmonitor. The daemon turns it off."""
    base = git_base(tmp_path / "base")
    marker = tmp_path / "fsmonitor-ran"
    m = mount_factory(base, name="gitcfg")
    m.call("saga.begin", name="s")
    m.call("saga.step", name="one")
    cfg = read(m.mp / ".git" / "config")
    put(m.mp / ".git" / "config", cfg + f"[core]\n\tfsmonitor = touch {marker}; echo\n".encode())
    put(m.mp / "new.log", "ignored\n")
    assert [c["path"] for c in m.call("saga.commit", dry_run=True)["left_out"]] == ["new.log"]
    m.call("saga.commit")
    assert not marker.exists(), "the daemon's git ran the view's core.fsmonitor command"
    assert not (base / "new.log").exists()
