"""Where a workspace keeps its state and its control socket, and how names are checked."""

import json
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


def index_dir() -> Path:
    """Where daemons register the workspaces they serve: one NAME.json per workspace, pointing at
    its state directory (so that those mounted with --state-dir are found too). Not a valid
    workspace name, so never a workspace's own directory."""
    return state_root() / ".index"


def register(name: str, state_dir) -> None:
    """Record (durably) that workspace *name* keeps its state in *state_dir*."""
    d = index_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = d / f".{name}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"name": name, "state_dir": os.path.abspath(state_dir)}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, d / f"{name}.json")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def unregister(name: str) -> None:
    try:
        os.unlink(index_dir() / f"{name}.json")
    except FileNotFoundError:
        pass


def known_workspaces() -> list[dict]:
    """Every workspace with state on this machine (for this user): those under state_root()
    and those registered in index_dir(); their workspace.json records (name, base, mountpoint)
    with ``state_dir``."""
    root = state_root()
    dirs = []
    try:
        dirs += [entry for entry in sorted(root.iterdir()) if not entry.name.startswith(".")]
    except OSError:
        pass
    try:
        for entry in sorted(index_dir().glob("*.json")):
            try:
                dirs.append(Path(json.loads(entry.read_text())["state_dir"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    out, seen = [], set()
    for d in dirs:
        if os.path.abspath(d) in seen:
            continue
        seen.add(os.path.abspath(d))
        try:
            info = json.loads((d / "workspace.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("name"), str):
            out.append({**info, "state_dir": str(d)})
    return out


def choose_name(mountpoint: str) -> str:
    """The name of a workspace mounted at *mountpoint* without --name.

    The workspace last mounted there keeps its name (so a remount finds its saga); else the
    mountpoint's last component, or, when another workspace already has that name (every
    ``*/mnt``), its last two components (``demo-mnt``). Raises UsageError if both are taken.
    """
    mp = mountinfo_path(mountpoint)
    taken = {}
    for info in known_workspaces():
        taken.setdefault(info["name"], info.get("mountpoint"))
    for point, name in overlayd_mounts():
        taken.setdefault(name, point)
    for name, point in taken.items():
        if point == mp:
            return name
    first = default_name(mp)
    second = default_name(f"{os.path.basename(os.path.dirname(mp))}-{os.path.basename(mp)}")
    for name in (first, second):
        if name not in taken:
            return name
    raise UsageError(f"the workspace names {first!r} and {second!r} are taken (by the workspaces at "
                     f"{taken[first]} and {taken[second]}); choose one with --name NAME")


def mount_command(name: str, base: str, mountpoint: str, state_dir=None) -> str:
    """The exact ``overlayd mount`` command line that serves this workspace again."""
    import shlex

    cmd = ["overlayd", "mount", str(base), str(mountpoint), "--name", name]
    if state_dir is not None and os.path.abspath(state_dir) != os.path.abspath(default_state_dir(name)):
        cmd += ["--state-dir", str(state_dir)]
    return shlex.join(cmd)


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
            if len(fields) > sep + 2 and fields[sep + 1] == b"fuse.overlayd" \
                    and fields[sep + 2].startswith(b"overlayd:"):
                out.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[sep + 2]).split(":", 1)[1]))
    return out


def mountinfo_path(path: str) -> str:
    """*path* as /proc/self/mountinfo spells it: absolute, its parent's symlinks resolved.

    (Not realpath() of the path itself: that would stat() a possibly hung mount.)"""
    mp = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(mp)), os.path.basename(mp))
