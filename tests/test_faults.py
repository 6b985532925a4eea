"""Fault injection against a real daemon: a full disk (layers, base), I/O errors from fsync, a tiny
journal map that has to grow, and a stopped daemon.

Small filesystems are tmpfs mounts (root only). EIO comes from an LD_PRELOAD shim compiled
here with the system C compiler: while a flag file exists, fsync/fdatasync/syncfs fail with
EIO for the calls (and optionally only the device) it names; every injected failure is logged
so that a test can check it really happened. Device-mapper (dm-error, dm-flakey) would give a
real failing disk, but is not available on the CI machine.

Every write opens with O_NOFOLLOW; every base and state directory lives in the test's tmp dir
or in a tmpfs mounted there.
"""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import O_NF, Mount, put, read
from overlayd.client import Client, ClientError
from treecmp import diff, snapshot

STAGE_PREFIX = ".overlayd-"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs and FUSE: needs root")


# ---------------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snap(root):
    return snapshot(root, data=True, owners=True)


def expect_error(m, op, **args) -> ClientError:
    try:
        res = m.call(op, **args)
    except ClientError as exc:
        return exc
    pytest.fail(f"{op} {args} succeeded but was expected to fail: {res}")


def alive(m) -> bool:
    return m.proc is not None and m.proc.poll() is None


