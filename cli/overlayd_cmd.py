"""``overlayd``: mount, unmount and list workspaces.

Exit codes: 0 ok, 1 error, 2 usage error, 5 no daemon serves the workspace, 7 permission denied.
"""

import json
import os
import sys

import click

from overlayd.cli import mcp_cmd
from overlayd.cli.common import Group
from overlayd import __version__
from overlayd.client import Client, ClientError, NoDaemon, PermissionDenied, connect_to_mount, mount_of
from overlayd.paths import (UsageError, check_workspace_name, choose_name, default_state_dir, disk_usage, index_dir,
                            known_workspaces, mount_command, mountinfo_path, mounts_at, overlayd_mounts, quote_path,
                            socket_path, state_root, unregister)

CONTEXT = {"help_option_names": ["-h", "--help"]}
EXIT_NO_DAEMON = 5
EXIT_PERMISSION = 7


def _stderr_is_journal() -> bool:
    """Is stderr a journald stream (systemd sets JOURNAL_STREAM=DEV:INODE of it)?"""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class ServiceError(click.ClickException):
    """An error of a command systemd runs: printed with a ``<3>`` priority prefix under journald."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        prefix = "<3>" if _stderr_is_journal() else ""
        click.echo(f"{prefix}Error: {self.format_message()}", err=True)


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="overlayd")
def main():
    """A copy-on-write overlay of a working tree, with sagas: every change lands in a layer.

    \b
    Example:
        overlayd mount ~/src/project /mnt/ws
        cd /mnt/ws && saga begin refactor
    """


@main.command()
@click.argument("base", type=click.Path(file_okay=False), required=False)
@click.argument("mountpoint", type=str, required=False)  # str: never stat() a possibly hung mount
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Read base, mountpoint and options from this file (TOML, e.g. /etc/overlayd/NAME.conf); "
                   "the workspace name is the file's stem. Arguments and options given here override it.")
@click.option("--name", help="Workspace name (default: the name of the workspace last mounted at MOUNTPOINT, "
                             "else its last component, or its last two (demo-mnt) when another workspace has that "
                             "name).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where layers and the journal live (default /var/lib/overlayd/NAME for root, "
                   "else $XDG_STATE_HOME/overlayd/NAME).")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for systemd: Type=notify).")
@click.option("--allow-other/--no-allow-other", default=None,
              help="Let every user's processes use the mount (default: on when run as root).")
@click.option("--group", help="Members of this group may also drive the daemon.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="How much the daemon logs (default: info).")
@click.option("--keep-open-step/--no-keep-open-step", default=None,
              help="After a crash, keep the step that was open instead of rolling it back.")
@click.option("--debug-fuse", is_flag=True, hidden=True)
def mount(base, mountpoint, config_path, name, state_dir, foreground, allow_other, group, log_level, keep_open_step,
          debug_fuse):
    """Mount a workspace over BASE at MOUNTPOINT.

    Returns once the mount is ready (exit 0) or has failed (exit 1, with the reason; exit 2
    for a usage or configuration error).

    \b
    Example:
        overlayd mount ./project /mnt/ws --name project
        overlayd mount --config /etc/overlayd/project.conf --foreground   # as systemd runs it
    """
    import shutil
    import subprocess

    from overlayd import config

    if config_path:
        try:
            cfg = config.load(config_path)
        except config.ConfigError as exc:
            raise ServiceError(str(exc), exit_code=2)
        base, mountpoint, name = base or cfg.base, mountpoint or cfg.mountpoint, name or cfg.name
        state_dir, group, log_level = state_dir or cfg.state_dir, group or cfg.group, log_level or cfg.log_level
        allow_other = cfg.allow_other if allow_other is None else allow_other
        keep_open_step = cfg.keep_open_step if keep_open_step is None else keep_open_step
    elif base is None or mountpoint is None:
        raise click.UsageError("give BASE and MOUNTPOINT, or --config FILE")
    log_level, keep_open_step = log_level or "info", bool(keep_open_step)
    try:
        name = name or choose_name(mountpoint)
        check_workspace_name(name)
    except UsageError as exc:
        raise click.UsageError(str(exc))
    state_dir = state_dir or str(default_state_dir(name))
    if allow_other is None:
        allow_other = os.geteuid() == 0
    from overlayd import daemon

    if foreground:
        daemon.setup_logging(log_level, name)
        sys.exit(daemon.run(base, mountpoint, state_dir, name, allow_other=allow_other, group=group,
                            debug_fuse=debug_fuse, keep_open_step=keep_open_step))
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "overlayd", "--ready-fd", str(wfd), "--name", name, "--state-dir", state_dir,
           "--log-level", log_level, base, mountpoint]
    if allow_other:
        cmd.append("--allow-other")
    if group:
        cmd += ["--group", group]
    if keep_open_step:
        cmd.append("--keep-open-step")
    log_path = os.path.join(state_dir, "daemon.log")
    fresh = not os.path.exists(state_dir)  # a failed first mount leaves nothing behind
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    os.close(wfd)
    msg = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(rfd)
    text = msg.decode(errors="replace").strip()
    if text == "ok":
        click.echo(f"mounted {os.path.abspath(mountpoint)} (workspace {name}, pid {proc.pid}, log {log_path})")
        return
    proc.wait(timeout=30)
    if fresh and text:  # the reason is in hand: the log and the new state directory can go
        shutil.rmtree(state_dir, ignore_errors=True)
        if os.path.realpath(_registered_state_dir(name) or "") == os.path.realpath(state_dir):
            unregister(name)
    if text.startswith("usage: "):
        raise click.UsageError(text[len("usage: "):])
    reason = text[len("error: "):] if text.startswith("error: ") else (text or f"the daemon exited with {proc.returncode}; see {log_path}")
    raise click.ClickException(reason)


def _registered_state_dir(name):
    for w in known_workspaces():
        if w["name"] == name:
            return w["state_dir"]
    try:
        return json.loads((index_dir() / f"{name}.json").read_text())["state_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mount_at(mountpoint: str):
    mp = os.path.abspath(mountpoint)
    m = mount_of(mp)
    if m is None or m.point not in (mp, os.path.realpath(mp)):
        raise click.ClickException(f"{mp} is not an overlayd mount")
    return m


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait until process *pid* has exited; False after *timeout* seconds.

    A pidfd turns readable the moment the process exits. Polling ``kill(pid, 0)`` instead
    waits for the zombie to be reaped, and the daemon is not our child: its reaper is PID 1,
    which may take seconds (this was most of the 2 s an ``overlayd unmount`` took).
    """
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


