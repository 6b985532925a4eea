"""Bad input and hostile behaviour against a real daemon: names, compensation commands, paths,
symlinks, devices, setuid files, unprivileged processes in the mount, and the control socket.

docs/SECURITY.md maps each threat to the test here that covers it.

Safety of the tests themselves: every write opens with O_NOFOLLOW, and a write below a
directory goes through directory fds opened with O_NOFOLLOW (``put_beneath``), so no symlink,
whatever the daemon shows, can lead a write of this test outside its temp dirs. Files under
/etc are only hashed, never opened for writing.
"""

import errno
import hashlib
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import O_NF, Mount, put, read
from overlayd import osutil
from overlayd.client import Client, ClientError
from overlayd.paths import mounts_at
from treecmp import diff, snapshot

DIR_NF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
STAGE_PREFIX = ".overlayd-"
ETC_FILES = ["/etc/hostname", "/etc/hosts", "/etc/passwd"]
OTHER_UID = 1000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE and switches uids: needs root")


# ---------------------------------------------------------------------------------- helpers


def put_beneath(root, rel: str, data: bytes | str, mode=0o644):
    """Write *root*/*rel* through directory fds, refusing a symlink at every component."""
    if isinstance(data, str):
        data = data.encode()
    parts = rel.split("/")
    fd = os.open(root, DIR_NF)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, DIR_NF, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NF, mode, dir_fd=fd)
        try:
            os.write(ffd, data)
        finally:
            os.close(ffd)
    finally:
        os.close(fd)


