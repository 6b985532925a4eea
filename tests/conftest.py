"""Fixtures that mount real FUSE workspaces with a real daemon subprocess.

``mounted(base)`` starts ``python -m overlayd`` in its own process, waits on its readiness
pipe, and on teardown asks it to unmount; a teardown that cannot unmount cleanly fails the
test. ``sample_base`` is one session-wide base tree that tests mount but never change: its
hash is checked at the end of the session.
"""

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlayd.client import Client, ClientError

ROOT = Path(__file__).resolve().parent.parent
O_NF = os.O_NOFOLLOW | os.O_CLOEXEC


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Compensation retries without the production back-off (read at daemon start), and no
    fault injection left over from the environment."""
    monkeypatch.setenv("OVERLAYD_BACKOFF", "0.01")
    monkeypatch.delenv("OVERLAYD_CRASH_AT", raising=False)


def put(path, data: bytes | str, mode=0o644):
    """Create or truncate *path* and write all of *data* (never through a symlink)."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NF, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read(path) -> bytes:
    fd = os.open(path, os.O_RDONLY | O_NF)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def tree_digest(root: Path) -> str:
    """Hash of a tree: names, types, modes, owners, contents, link targets, xattrs, mtimes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            h.update(f"{st.st_mode:o} {st.st_uid} {st.st_gid} {st.st_mtime_ns} {st.st_size}".encode())
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            try:
                for x in sorted(os.listxattr(p, follow_symlinks=False)):
                    h.update(x.encode() + os.getxattr(p, x, follow_symlinks=False))
            except OSError:
                pass
    return h.hexdigest()


def build_sample_base(root: Path) -> None:
    """A small tree with every kind of entry the filesystem has to handle."""
    root.mkdir(parents=True)
    (root / "src" / "pkg" / "sub").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "empty").mkdir()
    for i in range(20):
        (root / "src" / "pkg" / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / "src" / "pkg" / "sub" / "deep.txt").write_bytes(os.urandom(70000))
    (root / "README").write_text("sample base\n")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "docs" / "a.md").write_text("# a\n")
    os.link(root / "docs" / "a.md", root / "docs" / "a-link.md")
    os.link(root / "README", root / "src" / "README.hard")
    os.symlink("pkg/mod1.py", root / "src" / "link-to-mod1")
    os.symlink("/nonexistent/overlayd-outside", root / "src" / "abs-link")
    os.symlink("missing", root / "dangling")
    os.mkfifo(root / "fifo")
    os.chmod(root / "src" / "pkg" / "mod3.py", 0o755)
    os.setxattr(root / "docs" / "a.md", "user.colour", b"blue")
    os.chown(root / "docs", 1000, 1000)


class Mount:
    """A running daemon serving *base* at *mountpoint*."""

    def __init__(self, base: Path, tmp: Path, name: str = "ws", extra_args=()):
        self.base = Path(base)
        self.tmp = Path(tmp)
        self.mp = self.tmp / "mnt"
        self.state_root = self.tmp / "stateroot"
        self.state = self.state_root / name
        self.run_dir = self.tmp / "run"
        self.name = name
        self.extra_args = list(extra_args)
        self.mp.mkdir(exist_ok=True)
        self.proc = None
        self.log_path = self.tmp / "daemon.log"

    @property
    def env(self):
        return {**os.environ, "RUNTIME_DIRECTORY": str(self.run_dir), "PYTHONPATH": str(ROOT),
                "OVERLAYD_STATE_ROOT": str(self.state_root)}

    @property
    def socket(self) -> Path:
        return self.run_dir / f"{self.name}.sock"

    def daemon_command(self, ready_fd: int) -> list:
        return [sys.executable, "-m", "overlayd", "--ready-fd", str(ready_fd), "--name", self.name,
                "--state-dir", str(self.state), "--log-level", "info", "--allow-other",
                str(self.base), str(self.mp), *self.extra_args]

    def start(self, timeout: float = 20.0, cwd=None):
        """Start the daemon (from *cwd*) and wait for its readiness message."""
        rfd, wfd = os.pipe()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.daemon_command(wfd), pass_fds=(wfd,), stdout=log, stderr=log,
                                         env=self.env, start_new_session=True, cwd=cwd)
        os.close(wfd)
        msg = b""
        deadline = time.monotonic() + timeout
        os.set_blocking(rfd, False)
        while time.monotonic() < deadline:
            try:
                chunk = os.read(rfd, 4096)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                break
            msg += chunk
        os.close(rfd)
        if msg.strip() != b"ok":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"daemon failed to start: {msg!r}\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def client(self, timeout=30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, op, **args):
        with self.client() as c:
            return c.call(op, **args)

    def push(self):
        return self.call("layer.push")["layer"]

    def drop(self, count=1, reopen=False):
        return self.call("layer.drop", count=count, reopen=reopen)

    def stop(self, timeout: float = 30.0) -> None:
        """Clean unmount; raises if it does not happen."""
        if self.proc is None:
            return
        try:
            self.call("shutdown")
        except (ClientError, OSError):
            pass
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"daemon did not exit after shutdown\n{self.log()}")
        self.proc = None
        if os.path.ismount(self.mp):
            subprocess.run(["fusermount3", "-uz", str(self.mp)], check=False)
            raise RuntimeError("mountpoint still mounted after the daemon exited")
        if rc != 0:
            raise RuntimeError(f"daemon exited with {rc}\n{self.log()}")

    def kill(self, sig=signal.SIGKILL) -> None:
        """Crash the daemon (SIGKILL by default) and clear the dead mount."""
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc = None
        subprocess.run(["fusermount3", "-uz", str(self.mp)], check=False, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def sample_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "base"
    build_sample_base(root)
    digest = tree_digest(root)
    yield root
    assert tree_digest(root) == digest, "the base tree was modified during the test session"


@pytest.fixture
def mount_factory(tmp_path):
    mounts = []

    def make(base, name="ws", extra_args=(), start=True, where=None):
        """*where*: the directory for the mountpoint, state root and log (default: tmp_path)."""
        sub = Path(where or tmp_path) / f"m{len(mounts)}"
        sub.mkdir()
        m = Mount(base, sub, name=name, extra_args=extra_args)
        mounts.append(m)
        return m.start() if start else m

    yield make
    errors = []
    for m in mounts:
        try:
            m.stop()
        except Exception as exc:  # noqa: BLE001 - report every failed teardown
            errors.append(str(exc))
    if errors:
        pytest.fail("unmount failed: " + "\n".join(errors))


@pytest.fixture(scope="session")
def filesystems(tmp_path_factory):
    """ext4, xfs, btrfs (loop devices) and tmpfs, each mounted on first use and unmounted at the
    end of the session (tests/fsmatrix.py)."""
    from fsmatrix import Filesystems

    fss = Filesystems(tmp_path_factory.mktemp("fsmatrix"))
    yield fss
    fss.close()


@pytest.fixture
def ws(mount_factory, sample_base):
    """The sample base mounted, with one writable layer pushed."""
    m = mount_factory(sample_base)
    m.push()
    return m


@pytest.fixture
def copy_of_sample(sample_base, tmp_path):
    """A plain-directory copy of the sample base, for differential comparisons."""
    dst = tmp_path / "plain"
    subprocess.run(["cp", "-a", str(sample_base), str(dst)], check=True)
    return dst
