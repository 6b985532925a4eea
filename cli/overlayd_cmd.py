"""``overlayd``: mount, unmount and list workspaces.

Exit codes: 0 ok, 1 error, 2 usage error, 5 no daemon serves the workspace.
"""

import json
import os
import subprocess
import sys
import time

import click

from overlayd import __version__
from overlayd.client import Client, ClientError, NoDaemon
from overlayd.paths import UsageError, check_workspace_name, default_name, default_state_dir, socket_path, state_root

CONTEXT = {"help_option_names": ["-h", "--help"]}
EXIT_NO_DAEMON = 5


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="overlayd")
def main():
    """A copy-on-write overlay of a working tree, with sagas: every change lands in a layer.

    \b
    Example:
        overlayd mount ~/src/project /mnt/ws
        cd /mnt/ws && saga begin refactor
    """


@main.command()
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--name", help="Workspace name (default: the mountpoint's last component).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where layers and the journal live (default /var/lib/overlayd/NAME for root, "
                   "else $XDG_STATE_HOME/overlayd/NAME).")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for systemd: Type=notify).")
@click.option("--allow-other/--no-allow-other", default=None,
              help="Let every user's processes use the mount (default: on when run as root).")
@click.option("--group", help="Members of this group may also drive the daemon.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--keep-open-step", is_flag=True,
              help="After a crash, keep the step that was open instead of rolling it back.")
@click.option("--debug-fuse", is_flag=True, hidden=True)
def mount(base, mountpoint, name, state_dir, foreground, allow_other, group, log_level, keep_open_step, debug_fuse):
    """Mount a workspace over BASE at MOUNTPOINT.

    Returns once the mount is ready (exit 0) or has failed (exit 1, with the reason).

    \b
    Example:
        overlayd mount ./project /mnt/ws --name project
    """
    name = name or default_name(mountpoint)
    try:
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
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with open(log_path, "ab") as logf:
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
    reason = text[len("error: "):] if text.startswith("error: ") else (text or f"the daemon exited with {proc.returncode}; see {log_path}")
    raise click.ClickException(reason)


def _workspace_for_mountpoint(mountpoint: str) -> str:
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == mp and fields[sep + 1] == "fuse.overlayd":
                return fields[sep + 2].split(":", 1)[1]
    raise click.ClickException(f"{mp} is not an overlayd mount")


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def unmount(mountpoint, timeout):
    """Unmount a workspace cleanly: the journal is flushed and nothing is lost."""
    name = _workspace_for_mountpoint(mountpoint)
    try:
        with Client(socket_path(name)) as c:
            pid = c.call("status")["pid"]
            c.call("shutdown")
    except NoDaemon as exc:
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(EXIT_NO_DAEMON)
    except ClientError as exc:
        raise click.ClickException(exc.message)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise click.ClickException(f"the daemon (pid {pid}) did not exit within {timeout} s")
    click.echo(f"unmounted {os.path.abspath(mountpoint)}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(as_json):
    """List the workspaces on this machine, mounted or not."""
    rows = []
    root = state_root()
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            info_path = entry / "workspace.json"
            if not info_path.is_file():
                continue
            info = json.loads(info_path.read_text())
            row = {**info, "state_dir": str(entry), "mounted": False, "layers": None}
            try:
                with Client(socket_path(info["name"]), timeout=5) as c:
                    st = c.call("status")
                row.update(mounted=True, layers=len(st["layers"]), pid=st["pid"])
            except ClientError:
                pass
            rows.append(row)
    if as_json:
        click.echo(json.dumps({"version": 1, "workspaces": rows}))
        return
    for r in rows:
        click.echo(f"{r['name']}\t{'mounted' if r['mounted'] else 'stopped'}\t{r['base']}\t{r['mountpoint']}")
