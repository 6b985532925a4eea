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


def conflict_of(m, path):
    """The conflict *path* makes at commit (asserting the commit is refused with exit 3)."""
    r = saga(m, "--json", "commit", "--dry-run")
    assert r.returncode == 3, (r.stdout, r.stderr)
    return {c["path"]: c for c in json.loads(r.stdout)["conflicts"]}[path]


def test_theirs_takes_the_base_version_and_ours_keeps_the_saga(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    put(m.mp / "other.txt", "mine\n")
    put(m.mp / "d" / "deep.txt", "my deep\n")
    put(m.mp / "own.txt", "own\n")
    put(base / "other.txt", "theirs, rewritten\n" * 3)  # another workspace's commit, an editor
    os.chmod(base / "other.txt", 0o640)
    os.utime(base / "other.txt", ns=(1_000_000_000, 1_500_000_000_123))
    os.chown(base / "other.txt", 1000, 1000)  # another user's file
    put(base / "d" / "deep.txt", "their deep\n")
    assert conflict_of(m, "other.txt")["resolve"] == "saga resolve other.txt --merge"
    r = saga(m, "resolve", "other.txt", "--theirs")
    assert r.returncode == 0, r.stderr
    assert "other.txt: took the base's version" in r.stdout and "now: saga commit" in r.stdout
    st = os.stat(m.mp / "other.txt")
    assert read(m.mp / "other.txt") == read(base / "other.txt") and st.st_mode & 0o777 == 0o640
    assert st.st_mtime_ns == 1_500_000_000_123 and (st.st_uid, st.st_gid) == (1000, 1000)
    # the CLI takes paths relative to the current directory
    r = saga(m, "resolve", "deep.txt", "--ours", cwd=m.mp / "d")
    assert r.returncode == 0, r.stderr
    assert read(m.mp / "d" / "deep.txt") == b"my deep\n"
    steps = m.call("saga.status")["steps"]
    assert [(s["name"], s["state"]) for s in steps] == [("work", "done"), ("resolve", "done"), ("resolve", "done")]
    r = saga(m, "commit")
    assert r.returncode == 0, r.stderr
    bst = os.stat(base / "other.txt")
    assert read(base / "other.txt") == b"theirs, rewritten\n" * 3
    assert (bst.st_mode & 0o777, bst.st_uid, bst.st_gid) == (0o640, 1000, 1000)
    assert read(base / "d" / "deep.txt") == b"my deep\n"  # ours overwrote the base's newer change
    assert read(base / "own.txt") == b"own\n"


def test_theirs_of_a_file_the_base_removed_and_one_the_saga_removed(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    put(m.mp / "other.txt", "mine\n")
    os.unlink(m.mp / "shared.txt")
    os.unlink(base / "other.txt")
    put(base / "shared.txt", "the base's new shared\n")
    r = saga(m, "resolve", "other.txt", "shared.txt", "--theirs")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(m.mp / "other.txt")
    assert read(m.mp / "shared.txt") == b"the base's new shared\n"
    assert saga(m, "commit").returncode == 0
    assert not os.path.lexists(base / "other.txt") and read(base / "shared.txt") == b"the base's new shared\n"


def test_overlapping_edits_leave_conflict_markers_until_ours(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    put(m.mp / "shared.txt", edit_line(SHARED, 10, "the saga's line ten\n"))
    put(base / "shared.txt", edit_line(SHARED, 10, "the base's line ten\n"))
    r = saga(m, "resolve", "shared.txt", "--merge")
    assert r.returncode == 3, (r.stdout, r.stderr)  # documented: the path is still in conflict
    assert "CONFLICT: 1 overlapping change(s)" in r.stdout and "saga resolve shared.txt --ours" in r.stdout
    view = read(m.mp / "shared.txt").decode()
    assert "<<<<<<< saga\nthe saga's line ten\n||||||| base at first touch\n" not in view  # not diff3 style
    assert "<<<<<<< saga\nthe saga's line ten\n=======\nthe base's line ten\n>>>>>>> base\n" in view
    assert view.startswith(SHARED.split("line 10")[0])
    r = saga(m, "commit")
    assert r.returncode == 3 and "resolve: saga resolve shared.txt --merge" in r.stderr  # still in conflict
    # edit it in a step, then --ours
    m.call("saga.step", name="fix")
    fixed = edit_line(SHARED, 10, "both line tens, reconciled\n")
    put(m.mp / "shared.txt", fixed)
    r = saga(m, "--json", "resolve", "shared.txt", "--ours")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["unresolved"] == [] and out["resolved"][0]["result"] == "ours"
    assert saga(m, "commit").returncode == 0
    assert read(base / "shared.txt").decode() == fixed


def test_binary_and_unmergeable_paths_are_refused_with_what_to_do(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    blob = bytearray(read(base / "blob.bin"))
    blob[100] ^= 0xFF
    put(m.mp / "blob.bin", bytes(blob))
    blob[9000] ^= 0xFF
    put(base / "blob.bin", bytes(blob))
    put(m.mp / "made.txt", "mine\n")
    put(base / "made.txt", "theirs\n")  # both added it: no ancestor
    c = conflict_of(m, "blob.bin")
    assert c["mergeable"] is False and c["resolve"] == "saga resolve blob.bin --theirs  (or --ours)"
    before = m.call("saga.status")["steps"]
    r = saga(m, "resolve", "blob.bin", "--merge")
    assert r.returncode == 1 and "blob.bin is a binary file" in r.stderr and "--theirs" in r.stderr, r.stderr
    r = saga(m, "resolve", "made.txt", "--merge")
    assert r.returncode == 1 and "both sides added it" in r.stderr, r.stderr
    r = saga(m, "resolve", "nothing.txt", "--ours")
    assert r.returncode == 2 and "was not changed by saga" in r.stderr, r.stderr
    r = saga(m, "resolve", "/etc/passwd", "--ours")
    assert r.returncode == 2 and "not inside the workspace" in r.stderr, r.stderr
    r = saga(m, "resolve", "blob.bin")
    assert r.returncode == 2 and "--theirs, --ours or --merge" in r.stderr
    # nothing changed: no step, the saga's versions in the view
    assert m.call("saga.status")["steps"] == before
    assert read(m.mp / "made.txt") == b"mine\n"
    assert saga(m, "resolve", "blob.bin", "--theirs").returncode == 0
    assert saga(m, "resolve", "made.txt", "--ours").returncode == 0
    assert saga(m, "commit").returncode == 0
    assert read(base / "blob.bin") == bytes(blob) and read(base / "made.txt") == b"mine\n"


def test_a_crash_after_resolve_keeps_it(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    put(m.mp / "shared.txt", edit_line(SHARED, 2, "saga two\n"))
    put(base / "shared.txt", edit_line(SHARED, 30, "base thirty\n"))
    assert saga(m, "resolve", "shared.txt", "--merge").returncode == 0
    m.kill()  # SIGKILL between the resolve and the commit
    m.start()
    s = m.call("saga.status")
    assert s["saga"]["state"] == "active"
    assert [(x["name"], x["state"]) for x in s["steps"]] == [("work", "done"), ("resolve", "done")]
    merged = edit_line(edit_line(SHARED, 2, "saga two\n"), 30, "base thirty\n")
    assert read(m.mp / "shared.txt").decode() == merged
    r = saga(m, "commit")
    assert r.returncode == 0, r.stderr
    assert read(base / "shared.txt").decode() == merged


def test_rollback_of_the_resolve_step_brings_the_conflict_back(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    put(m.mp / "other.txt", "mine\n")
    r = saga(m, "resolve", "other.txt", "--merge")  # not in conflict yet: nothing to do, no step
    assert r.returncode == 0 and "not changed in the base" in r.stdout and "no step was made" in r.stdout
    assert len(m.call("saga.status")["steps"]) == 1
    put(base / "other.txt", "theirs\n")
    kept = copies(m)
    assert len(kept) == 1  # the base's "other\n" at the first touch, content-addressed
    assert read(Path(basecopy.copies_dir(m.state)) / kept.pop()) == b"other\n"
    assert saga(m, "resolve", "other.txt", "--theirs").returncode == 0
    assert read(m.mp / "other.txt") == b"theirs\n" and len(copies(m)) == 2  # + the base version it re-based on
    assert m.call("saga.rollback", to=1)["compensated"] == [2]
    assert read(m.mp / "other.txt") == b"mine\n"
    assert len(copies(m)) == 1  # the resolve step's copy went with it
    assert conflict_of(m, "other.txt")["mergeable"] is True
    assert saga(m, "resolve", "other.txt", "--ours").returncode == 0
    assert saga(m, "commit").returncode == 0 and read(base / "other.txt") == b"mine\n"
    assert copies(m) == set()


def test_base_copies_only_for_changed_base_files_and_gone_after_abort(mount_factory, base):
    m = mount_factory(base)
    begin(m)
    read(m.mp / "shared.txt")  # read, not changed: nothing kept
    put(m.mp / "new.txt", "new\n")  # not a base file: nothing kept
    assert copies(m) == set()
    os.chmod(m.mp / "other.txt", 0o600)  # a metadata change is a first touch too
    os.rename(m.mp / "d" / "deep.txt", m.mp / "moved.txt")
    big = base / "big.txt"
    put(big, b"x" * (basecopy.MAX_SIZE + 1))
    with open(m.mp / "big.txt", "ab") as f:
        f.write(b"y")
    m.call("saga.step", name="two")  # the open step's copies are journaled with its paths
    hashes = copies(m)
    assert len(hashes) == 2
    assert {read(Path(basecopy.copies_dir(m.state)) / h) for h in hashes} == {b"other\n", b"deep\n"}
    put(base / "big.txt", b"z" * 10)
    c = conflict_of(m, "big.txt")
    assert c["mergeable"] is False
    r = saga(m, "resolve", "big.txt", "--merge")
    assert r.returncode == 1 and "larger than 1 MiB" in r.stderr, r.stderr
    m.call("saga.abort")
    assert copies(m) == set()


def test_saga_run_on_conflict_merge(mount_factory, base, tmp_path):
    """A definition with on_conflict = "merge": the commit's conflict is merged and committed."""
    m = mount_factory(base)
    defn = tmp_path / "saga.toml"
    defn.write_text('name = "edit"\non_conflict = "merge"\n\n[[step]]\nname = "one"\n'
                    "run = \"sed -i 's/^line 05 .*/agent five/' shared.txt && "
                    f"python3 -c 'import os; open(\\\"{base}/shared.txt\\\", \\\"a\\\").write(\\\"appended by the base\\\\n\\\")'\"\n")
    r = saga(m, "run", str(defn))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "commit conflicts resolved (on_conflict = merge, step 2): shared.txt merged" in r.stdout, r.stdout
    expected = edit_line(SHARED, 5, "agent five\n") + "appended by the base\n"
    assert read(base / "shared.txt").decode() == expected
    # on_conflict = "theirs", and a bad value is refused with the choices
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\non_conflict = "yes"\n[[step]]\nname = "a"\nrun = "true"\n')
    r = saga(m, "run", str(bad))
    assert r.returncode == 2 and '"merge", "theirs", "stop"' in (r.stdout + r.stderr)


def test_client_resolve_theirs(mount_factory, base):
    from overlayd.client import ConflictError, Workspace

    m = mount_factory(base)
    ws = Workspace(m.mp, socket_path=str(m.socket))
    with pytest.raises(ConflictError) as err:
        with ws.saga("py") as s:
            with s.step("edit"):
                put(m.mp / "other.txt", "mine\n")
                put(base / "other.txt", "theirs\n")
    s = err.value.saga
    assert [c["resolve"] for c in err.value.conflicts] == ["saga resolve other.txt --merge"]
    with pytest.raises(ClientError) as bad:
        s.resolve("other.txt", how="sideways")
    assert bad.value.code == "bad-request"
    r = s.resolve("other.txt", how="theirs")
    assert r["resolved"][0]["result"] == "theirs" and r["unresolved"] == []
    s.commit()
    assert read(base / "other.txt") == b"theirs\n"


# ---------------------------------------------------------------------- pure logic, no mount


def test_basecopy_keep_read_sweep(tmp_path):
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    put(base / "d" / "f.txt", "hello\n")
    put(base / "big", b"\0" * (basecopy.MAX_SIZE + 1))
    os.symlink("f.txt", base / "d" / "link")
    store = str(tmp_path / "copies")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        from overlayd.commit import base_identity
        ident = base_identity(fd, "d/f.txt")
        kept = basecopy.keep(fd, "d/f.txt", ident, store)
        assert basecopy.read(store, kept["copy"]) == b"hello\n"
        assert basecopy.keep(fd, "d/f.txt", ident, store) == kept  # content-addressed: one file
        assert os.listdir(store) == [kept["copy"]]
        big = basecopy.keep(fd, "big", base_identity(fd, "big"), store)
        assert big == {"copy": None, "why": "larger than 1 MiB"}
        assert basecopy.keep(fd, "d/link", base_identity(fd, "d/link"), store)["copy"] is None  # not followed
        put(base / "d" / "f.txt", "changed\n")
        assert basecopy.keep(fd, "d/f.txt", ident, store)["why"] == "it changed while it was read"
    finally:
        os.close(fd)
    # a copy cut short by a crash reads as missing, never as a wrong ancestor
    with open(os.path.join(store, kept["copy"]), "wb") as f:
        f.write(b"hel")
    assert basecopy.read(store, kept["copy"]) is None and basecopy.read(store, None) is None
    other = basecopy.store(store, b"other\n")
    assert basecopy.sweep(store, {other}) == 1 and os.listdir(store) == [other]
    assert basecopy.sweep(str(tmp_path / "none"), set()) == 0


@pytest.mark.parametrize("ours,theirs,clean", [
    ("a\nB\nc\nd\ne\n", "a\nb\nc\nd\nE\n", "a\nB\nc\nd\nE\n"),  # disjoint lines
    ("a\nb\nc\nd\ne\n", "a\nb\nc\nd\nE\n", "a\nb\nc\nd\nE\n"),  # only the base changed
    ("X\nb\nc\nd\ne\n", "X\nb\nc\nd\ne\n", "X\nb\nc\nd\ne\n"),  # the same change on both sides
    ("a\nb\nc\nd\ne", "a\nb\nc\nd\ne\nf\n", None),  # no final newline vs an appended line: overlapping
    ("a\nmine\nc\nd\ne\n", "a\ntheirs\nc\nd\ne\n", None),
])
def test_merge_is_git_merge_file(ours, theirs, clean):
    merged, n = basecopy.merge(ours.encode(), b"a\nb\nc\nd\ne\n", theirs.encode())
    if clean is None:
        assert n >= 1 and b"<<<<<<< saga\n" in merged and b">>>>>>> base\n" in merged
    else:
        assert n == 0 and merged.decode() == clean
    assert basecopy.is_text(merged) and not basecopy.is_text(b"x\0y")


def test_tracker_rebase_and_ancestor_take_the_latest_live_step():
    from overlayd.engine.tracker import Tracker

    live = [{"index": 1}, {"index": 3}]
    stored = {1: {"a": {"copy": "h1"}, "b": {"copy": "h2"}},
              2: {"a": {"how": "ours", "rebase": ["f", 9], "copy": "dead"}},  # a compensated step
              3: {"a": {"how": "merge", "rebase": ["f", 7], "copy": "h3"}}}
    paths = {"a": ["f", 1], "b": ["f", 2], "c": None}
    assert Tracker.rebased(paths, (stored, live)) == {"a": ["f", 7], "b": ["f", 2], "c": None}
    assert Tracker.ancestor("a", (stored, live))["copy"] == "h3"
    assert Tracker.ancestor("b", (stored, live))["copy"] == "h2"
    assert Tracker.ancestor("c", (stored, live), {"c": {"copy": "h4"}})["copy"] == "h4"
    assert Tracker.ancestor("z", (stored, live)) is None
    assert Tracker.live_copies((stored, live), {"c": {"copy": "h4"}, "n": {"copy": None}}) == {"h1", "h2", "h3", "h4"}


def test_unusual_names_get_a_quoted_command(mount_factory, base):
    name = "my notes; " + "n" * 200 + ".txt"
    put(base / name, SHARED)
    m = mount_factory(base)
    begin(m)
    put(m.mp / name, edit_line(SHARED, 1, "saga one\n"))
    put(base / name, edit_line(SHARED, 40, "base forty\n"))
    c = conflict_of(m, name)
    assert c["resolve"] == f"saga resolve '{name}' --merge"
    r = saga(m, "resolve", name, "--merge")
    assert r.returncode == 0, r.stderr
    assert saga(m, "commit").returncode == 0
    assert read(base / name).decode() == edit_line(edit_line(SHARED, 1, "saga one\n"), 40, "base forty\n")


def test_a_base_change_after_the_resolution_is_a_conflict_again(mount_factory, base):
    """--ours re-bases on the base as it was then, not forever: the base changing once more is
    a new conflict, and a second merge takes the first resolution's base as its ancestor."""
    m = mount_factory(base)
    begin(m)
    put(m.mp / "shared.txt", edit_line(SHARED, 1, "saga one\n"))
    put(base / "shared.txt", edit_line(SHARED, 20, "base twenty\n"))
    assert saga(m, "resolve", "shared.txt", "--merge").returncode == 0
    # the base takes its line 20 back and changes line 40
    put(base / "shared.txt", edit_line(SHARED, 40, "base forty\n"))
    assert conflict_of(m, "shared.txt")["mergeable"] is True
    r = saga(m, "resolve", "shared.txt", "--merge")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert saga(m, "commit").returncode == 0
    # the ancestor was the base with line 20 (the first resolution's), so the base's revert of
    # line 20 is the base's change and wins; with the original as ancestor "base twenty" would stay
    assert read(base / "shared.txt").decode() == edit_line(edit_line(SHARED, 1, "saga one\n"), 40, "base forty\n")


def test_a_crash_before_the_resolve_step_is_done_rolls_it_back(mount_factory, base):
    """SIGKILL after the resolution is written but before its step is journaled done: the open
    resolve step is rolled back at restart, the saga is as before the resolve (still in
    conflict), and resolving again works."""
    from test_saga import daemon_env, wait_dead

    m = mount_factory(base, start=False)
    with daemon_env(OVERLAYD_CRASH_AT="resolve.written"):
        m.start()
    begin(m)
    put(m.mp / "shared.txt", edit_line(SHARED, 2, "saga two\n"))
    put(base / "shared.txt", edit_line(SHARED, 30, "base thirty\n"))
    with pytest.raises((ClientError, OSError)):
        m.call("saga.resolve", paths=["shared.txt"], how="merge")
    assert wait_dead(m) == -9
    m.kill()
    m.start()
    s = m.call("saga.status")
    assert [(x["name"], x["state"]) for x in s["steps"]] == [("work", "done"), ("resolve", "compensated")]
    assert read(m.mp / "shared.txt").decode() == edit_line(SHARED, 2, "saga two\n")
    assert conflict_of(m, "shared.txt")["mergeable"] is True
    assert saga(m, "resolve", "shared.txt", "--merge").returncode == 0
    assert saga(m, "commit").returncode == 0
    assert read(base / "shared.txt").decode() == edit_line(edit_line(SHARED, 2, "saga two\n"), 30, "base thirty\n")