def file_hashes(paths) -> dict:
    """sha256 and (mode, size, mtime) of files we must never change (read-only access)."""
    out = {}
    for p in paths:
        if os.path.exists(p):
            st = os.stat(p)
            with open(p, "rb") as f:
                out[p] = (hashlib.sha256(f.read()).hexdigest(), st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def snap(root):
    return snapshot(root, data=True, owners=True)


def expect_error(code, m, op, **args) -> ClientError:
    try:
        res = m.call(op, **args)
    except ClientError as exc:
        assert exc.code == code, f"{op} {args!r}: expected error {code!r}, got {exc.code!r}: {exc.message}"
        return exc
    pytest.fail(f"{op} {args!r} succeeded ({res}); expected error {code!r}")


def alive(m) -> bool:
    return m.proc is not None and m.proc.poll() is None


def mount_options(mp) -> set:
    for m in mounts_at(str(mp)):
        return set(m.options)
    raise AssertionError(f"{mp} is not mounted")


def raw_connect(m, timeout=15.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(m.socket))
    return s


def raw_request(s, data: bytes):
    """Send *data*; return (the answers received until the daemon closed or went quiet, closed?)."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return raw_answers(s)


def raw_answers(s, quiet=1.0):
    buf = b""
    closed = False
    s.settimeout(quiet)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            buf += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    return [json.loads(line) for line in buf.splitlines() if line.strip()], closed


def as_user(uid, gid, fn, m=None):
    """Run fn(socket path) in a forked child with uid/gid (no supplementary groups); return its
    JSON-able result. The child reaches *m*'s socket through an O_PATH fd opened while still
    root, so that directories it may not search do not stand in the way of SO_PEERCRED."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            sock = None
            if m is not None:
                dfd = os.open(m.run_dir, os.O_PATH | os.O_DIRECTORY)
                sock = f"/proc/self/fd/{dfd}/{m.socket.name}"
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            res = {"ok": fn(sock)}
        except BaseException as exc:  # noqa: BLE001 - report everything to the parent
            res = {"exc": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
        try:
            os.write(w, json.dumps(res, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def sock_call(path, op, **args):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # a refused peer is answered and disconnected at once: its answer is still readable
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf) if buf else None


@pytest.fixture
def public_mount():
    """Mounts under a fresh /tmp directory that other uids may traverse (pytest's are 0700)."""
    dirs, mounts = [], []

    def make(build, name="pub", extra_args=()):
        d = Path(tempfile.mkdtemp(prefix="overlayd-sec-", dir="/tmp"))
        os.chmod(d, 0o755)
        dirs.append(d)
        base = d / "base"
        base.mkdir()
        build(base)
        m = Mount(base, d, name=name, extra_args=extra_args)
        mounts.append(m)
        return m.start()

    yield make
    errors = []
    for m in mounts:
        try:
            m.stop()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if errors:
        pytest.fail("unmount failed: " + "\n".join(errors))


def simple_base(root):
    put(root / "README", "readme\n")
    (root / "src").mkdir()
    put(root / "src" / "app.py", "print('v1')\n")
    return root


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "base"
    root.mkdir()
    return simple_base(root)


# ---------------------------------------------------------------------------------- names

BAD_NAMES = ["", ".", "..", "a/b", "a\0b", "x" * 300, "\u00e9" * 100, "a\nb", "tab\there", "\x7f",
             "\udcff", "bad\udcffname", None, 7, ["list"], {"d": 1}]


def _journal_state(m):
    return m.call("saga.list")["sagas"], m.call("saga.log")["events"]


def test_bad_saga_and_step_names(mount_factory, base):
    """Bad names are refused with bad-name and nothing is journaled. Lone surrogates (what a
    non-UTF-8 name becomes in JSON) arrive through the ordinary JSON encoding; raw bytes that
    are not UTF-8 are a malformed request (bad-request)."""
    m = mount_factory(base)
    before = _journal_state(m)
    for name in BAD_NAMES:
        expect_error("bad-name", m, "saga.begin", name=name)
    assert _journal_state(m) == before, "a refused saga.begin was journaled"
    s = raw_connect(m)
    answers, closed = raw_request(s, b'{"v": 1, "id": 1, "op": "saga.begin", "args": {"name": "\xff\xfe"}}\n')
    s.close()
    assert [a["error"]["code"] for a in answers] == ["bad-request"], answers
    assert _journal_state(m) == before

    m.call("saga.begin", name="good")
    before = _journal_state(m)
    for name in BAD_NAMES:
        expect_error("bad-name", m, "saga.step", name=name)
    assert _journal_state(m) == before, "a refused saga.step was journaled"
    assert m.call("saga.status")["steps"] == []
    m.call("saga.step", name="x" * 128)  # the limit itself is fine
    m.call("saga.abort")


@pytest.mark.parametrize("args", [
    {"name": "s", "retries": "x"},
    {"name": "s", "compensate_timeout": "soon"},
    {"name": "s", "compensate": ["rm", "-rf", "/"]},
    {"name": "s", "compensate": "echo \0 nul"},
], ids=["retries-not-a-number", "timeout-not-a-number", "compensate-a-list", "compensate-with-nul"])
def test_malformed_step_arguments(mount_factory, base, args):
    """Wrongly typed arguments are the client's error (bad-request), never an internal error, and
    nothing is journaled."""
    m = mount_factory(base)
    m.call("saga.begin", name="args")
    before = _journal_state(m)
    expect_error("bad-request", m, "saga.step", **args)
    assert _journal_state(m) == before
    m.call("saga.abort")


# ---------------------------------------------------------------------------------- compensation commands


def test_compensation_that_hangs_is_killed_with_its_process_group(mount_factory, base, tmp_path):
    t = tmp_path / "comp"
    t.mkdir()
    T = shlex.quote(str(t))
    cmd = (f"echo $$ > {T}/pgid; trap '' TERM HUP INT; (trap '' TERM HUP INT; sleep 300) & "
           f"echo $! > {T}/child; sleep 300")
    m = mount_factory(base)
    m.call("saga.begin", name="hang")
    m.call("saga.step", name="s", compensate=cmd, retries=1, compensate_timeout=1)
    put(m.mp / "x", "x\n")
    t0 = time.monotonic()
    err = expect_error("stuck", m, "saga.rollback")
    took = time.monotonic() - t0
    assert took < 10, f"the hanging compensation was not killed at its 1 s timeout ({took:.1f} s)"
    assert err.data.get("status") == 124, err.data
    st = m.call("saga.status")
    assert st["saga"]["state"] == "stuck" and st["saga"]["exit_status"] == 124
    pgid = int((t / "pgid").read_text())
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"processes of the compensation's group {pgid} survived its timeout"
        time.sleep(0.05)
    assert alive(m)
    assert read(m.mp / "x") == b"x\n"


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_compensation_that_prints_megabytes(mount_factory, base, fails):
    """50 MB on stdout and stderr: the daemon keeps a bounded tail, its memory does not follow."""
    cmd = "yes stdout | head -c 50000000; yes stderr | head -c 50000000 >&2" + ("; exit 3" if fails else "")
    m = mount_factory(base)

    def rss_kib():
        with open(f"/proc/{m.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])

    rss0 = rss_kib()
    m.call("saga.begin", name="loud")
    m.call("saga.step", name="s", compensate=cmd, retries=1)
    put(m.mp / "x", "x\n")
    if fails:
        err = expect_error("stuck", m, "saga.rollback")
        assert err.data.get("status") == 3, err.data
        assert len(err.data.get("stderr", "")) <= 4096
        sag = m.call("saga.status")["saga"]
        assert len(sag["stderr_tail"]) <= 4096 and "stderr" in sag["stderr_tail"]
    else:
        assert m.call("saga.rollback")["compensated"] == [1]
    assert len(json.dumps(m.call("saga.status"))) < 64 << 10
    assert len(json.dumps(m.call("saga.log"))) < 256 << 10, "the journal keeps megabytes of output"
    du = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(m.state) for f in fs)
    assert du < 32 << 20, f"the state directory holds {du} bytes after the compensation"
    assert rss_kib() - rss0 < 40 << 10, "the daemon's memory grew with the compensation's output"
    assert alive(m)


@pytest.mark.parametrize("signal_", ["", "-9"], ids=["TERM", "KILL"])
def test_compensation_that_kills_its_process_group(mount_factory, base, tmp_path, signal_):
    fixed = tmp_path / "fixed"
    cmd = f"[ -e {shlex.quote(str(fixed))} ] || kill {signal_} 0"
    m = mount_factory(base)
    m.call("saga.begin", name="suicidal")
    m.call("saga.step", name="s", compensate=cmd, retries=2)
    put(m.mp / "x", "x\n")
    err = expect_error("stuck", m, "saga.rollback")
    assert err.data.get("status") not in (0, None), err.data
    assert alive(m), f"a compensation killing its own process group killed the daemon\n{m.log()}"
    put(fixed, "")
    assert m.call("saga.retry")["compensated"] == [1]
    assert not os.path.lexists(m.mp / "x")


def test_compensation_runs_as_the_registering_uid(public_mount):
    """A member of --group registers a step; its compensation runs with that uid and gid (not as
    root) and cannot kill the daemon."""
    out = Path(tempfile.mkdtemp(prefix="overlayd-sec-out-", dir="/tmp"))
    try:
        os.chmod(out, 0o777)
        m = public_mount(simple_base, name="grp", extra_args=["--group", "users"])
        gid = __import__("grp").getgrnam("users").gr_gid
        cmd = f"id -u > {out}/uid; id -g > {out}/gid; kill -9 $PPID; echo $? > {out}/kill"
        res = as_user(OTHER_UID, gid, lambda s: [sock_call(s, "saga.begin", name="by-1000"),
                                                sock_call(s, "saga.step", name="s", compensate=cmd, retries=1)], m)
        assert "ok" in res and all(r["ok"] for r in res["ok"]), res
        res = as_user(OTHER_UID, gid, lambda s: sock_call(s, "saga.rollback"), m)
        assert res["ok"]["ok"], res
        assert (out / "uid").read_text().strip() == str(OTHER_UID)
        assert (out / "gid").read_text().strip() == str(gid)
        assert (out / "kill").read_text().strip() != "0", "the compensation could signal the daemon"
        assert alive(m)
        assert m.call("saga.status")["saga"]["uid"] == OTHER_UID
        m.call("saga.abort")
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------- paths


def test_paths_longer_than_path_max(mount_factory, base):
    m = mount_factory(base)
    mp = m.mp
    m.call("saga.begin", name="deep")
    m.call("saga.step", name="s")
    comp = "d" * 200
    depth = 25  # 25 * 201 bytes > PATH_MAX (4096)
    fd = os.open(mp, DIR_NF)
    try:
        for _ in range(depth):
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, DIR_NF, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open("leaf", os.O_WRONLY | os.O_CREAT | O_NF, 0o644, dir_fd=fd)
        os.write(f, b"deep\n")
        os.close(f)
        with pytest.raises(OSError) as ei:
            os.open("n" * 256, os.O_WRONLY | os.O_CREAT | O_NF, 0o644, dir_fd=fd)
        assert ei.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(fd)
    long_path = os.path.join(str(mp), *([comp] * depth), "leaf")
    assert len(long_path) > 4096
    for fn in (lambda: os.stat(long_path), lambda: os.open(long_path, os.O_RDONLY | O_NF),
               lambda: os.mkdir(long_path + "x")):
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.ENAMETOOLONG, ei.value
    assert alive(m) and m.call("saga.status")["writable"]
    m.call("saga.commit")
    fd = os.open(base, DIR_NF)
    try:
        for _ in range(depth):
            nfd = os.open(comp, DIR_NF, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open("leaf", os.O_RDONLY | O_NF, dir_fd=fd)
        assert os.read(f, 100) == b"deep\n"
        os.close(f)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- symlinks


def test_symlinks_are_committed_verbatim_and_never_followed(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "README", "readme\n")
    os.symlink("/etc", base / "etc")  # the saga replaces this with a directory of its own
    etc_before = file_hashes(ETC_FILES)
    etc_names = set(os.listdir("/etc"))
    m = mount_factory(base)
    mp = m.mp
    m.call("saga.begin", name="links")
    m.call("saga.step", name="s")
    links = {"host": "/etc/hostname", "etcdir": "/etc", "loop-a": "loop-b", "loop-b": "loop-a",
             "self": "self", "up": "../../../../../../etc/passwd", "dangling": "/nonexistent/overlayd"}
    for name, target in links.items():
        os.symlink(target, mp / name)
    for name in ("loop-a", "self"):
        with pytest.raises(OSError) as ei:
            os.stat(mp / name)
        assert ei.value.errno == errno.ELOOP
    os.unlink(mp / "etc")  # the base's symlink to /etc ...
    os.mkdir(mp / "etc")  # ... becomes a directory holding files named like /etc's
    put_beneath(mp, "etc/hostname", "not the host's\n")
    put_beneath(mp, "etc/overlayd-probe", "probe\n")
    assert m.call("saga.commit")["saga"]["state"] == "committed"
    for name, target in links.items():
        assert os.path.islink(base / name) and os.readlink(base / name) == target, name
    assert not os.path.islink(base / "etc") and os.path.isdir(base / "etc")
    assert read(base / "etc" / "hostname") == b"not the host's\n"
    assert file_hashes(ETC_FILES) == etc_before, "a file under /etc changed"
    assert not os.path.lexists("/etc/overlayd-probe")
    assert set(os.listdir("/etc")) - etc_names == set(), "new entries appeared in /etc"
    assert not [n for n in os.listdir(base) if n.startswith(STAGE_PREFIX)]


def _outside_tree(root):
    root.mkdir()
    put(root / "sentinel", "outside the base\n")
    return snap(root)


def test_base_directory_swapped_for_symlink_before_commit(mount_factory, tmp_path):
    """The saga writes D/new; then, in the base, D is replaced by a symlink to a directory outside.
    The commit must be refused or write only inside the base: the outside is untouched."""
    base = tmp_path / "base"
    (base / "D").mkdir(parents=True)
    put(base / "D" / "keep", "keep\n")
    outside = tmp_path / "outside"
    outside_snap = _outside_tree(outside)
    m = mount_factory(base)
    m.call("saga.begin", name="swap")
    m.call("saga.step", name="s")
    put(m.mp / "D" / "new", "new\n")
    put(m.mp / "top", "top\n")
    os.rename(base / "D", base / "D.moved-away")
    os.symlink(str(outside), base / "D")
    try:
        res = m.call("saga.commit")
    except ClientError as exc:
        res = exc
    assert not diff(outside_snap, snap(outside)), f"the commit wrote outside the base: {diff(outside_snap, snap(outside))}"
    assert alive(m)
    if not isinstance(res, ClientError):
        assert not os.path.islink(base / "D") or os.readlink(base / "D") == str(outside)
        if not os.path.islink(base / "D"):
            assert read(base / "D" / "new") == b"new\n"
    else:
        assert res.code in ("conflict", "internal", "commit-failed") or "symlink" in res.message, res


def test_base_directory_swapped_during_commit_race(mount_factory, tmp_path):
    """A thread keeps exchanging the base's directory D with a symlink to a directory outside
    (renameat2 RENAME_EXCHANGE) while commits that write into D run: whatever each commit
    does, nothing is ever written outside the base."""
    base = tmp_path / "base"
    (base / "D").mkdir(parents=True)
    put(base / "D" / "keep", "keep\n")
    outside = tmp_path / "outside"
    outside_snap = _outside_tree(outside)
    m = mount_factory(base)
    base_fd = os.open(base, DIR_NF)
    outcomes = []
    try:
        for rnd in range(25):
            m.call("saga.begin", name=f"race{rnd}")
            m.call("saga.step", name="s")
            for i in range(5):
                put_beneath(m.mp, f"D/f{rnd}-{i}", f"{rnd} {i}\n")
            os.symlink(str(outside), base / "Dswap")
            stop = threading.Event()
            flips = [0]

            def flipper():
                while not stop.is_set():
                    try:
                        osutil.renameat2(base_fd, b"D", base_fd, b"Dswap", osutil.RENAME_EXCHANGE)
                        flips[0] += 1
                    except OSError:
                        pass

            th = threading.Thread(target=flipper)
            th.start()
            try:
                m.call("saga.commit")
                outcomes.append("committed")
            except ClientError as exc:
                outcomes.append(f"{exc.code}: {exc.message[:60]}")
            finally:
                stop.set()
                th.join()
            assert flips[0] > 0
            if os.path.islink(base / "D"):
                osutil.renameat2(base_fd, b"D", base_fd, b"Dswap", osutil.RENAME_EXCHANGE)
            # a commit may have replaced either name (a directory for the symlink: inside the base)
            if os.path.islink(base / "Dswap"):
                os.unlink(base / "Dswap")
            elif os.path.isdir(base / "Dswap"):
                shutil.rmtree(base / "Dswap")
            if not os.path.isdir(base / "D") or os.path.islink(base / "D"):
                pytest.fail(f"round {rnd}: base/D is no longer a directory: {os.listdir(base)}")
            assert not diff(outside_snap, snap(outside)), \
                f"round {rnd}: the commit wrote outside the base: {diff(outside_snap, snap(outside))}"
            st = m.call("saga.status")["saga"]
            outcomes[-1] += f" -> {st['state'] if st else 'no saga'}"
            if st is not None and st["state"] == "active":
                m.call("saga.abort")
            elif st is not None:  # a commit that failed half-way: finished by the next commit, or
                try:  # by the recovery of a restarted daemon
                    m.call("saga.commit")
                    outcomes[-1] += ", finished by the next commit"
                except ClientError as exc:
                    outcomes[-1] += f", next commit: {exc.code}; restarted"
                    m.kill()
                    m.start()
                while m.call("saga.status")["saga"] is not None and \
                        m.call("saga.status")["saga"]["state"] == "active":
                    m.call("saga.abort")
            assert not diff(outside_snap, snap(outside)), f"round {rnd}: recovery wrote outside the base"
    finally:
        os.close(base_fd)
    assert alive(m)
    print("race outcomes:", {o: outcomes.count(o) for o in set(outcomes)})


# ---------------------------------------------------------------------------------- devices, setuid


@pytest.mark.parametrize("where", ["same-fs", "other-fs"])
def test_device_nodes_as_root_only(mount_factory, tmp_path, where):
    """Root creates character and block devices in the view and commits them (in a base
    directory and in a new directory moved whole); a 0/0 character device (a whiteout's look-alike)
    is refused, as kernel overlayfs refuses it; the mount is nodev (a device cannot be opened
    through it); an unprivileged process cannot create one (test_unprivileged_process_inside_the_mount)."""
    if where == "other-fs":
        fsdir = tmp_path / "fs"
        fsdir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fsdir)], check=True)
        base = fsdir / "base"
        base.mkdir()
        simple_base(base)
    else:
        fsdir = None
        base = tmp_path / "base"
        base.mkdir()
        simple_base(base)
    try:
        (base / "old").mkdir()
        os.mknod(base / "old" / "gone", stat.S_IFCHR | 0o600, os.makedev(1, 7))
        m = mount_factory(base)
        mp = m.mp
        assert {"nodev", "nosuid"} <= mount_options(mp)
        m.call("saga.begin", name="dev")
        m.call("saga.step", name="s")
        with pytest.raises(OSError) as ei:
            os.mknod(mp / "wh", stat.S_IFCHR | 0o666, os.makedev(0, 0))
        assert ei.value.errno == errno.EPERM, ei.value
        assert not os.path.lexists(mp / "wh")
        want = {"src/null": (stat.S_IFCHR, os.makedev(1, 3), 0o644), "src/loop": (stat.S_IFBLK, os.makedev(7, 0), 0o640),
                "new/deep/zero": (stat.S_IFCHR, os.makedev(1, 5), 0o644),
                "old/gone": (stat.S_IFCHR, os.makedev(1, 9), 0o6600)}
        os.makedirs(mp / "new" / "deep")
        os.unlink(mp / "old" / "gone")
        for rel, (kind, dev, mode) in want.items():
            os.mknod(mp / rel, kind | mode, dev)
        with pytest.raises(PermissionError):
            os.open(mp / "src" / "null", os.O_RDONLY | O_NF)
        os.chown(mp / "src" / "loop", 1000, 6)
        os.mkfifo(mp / "fifo", 0o644)
        assert m.call("saga.commit")["saga"]["state"] == "committed"
        assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
        want["old/gone"] = (stat.S_IFCHR, os.makedev(1, 9), 0o600)  # set-ID bits dropped, as for files
        for rel, (kind, dev, mode) in want.items():
            st = os.lstat(base / rel)
            assert (stat.S_IFMT(st.st_mode), st.st_rdev, stat.S_IMODE(st.st_mode)) == (kind, dev, mode), rel
            assert stat.S_IFMT(os.lstat(mp / rel).st_mode) == kind
        assert (os.lstat(base / "src" / "loop").st_uid, os.lstat(base / "src" / "loop").st_gid) == (1000, 6)
        for dirpath, dirnames, filenames in os.walk(base):
            for n in dirnames + filenames:
                assert not n.startswith(STAGE_PREFIX), os.path.join(dirpath, n)
                st = os.lstat(os.path.join(dirpath, n))
                assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), os.path.join(dirpath, n)
        m.stop()
    finally:
        if fsdir is not None:
            subprocess.run(["umount", "-l", str(fsdir)], check=False)


