"""Real local users for the multi-user tests, and a way to run overlayd as them.

``local_users`` (a session fixture) creates ``overlayd-alice`` and ``overlayd-bob`` (members of
the group ``overlayd-devs``) and ``overlayd-eve`` (a stranger), idempotently, with useradd. A
command runs as one of them through ``setpriv --reuid --regid --init-groups``.

The interpreter and the code must be readable by those users. The test venv usually links to
an interpreter under /root (mode 0700), and a CI clone may live in a directory other users
cannot enter, so the session copies the code (overlayd/, cli/, journal/) and the venv's
site-packages into a fresh world-readable directory under /tmp and runs them with a system
interpreter of the same minor version (the compiled modules, pyfuse3 and lmdb, are built for
it). Without one the tests are skipped, loudly, except under CI, where they fail.
"""

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUP = "overlayd-devs"
MEMBERS = ("overlayd-alice", "overlayd-bob")
STRANGER = "overlayd-eve"
SKIP_SITE = {"pip", "setuptools", "hypothesis", "_pytest", "pytest", "pygments", "_distutils_hack", "pkg_resources",
             "__pycache__"}


class User:
    def __init__(self, name: str, runtime):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid
        self.rt = runtime

    def env(self, **extra) -> dict:
        """A clean environment: no XDG_RUNTIME_DIR, no RUNTIME_DIRECTORY unless given."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",
               "PYTHONPATH": self.rt.pythonpath, "PYTHONDONTWRITEBYTECODE": "1", "OVERLAYD_BACKOFF": "0.01"}
        env.update({k: str(v) for k, v in extra.items() if v is not None})
        return env

    def argv(self, *argv) -> list:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *map(str, argv)]

    def run(self, *argv, env=None, umask=None, timeout=60, check=False, input=None) -> subprocess.CompletedProcess:
        cmd = self.argv(*argv)
        if umask is not None:
            cmd = self.argv("/bin/sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *argv)
        r = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL if input is None else None, input=input, cwd="/")
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: {argv} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sh(self, script, **kw):
        return self.run("/bin/sh", "-c", script, **kw)

    def saga(self, *args, **kw):
        return self.run(self.rt.python, "-c", "import sys; from overlayd.cli.saga_cmd import main; sys.argv[0] = 'saga'; main()",
                        *args, **kw)

    def overlayd(self, *args, **kw):
        return self.run(self.rt.python, "-c",
                        "import sys; from overlayd.cli.overlayd_cmd import main; sys.argv[0] = 'overlayd'; main()", *args, **kw)

    def mkdir(self, path, mode=0o700) -> Path:
        """A directory of this user's (made by root, then given away)."""
        path = Path(path)
        path.mkdir(mode=mode)
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)
        return path


class Runtime:
    """The interpreter and PYTHONPATH every test user can read."""

    def __init__(self, python: str, pythonpath: str, tmp: Path | None):
        self.python, self.pythonpath, self.tmp = python, pythonpath, tmp


def _ensure_users() -> None:
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "-f", GROUP], check=True)
    for name in (*MEMBERS, STRANGER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            r = subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], capture_output=True, text=True)
            if r.returncode not in (0, 9):  # 9: created meanwhile by a parallel session
                raise RuntimeError(f"useradd {name}: {r.stderr}")
    for name in MEMBERS:
        if name not in grp.getgrnam(GROUP).gr_mem:
            subprocess.run(["usermod", "-a", "-G", GROUP, name], check=True)


def _system_python() -> str | None:
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if os.access(cand, os.X_OK):
            st = os.stat(cand)
            if st.st_mode & 0o005 == 0o005:
                return cand
    return None


def _build_runtime() -> Runtime:
    python = _system_python()
    if python is None:
        msg = (f"no world-executable python{sys.version_info.major}.{sys.version_info.minor} for the test users "
               "(the venv's interpreter lives where other users cannot read it)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = Path(tempfile.mkdtemp(prefix="overlayd-users-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    code, site = tmp / "code", tmp / "site"
    # laid out as installed: journal/ and cli/ are overlayd.journal and overlayd.cli (pyproject's package-dir)
    # (a git worktree may carry symlinks overlayd/cli and overlayd/journal to the same layout: skipped)
    shutil.copytree(ROOT / "overlayd", code / "overlayd", ignore=shutil.ignore_patterns("__pycache__", "cli", "journal"))
    for pkg in ("cli", "journal"):
        shutil.copytree(ROOT / pkg, code / "overlayd" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    src = Path(sysconfig.get_paths()["purelib"])
    site.mkdir()
    for entry in src.iterdir():
        if entry.name in SKIP_SITE or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, site / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, site / entry.name)
    subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
    return Runtime(python, f"{code}:{site}", tmp)


@pytest.fixture(scope="session")
def local_users():
    """{"alice": User, "bob": User, "eve": User}: alice and bob in overlayd-devs, eve a stranger."""
    if os.geteuid() != 0:
        pytest.skip("creating users needs root (CI runs as root)")
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{tool} is missing")
    _ensure_users()
    # Unprivileged FUSE needs /dev/fuse readable and writable by everybody, the mode the fuse3
    # package's udev rule gives it; some containers create it 0600.
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", 0o666)
    rt = _build_runtime()
    users = {n.split("-", 1)[1]: User(n, rt) for n in (*MEMBERS, STRANGER)}
    r = users["alice"].run(rt.python, "-c", "import pyfuse3, trio, lmdb, click, overlayd.daemon, overlayd.cli.saga_cmd, overlayd.journal")
    if r.returncode != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"the copied overlayd does not import for another user with {rt.python}: {r.stderr[-2000:]}")
    yield users
    if rt.tmp is not None:
        shutil.rmtree(rt.tmp, ignore_errors=True)


def shared_dir(prefix="overlayd-mu-") -> Path:
    """A fresh directory under /tmp that every user may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d
