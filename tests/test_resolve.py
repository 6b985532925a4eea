"""Resolving a commit conflict (issue 20 item 3): the base's version at the saga's first touch is
kept (STATE/basecopies, the journal's "bases"), and `saga resolve PATH --theirs | --ours | --merge`
settles a conflict in a step of its own, after which `saga commit` goes in. Real daemons, real
mounts, real git merge-file; the base's content is checked after every commit."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import put, read
from overlayd.client import ClientError
from overlayd.commit import basecopy

ROOT = Path(__file__).resolve().parent.parent
CODE = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"

SHARED = "".join(f"line {i:02d} of the shared file\n" for i in range(1, 41))


def saga(m, *args, cwd=None):
    """The saga CLI in workspace *m* (a subprocess, as a user runs it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **m.env}
    return subprocess.run([sys.executable, "-c", CODE, *args], cwd=cwd or m.mp, env=env, capture_output=True,
                          text=True, timeout=120)


def edit_line(text: str, n: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[n - 1] = new
    return "".join(lines)


def copies(m) -> set:
    d = Path(basecopy.copies_dir(m.state))
    return set(os.listdir(d)) if d.exists() else set()


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    b.mkdir()
    put(b / "shared.txt", SHARED)
    put(b / "other.txt", "other\n")
    put(b / "blob.bin", bytes(range(256)) * 64)
    (b / "d").mkdir()
    put(b / "d" / "deep.txt", "deep\n")
    return b


def begin(m, name="s", step="work"):
    m.call("saga.begin", name=name)
    m.call("saga.step", name=step)


def test_eight_workspaces_all_go_in_with_merge(mount_factory, base):
    """The issue's scenario: 8 workspaces each add their own file and all change one shared text
    file at a different line; the first commit wins, the other seven get exit 3 with the resolve
    command, resolve with --merge and all go in: the base has all 8 files and every line."""
    n = 8
    mounts = [mount_factory(base, name=f"w{i}", start=False) for i in range(n)]
    starters = [threading.Thread(target=m.start) for m in mounts]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    for i, m in enumerate(mounts):
        begin(m, f"agent{i}")
        put(m.mp / f"own{i}.txt", f"work of agent {i}\n")
        put(m.mp / "shared.txt", edit_line(read(m.mp / "shared.txt").decode(), 3 + 5 * i, f"agent {i} was here\n"))
    first = saga(mounts[0], "commit")
    assert first.returncode == 0, first.stderr
    for i, m in enumerate(mounts[1:], 1):
        r = saga(m, "commit")
        assert r.returncode == 3, (i, r.stdout, r.stderr)
        assert "conflict: shared.txt  resolve: saga resolve shared.txt --merge" in r.stderr, r.stderr
        dry = saga(m, "--json", "commit", "--dry-run")
        assert dry.returncode == 3
        c = json.loads(dry.stdout)["conflicts"]
        assert [(x["path"], x["resolve"], x["mergeable"]) for x in c] == \
            [("shared.txt", "saga resolve shared.txt --merge", True)]
        r = saga(m, "resolve", "shared.txt", "--merge")
        assert r.returncode == 0, (i, r.stdout, r.stderr)
        assert "shared.txt: merged cleanly" in r.stdout
        # the view shows the merge: every earlier agent's line and this one's
        view = read(m.mp / "shared.txt").decode()
        for j in range(i + 1):
            assert f"agent {j} was here\n" in view
        r = saga(m, "commit")
        assert r.returncode == 0, (i, r.stdout, r.stderr)
    final = read(base / "shared.txt").decode()
    expected = SHARED
    for i in range(n):
        expected = edit_line(expected, 3 + 5 * i, f"agent {i} was here\n")
    assert final == expected
    for i in range(n):
        assert read(base / f"own{i}.txt").decode() == f"work of agent {i}\n"
    for m in mounts:
        assert copies(m) == set()  # every base copy went with its committed saga