@pytest.mark.parametrize("where", ["same-fs", "other-fs"])
def test_setuid_and_setgid_bits_are_dropped_on_commit(mount_factory, tmp_path, where):
    if where == "other-fs":
        fsdir = tmp_path / "fs"
        fsdir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fsdir)], check=True)
        base = fsdir / "base"
    else:
        fsdir = None
        base = tmp_path / "base"
    try:
        base.mkdir()
        put(base / "tool", "#!/bin/sh\necho tool\n", 0o755)
        os.chmod(base / "tool", 0o755)
        m = mount_factory(base)
        mp = m.mp
        assert "nosuid" in mount_options(mp)
        m.call("saga.begin", name="suid")
        m.call("saga.step", name="s")
        put(mp / "suid", "#!/bin/sh\nid\n", 0o755)
        os.chmod(mp / "suid", 0o4755)
        put(mp / "sgid", "#!/bin/sh\nid\n", 0o755)
        os.chmod(mp / "sgid", 0o2755)
        os.chmod(mp / "tool", 0o6755)
        assert os.stat(mp / "suid").st_mode & stat.S_ISUID
        m.call("saga.commit")
        for name in ("suid", "sgid", "tool"):
            st = os.lstat(base / name)
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{name}: mode {st.st_mode:o} in the base"
            assert st.st_mode & 0o777 == 0o755, f"{name}: mode {st.st_mode:o}"
        m.stop()
    finally:
        if fsdir is not None:
            subprocess.run(["umount", "-l", str(fsdir)], check=False)


