"""The one helper per concern (issue 18): durations and sizes (overlayd.units), saga and step
names (protocol.name_problem), the mount table (paths.parse_mountinfo and friends), the retry
schedule (overlayd.retry) and the TOML line finder (overlayd.tomllines). Pure functions, plus
real mounts at paths with spaces, backslashes and non-ASCII names."""

import os
import subprocess
import sys

import pytest

from overlayd import paths, protocol, retry, tomllines, units

# ---------------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 7 * 86400), ("250ms", 0.25), ("1.5h", 5400),
    (" 10 m ", 600), ("90", 90), (90, 90), (2.5, 2.5), ("1d", 86400)])
def test_durations(text, seconds):
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize("value, message", [
    ("soon", "'soon' is not a duration (examples: 30s, 5m, 1h, 7d, 250ms)"),
    ("5 minutes", "is not a duration"), ("-1s", "is not a duration"), (True, "is not a duration"),
    (None, "is not a duration"), ([1], "is not a duration"),
    ("0", "must be more than 0 (got '0')"), (0, "must be more than 0"), ("0ms", "must be more than 0"),
    ("8d", "must be at most 7d (got '8d')"), (float("inf"), "must be finite"), (float("nan"), "must be finite"),
    (-3, "must be more than 0")])
def test_bad_durations(value, message):
    with pytest.raises(ValueError) as ei:
        units.parse_duration(value)
    assert message in str(ei.value)


def test_an_age_may_be_zero_and_long():
    assert units.parse_duration("0", zero=True, maximum=None) == 0
    assert units.parse_duration("30d", zero=True, maximum=None) == 30 * 86400
    with pytest.raises(ValueError, match="at least 0"):
        units.parse_duration(-1, zero=True)


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), (4096, 4096), ("512K", 512 << 10), ("100M", 100 << 20), ("2G", 2 << 30), ("1T", 1 << 40),
    ("100MiB", 100 << 20), ("100MB", 100 << 20), ("3kb", 3 << 10), ("7b", 7), (" 1 g ", 1 << 30)])
def test_sizes(text, size):
    assert units.parse_size(text) == size


@pytest.mark.parametrize("value", ["lots", "1.5G", "-1", "", "1X", True, None, 2.0])
def test_bad_sizes(value):
    with pytest.raises(ValueError, match="is not a size"):
        units.parse_size(value)


@pytest.mark.parametrize("value", [0, "0", "0M"])
def test_a_size_of_zero_is_refused(value):
    with pytest.raises(ValueError, match="must be more than 0"):
        units.parse_size(value)


def test_format_duration():
    assert [units.format_duration(s) for s in (7 * 86400, 7200, 90, 0.25, 60)] == ["7d", "2h", "90s", "0.25s", "1m"]


# ---------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "fix the bug", "é-ü", "x" * 128, "a.b", "..."])
def test_good_saga_names(name):
    assert protocol.name_problem(name) is None


@pytest.mark.parametrize("name, why", [
    ("", "1-128"), (".", "not '.'"), ("..", "not '.'"), ("a/b", "no '/'"), ("a\nb", "printable"),
    ("x" * 129, "1-128"), ("é" * 65, "1-128"), (5, "1-128"), (None, "1-128"), ("\udcff", "not valid UTF-8")])
def test_bad_saga_names(name, why):
    assert why in protocol.name_problem(name)


# ---------------------------------------------------------------------- the mount table

MOUNTINFO = (
    b"22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    b"90 29 0:50 / /mnt/a\\040dir/\xc3\xa9t\xc3\xa9\\011tab\\134back\\012nl rw,nosuid,nodev,relatime shared:40 "
    b"master:1 - fuse.overlayd overlayd:ws-1 rw,user_id=1000,group_id=1000,allow_other\n"
    b"91 29 8:1 /sub\\040dir /srv/bind rw,relatime - ext4 /dev/vda1 rw\n"
    b"garbage line\n"
    b"92 29 0:51 / /mnt/other rw - fuse.sshfs host:/x rw,user_id=0\n")


