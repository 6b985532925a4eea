"""``saga fork NAME --mountpoint DIR [--at STEP]``: a second workspace over the same base whose saga
starts as a copy of this one's finished steps (engine/fork.py builds its state, journal first;
this command then mounts it with ``overlayd mount``)."""

import os
import shlex
import subprocess
import sys

import click

from overlayd.cli.saga_common import SagaError, common, complete_steps, emit, run
from overlayd.paths import UsageError, check_workspace_name, known_workspaces, mountinfo_path, mounts_at, quote_path


@click.command()
@click.argument("name")
@click.option("--mountpoint", "-m", "mountpoint", required=True, type=str, metavar="DIR",
              help="Where to mount the fork (an empty directory that is not a mount point).")
@click.option("--at", "at", metavar="STEP", shell_complete=complete_steps,
              help="Copy the steps up to STEP (a name or 1-based index; 0: none). Default: every finished step.")
@common
@click.pass_context
def fork(ctx, name, mountpoint, at, workspace, as_json):
    """Fork the active saga into a new workspace NAME mounted at DIR, over the same base.

    The fork's saga (also called NAME) starts with this saga's finished steps up to STEP: their
    layers are shared (hard links, never copies of the data), with their names, compensation
    commands, budgets and the base identities the conflict check uses. The open step is not
    copied: a fork without --at is refused while the open step has changes (finish it with saga
    step NEXT first). The fork has no open step: start one with saga -w DIR step NAME. Try two
    approaches side by side, commit the winner and abort the other: the loser's commit after the
    winner's reports the paths both changed as conflicts (exit 3).

    \b
    Example:
        saga fork plan-b --mountpoint /mnt/plan-b --at analyse
        saga -w /mnt/plan-b step try-b
    """
    mp = os.path.abspath(mountpoint)
    try:
        check_workspace_name(name)
    except UsageError as exc:
        raise click.UsageError(f"{exc} (NAME names the new workspace and its saga)")

    def go(t):
        if any(k.get("name") == name for k in known_workspaces()):
            raise SagaError(f"a workspace named {name!r} exists; choose another name (see: overlayd list)", 1)
        if not os.path.isdir(mp):
            raise SagaError(f"mountpoint {quote_path(mp)} is not a directory; create it with: mkdir -p {shlex.quote(mp)}", 1)
        if mounts_at(mountinfo_path(mp)):
            raise SagaError(f"mountpoint {quote_path(mp)} is in use (something is mounted there); choose another "
                            "directory, or unmount it first", 1)
        if os.listdir(mp):
            raise SagaError(f"mountpoint {quote_path(mp)} is not empty; a mount would hide its files: choose an "
                            "empty directory", 1)
        args = {"name": name}
        if at is not None:
            args["at"] = at
        r = t.call("saga.fork", **args)
        cmd = [sys.executable, "-c", "from overlayd.cli.overlayd_cmd import main; main()", "mount", r["base"], mp,
               "--name", name, "--state-dir", r["state_dir"]]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        hint = shlex.join(["overlayd", "mount", r["base"], mp, "--name", name, "--state-dir", r["state_dir"]])
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or [f"overlayd mount exited with {p.returncode}"])[-1]
            raise SagaError(f"the fork's state was made ({r['state_dir']}) but it could not be mounted: {why}; "
                            f"mount it with: {hint}  (or remove it with: rm -rf {shlex.quote(r['state_dir'])})", 1,
                            {"state_dir": r["state_dir"], "mount_command": hint})
        steps = r["steps"]
        emit(ctx, {**r, "mountpoint": mp}, f"forked the saga of workspace {t.name} into workspace {name} at {quote_path(mp)} "
             f"with step(s) {', '.join(map(str, steps)) or 'none'} ({r['shared'].get('links', 0)} file(s) shared); "
             f"start a step there with: saga -w {shlex.quote(mp)} step NAME")
    run(ctx, workspace, as_json, go)