def test_unprivileged_process_inside_the_mount(public_mount):
    """uid 1000 in a world-writable directory of the view: it cannot chown to root, write root's
    files, forge an opaque marker or a whiteout, read the private xattrs; its setuid file is
    committed without the bit, owned by it; and it cannot talk to the daemon."""
    def build(root):
        simple_base(root)
        (root / "pub").mkdir()
        os.chmod(root / "pub", 0o777)
        put(root / "pub" / "roots", "root's file\n")
        os.chmod(root / "pub" / "roots", 0o644)

    m = public_mount(build, name="unpriv")
    mp = m.mp
    m.call("saga.begin", name="shared")
    m.call("saga.step", name="s")
    os.mkdir(mp / "opaque-test")  # root: remove and recreate a directory (an opaque one)
    shutil.rmtree(mp / "src")
    os.mkdir(mp / "src")

    def inside(sock):
        out = {}
        p = mp / "pub" / "mine"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | O_NF, 0o755)
        os.write(fd, b"#!/bin/sh\nid\n")
        os.close(fd)
        os.chmod(p, 0o4755)
        for what, fn in [
            ("chown-to-root", lambda: os.chown(p, 0, 0)),
            ("write-roots-file", lambda: os.open(mp / "pub" / "roots", os.O_WRONLY | O_NF)),
            ("forge-opaque", lambda: os.setxattr(mp / "pub", "user.overlayd.opaque", b"y")),
            ("read-opaque", lambda: os.getxattr(mp / "src", "user.overlayd.opaque")),
            ("forge-whiteout", lambda: os.mknod(mp / "pub" / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))),
            ("mknod-device", lambda: os.mknod(mp / "pub" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))),
            ("trusted-xattr", lambda: os.setxattr(p, "trusted.overlay.opaque", b"y")),
            ("control-socket", lambda: sock_call(sock, "saga.commit")),
        ]:
            try:
                out[what] = ["ok", fn()]
            except OSError as exc:
                out[what] = ["error", exc.errno]
        out["listxattr-src"] = os.listxattr(mp / "src")
        return out

    res = as_user(OTHER_UID, OTHER_UID, inside, m)
    assert "ok" in res, res
    r = res["ok"]
    assert r["chown-to-root"] == ["error", errno.EPERM], r
    assert r["write-roots-file"] == ["error", errno.EACCES], r
    assert r["forge-opaque"][0] == "error", r
    assert r["read-opaque"] == ["error", errno.ENODATA], r
    assert r["forge-whiteout"] == ["error", errno.EPERM], r
    assert r["mknod-device"] == ["error", errno.EPERM], r
    assert r["trusted-xattr"][0] == "error", r
    assert r["control-socket"][0] == "ok" and r["control-socket"][1]["error"]["code"] == "permission", r
    assert not [x for x in r["listxattr-src"] if x.startswith("user.overlayd.")], r
    assert not [x for x in os.listxattr(mp / "src") if x.startswith("user.overlayd.")]
    assert m.call("saga.status")["saga"]["state"] == "active", "uid 1000 changed the saga"
    m.call("saga.commit")
    st = os.lstat(m.base / "pub" / "mine")
    assert (st.st_uid, st.st_mode & 0o7777) == (OTHER_UID, 0o755), f"{st.st_uid} {st.st_mode:o}"
    assert read(m.base / "pub" / "roots") == b"root's file\n"


