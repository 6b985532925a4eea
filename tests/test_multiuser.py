"""Local security with several users (issue 16) and workspaces that share a name (issue 15.4).

Real users (tests/users.py: overlayd-alice and overlayd-bob in overlayd-devs, overlayd-eve a
stranger), real daemons run as them (through fusermount3), real CLI processes.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Mount, put, read
from overlayd.client import Client, ClientError
from overlayd.paths import mounts_at
import users
from users import shared_dir

local_users = users.local_users  # the session fixture (a binding pyflakes does not call unused)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "TOKEN=hunter2-do-not-leak"

# A stand-in for a daemon: records every byte it receives, answers every request "ok" with a
# result shaped like any command's answer (or with *reply* verbatim).
FAKE_DAEMON = r'''
import json, os, socket, sys
path, log, reply = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
s.listen(8)
open(path + ".ready", "w").close()
res = {"saga": {"id": 1, "name": "x", "state": "active", "created": 0, "updated": 0, "steps": 1},
       "step": {"index": 1, "name": "s", "state": "open"}, "seconds": 0.0, "changes": 0, "compensated": [],
       "pid": 1, "name": "fake", "mountpoint": "/", "dev": "0:0", "layers": [], "steps": [], "writable": True,
       "busy": None}
while True:
    c, _ = s.accept()
    c.settimeout(5)
    buf = b""
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            with open(log, "ab") as f:
                f.write(d)
            buf += d
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                rid = json.loads(line).get("id")
                out = reply.encode() if reply else json.dumps({"v": 1, "id": rid, "ok": True, "result": res}).encode()
                c.sendall(out + b"\n")
    except Exception:
        pass
    c.close()
'''


def start_fake(user, sock_path: Path, log: Path, reply: str = ""):
    """The fake daemon as *user* (None: root, in a thread-free subprocess) listening on *sock_path*."""
    script = log.parent / "fake_daemon.py"
    script.write_text(FAKE_DAEMON)
    os.chmod(script, 0o644)
    argv = [sys.executable if user is None else user.rt.python, str(script), str(sock_path), str(log), reply]
    if user is not None:
        argv = user.argv(*argv)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=user.env() if user is not None else None)
    deadline = time.monotonic() + 20
    while not os.path.exists(str(sock_path) + ".ready"):
        assert proc.poll() is None and time.monotonic() < deadline, "the fake daemon did not start"
        time.sleep(0.02)
    return proc


class UserMount:
    """A workspace mounted by a user with `overlayd mount` (a non-root daemon: fusermount3)."""

    def __init__(self, user, base: Path, d: Path, name: str, *, xdg=True, extra=()):
        self.user, self.base, self.name = user, base, name
        self.mp = user.mkdir(d / f"mnt-{name}", 0o755)
        parent = d / f"state-{user.name}"
        if not parent.exists():
            user.mkdir(parent, 0o700)
        self.state = parent / name
        self.xdg = user.mkdir(d / f"xdg-{user.name}-{name}") if xdg else None
        self.extra = list(extra)
        self.mounted = False

    def env(self, **extra):
        return self.user.env(XDG_RUNTIME_DIR=self.xdg, OVERLAYD_STATE_ROOT=self.state.parent, **extra)

    def mount(self, check=True):
        r = self.user.overlayd("mount", self.base, self.mp, "--name", self.name, "--state-dir", self.state,
                               *self.extra, env=self.env())
        self.mounted = r.returncode == 0
        if check:
            assert r.returncode == 0, r.stdout + r.stderr + self.log()
        return r

    def log(self):
        try:
            return (self.state / "daemon.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def saga(self, *args, env=None, **kw):
        return self.user.saga("-w", self.mp, *args, env=env or self.env(), **kw)

    def sh(self, script):
        return self.user.sh(script, env=self.env(), check=True)

    def unmount(self):
        if not self.mounted:
            return
        try:
            r = self.user.overlayd("unmount", self.mp, env=self.env(), timeout=30)
            ok, out = r.returncode == 0 and not os.path.ismount(self.mp), r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            ok, out = False, "overlayd unmount timed out"
        self.mounted = False
        if not ok:
            self.kill_daemon()
            subprocess.run(["fusermount3", "-uz", str(self.mp)], check=False, stderr=subprocess.DEVNULL)
            raise AssertionError(f"unmount of {self.mp} failed: {out}{self.log()}")

    def kill_daemon(self):
        """SIGKILL the daemon (and its children) serving this state directory, found by its command line."""
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"overlayd" in argv and os.fsencode(str(self.state)) in argv:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture
def place():
    """A shared /tmp directory and the user mounts made in it, unmounted and removed at the end."""
    d = shared_dir()
    mounts, procs = [], []

    class Place:
        dir = d

        def mount(self, *args, **kw):
            m = UserMount(*args, **kw)
            mounts.append(m)
            return m

        def proc(self, p):
            procs.append(p)
            return p

    yield Place()
    for p in procs:
        p.kill()
        p.wait()
    errors = []
    for m in mounts:
        try:
            m.unmount()
        except AssertionError as exc:
            errors.append(str(exc))
    subprocess.run(["fusermount3", "-uz", str(d)], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(d, ignore_errors=True)
    if errors:
        pytest.fail("\n".join(errors))


def user_base(d: Path, owner=None) -> Path:
    base = d / "base"
    base.mkdir()
    put(base / "README", "readme\n")
    put(base / "shared.txt", "v0\n")
    for p in (base, base / "README", base / "shared.txt"):
        os.chmod(p, 0o777 if p == base else 0o666)
        if owner is not None:
            os.chown(p, owner.uid, owner.gid)
    return base


def owned_file(path: Path, user) -> Path:
    path.touch(mode=0o644)
    os.chown(path, user.uid, user.gid)
    return path


def squat(victim, squatter) -> Path:
    """*squatter* creates the victim's default runtime directory (/tmp/overlayd-UID) first."""
    path = Path(f"/tmp/overlayd-{victim.uid}")
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    squatter.run("mkdir", "-m", "0777", path, check=True)
    squatter.run("chmod", "0777", path, check=True)
    return path