def wait_idle(m, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        st = m.call("saga.status")
        if st["busy"] is None and (st["saga"] is None or st["saga"]["state"] != "compensating"):
            return st
        assert time.monotonic() < deadline, f"daemon still busy after {timeout} s: {st}"
        time.sleep(0.02)


def free_kib(path) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize // 1024


@pytest.fixture
def tmpfs():
    """mount(path, size): a tmpfs of *size* at *path*; lazily unmounted at teardown.

    Request this fixture before mount_factory, so that the daemons stop before it unmounts.
    """
    mounted = []

    def mount(path, size="8m"):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------------- ENOSPC


def test_enospc_in_layer_filesystem(tmpfs, mount_factory, tmp_path):
    """The state directory (layers and journal) on an 8 MiB filesystem: a write that does not fit
    fails with ENOSPC, a copy-up that does not fit fails with ENOSPC and shows no half copy,
    everything written before is intact, the daemon keeps serving, and once space is freed
    writes, copy-ups, steps and the commit work."""
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    big = os.urandom(5 << 20)
    put(base / "big.bin", big)
    put(base / "small.txt", "small\n")
    put(base / "d" / "inner", "inner\n")
    m = mount_factory(base, start=False)
    tmpfs(m.state_root, "8m")
    m.start()
    mp = m.mp

    m.call("saga.begin", name="enospc")
    m.call("saga.step", name="fill")
    keep = os.urandom(1 << 20)
    put(mp / "keep.bin", keep)
    put(mp / "small.txt", "small, changed before the disk filled\n")
    os.unlink(mp / "d" / "inner")

    # a write that does not fit
    fd = os.open(mp / "huge", os.O_WRONLY | os.O_CREAT | O_NF, 0o644)
    chunk = b"h" * (64 << 10)
    written = 0
    try:
        with pytest.raises(OSError) as ei:
            while written < (16 << 20):
                written += os.write(fd, chunk)
        assert ei.value.errno == errno.ENOSPC, f"a write on a full layer filesystem: {ei.value!r}"
    finally:
        os.close(fd)
    assert free_kib(m.state_root) < 64, "the filesystem should be full now"

    # a copy-up that does not fit (appending to the 5 MiB base file copies it first)
    with pytest.raises(OSError) as ei:
        os.open(mp / "big.bin", os.O_WRONLY | os.O_APPEND | O_NF)
    assert ei.value.errno == errno.ENOSPC, f"a copy-up on a full layer filesystem: {ei.value!r}"

    # nothing else is lost, no half-copied file is visible, the daemon serves
    assert read(mp / "keep.bin") == keep
    assert read(mp / "small.txt") == b"small, changed before the disk filled\n"
    assert sha(read(mp / "big.bin")) == sha(big), "the failed copy-up changed what the view shows"
    assert os.stat(mp / "big.bin").st_size == len(big)
    assert sorted(os.listdir(mp)) == ["big.bin", "d", "huge", "keep.bin", "small.txt"]
    assert os.listdir(mp / "d") == []
    assert os.stat(mp / "huge").st_size == written
    st = m.call("saga.status")
    assert st["saga"]["state"] == "active" and st["writable"] is True

    # a stack operation while the journal's filesystem is full: it works or fails cleanly
    try:
        m.call("saga.step", name="while-full")
        step_while_full = True
    except ClientError as exc:
        step_while_full = False
        assert exc.code != "disconnected", exc
    assert alive(m), f"the daemon died on a full disk\n{m.log()}"
    live = [s["name"] for s in m.call("saga.status")["steps"] if s["state"] in ("open", "done")]
    assert live == (["fill", "while-full"] if step_while_full else ["fill"]), live

    # free space: everything works again
    os.unlink(mp / "huge")
    put(mp / "after.txt", "after freeing space\n")
    fd = os.open(mp / "big.bin", os.O_WRONLY | os.O_APPEND | O_NF)
    try:
        os.write(fd, b"appended")
    finally:
        os.close(fd)
    m.call("saga.step", name="after")
    put(mp / "last.txt", "last\n")
    m.call("saga.commit")
    assert read(base / "keep.bin") == keep
    assert read(base / "big.bin") == big + b"appended"
    assert read(base / "after.txt") == b"after freeing space\n"
    assert read(base / "last.txt") == b"last\n"
    assert read(base / "small.txt") == b"small, changed before the disk filled\n"
    assert not os.path.lexists(base / "huge") and not os.path.lexists(base / "d" / "inner")
    assert not [n for n in os.listdir(base) if n.startswith(STAGE_PREFIX)]


def test_enospc_during_commit(tmpfs, mount_factory, tmp_path):
    """The base on an 8 MiB filesystem that cannot hold the saga's changes: the commit fails with
    an error, the base is consistent (as before the commit, or as after it: nothing half
    applied, no temporary entries), the daemon keeps serving, and once space is freed the
    commit can be completed."""
    fs = tmpfs(tmp_path / "smallfs", "8m")
    base = fs / "base"
    (base / "d").mkdir(parents=True)
    put(base / "mod.txt", "mod\n")
    put(base / "del.txt", "del\n")
    put(base / "d" / "x", "x\n")
    filler = fs / "filler"  # outside the base, on its filesystem
    put(filler, b"f" * (5 << 20))
    m = mount_factory(base)  # the layers are on the big disk: the commit copies into the tmpfs
    mp = m.mp

    m.call("saga.begin", name="too-big")
    m.call("saga.step", name="s1")
    put(mp / "new-big", os.urandom(4 << 20))
    put(mp / "mod.txt", "modified\n")
    os.unlink(mp / "del.txt")
    put(mp / "d" / "y", "y\n")
    pre = snap(base)
    post = snap(mp)

    err = expect_error(m, "saga.commit")
    problems = []
    if err.code == "disconnected" or "space" not in err.message.lower():
        problems.append(f"the failed commit is not reported as a lack of space: {err.code}: {err.message}")
    assert alive(m), f"the daemon died on a full base filesystem\n{m.log()}"
    now = snap(base)
    if diff(pre, now) and diff(post, now):
        problems.append("after the failed commit the base is neither as before nor as after the commit:\n  "
                        + "\n  ".join(diff(pre, now)[:10]))
    state = m.call("saga.status")["saga"]

    os.unlink(filler)
    if state is not None:  # the commit must be completable now, whatever state the failure left
        try:
            res = m.call("saga.commit")
            assert res["saga"]["state"] == "committed", res
        except ClientError as exc:
            problems.append(f"after freeing space the commit cannot be completed: {exc.code}: {exc.message} "
                            f"(the failed commit left the saga {state['state']!r})")
    if m.call("saga.status")["saga"] is not None:
        # the daemon could not finish it: a restart must (recovery rolls the commit forward)
        m.kill()
        m.start()
        wait_idle(m)
        if m.call("saga.status")["saga"] is not None:
            problems.append(f"even after a restart the saga is not committed: {m.call('saga.status')['saga']}")
    lines = diff(post, snap(base))
    if lines:
        problems.append("in the end the base does not hold the saga's changes:\n  " + "\n  ".join(lines[:10]))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------- EIO from fsync

EIO_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* While the file $OVERLAYD_EIO_FLAG exists and holds "CALLS [DEV]" (CALLS: a comma-separated
 * list of fsync, fdatasync, syncfs; DEV: a decimal st_dev, or nothing for any), those calls
 * fail with EIO; each failure is appended to $OVERLAYD_EIO_LOG. */
static int failing(const char *call, int fd) {
    const char *flag = getenv("OVERLAYD_EIO_FLAG");
    if (!flag) return 0;
    int ffd = open(flag, O_RDONLY | O_CLOEXEC);
    if (ffd < 0) return 0;
    char buf[256];
    ssize_t n = read(ffd, buf, sizeof buf - 1);
    close(ffd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char calls[200] = ",";
    unsigned long long dev = 0;
    int have_dev = 0;
    char list[190];
    if (sscanf(buf, "%189s %llu", list, &dev) == 2) have_dev = 1;
    strcat(calls, list);
    strcat(calls, ",");
    char want[32];
    snprintf(want, sizeof want, ",%s,", call);
    if (!strstr(calls, want)) return 0;
    if (have_dev) {
        struct stat st;
        if (fstat(fd, &st) != 0 || (unsigned long long)st.st_dev != dev) return 0;
    }
    const char *logp = getenv("OVERLAYD_EIO_LOG");
    if (logp) {
        int lfd = open(logp, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (lfd >= 0) {
            char line[64];
            int len = snprintf(line, sizeof line, "%s\n", call);
            if (write(lfd, line, len) < 0) { /* nothing to do */ }
            close(lfd);
        }
    }
    return 1;
}

int fsync(int fd) { if (failing("fsync", fd)) { errno = EIO; return -1; } return syscall(SYS_fsync, fd); }
int fdatasync(int fd) { if (failing("fdatasync", fd)) { errno = EIO; return -1; } return syscall(SYS_fdatasync, fd); }
int syncfs(int fd) { if (failing("syncfs", fd)) { errno = EIO; return -1; } return syscall(SYS_syncfs, fd); }
"""


@pytest.fixture(scope="session")
def eio_shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the EIO injection shim (scripts/install.sh installs gcc)")
    d = tmp_path_factory.mktemp("eio")
    (d / "eio.c").write_text(EIO_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(d / "eio.so"), str(d / "eio.c")], check=True)
    return d / "eio.so"


class EioMount(Mount):
    """A daemon whose fsync/fdatasync/syncfs fail with EIO on demand (see EIO_SHIM)."""

    def __init__(self, *args, shim, **kwargs):
        super().__init__(*args, **kwargs)
        self.shim = shim
        self.flag = self.tmp / "eio-flag"
        self.eio_log = self.tmp / "eio.log"

    @property
    def env(self):
        return {**super().env, "LD_PRELOAD": str(self.shim), "OVERLAYD_EIO_FLAG": str(self.flag),
                "OVERLAYD_EIO_LOG": str(self.eio_log)}

    def inject(self, calls: str, dev: int | None = None) -> None:
        self.flag.write_text(calls + (f" {dev}" if dev is not None else "") + "\n")

    def clear(self) -> None:
        self.flag.unlink(missing_ok=True)

    def injected(self) -> list[str]:
        try:
            return self.eio_log.read_text().split()
        except FileNotFoundError:
            return []


@pytest.fixture
def eio_mount(eio_shim, tmp_path):
    mounts = []

    def make(base, name="eio"):
        sub = tmp_path / f"e{len(mounts)}"
        sub.mkdir()
        m = EioMount(base, sub, name=name, shim=eio_shim)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.clear()
        m.stop()


def _journal(m):
    from overlayd.journal import Journal

    return Journal.open(m.state, readonly=True)


def test_eio_from_fsync_reaches_the_application(eio_mount, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "f\n")
    m = eio_mount(base)
    m.call("saga.begin", name="eio")
    m.call("saga.step", name="s")
    put(m.mp / "data", "written\n")
    m.inject("fsync,fdatasync")
    fd = os.open(m.mp / "data", os.O_WRONLY | os.O_APPEND | O_NF)
    try:
        os.write(fd, b"more\n")
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EIO, f"fsync in the mount after an EIO from the layer: {ei.value!r}"
    finally:
        os.close(fd)
    assert m.injected(), "the EIO was not injected"
    m.clear()
    assert read(m.mp / "data") == b"written\nmore\n"
    assert alive(m)


def test_eio_journal_never_claims_durability(eio_mount, tmp_path):
    """fdatasync of the journal fails: no operation that needs a journal write reports success,
    and nothing it would have journaled is visible afterwards."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "f\n")
    m = eio_mount(base)
    sagas_before = m.call("saga.list")["sagas"]
    m.inject("fdatasync,fsync")
    err = expect_error(m, "saga.begin", name="not-durable")
    assert err.code != "disconnected", err
    assert m.injected(), "the EIO was not injected"
    assert alive(m), m.log()
    assert m.call("saga.status")["saga"] is None, "a saga whose begin failed is active"
    m.clear()
    assert m.call("saga.list")["sagas"] == sagas_before, "a saga whose begin failed was journaled"
    with _journal(m) as j:
        assert j.meta("active_saga") is None

    m.call("saga.begin", name="durable")
    m.call("saga.step", name="s1")
    put(m.mp / "one", "1\n")
    m.inject("fdatasync,fsync")
    err = expect_error(m, "saga.step", name="s2")
    m.clear()
    st = m.call("saga.status")
    assert [(s["name"], s["state"]) for s in st["steps"]] == [("s1", "open")], \
        f"a step whose journal write failed is recorded: {st['steps']}"
    assert st["writable"] is True and read(m.mp / "one") == b"1\n"
    put(m.mp / "two", "2\n")  # still step 1's layer
    m.kill()  # and after a crash the journal holds exactly what was acknowledged
    m.start()
    st = wait_idle(m)
    assert [(s["name"], s["state"]) for s in st["steps"]] == [("s1", "compensated")], st["steps"]


def test_eio_from_layer_syncfs_is_not_recorded_as_synced(eio_mount, tmp_path):
    """A finished step's layer is flushed with syncfs and only then journaled ``synced``; a commit
    flushes the layers before touching the base. With syncfs failing neither may claim success."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "f\n")
    m = eio_mount(base)
    layer_dev = os.stat(m.state).st_dev
    m.call("saga.begin", name="sync")
    m.call("saga.step", name="s1")
    put(m.mp / "one", "1\n")
    m.inject("syncfs", layer_dev)
    try:
        m.call("saga.step", name="s2")
    except ClientError:
        pass
    assert "syncfs" in m.injected(), "the EIO was not injected"
    steps = {s["name"]: s for s in m.call("saga.status")["steps"]}
    assert not steps["s1"].get("synced"), f"step s1 is journaled as synced though syncfs failed: {steps['s1']}"
    with _journal(m) as j:
        sid = j.meta("active_saga")
        assert not [s for s in j.steps(sid) if s["name"] == "s1" and s.get("synced")]

    # a commit while the layers cannot be flushed: refused before the base is touched
    pre = snap(base)
    err = expect_error(m, "saga.commit")
    assert err.code != "disconnected", err
    assert not diff(pre, snap(base)), "the base changed although the layers could not be flushed"
    st = m.call("saga.status")
    assert st["saga"]["state"] == "active", f"after a commit refused for EIO the saga is {st['saga']['state']}"
    m.clear()
    m.call("saga.commit")
    assert read(base / "one") == b"1\n"


def test_eio_from_base_syncfs_during_commit(tmpfs, eio_mount, tmp_path):
    """The base's filesystem cannot be flushed: the commit fails, and the journal never records a
    phase (staged, committed) whose flush failed; after the fault is gone a restart rolls the
    commit forward."""
    fs = tmpfs(tmp_path / "basefs", "16m")
    base = fs / "base"
    base.mkdir()
    put(base / "mod.txt", "mod\n")
    put(base / "del.txt", "del\n")
    m = eio_mount(base)
    m.call("saga.begin", name="base-eio")
    m.call("saga.step", name="s1")
    put(m.mp / "mod.txt", "modified\n")
    os.unlink(m.mp / "del.txt")
    put(m.mp / "new.txt", "new\n")
    post = snap(m.mp)
    m.inject("syncfs,fsync,fdatasync", os.stat(base).st_dev)
    err = expect_error(m, "saga.commit")
    assert err.code != "disconnected", err
    assert m.injected(), "the EIO was not injected"
    assert alive(m), m.log()
    with _journal(m) as j:
        sid = j.sagas()[-1]["id"]
        assert j.saga(sid)["state"] != "committed", "the saga is journaled committed though the base was not flushed"
        plan = j.meta("commit_plan")
        assert plan is None or plan["phase"] == "planned", \
            f"the journal records commit phase {plan['phase']!r} though the staged entries were not flushed"
    m.clear()
    m.kill()
    m.start()
    wait_idle(m)
    assert m.call("saga.status")["saga"] is None or m.call("saga.status")["saga"]["state"] == "active"
    if m.call("saga.status")["saga"] is not None:  # the commit was refused before its intent: commit again
        m.call("saga.commit")
    assert not diff(post, snap(base)), diff(post, snap(base))


# ---------------------------------------------------------------------------------- a full LMDB map

TINY_MAP = 32 * 1024


class TinyMapMount(Mount):
    """A daemon whose journal starts with a 32 KiB LMDB map (set through a sitecustomize)."""

    @property
    def env(self):
        site = self.tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            "import overlayd.journal.store\n"
            f"overlayd.journal.store.Journal.open.__func__.__kwdefaults__['map_size'] = {TINY_MAP}\n")
        env = super().env
        return {**env, "PYTHONPATH": f"{site}:{env['PYTHONPATH']}"}


def test_full_lmdb_map_grows_and_loses_nothing(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "f\n")
    (tmp_path / "w").mkdir()
    m = TinyMapMount(base, tmp_path / "w", name="tinymap").start()
    try:
        sid = m.call("saga.begin", name="grow")["saga"]["id"]
        blobs = {}
        for i in range(12):
            blobs[f"k{i}"] = os.urandom(48 << 10).hex()  # 96 KiB of JSON each
            m.call("saga.annotate", fields={f"k{i}": blobs[f"k{i}"]})
        for i in range(40):
            m.call("saga.step", name=f"s{i}")
            put(m.mp / f"file{i}", f"{i}\n")
        events = m.call("saga.log", saga=sid)["events"]
        assert "map full, grew map" in m.log(), "the journal map did not grow (was the tiny map applied?)"
        m.kill()  # a crash after the growth: everything acknowledged is still there
        m.start()
        st = wait_idle(m)
        assert st["saga"]["annotations"] == blobs
        assert [s["name"] for s in st["steps"]] == [f"s{i}" for i in range(40)]
        assert [s["state"] for s in st["steps"]] == ["done"] * 39 + ["compensated"]
        again = m.call("saga.log", saga=sid)["events"]
        assert again[:len(events)] == events, "journal events were lost or changed across the growth and a crash"
        m.call("saga.commit")
        assert sorted(os.listdir(base)) == sorted(["f"] + [f"file{i}" for i in range(39)])
        with _journal(m) as j:
            stats = j.stats()
        assert stats["used_bytes"] > TINY_MAP, stats
    finally:
        m.stop()


# ---------------------------------------------------------------------------------- a stopped daemon


def _saga_cli(m, args, cwd, env_extra=None, timeout=10.0):
    """Run the saga CLI in a fresh interpreter that never touches the mount by itself (-P: no
    current directory on sys.path). Returns (returncode or None if it hung, stdout, stderr, s)."""
    env = {**m.env, "SAGA_TIMEOUT": "2", **(env_extra or {})}
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-P", "-c", code, *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = None
    return rc, out, err, time.monotonic() - t0


@pytest.mark.parametrize("how", ["cwd-inside", "-w", "SAGA_WORKSPACE"])
def test_stopped_daemon_cli_times_out(mount_factory, tmp_path, how):
    """SIGSTOP the daemon: ``saga status`` (SAGA_TIMEOUT=2) exits non-zero within ~5 s with a
    timeout message, whether the workspace is found from the current directory, -w or
    $SAGA_WORKSPACE. Nothing may touch the stopped mount (a stat of it hangs)."""
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f", "f\n")
    m = mount_factory(base, name="stopped")
    m.call("saga.begin", name="running")
    os.listdir(m.mp)
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        if how == "cwd-inside":
            rc, out, err, took = _saga_cli(m, ["status"], cwd=str(m.mp))
        elif how == "-w":
            rc, out, err, took = _saga_cli(m, ["-w", str(m.mp), "status"], cwd="/")
        else:
            rc, out, err, took = _saga_cli(m, ["status"], cwd="/", env_extra={"SAGA_WORKSPACE": str(m.mp)})
        assert rc is not None, f"saga status ({how}) hung on a stopped daemon for {took:.0f} s " \
                               f"instead of timing out; its stderr: {err[-500:]!r}"
        assert rc != 0, (rc, out, err)
        assert took < 6, f"saga status took {took:.1f} s with SAGA_TIMEOUT=2"
        assert "did not answer" in err and "stopped or hung" in err, err

        t0 = time.monotonic()
        with pytest.raises(ClientError) as ei:
            with Client(m.socket, timeout=2) as c:
                c.call("saga.status")
        assert ei.value.code == "timeout" and time.monotonic() - t0 < 4, ei.value
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    assert m.call("saga.status")["saga"]["name"] == "running"
    m.call("saga.abort")