@pytest.mark.parametrize("decoy", ["{sid}-1", "{sid}-1-old"], ids=["stage-name", "old-name"])
def test_staging_names_in_the_view_cannot_redirect_a_commit(mount_factory, base, decoy):
    """A process in the mount creates an entry named like one of the commit's temporary names
    (``.overlayd-SAGA-N``, ``...-old``; SAGA is in ``saga status``, N is the index of an
    operation of the plan): after the commit the base must hold exactly what the view held."""
    m = mount_factory(base)
    mp = m.mp
    sid = m.call("saga.begin", name="collide")["saga"]["id"]
    m.call("saga.step", name="s")
    put(mp / (STAGE_PREFIX + decoy.format(sid=sid)), "decoy: a file named like a staging name\n")
    put(mp / "a", "the content of a\n")
    view = snap(mp)
    m.call("saga.commit")
    lines = diff(view, snap(base))
    assert not lines, "the commit did not install what the view showed:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------- the control socket


def test_socket_refuses_another_uid(mount_factory, base):
    m = mount_factory(base)
    res = as_user(OTHER_UID, OTHER_UID, lambda s: sock_call(s, "status"), m)
    assert "ok" in res, res
    assert res["ok"]["ok"] is False, res
    assert res["ok"]["error"]["code"] == "permission", res
    res = as_user(OTHER_UID, OTHER_UID, lambda s: sock_call(s, "shutdown"), m)
    assert "ok" in res, res
    assert res["ok"]["error"]["code"] == "permission", res
    assert alive(m) and m.call("status")["pid"] == m.proc.pid


