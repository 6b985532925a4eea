"""The systemd service: units, configuration files, install-service, and the unit run as systemd runs it.

The units are checked by ``systemd-analyze verify`` (skipped only when the binary is missing:
Debian package ``systemd``). The lifecycle tests install the units with ``overlayd
install-service --root TMP`` and run their ``Exec*=`` lines the way systemd would: ``%i``
substituted, the ``-`` prefix meaning "failure ignored", a minimal environment (systemd's
PATH, not the venv's), ``STATE_DIRECTORY``/``RUNTIME_DIRECTORY`` set to directories created
beforehand, ``NOTIFY_SOCKET`` a datagram socket this test binds, and for the watchdog
``WATCHDOG_USEC`` with ``WATCHDOG_PID`` the pid of the exec'd main process. The one liberty:
``/etc/overlayd`` in the command lines is read below the temporary root.
"""

import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from overlayd.cli import overlayd_cmd
from overlayd import config
from overlayd.client import Client
from overlayd.paths import mounts_at

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
NAME = "ws"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NAMESPACE_OPTIONS = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "PrivateDevices",
                     "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                     "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
                     "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "MountAPIVFS", "RootDirectory",
                     "RootImage", "DynamicUser")


# ---------------------------------------------------------------------------------- unit files


def parse_unit(path) -> dict:
    """{key: [values]} of a unit file's [Service]/[Unit]/[Install] lines (repeated keys kept in order)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_argv(value: str, *, instance: str, root: Path) -> tuple[list[str], bool]:
    """An Exec*= value as systemd runs it: (argv, failure ignored)."""
    ignore = False
    while value and value[0] in "-@:+!":
        ignore |= value[0] == "-"
        value = value[1:]
    value = value.replace("%i", instance).replace("%I", instance).replace("%%", "%")
    argv = shlex.split(value)
    return [a.replace("/etc/overlayd/", f"{root}/etc/overlayd/") for a in argv], ignore


def install(tmp_path, *args, check=True):
    r = CliRunner().invoke(overlayd_cmd.main, ["install-service", "--root", str(tmp_path / "root"), *args],
                           catch_exceptions=False)
    if check:
        assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_verify(tmp_path, user):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd): cannot verify the units")
    install(tmp_path, *(["--user"] if user else []))
    unit = config.USER_UNIT if user else config.SYSTEM_UNIT
    installed = next((tmp_path / "root").rglob(unit))
    check = tmp_path / "verify" / unit.replace("@", f"@{NAME}")  # verify an instance of the template
    check.parent.mkdir()
    shutil.copy(installed, check)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "xdg-run")}
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    r = subprocess.run([analyze, *(["--user"] if user else []), "verify", str(check)], env=env,
                       capture_output=True, text=True, timeout=120)
    # verify exits 0 on many problems (unknown keys, bad values are "ignoring" warnings): no output at all
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_system_unit_settings():
    u = parse_unit(UNITS / config.SYSTEM_UNIT)
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["ExecStart"] == ["/usr/local/bin/overlayd mount --config /etc/overlayd/%i.conf --foreground"]
    assert u["ExecStartPre"][0].startswith("-") and "clear-mount" in u["ExecStartPre"][0]
    assert u["ExecStopPost"][0].startswith("-") and "clear-mount" in u["ExecStopPost"][0]
    assert u["Restart"] == ["on-failure"] and u["RestartPreventExitStatus"] == ["2"]
    assert u["StateDirectory"] == ["overlayd/%i"] and u["RuntimeDirectory"] == ["overlayd"]
    assert u["RuntimeDirectoryPreserve"] == ["yes"]
    assert int(u["TimeoutStopSec"][0]) >= 120 and int(u["WatchdogSec"][0]) > 0
    assert u["KillMode"] == ["mixed"]
    assert u["DevicePolicy"] == ["closed"] and u["DeviceAllow"] == ["/dev/fuse rw"]
    assert u["RestrictAddressFamilies"] == ["AF_UNIX"]
    caps = set(u["CapabilityBoundingSet"][0].split())
    assert {"CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_CHOWN", "CAP_SETUID", "CAP_DAC_OVERRIDE"} <= caps
    assert not caps & {"CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_RAWIO"}
    for unit in (config.SYSTEM_UNIT, config.USER_UNIT):
        hidden = set(parse_unit(UNITS / unit)) & set(NAMESPACE_OPTIONS)
        assert not hidden, f"{unit}: {hidden} would run the daemon in a mount namespace and hide the mount"


def test_start_limits_leave_room_for_restarts_by_hand():
    """A crash loop is stopped, but a person restarting a workspace by hand a few times while
    fixing something is not; README says what to do when the limit is hit anyway."""
    for unit in (config.SYSTEM_UNIT, config.USER_UNIT):
        u = parse_unit(UNITS / unit)
        burst, interval = int(u["StartLimitBurst"][0]), int(u["StartLimitIntervalSec"][0])
        assert burst >= 10, unit
        assert burst * int(u["RestartSec"][0]) < interval, f"{unit}: a crash loop would never hit the limit"
    readme = (UNITS.parent / "README.md").read_text()
    assert "systemctl reset-failed overlayd@NAME" in readme


def test_system_unit_hardening_score(tmp_path):
    """`systemd-analyze security` of overlayd@NAME (offline, on the unit file): 6.2 MEDIUM before
    the hardening of issue 16.7, at most 4.1 now. The namespace options stay out (see
    test_system_unit_settings); systemd/test-in-nspawn.sh runs the hardened unit for real."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    u = parse_unit(UNITS / config.SYSTEM_UNIT)
    assert u["UMask"] == ["0077"] and u["SystemCallFilter"] == ["@system-service @mount"]
    assert u["SystemCallErrorNumber"] == ["EPERM"]
    for key in ("LockPersonality", "MemoryDenyWriteExecute", "RestrictRealtime", "ProtectClock", "ProtectHostname",
                "PrivateNetwork", "NoNewPrivileges", "RestrictNamespaces"):
        assert u[key] == ["yes"], key
    unit = tmp_path / "overlayd@ws.service"
    unit.write_text((UNITS / config.SYSTEM_UNIT).read_text().replace("%i", "ws"))
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", unit.name], cwd=tmp_path,
                       capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if "Overall exposure level" in x]
    assert line, r.stdout + r.stderr
    score = float(line[0].split(":")[1].split()[0])
    assert score <= 4.1, line[0]