@main.command()
@click.argument("mountpoint", type=str)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def unmount(mountpoint, timeout):
    """Unmount a workspace cleanly: the journal is flushed and nothing is lost."""
    import shlex

    m = _mount_at(mountpoint)
    name = m.name
    try:
        with connect_to_mount(m) as c:  # verified: the daemon of this very mount
            pid = c.identity["pid"]
            c.call("shutdown")
    except NoDaemon as exc:
        mp = mountinfo_path(mountpoint)
        if _probe(mp, timeout=2.0) == "dead":
            hint = (f"its daemon died and left a dead mount; clear it with: overlayd clear-mount {shlex.quote(mp)}"
                    + "".join(f", then mount it again with: {mount_command(name, w['base'], mp, w['state_dir'])}"
                              for w in known_workspaces() if w["name"] == name and w.get("mountpoint") == mp))
        else:
            hint = "is the daemon run by another user (its control socket is elsewhere)?"
        click.echo(f"Error: no daemon serves the workspace {name} at {mp} ({exc.message}); {hint}", err=True)
        sys.exit(EXIT_NO_DAEMON)
    except PermissionDenied as exc:
        click.echo(f"Error: permission denied: {exc.message}", err=True)
        sys.exit(EXIT_PERMISSION)
    except (ClientError, UsageError) as exc:
        raise click.ClickException(getattr(exc, "message", str(exc)))
    except (KeyError, TypeError):
        raise click.ClickException("the daemon's answer has no pid: is it another version of overlayd?")
    if not wait_exited(pid, timeout):
        raise click.ClickException(f"the daemon (pid {pid}) did not exit within {timeout} s")
    click.echo(f"unmounted {os.path.abspath(mountpoint)}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(as_json):
    """List the workspaces on this machine: mounted, stopped, or dead (the daemon died and left
    its mount: clear it with overlayd clear-mount). Also those with a --state-dir of their own,
    and any overlayd mount whose state is elsewhere. FUSE (`pyfuse3` in --json) says which
    pyfuse3 a mounted workspace's daemon runs on: patched (and with what) or stock. BASE VIEW
    (base_view in --json) says how it sees changes made to the base outside it: "live (inotify)",
    or "revalidating" (events were lost or cannot be had: changes show within a second anyway)."""
    import shlex

    from overlayd.journal import Journal, JournalError
    from overlayd.engine.records import status_of

    rows = []
    mounts = {m.name: m.point for m in overlayd_mounts()}
    for info in known_workspaces():
        entry = info["state_dir"]
        row = {**info, "mounted": False, "state": "stopped", "layers": None, "saga": None,
               "disk_bytes": disk_usage(entry), "pyfuse3": None, "base_view": None}
        saga = _live_status(row)
        if not row["mounted"]:
            if info.get("mountpoint") and mounts.get(info["name"]) == mountinfo_path(info["mountpoint"]):
                row["state"] = {"ok": "mounted", "dead": "dead"}.get(_probe(info["mountpoint"], timeout=2.0), "hung")
            try:
                with Journal.open(entry, readonly=True) as j:
                    saga = status_of(j)["saga"]
            except JournalError:
                saga = None
        if saga:
            row["saga"] = {"id": saga["id"], "name": saga["name"], "state": saga["state"]}
        if info.get("mountpoint") and mounts.get(info["name"]) == mountinfo_path(info["mountpoint"]):
            del mounts[info["name"]]
        rows.append(row)
    for name, point in sorted(mounts.items()):  # mounted, but its state is not known here
        row = {"name": name, "mountpoint": point, "base": None, "state_dir": None, "mounted": False,
               "state": "stopped", "layers": None, "saga": None, "disk_bytes": None, "pyfuse3": None,
               "base_view": None}
        saga = _live_status(row)
        if not row["mounted"]:
            row["state"] = {"ok": "mounted", "dead": "dead"}.get(_probe(point, timeout=2.0), "hung")
        if saga:
            row["saga"] = {"id": saga["id"], "name": saga["name"], "state": saga["state"]}
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"version": 1, "workspaces": rows}))
        return
    if not rows:
        click.echo(f"no workspaces under {state_root()}")
        return
    click.echo("NAME\tSTATE\tSAGA\tDISK\tBASE\tMOUNTPOINT\tFUSE\tBASE VIEW")
    for r in rows:
        saga = f"{r['saga']['name']} ({r['saga']['state']})" if r["saga"] else "-"
        disk = "-" if r["disk_bytes"] is None else _human(r["disk_bytes"])
        click.echo(f"{r['name']}\t{r['state']}\t{saga}\t{disk}\t{quote_path(r['base']) if r['base'] else '-'}\t{quote_path(r['mountpoint'])}\t{r['pyfuse3'] or '-'}\t{r['base_view'] or '-'}")
    dead = [r for r in rows if r["state"] == "dead"]
    for r in dead:
        click.echo(f"{r['name']}: its daemon died; clear the dead mount with: overlayd clear-mount "
                   f"{shlex.quote(r['mountpoint'])}", err=True)


