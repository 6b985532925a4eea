"""Where a workspace keeps its state and its control socket, how workspace names are checked
(saga and step names: overlayd.protocol.name_problem), and the one parser of the kernel's mount
table.

Every ``saga`` command imports this module: it imports :mod:`pathlib` (which brings
``urllib.parse`` and ``ipaddress``, a tenth of ``saga status``'s time) only when a function
here first makes a path."""

from __future__ import annotations

import collections
import json
import os
import re
import stat
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def as_path(*parts) -> Path:
    """pathlib.Path(*parts), with pathlib imported on the first call."""
    from pathlib import Path  # on first use: see the module's docstring

    return Path(*parts)

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


def disk_usage(path) -> int:
    """Bytes of disk the files below *path* use (allocated blocks; files that vanish meanwhile
    count 0): a workspace's state directory, for ``overlayd list`` and ``saga gc``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def index_dir() -> Path:
    """Where daemons register the workspaces they serve: one NAME.json per workspace, pointing at
    its state directory (so that those mounted with --state-dir are found too). Not a valid
    workspace name, so never a workspace's own directory."""
    return state_root() / ".index"


def fsync_dir(path) -> None:
    """fsync a directory (after a rename or an unlink in it: the name is durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fsync_dir(d)


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
                dirs.append(as_path(json.loads(entry.read_text())["state_dir"]))
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
    for point, name in ((m.point, m.name) for m in overlayd_mounts()):
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
        return as_path(env)
    if os.geteuid() == 0:
        return as_path("/var/lib/overlayd")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return as_path(xdg) / "overlayd"


def default_state_dir(name: str) -> Path:
    env = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=overlayd/%i
    if env:
        return as_path(env.split(":")[0])
    return state_root() / name


#: root's runtime directory (systemd's RuntimeDirectory=overlayd): world-searchable, so that a
#: member of a workspace's group finds the socket of a root daemon there.
SYSTEM_RUNTIME = "/run/overlayd"


class UnsafePath(UsageError):
    """A directory that somebody else could have planted or can change: refused, never used."""


def runtime_dir() -> Path:
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return as_path(env.split(":")[0])
    if os.geteuid() == 0:
        return as_path(SYSTEM_RUNTIME)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return as_path(xdg) / "overlayd"
    return as_path(f"/tmp/overlayd-{os.geteuid()}")


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{name}.sock"


def check_owned_dir(path, trusted_uids=None) -> os.stat_result:
    """Refuse *path* unless it is a real directory (not a symlink) owned by a trusted uid (by
    default: you) that neither group nor others may write. Returns its lstat."""
    path = as_path(path)
    uids = {os.geteuid()} if trusted_uids is None else set(trusted_uids)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing to use {path}: it is not a directory but "
                         f"{'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'a file'}; somebody may have "
                         f"planted it to intercept the workspace's socket: remove it (rm {path}) and try again")
    if st.st_uid not in uids:
        raise UnsafePath(f"refusing to use {path}: it belongs to uid {st.st_uid}, not to uid "
                         f"{' or '.join(str(u) for u in sorted(uids))}; somebody may have created it to intercept "
                         f"the workspace's socket: have root remove it, or set XDG_RUNTIME_DIR to a private "
                         f"directory of yours")
    if st.st_mode & 0o022:
        raise UnsafePath(f"refusing to use {path}: its mode {stat.S_IMODE(st.st_mode):04o} lets others write "
                         f"in it; fix it with: chmod go-w {path}")
    return st


def make_parents(path, mode: int = 0o755) -> None:
    """Create the missing parents of *path* with *mode* each (``mkdir -p`` would give them
    0777 under the daemon's umask 0)."""
    missing = []
    p = as_path(os.path.abspath(path)).parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            pass


def ensure_private_dir(path, mode: int = 0o700) -> Path:
    """Create *path* with *mode* (its parents as needed) or verify the existing one with
    check_owned_dir: a directory another user created first is refused, never used."""
    path = as_path(path)
    make_parents(path)
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # whatever the umask
    except FileExistsError:
        pass
    check_owned_dir(path)
    return path


def is_within(child: Path, parent: Path) -> bool:
    child, parent = as_path(os.path.realpath(child)), as_path(os.path.realpath(parent))
    return child == parent or parent in child.parents


class MountInfo(collections.namedtuple("MountInfo", "point name dev owner")):
    """An overlayd mount as the kernel's mount table gives it (nobody can forge these fields):
    ``point`` the canonical path of the mountpoint, ``name`` the workspace name (fsname
    ``overlayd:NAME``), ``dev`` "MAJOR:MINOR" of the mount, ``owner`` the uid that mounted it
    (FUSE's ``user_id=``) or None."""

    __slots__ = ()


class Mount(collections.namedtuple("Mount", "id parent dev root point options fstype source super_options")):
    """One line of /proc/self/mountinfo (proc(5)), its paths unescaped: ``id``/``parent`` mount
    ids (int), ``dev`` "MAJOR:MINOR", ``root`` and ``point`` (str, as os.fsdecode gives them),
    ``options`` and ``super_options`` (tuples of str), ``fstype``, ``source``."""

    __slots__ = ()


def _unescape(field: bytes) -> str:
    """The kernel escapes space, tab, newline and backslash in mount table fields as \\ooo
    (octal); every other byte, non-ASCII ones included, is given as it is."""
    if b"\\" in field:
        field = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(field)


def parse_mountinfo(data: bytes) -> list[Mount]:
    """The mounts of a /proc/PID/mountinfo text (bytes), in its order; malformed lines are
    skipped. The one parser of the mount table: everything else asks it."""
    out = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        try:
            mid, parent = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        out.append(Mount(mid, parent, fields[2].decode("ascii", "replace"), _unescape(fields[3]), _unescape(fields[4]),
                         tuple(_unescape(o) for o in fields[5].split(b",")), _unescape(fields[sep + 1]),
                         _unescape(fields[sep + 2]), tuple(_unescape(o) for o in fields[sep + 3].split(b","))))
    return out


def mount_table() -> list[Mount]:
    """Every mount of this process's mount namespace, in mount order (read, never stat()ed: a
    hung FUSE mount cannot block it)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def mounts_at(path) -> list[Mount]:
    """The mounts stacked at *path* (compared as given: pass mountinfo_path(path)), bottom first."""
    path = os.fsdecode(path)
    return [m for m in mount_table() if m.point == path]


def overlayd_mounts() -> list[MountInfo]:
    """Every overlayd mount of this mount namespace, in mount order, from the mount table. The
    mount's source (fsname) is ``overlayd:NAME``; a mount whose daemon died stays listed until
    it is cleared."""
    out = []
    for m in mount_table():
        if m.fstype != "fuse.overlayd" or not m.source.startswith("overlayd:"):
            continue
        owner = None
        for opt in m.super_options:
            if opt.startswith("user_id="):
                owner = int(opt[8:])
        out.append(MountInfo(m.point, m.source.split(":", 1)[1], m.dev, owner))
    return out


def mount_of(path) -> MountInfo | None:
    """The overlayd mount holding *path* (the innermost, the topmost of a stack), or None."""
    mounts = overlayd_mounts()

    def find(p):
        best = None
        for m in mounts:
            if p == m.point or p.startswith(m.point.rstrip("/") + "/"):
                if best is None or len(m.point) >= len(best.point):
                    best = m
        return best

    # abspath first: resolving a path inside a mount stat()s it, which hangs on a stopped daemon
    return find(os.path.abspath(path)) or find(os.path.realpath(path))


def mountinfo_path(path: str) -> str:
    """*path* as /proc/self/mountinfo spells it: absolute, its parent's symlinks resolved.

    (Not realpath() of the path itself: that would stat() a possibly hung mount.)"""
    mp = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(mp)), os.path.basename(mp))


_C_ESCAPES = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r", 34: '"', 92: "\\"}


def quote_path(path) -> str:
    """A file name (bytes, or str decoded with surrogateescape) as one line of human-readable
    output, quoted the way git quotes an unusual path (core.quotePath): unchanged if it is
    plain, else in double quotes with C escapes (\\n \\t \\" \\\\ ...) and octal escapes
    (\\302\\205) for control characters, bytes that are not UTF-8, and invisible or
    line-breaking Unicode (format characters, U+0085, U+2028/9, bidirectional overrides).
    Printable non-ASCII text stays as it is. A name can then never forge a line of output."""
    if isinstance(path, str):
        try:
            path = os.fsencode(path)
        except UnicodeEncodeError:
            path = path.encode("utf-8", "surrogatepass")
    text = path.decode("utf-8", "surrogateescape")
    out, quoted = [], False
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\{o - 0xDC00:03o}")
        elif o < 0x20 or o == 0x7F or o in (34, 92):
            out.append("\\" + _C_ESCAPES[o] if o in _C_ESCAPES else f"\\{o:03o}")
        elif o >= 0x80 and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append("".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
            continue
        quoted = True
    return '"' + "".join(out) + '"' if quoted else text