def test_oversized_frame(mount_factory, base):
    m = mount_factory(base)
    other = Client(m.socket, timeout=10).connect()
    try:
        for payload in (b"x" * (2 << 20) + b"\n", b'{"op": "status", "pad": "' + b"y" * (2 << 20)):
            s = raw_connect(m)
            answers, closed = raw_request(s, payload)
            s.close()
            assert [a["error"]["code"] for a in answers] == ["frame-too-large"], answers
            assert closed, "the connection stayed open after an oversized frame"
            assert other.call("status")["pid"] == m.proc.pid
    finally:
        other.close()
    assert alive(m)


@pytest.mark.parametrize("line", [
    b"this is not json", b"[1, 2, 3]", b'{"op": 1}', b'{"args": {}}', b'{"op": "status", "args": [1]}',
    b"{" * 100000, b"[" * 500000, b'"just a string"', b"\xff\xfe\xfd",
], ids=["text", "array", "op-number", "no-op", "args-list", "unclosed-objects", "deep-nesting", "string",
        "binary"])
def test_garbage_json(mount_factory, base, line):
    """Each garbage line is answered with bad-request; the connection stays usable."""
    m = mount_factory(base)
    s = raw_connect(m)
    try:
        answers, closed = raw_request(s, line + b"\n" + b'{"v": 1, "id": 2, "op": "status"}\n')
    finally:
        s.close()
    codes = [a["error"]["code"] if not a["ok"] else "ok" for a in answers]
    assert codes == ["bad-request", "ok"], f"answers to {line[:40]!r}...: {answers}"
    assert alive(m) and m.call("status")["pid"] == m.proc.pid