# ---------------------------------------------------------------------------------- 16.1 squatting


def test_squatted_runtime_dir_is_refused_by_client_and_daemon(local_users, place):
    """eve creates alice's /tmp/overlayd-UID first and serves a socket there: alice's client
    refuses it before sending anything (her compensation command's token never reaches eve),
    and alice's daemon refuses to serve its socket from it."""
    alice, eve = local_users["alice"], local_users["eve"]
    base = user_base(place.dir, alice)
    m = place.mount(alice, base, place.dir, "sq1")
    m.mount()
    trap = squat(alice, eve)
    try:
        log = owned_file(place.dir / "eve.log", eve)
        place.proc(start_fake(eve, trap / "sq1.sock", log))
        env = alice.env()  # no XDG_RUNTIME_DIR: the default /tmp/overlayd-UID, eve's
        r = alice.saga("-w", m.mp, "begin", "x", env=env)
        r2 = alice.saga("-w", m.mp, "step", "s", "--compensate", f"{SECRET} true", env=env)
        received = log.read_bytes()
        assert b"hunter2" not in received, f"the secret went to eve's socket: {received[:300]!r}"
        for res in (r, r2):
            assert res.returncode not in (0, 5) and "refusing" in res.stderr, res.stdout + res.stderr
        assert "Traceback" not in r.stderr + r2.stderr
        # the daemon refuses the planted directory too
        m2 = place.mount(alice, base, place.dir, "sq2", xdg=False)
        r = m2.mount(check=False)
        assert r.returncode != 0 and "refusing to use" in r.stdout + r.stderr, r.stdout + r.stderr + m2.log()
        assert not os.path.ismount(m2.mp)
        # with her own runtime directory, alice's workspace works as before
        assert m.saga("begin", "fine").returncode == 0
        assert m.saga("abort").returncode == 0
    finally:
        shutil.rmtree(trap, ignore_errors=True)


