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
