"""Where a workspace keeps its state and its control socket, and how names are checked."""

import os
import re
import stat
import unicodedata
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


#: root's runtime directory (systemd's RuntimeDirectory=overlayd): world-searchable, so that a
#: member of a workspace's group finds the socket of a root daemon there.
SYSTEM_RUNTIME = Path("/run/overlayd")


class UnsafePath(UsageError):
    """A directory that somebody else could have planted or can change: refused, never used."""


def runtime_dir() -> Path:
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "overlayd"
    return Path(f"/tmp/overlayd-{os.geteuid()}")


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{name}.sock"


def check_owned_dir(path, trusted_uids=None) -> os.stat_result:
    """Refuse *path* unless it is a real directory (not a symlink) owned by a trusted uid (by
    default: you) that neither group nor others may write. Returns its lstat."""
    path = Path(path)
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
    p = Path(os.path.abspath(path)).parent
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
    path = Path(path)
    make_parents(path)
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # whatever the umask
    except FileExistsError:
        pass
    check_owned_dir(path)
    return path


def is_within(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


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