def _live_status(row):
    """Ask the daemon serving *row*'s mount (verified: its socket, its uid, this very mount);
    fills in row and returns the active saga, or None."""
    m = next((m for m in overlayd_mounts()
              if m.name == row["name"] and (row.get("mountpoint") is None
                                            or m.point == mountinfo_path(row["mountpoint"]))), None)
    if m is None:
        return None
    try:
        with connect_to_mount(m, timeout=5) as c:  # this workspace's daemon, not a namesake's
            st = c.identity
            saga = c.call("saga.status")["saga"]
        row.update(mounted=True, state="mounted", layers=len(st["layers"]), pid=st["pid"], pyfuse3=st.get("pyfuse3"),
                   base_view=st.get("base_view"),
                   base=row.get("base") or st["base"], state_dir=row.get("state_dir") or st["state_dir"])
    except (ClientError, OSError, UsageError, KeyError, TypeError):
        return None
    return saga


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when a saga is active (its work is lost).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def forget(name, force, yes):
    """Remove workspace NAME: its state directory (layers, journal, log), its registration and
    its leftovers (control socket, saga run lock). The base is never touched.

    Refused while the workspace is mounted (unmount it first) and while a saga is active
    (commit or abort it, or give --force). Asks for confirmation on a terminal.

    \b
    Example:
        overlayd unmount /mnt/ws && overlayd forget ws
    """
    import fcntl
    import shlex
    import subprocess

    from overlayd.journal import Journal, JournalError
    from overlayd.engine.records import status_of

    try:
        check_workspace_name(name)
    except UsageError as exc:
        raise click.UsageError(str(exc))
    matches = [w for w in known_workspaces() if w["name"] == name]
    if not matches:
        raise click.ClickException(f"no workspace named {name!r} here; see: overlayd list")
    w = matches[0]
    state_dir = w["state_dir"]
    mounted = [m.point for m in overlayd_mounts() if m.name == name]
    try:
        with Client(socket_path(name), timeout=5) as c:
            mounted.append(c.call("status")["mountpoint"])
    except (ClientError, OSError):
        pass
    if mounted:
        raise click.ClickException(f"workspace {name} is mounted at {mounted[0]}: unmount it first (overlayd "
                                   f"unmount {shlex.quote(mounted[0])}; overlayd clear-mount if its daemon died)")
    fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no daemon may start on it meanwhile
        except BlockingIOError:
            raise click.ClickException(f"workspace {name} is in use by a daemon (its state {state_dir} is locked); "
                                       "unmount it first") from None
        try:
            with Journal.open(state_dir, readonly=True) as j:
                saga = status_of(j)["saga"]
        except JournalError:
            saga = None
        if saga and not force:
            raise click.ClickException(f"saga {saga['id']} {saga['name']!r} is {saga['state']} in workspace {name}: "
                                       "commit or abort it first (mount it, then saga commit / saga abort), or "
                                       "lose its work with --force")
        if not yes and sys.stdin.isatty():
            click.confirm(f"remove workspace {name} ({_human(disk_usage(state_dir))} in {state_dir}; the base "
                          f"{w.get('base')} is kept)?", abort=True)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", state_dir], check=False)
    finally:
        os.close(fd)
    if os.path.exists(state_dir):
        raise click.ClickException(f"could not remove all of {state_dir}; remove it by hand")
    unregister(name)
    for leftover in (socket_path(name), f"{socket_path(name)}.run.lock"):
        try:
            os.unlink(leftover)
        except OSError:
            pass
    click.echo(f"forgot workspace {name} (removed {state_dir})")


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- systemd


