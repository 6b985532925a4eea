"""The file systems under test. Each ``mount()`` gives a fresh view of the base (a fresh upper
directory or layer) and ``unmount()`` takes it down; every mount made is registered so that
``cleanup_all()`` can clear it whatever happened (timeouts, Ctrl-C, a dead daemon)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import Mount  # noqa: E402

_live = {}  # id -> target with something mounted


def cleanup_all() -> None:
    for t in list(_live.values()):
        try:
            t.unmount(force=True)
        except Exception as exc:  # noqa: BLE001 - keep clearing the others
            print(f"cleanup of {t.name}: {exc}", file=sys.stderr)


def lazy_unmount(path: str, fuse: bool) -> None:
    if fuse:
        subprocess.run(["fusermount3", "-uz", path], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    subprocess.run(["umount", "-l", path], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process (and its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class Target:
    name = "?"
    fuse = False

    def __init__(self, base: Path, work: Path):
        self.base = Path(base)
        self.work = Path(work)
        self.root = None  # where the workload runs
        self.tmp = None

    @property
    def pid(self) -> int | None:
        return None

    def available(self) -> str | None:
        """None when usable, else why not."""
        return None

    def prepare(self) -> None:
        """Once per benchmark."""

    def mount(self) -> Path:
        raise NotImplementedError

    def unmount(self, force: bool = False) -> None:
        raise NotImplementedError

    def restore(self, workload) -> None:
        """After a writing workload (only the native target writes in place)."""

    def _new_tmp(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.work))
        return self.tmp

    def _overlay_dirs(self) -> tuple[Path, str]:
        """A new scratch directory with upper/, work/ and mnt/ (registered for cleanup), and the
        overlay mount options over the base."""
        t = self._new_tmp()
        for d in ("upper", "work", "mnt"):
            (t / d).mkdir()
        _live[id(self)] = self
        return t, f"lowerdir={self.base},upperdir={t / 'upper'},workdir={t / 'work'}"

    def _drop_tmp(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _umount_overlay(self, command: list) -> None:
        """Unmount tmp/mnt with *command* (lazily if that fails)."""
        mnt = str(self.tmp / "mnt")
        if os.path.ismount(mnt):
            r = subprocess.run(command + [mnt], stderr=subprocess.DEVNULL)
            if r.returncode != 0:
                lazy_unmount(mnt, fuse=self.fuse)

    def _forget(self) -> None:
        _live.pop(id(self), None)
        self._drop_tmp()
        self.root = None


class Native(Target):
    """A plain copy of the base (same file system as the base)."""

    name = "native"

    def prepare(self) -> None:
        self.copy = self.work / "native"
        if self.copy.exists():
            shutil.rmtree(self.copy)
        subprocess.run(["cp", "-a", str(self.base), str(self.copy)], check=True)
        # a copy has new inode numbers and ctimes: refresh the index once, as any clone would
        subprocess.run(["git", "status", "--porcelain"], cwd=self.copy, check=True, stdout=subprocess.DEVNULL)

    def mount(self) -> Path:
        self.root = self.copy
        return self.root

    def unmount(self, force: bool = False) -> None:
        self.root = None

    def restore(self, w) -> None:
        c = self.copy
        for d in ("xt", "new"):
            if (c / d).exists():
                shutil.rmtree(c / d)
        if (c / "seq.out").exists():
            os.unlink(c / "seq.out")
        if w.func == "compileall":
            for dirpath, dirnames, _ in os.walk(c / w.params["dir"]):
                if "__pycache__" in dirnames:
                    shutil.rmtree(os.path.join(dirpath, "__pycache__"))
                    dirnames.remove("__pycache__")
        if w.func == "rm_rf" and not (c / w.params["dir"]).exists():
            subprocess.run(["cp", "-a", str(self.base / w.params["dir"]), str(c / w.params["dir"])], check=True)
        if w.func == "rename":
            for rel in w.params["files"]:
                if (c / (rel + ".moved")).exists():
                    os.rename(c / (rel + ".moved"), c / rel)
        if w.func in ("rm_rf", "rename"):
            # restored files have new ctimes (and inode numbers): refresh the index as a user's
            # next `git status` would, so that the next git workload does not pay for it
            subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=c, stdout=subprocess.DEVNULL)


class KernelOverlay(Target):
    name = "kernel-overlayfs"

    def available(self):
        return None if shutil.which("mount") else "mount(8) missing"

    def mount(self) -> Path:
        t, opts = self._overlay_dirs()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(t / "mnt")], check=True)
        self.root = t / "mnt"
        return self.root

    def unmount(self, force: bool = False) -> None:
        if self.tmp is None:
            return
        self._umount_overlay(["umount"])
        self._forget()


class FuseOverlayfs(Target):
    name = "fuse-overlayfs"
    fuse = True

    def __init__(self, base, work):
        super().__init__(base, work)
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def available(self):
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed (apt-get install fuse-overlayfs)"

    def mount(self) -> Path:
        t, opts = self._overlay_dirs()
        self.proc = subprocess.Popen(
            ["fuse-overlayfs", "-f", "-o", opts, str(t / "mnt")], stdout=subprocess.DEVNULL, stderr=open(t / "log", "wb"), start_new_session=True)
        deadline = time.monotonic() + 15
        while not os.path.ismount(t / "mnt"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fuse-overlayfs did not mount: {(t / 'log').read_text()[-2000:]}")
            time.sleep(0.01)
        self.root = t / "mnt"
        return self.root

    def unmount(self, force: bool = False) -> None:
        if self.tmp is None:
            return
        try:
            self._umount_overlay(["fusermount3", "-u"])
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self.proc = None
            self._forget()


class BenchMount(Mount):
    """tests/conftest.py's Mount, with the daemon's code and entry point chosen by the bench."""

    def __init__(self, *a, code: Path = ROOT, entry=None, log_level="info", env_extra=None, python=None, **kw):
        super().__init__(*a, **kw)
        self.python = python or sys.executable  # another venv's: another pyfuse3 (stock or patched)
        self.code = Path(code)
        self.entry = entry  # a script path run instead of ``-m overlayd`` (request counting)
        self.log_level = log_level
        self.env_extra = env_extra or {}

    @property
    def env(self):
        return {**super().env, "PYTHONPATH": str(self.code), **self.env_extra}

    def daemon_command(self, ready_fd: int) -> list:
        head = [self.python, str(self.entry)] if self.entry else [self.python, "-m", "overlayd"]
        return [*head, "--ready-fd", str(ready_fd), "--name", self.name, "--state-dir", str(self.state),
                "--log-level", self.log_level, "--allow-other", str(self.base), str(self.mp), *self.extra_args]

    def start(self, timeout: float = 30.0):
        try:
            return super().start(timeout, cwd="/")
        except RuntimeError:  # the daemon is killed: clear a mount it may have left
            subprocess.run(["fusermount3", "-uz", str(self.mp)], check=False, stderr=subprocess.DEVNULL)
            raise


class Overlayd(Target):
    """overlayd with a saga of *layers* steps: the first layers-1 steps each copy up one base
    file (so that the layers hold real directories along some paths), the last one is open and
    receives the workload's writes."""

    fuse = True

    def __init__(self, base, work, layers: int = 1, code: Path = ROOT, entry=None, env_extra=None,
                 python=None, name=None):
        super().__init__(base, work)
        self.layers = layers
        self.name = name or (f"overlayd-{layers}" if layers > 1 else "overlayd")
        self.python = python
        self.code = code
        self.entry = entry
        self.env_extra = env_extra
        self.m = None
        self.touch = []

    @property
    def pid(self):
        return self.m.proc.pid if self.m is not None and self.m.proc is not None else None

    def prepare(self) -> None:
        from tree import files_of

        files = files_of(self.base)
        step = max(1, len(files) // max(1, self.layers))
        self.touch = [files[i * step + step // 2] for i in range(self.layers - 1)]

    def mount(self) -> Path:
        t = self._new_tmp()
        _live[id(self)] = self
        self.m = BenchMount(self.base, t, name="bench", code=self.code, entry=self.entry,
                            env_extra=self.env_extra, python=self.python)
        self.m.start()
        self.m.call("saga.begin", name="bench")
        for i in range(self.layers):
            self.m.call("saga.step", name=f"s{i + 1}")
            if i < self.layers - 1:
                p = self.m.mp / self.touch[i]
                st = os.stat(p)
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # a metadata copy-up
        self.root = self.m.mp
        return self.root

    def call(self, op, **args):
        return self.m.call(op, **args)

    def unmount(self, force: bool = False) -> None:
        if self.m is None:
            return
        m, self.m = self.m, None
        try:
            if force:
                if m.proc is not None:
                    try:
                        os.killpg(m.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    m.proc.wait(timeout=30)
                    m.proc = None
                lazy_unmount(str(m.mp), fuse=True)
            else:
                try:
                    m.stop(timeout=60)
                except Exception:
                    if m.proc is not None:
                        m.kill()
                    lazy_unmount(str(m.mp), fuse=True)
                    raise
        finally:
            if os.path.ismount(m.mp):
                lazy_unmount(str(m.mp), fuse=True)
            _live.pop(id(self), None)
            self._drop_tmp()
            self.root = None