def test_symlinked_runtime_dir_is_refused(local_users, place):
    alice, eve = local_users["alice"], local_users["eve"]
    base = user_base(place.dir, alice)
    trap = Path(f"/tmp/overlayd-{alice.uid}")
    if os.path.lexists(trap):
        shutil.rmtree(trap) if trap.is_dir() and not trap.is_symlink() else trap.unlink()
    target = eve.mkdir(place.dir / "eve-dir", 0o777)
    eve.run("ln", "-s", target, trap, check=True)
    try:
        m = place.mount(alice, base, place.dir, "sym", xdg=False)
        r = m.mount(check=False)
        assert r.returncode != 0 and "refusing to use" in r.stdout + r.stderr and "symbolic link" in r.stdout + r.stderr
        assert not os.listdir(target)
    finally:
        trap.unlink()


def test_client_refuses_a_socket_of_another_uid(local_users, place):
    """A socket in a trusted directory but served by another uid (SO_PEERCRED) is refused."""
    alice, eve = local_users["alice"], local_users["eve"]
    base = user_base(place.dir, alice)
    m = place.mount(alice, base, place.dir, "peer")
    m.mount()
    # alice's own runtime directory, but eve's process behind the socket name (alice was
    # tricked into making it group-writable to a group eve is in: simulate with a bind of
    # eve's socket at alice's socket's name)
    log = owned_file(place.dir / "eve-peer.log", eve)
    eve_dir = eve.mkdir(place.dir / "evesock", 0o755)
    place.proc(start_fake(eve, eve_dir / "fake.sock", log))
    real = m.xdg / "overlayd" / "peer.sock"
    os.rename(real, m.xdg / "overlayd" / "peer.sock.real")
    os.link(eve_dir / "fake.sock", real)  # the socket inode is eve's
    try:
        r = m.saga("step", "s", "--compensate", f"{SECRET} true")
        assert r.returncode not in (0, 5), r.stdout + r.stderr
        assert "impersonat" in r.stderr, r.stderr
        assert b"hunter2" not in log.read_bytes()
    finally:
        os.unlink(real)
        os.rename(m.xdg / "overlayd" / "peer.sock.real", real)


# ---------------------------------------------------------------------------------- 15.4 duplicate names


def test_duplicate_workspace_name_mountpoint_or_state_dir_is_refused(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "a", "base\n")
    m1 = mount_factory(base, name="dup")
    # the same name in the same runtime directory, another state directory and mountpoint
    m2 = mount_factory(base, name="dup", start=False)
    m2.run_dir = m1.run_dir
    with pytest.raises(RuntimeError, match="name dup is in use"):
        m2.start()
    m2.proc = None
    assert m1.call("status")["mountpoint"] == str(m1.mp)  # m1's socket survived
    # the same mountpoint under another name
    m3 = mount_factory(base, name="other", start=False)
    m3.mp = m1.mp
    with pytest.raises(RuntimeError, match="already a mount point"):
        m3.start()
    m3.proc = None
    # the same state directory
    m4 = mount_factory(base, name="dup4", start=False)
    m4.state = m1.state
    with pytest.raises(RuntimeError, match="in use by another daemon"):
        m4.start()
    m4.proc = None
    # the refused daemons left m1's name lock alone; m1 removes it when it stops
    assert (m1.run_dir / "dup.lock").exists() and m1.socket.exists()
    m1.stop()
    assert not (m1.run_dir / "dup.lock").exists() and not m1.socket.exists()