def test_parse_mountinfo():
    table = paths.parse_mountinfo(MOUNTINFO)
    assert [m.id for m in table] == [22, 90, 91, 92]
    ws = table[1]
    assert ws.point == "/mnt/a dir/été\ttab\\back\nnl" and ws.parent == 29 and ws.dev == "0:50"
    assert ws.fstype == "fuse.overlayd" and ws.source == "overlayd:ws-1"
    assert ws.options == ("rw", "nosuid", "nodev", "relatime") and "user_id=1000" in ws.super_options
    assert table[2].root == "/sub dir" and table[2].point == "/srv/bind"


def test_a_name_that_is_not_utf8_keeps_its_bytes():
    m, = paths.parse_mountinfo(b"5 1 0:9 / /mnt/\\040\xff rw - tmpfs tmpfs rw\n")
    assert os.fsencode(m.point) == b"/mnt/ \xff"


def test_bind_mount_at_an_unusual_path(tmp_path):
    """The kernel's own table, for a mount at a path with a space, a backslash, a tab and
    non-ASCII characters: found at exactly that path, its escapes undone."""
    src = tmp_path / "src"
    dst = tmp_path / "a dir\\with\tstrange é ü 日本"
    src.mkdir()
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        found = paths.mounts_at(str(dst))
        assert len(found) == 1 and found[0].point == str(dst) and found[0].root.endswith("/src")
        assert any(m.point == str(dst) for m in paths.mount_table())
    finally:
        subprocess.run(["umount", str(dst)], check=True)
    assert paths.mounts_at(str(dst)) == []


def test_overlayd_mount_at_an_unusual_path(mount_factory, tmp_path):
    """An overlayd workspace mounted below a directory with a space and non-ASCII letters: its
    mount is found (paths.overlayd_mounts, mount_of), and saga finds its daemon."""
    where = tmp_path / "my wörk space"
    where.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="odd", where=where)
    assert " " in str(m.mp) and "ö" in str(m.mp)
    mine = [x for x in paths.overlayd_mounts() if x.point == str(m.mp)]
    assert len(mine) == 1 and mine[0].name == "odd" and mine[0].dev == paths.mounts_at(str(m.mp))[-1].dev
    assert paths.mount_of(str(m.mp / "sub" / "file")) == mine[0]
    r = subprocess.run([sys.executable, "-c", "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())",
                        "-w", str(m.mp), "status"], env=m.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no saga is active" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------- retries


def test_retry_schedule(monkeypatch):
    monkeypatch.setenv("OVERLAYD_BACKOFF", "0.5")
    assert list(retry.schedule(4)) == [(1, 0.5), (2, 1.0), (3, 2.0), (4, None)]
    assert list(retry.schedule(1)) == [(1, None)]
    assert retry.delay(10) == retry.CAP == 30.0
    assert retry.pauses_left(1, 3) == 1.5 and retry.pauses_left(3, 3) == 0
    monkeypatch.setenv("OVERLAYD_BACKOFF", "0.01")
    assert retry.delay(2) == 0.02


# ---------------------------------------------------------------------- TOML lines

TOML = '''# a definition
name = "x"
"quoted" = 1
description = """
name = "not a key: inside a string"
"""
[[step]]
name = "a"   # step 1
run = "true"
[step.env]
HOME = "/"
[[step]]
  name = "b"
[budgets]
timeout = "1h"
'''


def test_toml_line_map():
    top, steps = tomllines.line_map(TOML)
    assert top == {"name": 2, "quoted": 3, "description": 4, "budgets": 14}
    assert steps == [{"": 7, "name": 8, "run": 9, "env": 10, "env.HOME": 11}, {"": 12, "name": 13}]
    assert tomllines.key_line(TOML, "description") == 4 and tomllines.key_line(TOML, "nothing") is None
