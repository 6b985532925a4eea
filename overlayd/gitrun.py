"""Running git for a saga's user: the commit rules' check-ignore, the git base's ancestry
question (commit.gitpolicy) and the base's HEAD at saga begin (engine.export).

The daemon may run as root while the repository is the user's: git then runs as the saga's
uid/gid (without root's groups), with a clean environment (PATH, LC_ALL=C, the user's HOME)
and core.fsmonitor off (no daemon of git's started from ours), from "/". Blocking: call it on a
worker thread."""

import os
import pwd
import subprocess


def run_git(args, *, uid=None, gid=None, env=None, input=None, timeout=30.0) -> subprocess.CompletedProcess:
    """``git -c core.fsmonitor=false ARGS`` as *uid*/*gid* (when we are root and *uid* is not);
    *env*: variables added to the clean environment. Raises OSError (git not installed: a
    FileNotFoundError) and subprocess.TimeoutExpired; the caller reads returncode and output."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **(env or {})}
    kwargs = {}
    if os.geteuid() == 0 and uid not in (None, 0):
        kwargs = {"user": uid, "group": gid if gid is not None else uid, "extra_groups": []}
    try:
        full["HOME"] = pwd.getpwuid(uid if uid is not None else os.geteuid()).pw_dir
    except KeyError:
        full["HOME"] = "/nonexistent"
    return subprocess.run(["git", "-c", "core.fsmonitor=false", *args], input=input, capture_output=True,
                          env=full, timeout=timeout, cwd="/", **kwargs)