def cli(*args, env, cwd="/"):
    return subprocess.run([sys.executable, "-c", "import sys; from overlayd.cli.saga_cmd import main; sys.argv[0]='saga'; main()",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def overlayd_cli(*args, env):
    return subprocess.run([sys.executable, "-c",
                           "import sys; from overlayd.cli.overlayd_cmd import main; sys.argv[0]='overlayd'; main()",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_client_checks_the_daemon_serves_the_mountpoint(mount_factory, tmp_path, monkeypatch):
    """Two workspaces named alike in two runtime directories: with m1's directory in the
    environment, `saga -w m2 commit` must not commit m1's saga, and `overlayd unmount m2` must
    not unmount m1."""
    b1, b2 = tmp_path / "b1", tmp_path / "b2"
    for b in (b1, b2):
        b.mkdir()
        put(b / "f", "base\n")
    m1 = mount_factory(b1, name="same")
    m2 = mount_factory(b2, name="same")
    assert m1.run_dir != m2.run_dir
    for m in (m1, m2):
        m.call("saga.begin", name="s")
        m.call("saga.step", name="a")
        put(m.mp / "f", f"changed in {m.mp}\n")
    env = {**m1.env}  # RUNTIME_DIRECTORY = m1's: the socket named "same" there is m1's
    r = cli("-w", m2.mp, "commit", env=env)
    assert r.returncode not in (0, 5), r.stdout + r.stderr
    assert "serves" in r.stderr and str(m2.mp) in r.stderr, r.stderr
    assert read(b1 / "f") == b"base\n" and read(b2 / "f") == b"base\n"
    assert m1.call("saga.status")["saga"]["state"] == "active"
    r = overlayd_cli("unmount", m2.mp, env=env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert os.path.ismount(m1.mp) and os.path.ismount(m2.mp)
    # the Python API checks the same way
    from overlayd.client import Workspace

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(m1.run_dir))
    with pytest.raises(ClientError) as e:
        Workspace(m2.mp).saga("s").commit()
    assert e.value.code == "wrong-daemon"
    assert Workspace(m1.mp).status()["saga"]["name"] == "s"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    # with its own runtime directory each one works
    r = cli("-w", m2.mp, "commit", env=m2.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read(b2 / "f") == f"changed in {m2.mp}\n".encode() and read(b1 / "f") == b"base\n"
    m1.call("saga.abort")


# ---------------------------------------------------------------------------------- 16.2 umask, 16.6 modes


def test_compensation_gets_the_registering_clients_umask_and_state_is_private(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    m = mount_factory(base, name="um")
    m.call("saga.begin", name="s")
    old = os.umask(0o027)
    try:
        m.call("saga.step", name="a", compensate=f"touch {out}/f; mkdir {out}/d")
    finally:
        os.umask(old)
    m.call("saga.step", name="b", compensate=f"touch {out}/g")  # registered with umask 022
    m.call("saga.abort")  # compensates both steps
    assert stat.S_IMODE(os.stat(out / "g").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750
    # nothing of the state is readable or writable by others (the layers hold the view's
    # entries with the view's modes, inside 0700 directories)
    for dirpath, dirnames, filenames in os.walk(m.state):
        dirnames[:] = [d for d in dirnames if not (dirpath == str(m.state) and d in ("layers", "trash", "work"))]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            assert os.lstat(p).st_mode & 0o077 == 0, f"{p} is {stat.S_IMODE(os.lstat(p).st_mode):04o}"
    for d in ("layers", "trash", "work"):
        assert stat.S_IMODE(os.stat(m.state / d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(m.state / "workspace.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(m.state).st_mode) == 0o700


def test_user_compensation_umask_and_state_modes(local_users, place):
    """A user's daemon: the compensation gets the umask of the `saga step` that registered it."""
    alice = local_users["alice"]
    base = user_base(place.dir, alice)
    out = alice.mkdir(place.dir / "out", 0o755)
    m = place.mount(alice, base, place.dir, "umask")
    m.mount()
    assert m.saga("begin", "u").returncode == 0
    r = alice.saga("-w", m.mp, "step", "s", "--compensate", f"touch {out}/f", env=m.env(), umask=0o077)
    assert r.returncode == 0, r.stderr
    assert m.saga("rollback").returncode == 0
    st = os.stat(out / "f")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600)
    assert m.saga("abort").returncode == 0
    assert stat.S_IMODE(os.stat(m.state / "workspace.json").st_mode) == 0o600
    assert os.stat(m.state / "workspace.json").st_uid == alice.uid


# ---------------------------------------------------------------------------------- 16.3 base lock


def test_two_users_daemons_over_one_base_serialize_commits(local_users, place):
    """alice's and bob's daemons over one base: a commit waits while another holds the base's
    lock (flock on the base directory, here held by alice's flock(1)), and of two commits of
    the same file exactly one applies."""
    alice, bob = local_users["alice"], local_users["bob"]
    base = user_base(place.dir)
    ma = place.mount(alice, base, place.dir, "lock-a")
    mb = place.mount(bob, base, place.dir, "lock-b")
    ma.mount()
    mb.mount()
    for m, who in ((ma, "alice"), (mb, "bob")):
        assert m.saga("begin", "s").returncode == 0
        assert m.saga("step", "a").returncode == 0
        m.sh(f"echo {who} > {m.mp}/shared.txt")
    held = alice.mkdir(place.dir / "alice-flag", 0o755) / "held"
    holder = place.proc(subprocess.Popen(alice.argv("flock", base, "/bin/sh", "-c", f"touch {held}; sleep 2"),
                                         env=alice.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 10
    while not held.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    r = mb.saga("commit")
    waited = time.monotonic() - t0
    holder.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    assert waited > 1.2, f"bob's commit did not wait for the base's lock ({waited:.2f} s)"
    assert read(base / "shared.txt") == b"bob\n"
    # alice's saga changed the same file: her commit is a conflict, the base keeps bob's
    r = ma.saga("commit")
    assert r.returncode == 3, r.stdout + r.stderr
    assert read(base / "shared.txt") == b"bob\n"
    assert ma.saga("abort").returncode == 0


# ---------------------------------------------------------------------------------- 16.4 group members


class SystemMount(Mount):
    """A root daemon with the system's runtime directory (/run/overlayd), as the service runs."""

    @property
    def env(self):
        env = {k: v for k, v in super().env.items() if k != "RUNTIME_DIRECTORY"}
        return env

    @property
    def socket(self):
        return Path("/run/overlayd") / f"{self.name}.sock"


def test_group_member_drives_a_root_daemon_and_a_stranger_is_denied(local_users, place):
    alice, eve = local_users["alice"], local_users["eve"]
    base = user_base(place.dir)
    name = f"grp-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    m = SystemMount(base, place.dir, name=name, extra_args=["--group", "overlayd-devs"])
    (place.dir / "mnt").chmod(0o755)
    out = alice.mkdir(place.dir / "out", 0o755)
    m.start()
    try:
        env = alice.env()
        r = alice.saga("-w", m.mp, "begin", "by-alice", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = alice.saga("-w", m.mp, "step", "s", "--compensate", f"id -u > {out}/uid", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert alice.saga("-w", m.mp, "rollback", env=env).returncode == 0
        assert (out / "uid").read_text().strip() == str(alice.uid)
        for _ in range(6):
            r = eve.saga("-w", m.mp, "status", env=eve.env())
            assert r.returncode == 7, r.stdout + r.stderr
            assert "permission denied" in r.stderr and "Broken pipe" not in r.stderr and "no daemon" not in r.stderr
            r = eve.saga("-w", m.mp, "step", "x", "--compensate", "true", env=eve.env())
            assert r.returncode == 7, r.stdout + r.stderr
        r = eve.overlayd("unmount", m.mp, env=eve.env())
        assert r.returncode == 7 and "permission denied" in r.stderr, r.stdout + r.stderr
        assert os.path.ismount(m.mp)
        assert alice.saga("-w", m.mp, "abort", env=env).returncode == 0
    finally:
        m.stop()


def test_stranger_to_a_users_daemon_is_denied(local_users, place):
    alice, eve = local_users["alice"], local_users["eve"]
    base = user_base(place.dir, alice)
    m = place.mount(alice, base, place.dir, "private")
    m.mount()
    r = eve.saga("-w", m.mp, "status", env=eve.env())
    assert r.returncode == 7 and "permission denied" in r.stderr, r.stdout + r.stderr


# ---------------------------------------------------------------------------------- 16.5 names that forge output

FORGED = "x\ndeleted   README  (step 1 a)"


def test_unusual_names_are_quoted_in_listings_and_exact_in_json(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "README", "readme\n")
    m = mount_factory(base, name="quote")
    m.call("saga.begin", name="s")
    m.call("saga.step", name="a")
    put(m.mp / FORGED, "forged\n")
    put(m.mp / os.fsdecode(b"bad\xffname"), "bytes\n")
    env = m.env
    for args in (["diff"], ["diff", "--stat"], ["diff", "--name-only"], ["commit", "--dry-run"]):
        r = cli("-w", m.mp, *args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert not any(line.startswith("deleted") for line in lines), (args, r.stdout)
        assert any('"x\\ndeleted   README  (step 1 a)"' in line for line in lines), (args, r.stdout)
        assert any('"bad\\377name"' in line for line in lines), (args, r.stdout)
        if "--name-only" in args:
            assert len(lines) == 2, r.stdout
    r = cli("-w", m.mp, "--json", "diff", env=env)
    paths = {os.fsencode(c["path"]) for c in json.loads(r.stdout)["changes"]}
    assert paths == {FORGED.encode(), b"bad\xffname"}
    m.call("saga.abort")


# ---------------------------------------------------------------------------------- 16.6 small ones


def test_malformed_daemon_replies_are_clear_errors(mount_factory, tmp_path):
    """A daemon (here a stand-in at a verified socket) answering garbage or objects without the
    expected keys: an error message and exit 1, never a traceback."""
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="bad")
    dev = mounts_at(str(m.mp))[-1].dev
    fake_dir = tmp_path / "fakerun"
    fake_dir.mkdir(mode=0o700)
    status = {"pid": 1, "name": "bad", "mountpoint": str(m.mp), "dev": dev, "layers": []}
    for reply in ("not json", "[1, 2]", json.dumps({"v": 1, "id": 2, "ok": True, "result": {}}),
                  json.dumps({"v": 1, "id": 2, "ok": False, "error": "flat"})):
        sock = fake_dir / "bad.sock"
        for p in (sock, Path(str(sock) + ".ready")):
            if p.exists():
                p.unlink()
        # the stand-in answers status correctly (it serves this mount), then the reply under test
        script = tmp_path / "fake.py"
        script.write_text(FAKE_DAEMON.replace(
            'out = reply.encode() if reply else',
            f'out = (json.dumps({{"v": 1, "id": rid, "ok": True, "result": {status!r}}}).encode() '
            'if json.loads(line).get("op") == "status" else reply.encode()) if reply else'))
        proc = subprocess.Popen([sys.executable, str(script), str(sock), str(tmp_path / "fake.log"), reply])
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(str(sock) + ".ready"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = cli("-w", m.mp, "status", env={**m.env, "RUNTIME_DIRECTORY": str(fake_dir)})
            assert r.returncode == 1, (reply, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and r.stderr.startswith("Error: "), (reply, r.stderr)
            if '"result": {}' not in reply:  # not an overlayd reply at all: the Python client says so
                with pytest.raises(ClientError) as e:
                    with Client(sock, timeout=5) as c:
                        c.call("status")
                        c.call("saga.status")
                assert e.value.code == "bad-reply"
        finally:
            proc.kill()
            proc.wait()


def test_deeply_nested_toml_and_absurd_timeouts_are_usage_errors(tmp_path, mount_factory):
    deep = tmp_path / "deep.conf"
    deep.write_text("base = " + "[" * 100000 + "\n")
    r = overlayd_cli("mount", "--config", deep, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr, r.stderr
    deep_def = tmp_path / "deep.toml"
    deep_def.write_text("name = " + "[" * 100000 + "\n")
    r = cli("run", deep_def, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "nested too deeply" in r.stdout + r.stderr, r.stdout + r.stderr
    for value in ("inf", "1e308", "nan", "-inf"):
        f = tmp_path / f"t-{value}.toml"
        f.write_text(f'name = "t"\n[[step]]\nname = "a"\nrun = "true"\ntimeout = {value}\n')
        r = cli("run", f, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 2 and "timeout" in r.stdout + r.stderr, (value, r.stdout, r.stderr)
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="inf")
    for value in (1e308, float("inf")):
        with pytest.raises(ClientError) as e:
            m.call("saga.begin", name="b", budgets={"timeout": value})
        assert e.value.code == "bad-request"
    assert m.call("saga.status")["saga"] is None