# ---------------------------------------------------------------------------------- configuration files


def write_conf(tmp_path, text, name=NAME):
    p = tmp_path / f"{name}.conf"
    p.write_text(text)
    return p


def test_config_valid(tmp_path):
    p = write_conf(tmp_path, 'base = "/srv/base"\nmountpoint = "/mnt/x/"\nallow_other = false\n'
                             'keep_open_step = true\nlog_level = "DEBUG"\ngroup = "root"\n')
    c = config.load(p)
    assert (c.name, c.base, c.mountpoint, c.allow_other, c.keep_open_step, c.log_level, c.group, c.state_dir) == \
        (NAME, "/srv/base", "/mnt/x", False, True, "debug", "root", None)
    c = config.load(write_conf(tmp_path, 'base = "~/b"\nmountpoint = "/m"\n', name="other.ws"))
    assert c.name == "other.ws" and c.base == os.path.expanduser("~/b") and c.allow_other is None


@pytest.mark.parametrize("text, message", [
    ('base = "/b"\n', "ws.conf: missing required key 'mountpoint'"),
    ('base = "/b"\n\nmountpoint = "mnt/ws"\n', "ws.conf:3: mountpoint must be an absolute path, got 'mnt/ws'"),
    ('base = "/b"\nmountpoint = "/m"\nmount_point = "/x"\n',
     "ws.conf:3: unknown key 'mount_point'; did you mean 'mountpoint'?"),
    ('base = "/b"\nmountpoint = "/m"\nallow_other = "yes"\n', "ws.conf:3: allow_other must be true or false"),
    ('base = "/b"\nmountpoint = "/m"\nlog_level = "loud"\n', "ws.conf:3: log_level must be one of debug, info"),
    ('base = "/b"\nmountpoint = /m\n', "ws.conf:2: invalid TOML: "),
    ('base = "/b"\nmountpoint = "/m"\n[options]\nallow_other = true\n', "ws.conf:3: unexpected section [options]"),
    ('base = "/b"\nmountpoint = "/m"\ngroup = "no-such-group-xyz"\n',
     "ws.conf:3: group 'no-such-group-xyz' does not exist"),
    ('base = "/b"\nmountpoint = "/b"\n', "ws.conf:2: mountpoint must differ from base"),
])
def test_config_errors(tmp_path, text, message):
    p = write_conf(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]) + message[len(message.split(":")[0]):]), \
        str(e.value)


