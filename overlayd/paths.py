"""Where a workspace keeps its state and its control socket, and how names are checked."""

import os
import re
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UsageError(Exception):
    """Bad input from a user: the message says what happened and what to do."""


def check_workspace_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"invalid workspace name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit")
    return name


def default_name(mountpoint: str) -> str:
    base = os.path.basename(os.path.abspath(mountpoint)) or "root"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-")[:64]
    return name or "workspace"


def state_root() -> Path:
    env = os.environ.get("OVERLAYD_STATE_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/overlayd")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "overlayd"


def default_state_dir(name: str) -> Path:
    env = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=overlayd/%i
    if env:
        return Path(env.split(":")[0])
    return state_root() / name


def runtime_dir() -> Path:
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/overlayd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "overlayd"
    return Path(f"/tmp/overlayd-{os.geteuid()}")


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{name}.sock"


def is_within(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


def _unescape_mountinfo(field: bytes) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def overlayd_mounts() -> list[tuple[str, str]]:
    """(mountpoint, workspace name) of every overlayd FUSE mount, from /proc/self/mountinfo.

    The mount's source (fsname) is ``overlayd:NAME``; a mount whose daemon died stays listed
    until it is cleared.
    """
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index(b"-")
            except ValueError:
                continue
            if len(fields) > sep + 2 and fields[sep + 1] == b"fuse.overlayd" and fields[sep + 2].startswith(b"overlayd:"):
                out.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[sep + 2]).split(":", 1)[1]))
    return out


def mountinfo_path(path: str) -> str:
    """*path* as /proc/self/mountinfo spells it: absolute, its parent's symlinks resolved.

    (Not realpath() of the path itself: that would stat() a possibly hung mount.)"""
    mp = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(mp)), os.path.basename(mp))