def test_unfinished_request_is_disconnected(mount_factory, base):
    m = mount_factory(base)
    slow = raw_connect(m, timeout=30)
    slow.sendall(b'{"v": 1, "id": 1, "op": "sta')
    t0 = time.monotonic()
    with Client(m.socket, timeout=5) as c:  # served meanwhile
        for _ in range(10):
            t1 = time.monotonic()
            assert c.call("status")["pid"] == m.proc.pid
            assert time.monotonic() - t1 < 1.0
            time.sleep(0.2)
    slow.settimeout(20)
    buf = b""
    while True:
        chunk = slow.recv(65536)
        if not chunk:
            break
        buf += chunk
    took = time.monotonic() - t0
    slow.close()
    assert 8 <= took <= 15, f"the unfinished request was cut after {took:.1f} s (expected ~10 s)"
    assert json.loads(buf.splitlines()[0])["error"]["code"] == "timeout", buf
    assert alive(m)


def commit_together(sockets: dict) -> dict:
    """saga.commit through each of *sockets* (key -> control socket) at the same moment, one
    thread each; key -> ("ok", saga state) or ("error", error code)."""
    barrier = threading.Barrier(len(sockets))
    results = {}

    def commit(key, sock):
        c = Client(sock, timeout=120).connect()
        try:
            barrier.wait()
            results[key] = ("ok", c.call("saga.commit")["saga"]["state"])
        except ClientError as exc:
            results[key] = ("error", exc.code)
        finally:
            c.close()

    threads = [threading.Thread(target=commit, args=item) for item in sockets.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def test_concurrent_commits_one_workspace(mount_factory, base):
    """Two clients commit the same saga at the same moment: exactly one wins, the other gets busy
    (or no-saga, if the first had already finished)."""
    m = mount_factory(base)
    busy_seen = 0
    for rnd in range(4):
        m.call("saga.begin", name=f"c{rnd}")
        m.call("saga.step", name="s")
        os.makedirs(m.mp / f"r{rnd}")
        for i in range(400):
            put(m.mp / f"r{rnd}" / f"f{i}", f"{rnd} {i}\n")
        results = list(commit_together({0: m.socket, 1: m.socket}).values())
        oks = [r for r in results if r[0] == "ok"]
        errs = [r for r in results if r[0] == "error"]
        assert oks == [("ok", "committed")] and len(errs) == 1 and errs[0][1] in ("busy", "no-saga"), results
        busy_seen += errs[0][1] == "busy"
        assert len(os.listdir(base / f"r{rnd}")) == 400
        assert m.call("saga.status")["saga"] is None
    assert busy_seen, "the two commits never overlapped; the test did not test the race"


def test_concurrent_commits_two_workspaces_one_base(mount_factory, base):
    """Two workspaces over one base change the same file and commit at the same moment: the base
    lock serializes them, one wins, the other is refused with a conflict."""
    a = mount_factory(base, name="wsa")
    b = mount_factory(base, name="wsb")
    for m, who in ((a, "A"), (b, "B")):
        m.call("saga.begin", name=who)
        m.call("saga.step", name="s")
        put(m.mp / "README", f"from {who}\n")
        for i in range(300):
            put(m.mp / f"{who}-{i}", f"{i}\n")
    results = commit_together({"A": a.socket, "B": b.socket})
    winners = [w for w, r in results.items() if r == ("ok", "committed")]
    assert len(winners) == 1, results
    loser = "B" if winners == ["A"] else "A"
    assert results[loser] == ("error", "conflict"), results
    assert read(base / "README") == f"from {winners[0]}\n".encode()
    assert not [n for n in os.listdir(base) if n.startswith(f"{loser}-")]
    assert len([n for n in os.listdir(base) if n.startswith(f"{winners[0]}-")]) == 300
    (a if loser == "A" else b).call("saga.abort")