def _mounts_at(path: str) -> int:
    """How many mounts are stacked at *path* (from the mount table, without touching the mount)."""
    return len(mounts_at(path))


def _probe(path: str, timeout: float = 5.0) -> str:
    """"ok", "dead" (ENOTCONN: its daemon is gone) or "hung" (no answer within *timeout*)."""
    import errno
    import threading

    result = []

    def probe():
        try:
            os.statvfs(path)  # not stat(): the kernel answers that from its attribute cache, dead or not
            result.append("ok")
        except OSError as exc:
            result.append("dead" if exc.errno == errno.ENOTCONN else "ok")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


@main.command("clear-mount")
@click.argument("mountpoint", type=str, required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take the mountpoint from this configuration file.")
def clear_mount(mountpoint, config_path):
    """Unmount a dead mount left by a crashed daemon ("Transport endpoint is not connected").

    A live mount is left alone, and so is one whose daemon does not answer (exit 1, say so).
    Exit 0 when nothing dead is left at MOUNTPOINT. The systemd units run it before a start
    and after a stop (ExecStartPre=, ExecStopPost=).

    \b
    Example:
        overlayd clear-mount /mnt/ws
    """
    import shutil
    import subprocess

    from overlayd import config

    if mountpoint is None:
        if not config_path:
            raise click.UsageError("give MOUNTPOINT or --config FILE")
        try:
            mountpoint = config.mountpoint_of(config_path)
        except config.ConfigError as exc:
            raise ServiceError(str(exc), exit_code=2)
    mp = os.path.abspath(mountpoint)
    mp = os.path.join(os.path.realpath(os.path.dirname(mp)), os.path.basename(mp))  # as mountinfo spells it
    cleared = 0
    while _mounts_at(mp) and cleared < 16:
        state = _probe(mp)
        if state == "ok":
            break
        if state == "hung":
            raise ServiceError(f"the mount at {mp} does not answer (a hung daemon?); stop its daemon, "
                               f"or force it away with: fusermount3 -uz {mp}")
        cmd = ["fusermount3", "-uz", mp] if shutil.which("fusermount3") else ["umount", "-l", mp]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0:
            raise ServiceError(f"could not clear the dead mount at {mp}: {' '.join(cmd)}: "
                               f"{r.stderr.strip() or f'exit status {r.returncode}'}")
        cleared += 1
    if cleared:
        prefix = "<4>" if _stderr_is_journal() else ""
        click.echo(f"{prefix}cleared a dead mount at {mp} (its daemon had died)", err=True)


def _closed_ancestor(path: str) -> str | None:
    """The first directory above *path* that others may not enter (no o+x), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return None
        if d == "/":
            return None
        d = os.path.dirname(d)


@main.command("install-service")
@click.option("--name", help="Also write a sample configuration for this workspace (an existing one is kept).")
@click.option("--base", type=click.Path(file_okay=False), help="The sample configuration's base (absolute).")
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="The sample configuration's mountpoint (absolute).")
@click.option("--user", is_flag=True,
              help="Install the unprivileged user unit overlayd-user@.service (systemctl --user) in "
                   "~/.config/systemd/user, its configuration in ~/.config/overlayd.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Install below this directory instead of / (packaging, tests).")
@click.option("--executable", type=click.Path(dir_okay=False),
              help="The overlayd command the unit runs (default: this one, by absolute path).")
def install_service(name, base, mountpoint, user, root, executable):
    """Install the systemd unit overlayd@.service and a sample /etc/overlayd/NAME.conf.

    The unit runs this overlayd by its absolute path (a virtualenv is not on systemd's PATH).
    Idempotent: the unit is rewritten only if it changed; an existing configuration is never
    overwritten. Prints the systemctl commands that enable and start the workspace.

    \b
    Example:
        overlayd install-service --name project --base /srv/project --mountpoint /mnt/project
        systemctl daemon-reload && systemctl enable --now overlayd@project
    """
    from overlayd import config

    if (base or mountpoint) and not name:
        raise click.UsageError("--base and --mountpoint fill in a sample configuration: give --name too")
    try:
        r = config.install_service(root=root, user=user, name=name, base=base, mountpoint=mountpoint,
                                   executable=executable)
    except UsageError as exc:
        raise click.UsageError(str(exc))
    except OSError as exc:
        raise click.ClickException(f"cannot install into {exc.filename or root}: {exc.strerror}"
                                   + ("; run it as root, or use --user" if exc.errno == 13 and not user else ""))
    click.echo(f"{r['unit_action']} {r['unit']} (it runs {r['executable']})")
    closed = None if user else _closed_ancestor(r["executable"])
    if closed:
        click.echo(f"note: {closed} is mode {os.stat(closed).st_mode & 0o777:04o}: other users (and the members of "
                   f"a workspace's group) cannot run {os.path.dirname(r['executable'])}/saga and get 'Permission "
                   "denied'; put the checkout where everybody may enter, e.g. /opt/overlayd, then run "
                   "install-service from there")
    if r["config"]:
        if r["config_action"] == "kept":
            click.echo(f"kept the existing {r['config']}")
        else:
            click.echo(f"wrote {r['config']}" + ("" if base and mountpoint else ": edit base and mountpoint"))
    for label, path in (("base", base), ("mountpoint", mountpoint)):
        if path and not os.path.isdir(os.path.expanduser(path)):
            click.echo(f"note: the {label} {path} does not exist yet" +
                       (f"; create it: mkdir -p {path}" if label == "mountpoint" else ""))
    if not name:
        click.echo("add a workspace: overlayd install-service --name NAME --base DIR --mountpoint DIR"
                   + (" --user" if user else ""))
    click.echo("then run:" if root in ("", "/") else f"then, on the system installed in {root}, run:")
    for cmd in r["commands"]:
        click.echo(f"  {cmd}")


# commands with a module of their own
main.add_command(mcp_cmd.mcp)  # overlayd mcp: imports the mcp SDK only when run