def test_config_missing_file_and_bad_name(tmp_path):
    with pytest.raises(config.ConfigError, match=r"no such configuration file; create it \(overlayd install-service"):
        config.load(tmp_path / "nope.conf")
    with pytest.raises(config.ConfigError, match="the file's name gives the workspace name: invalid workspace name"):
        config.load(write_conf(tmp_path, 'base = "/b"\nmountpoint = "/m"\n', name="-bad"))


def test_mount_with_config_and_overrides(tmp_path, monkeypatch):
    from overlayd import daemon

    calls = []
    monkeypatch.setattr(daemon, "run", lambda *a, **kw: calls.append((a, kw)) or 0)
    monkeypatch.setattr(daemon, "setup_logging", lambda level, name: calls.append(("log", level, name)))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "st"))
    p = write_conf(tmp_path, 'base = "/srv/b"\nmountpoint = "/mnt/m"\nkeep_open_step = true\nlog_level = "debug"\n'
                             'allow_other = false\ngroup = "root"\n')
    r = CliRunner().invoke(overlayd_cmd.main, ["mount", "--config", str(p), "--foreground"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert calls[0] == ("log", "debug", NAME)
    assert calls[1] == (("/srv/b", "/mnt/m", str(tmp_path / "st"), NAME),
                        dict(allow_other=False, group="root", debug_fuse=False, keep_open_step=True))
    calls.clear()
    r = CliRunner().invoke(overlayd_cmd.main, ["mount", "--config", str(p), "/other/b", "--foreground", "--name", "n2",
                                               "--allow-other", "--no-keep-open-step", "--log-level", "error",
                                               "--state-dir", "/sd"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert calls == [("log", "error", "n2"), (("/other/b", "/mnt/m", "/sd", "n2"),
                                              dict(allow_other=True, group="root", debug_fuse=False,
                                                   keep_open_step=False))]


def test_mount_config_errors_exit_2(tmp_path):
    p = write_conf(tmp_path, 'base = "/b"\nmountpoint = "/m"\nbse = "/x"\n')
    r = CliRunner().invoke(overlayd_cmd.main, ["mount", "--config", str(p), "--foreground"], catch_exceptions=False)
    assert r.exit_code == 2
    assert r.output == f"Error: {p}:3: unknown key 'bse'; did you mean 'base'? known keys: " \
                       "base, mountpoint, allow_other, group, keep_open_step, log_level, state_dir\n"
    r = CliRunner().invoke(overlayd_cmd.main, ["mount"], catch_exceptions=False)
    assert r.exit_code == 2 and "give BASE and MOUNTPOINT, or --config FILE" in r.output


# ---------------------------------------------------------------------------------- install-service


def test_install_service_is_idempotent(tmp_path):
    root = tmp_path / "root"
    r = install(tmp_path, "--name", NAME, "--base", "/srv/b", "--mountpoint", "/mnt/m")
    unit = root / "etc/systemd/system" / config.SYSTEM_UNIT
    conf = root / "etc/overlayd" / f"{NAME}.conf"
    exe = config.overlayd_executable()
    assert r.output.splitlines()[:2] == [f"installed {unit} (it runs {exe})", f"wrote {conf}"]
    assert r.output.splitlines()[-2:] == ["  systemctl daemon-reload", f"  systemctl enable --now overlayd@{NAME}"]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    u = parse_unit(unit)
    for key in ("ExecStart", "ExecStartPre", "ExecStopPost"):
        argv, _ = exec_argv(u[key][0], instance=NAME, root=root)
        assert argv[0] == exe, (key, argv)
    assert "/usr/local/bin/overlayd" in unit.read_text()  # the comments are left alone
    c = config.load(conf)
    assert (c.name, c.base, c.mountpoint) == (NAME, "/srv/b", "/mnt/m")
    conf.write_text(conf.read_text() + "log_level = \"debug\"\n")
    edited = conf.read_text()
    r = install(tmp_path, "--name", NAME, "--base", "/elsewhere", "--mountpoint", "/mnt/m")
    assert r.output.splitlines()[:2] == [f"unchanged {unit} (it runs {exe})", f"kept the existing {conf}"]
    assert conf.read_text() == edited
    unit.write_text("stale\n")
    assert install(tmp_path).output.startswith(f"updated {unit}")
    assert "mount --config /etc/overlayd/%i.conf --foreground" in unit.read_text()


def test_install_service_user_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/someone/.config")
    r = install(tmp_path, "--user", "--name", NAME, "--executable", "/opt/over layd/bin/overlayd")
    unit = tmp_path / "root/home/someone/.config/systemd/user" / config.USER_UNIT
    assert unit.is_file() and (tmp_path / f"root/home/someone/.config/overlayd/{NAME}.conf").is_file()
    assert f"systemctl --user enable --now overlayd-user@{NAME}" in r.output
    assert 'ExecStart="/opt/over layd/bin/overlayd" mount --config %E/overlayd/%i.conf --foreground' in unit.read_text()
    r = install(tmp_path, "--base", "/b", check=False)
    assert r.exit_code == 2 and "give --name too" in r.output
    r = install(tmp_path, "--name", "../x", check=False)
    assert r.exit_code == 2 and "invalid workspace name" in r.output
    r = install(tmp_path, "--name", "x", "--base", "rel/dir", check=False)
    assert r.exit_code == 2 and "--base must be an absolute path" in r.output


def test_clear_mount_without_a_mount(tmp_path):
    r = CliRunner().invoke(overlayd_cmd.main, ["clear-mount", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0 and r.output == ""
    r = CliRunner().invoke(overlayd_cmd.main, ["clear-mount"], catch_exceptions=False)
    assert r.exit_code == 2 and "give MOUNTPOINT or --config FILE" in r.output
    # another mistake in the file is left to ExecStart= to report (once), the mountpoint is still usable
    p = write_conf(tmp_path, f'base = "/b"\nmountpoint = "{tmp_path}"\nbse = 1\n')
    r = CliRunner().invoke(overlayd_cmd.main, ["clear-mount", "--config", str(p)], catch_exceptions=False)
    assert r.exit_code == 0 and r.output == ""
    p = write_conf(tmp_path, 'base = "/b"\nmountpoint = "rel"\n')
    r = CliRunner().invoke(overlayd_cmd.main, ["clear-mount", "--config", str(p)], catch_exceptions=False)
    assert r.exit_code == 2 and "mountpoint must be an absolute path" in r.output


# ---------------------------------------------------------------------------------- the unit run as systemd runs it


class Service:
    """One installed instance of overlayd@.service, its Exec lines run by hand as systemd would."""

    def __init__(self, tmp: Path, base: Path, extra_config: str = ""):
        self.tmp = tmp
        self.root = tmp / "root"
        self.mp = tmp / "mnt"
        self.mp.mkdir()
        install(tmp, "--name", NAME, "--base", str(base), "--mountpoint", str(self.mp))
        conf = self.root / "etc/overlayd" / f"{NAME}.conf"
        conf.write_text(conf.read_text() + extra_config)
        self.unit = parse_unit(self.root / "etc/systemd/system" / config.SYSTEM_UNIT)
        # what systemd creates before ExecStartPre= (StateDirectory=, RuntimeDirectory=)
        self.state_dir = tmp / "var/lib/overlayd" / NAME
        self.state_dir.mkdir(parents=True, mode=0o700)
        self.run_dir = tmp / "run/overlayd"
        self.run_dir.mkdir(parents=True)
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.log_path = tmp / "service.log"
        self.proc = None
        self.messages = []  # (message, mounted when it arrived)

    def env(self, **extra):
        return {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "INVOCATION_ID": "0" * 32,
                "STATE_DIRECTORY": str(self.state_dir), "RUNTIME_DIRECTORY": str(self.run_dir),
                "NOTIFY_SOCKET": str(self.notify_path), **extra}

    def argv(self, key):
        return [exec_argv(v, instance=NAME, root=self.root) for v in self.unit.get(key, [])]

    def run_lines(self, key):
        """Run ExecStartPre=/ExecStopPost= lines; a failure counts unless the line has '-'."""
        results = []
        for argv, ignore in self.argv(key):
            r = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=60)
            assert ignore or r.returncode == 0, (key, argv, r.stdout, r.stderr)
            results.append(r)
        return results

    def start(self, watchdog_usec=None):
        assert self.proc is None
        self.run_lines("ExecStartPre")
        [(argv, _)] = self.argv("ExecStart")
        env = self.env()
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
            # systemd sets WATCHDOG_PID to the pid it execs: the shell's pid, kept by exec
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")[-5000:]

    def receive(self, timeout):
        """The next notification (None after *timeout*), noting whether the mount was live when it came."""
        self.notify.settimeout(timeout)
        try:
            msg = self.notify.recv(4096).decode()
        except socket.timeout:
            return None
        mounted = is_mount(self.mp)
        self.messages.append((msg, mounted))
        return msg

    def wait_for(self, field, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.receive(max(0.01, deadline - time.monotonic()))
            if msg is not None and field in msg.split("\n"):
                return self.messages[-1]
            if self.proc.poll() is not None and msg is None:
                break
        raise AssertionError(f"no {field} within {timeout} s (got {self.messages}, rc {self.proc.poll()})\n"
                             f"{self.log()}")

    def client(self):
        return Client(self.run_dir / f"{NAME}.sock", timeout=30)

    def call(self, op, **args):
        with self.client() as c:
            return c.call(op, **args)

    def wait_idle(self, timeout=30.0):
        """Recovery (rolling back the step open at a crash) runs after READY=1: wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.call("saga.status")
            if st["busy"] is None and (st["saga"] is None or st["saga"]["state"] != "compensating"):
                return st
            assert time.monotonic() < deadline, f"still busy: {st}"
            time.sleep(0.05)

    def stop(self, timeout=60.0):
        """systemctl stop: SIGTERM to the main process (KillMode=mixed), then ExecStopPost=."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        self.run_lines("ExecStopPost")
        return rc

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def cleanup(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if is_mount(self.mp):
            subprocess.run(["fusermount3", "-uz", str(self.mp)], check=False)
        self.notify.close()


def is_mount(path) -> bool:
    """From the mount table: does not touch the mount (safe on a dead or stopped one)."""
    return bool(mounts_at(str(path)))


def mount_state(path) -> str:
    try:
        os.statvfs(path)  # a dead FUSE mount may still answer stat() from the kernel's attribute cache
        return "live" if is_mount(path) else "none"
    except OSError as exc:
        assert exc.errno == errno.ENOTCONN, exc
        return "dead"


@pytest.fixture
def service(tmp_path):
    base = tmp_path / "base"
    (base / "src").mkdir(parents=True)
    (base / "src" / "main.py").write_text("print('hello')\n")
    made = []

    def make(extra_config=""):
        sub = tmp_path / f"s{len(made)}"
        sub.mkdir()
        made.append(Service(sub, base, extra_config))
        return made[-1]

    make.base = base
    yield make
    for s in made:
        s.cleanup()


def test_service_ready_watchdog_and_clean_stop(service):
    s = service().start(watchdog_usec=2_000_000)
    msg, mounted = s.wait_for("READY=1")
    assert mounted, f"READY=1 arrived before {s.mp} was mounted: {s.messages}"
    assert not any("READY=1" in m for m, live in s.messages if not live)
    assert (s.mp / "src" / "main.py").read_text() == "print('hello')\n"
    st = s.call("status")
    assert st["pid"] == s.proc.pid and st["state_dir"] == str(s.state_dir) and st["name"] == NAME
    assert (s.run_dir / f"{NAME}.sock").exists()
    # WATCHDOG_USEC=2 s: a ping at least every second, from the main process
    t0 = time.monotonic()
    s.wait_for("WATCHDOG=1", timeout=3)
    s.wait_for("WATCHDOG=1", timeout=3)
    assert time.monotonic() - t0 < 4
    # ExecStartPre= on a live mount (a second start attempt) leaves it alone
    [r] = s.run_lines("ExecStartPre")
    assert r.returncode == 0 and mount_state(s.mp) == "live"
    # SIGTERM: STOPPING=1, a clean unmount, exit 0, and ExecStopPost= has nothing to do
    s.proc.send_signal(signal.SIGTERM)
    s.wait_for("STOPPING=1", timeout=30)
    assert s.proc.wait(timeout=60) == 0, s.log()
    s.proc = None
    assert mount_state(s.mp) == "none"
    [r] = s.run_lines("ExecStopPost")
    assert r.returncode == 0 and r.stderr == ""
    assert "<3>" not in s.log() and "<6>" in s.log(), s.log()  # journald priority prefixes, no error


def test_service_hung_mount_is_not_touched(service):
    """ExecStartPre= never hangs on a mount whose daemon does not answer, and does not unmount it."""
    s = service().start()
    s.wait_for("READY=1")
    s.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        [r] = s.run_lines("ExecStartPre")
        assert time.monotonic() - t0 < 20
        assert r.returncode == 1 and "does not answer (a hung daemon?)" in r.stderr, r.stderr
        assert is_mount(s.mp)
    finally:
        s.proc.send_signal(signal.SIGCONT)
    assert s.stop() == 0, s.log()


def test_service_config_error_is_not_restarted(service, tmp_path):
    """A bad configuration exits 2 (RestartPreventExitStatus=2), its error at journald priority 3."""
    s = service(extra_config="mountpont = \"/x\"\n")
    [(argv, _)] = s.argv("ExecStart")
    log = tmp_path / "journal-stream"
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        r = subprocess.run(argv, env=s.env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"), stdout=f, stderr=f,
                           timeout=60)
    assert r.returncode == 2 and "2" in s.unit["RestartPreventExitStatus"][0].split()
    conf = s.root / "etc/overlayd" / f"{NAME}.conf"
    line = len(conf.read_text().splitlines())
    assert log.read_text().startswith(f"<3>Error: {conf}:{line}: unknown key 'mountpont'; did you mean 'mountpoint'?")


@pytest.mark.parametrize("keep", [False, True], ids=["open-step-rolled-back", "keep-open-step"])
def test_service_sigkill_then_restart_recovers(service, keep):
    s = service(extra_config="keep_open_step = true\n" if keep else "")
    s.start()
    s.wait_for("READY=1")
    sid = s.call("saga.begin", name="deploy")["saga"]["id"]
    s.call("saga.step", name="first")
    (s.mp / "src" / "first.txt").write_text("one\n")
    s.call("saga.step", name="second")
    (s.mp / "src" / "second.txt").write_text("two\n")
    before = s.call("saga.status")
    assert [x["state"] for x in before["steps"]] == ["done", "open"]

    s.kill()  # SIGKILL mid-saga: the mount is left dead
    assert mount_state(s.mp) == "dead"
    [r] = s.run_lines("ExecStopPost")
    assert r.returncode == 0 and "cleared a dead mount" in r.stderr, r.stderr
    assert mount_state(s.mp) == "none"
    s.start()  # ExecStartPre= (nothing left to clear), then ExecStart=
    msg, mounted = s.wait_for("READY=1")
    assert mounted
    after = s.wait_idle()
    assert after["saga"]["id"] == sid and after["saga"]["state"] == "active"
    assert after["saga"]["name"] == before["saga"]["name"]
    assert (s.mp / "src" / "first.txt").read_text() == "one\n"
    if keep:
        assert [x["state"] for x in after["steps"]] == ["done", "open"]
        assert (s.mp / "src" / "second.txt").read_text() == "two\n"
    else:
        assert [x["state"] for x in after["steps"]] == ["done", "compensated"]
        assert not (s.mp / "src" / "second.txt").exists()
    kinds = [e["kind"] for e in s.call("saga.log")["events"]]
    assert "daemon.recovered" in kinds, kinds
    assert s.stop() == 0, s.log()
    assert mount_state(s.mp) == "none"


def test_service_crash_cleared_by_exec_start_pre_alone(service):
    """Without ExecStopPost= (e.g. the machine's systemd was killed too), ExecStartPre= clears the dead mount."""
    s = service().start()
    s.wait_for("READY=1")
    s.kill()
    assert mount_state(s.mp) == "dead"
    [r] = s.run_lines("ExecStartPre")
    assert r.returncode == 0 and "cleared a dead mount" in r.stderr
    s.start()
    s.wait_for("READY=1")
    assert s.stop() == 0, s.log()
