"""The file system matrix: real ext4, xfs and btrfs on loop devices, and tmpfs, for the tests
that vary where the base and the state directory live (issue 15: a commit must be right on
every file system, across two of them, and through a bind mount).

``Filesystems`` (the session fixture ``filesystems`` in conftest) makes at most one file
system of each kind per test session, on a sparse image in pytest's tmp dir, and unmounts it
at the end; tests take a fresh directory on it with ``filesystems.dir(kind, "name")``.

A *combo* names where the state directory and the base live:

    "ext4"          both on one ext4 (layer -> base by hard link, directories moved whole)
    "ext4/tmpfs"    state dir on ext4, base on tmpfs (data copied across file systems)
    "bind:ext4"     both on one ext4, the base reached through ``mount --bind`` of a
                    directory of it (same st_dev, but link() across the two mounts: EXDEV)

Tools: a missing ``mkfs.KIND`` skips the combo with the reason, except in CI (``CI=true``),
where it is a failure: scripts/install.sh --test installs xfsprogs and btrfs-progs.

``OVERLAYD_FS_COMBOS`` (comma-separated) replaces a test's default combos (the CI slice);
``OVERLAYD_TORTURE=1`` selects every combo (scripts/torture.sh).
"""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

KINDS = ("ext4", "xfs", "btrfs", "tmpfs")
# sparse images: only what the tests write takes space. xfs needs at least 300 MiB.
IMAGE_SIZE = "512M"
MKFS = {
    # 4 KiB blocks and 256-byte inodes whatever the image size (a small ext4 defaults to 1 KiB
    # blocks and 128-byte inodes, where no xattr fits in the inode and values stop near 1 KiB)
    "ext4": ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}

TORTURE = os.environ.get("OVERLAYD_TORTURE", "") not in ("", "0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ALL_COMBOS = [
    "ext4", "xfs", "btrfs", "tmpfs",
    "ext4/tmpfs", "tmpfs/ext4", "ext4/xfs", "xfs/btrfs", "btrfs/ext4", "tmpfs/xfs",
    "bind:ext4", "bind:xfs", "bind:btrfs", "bind:tmpfs",
]


def combos(default):
    """The combos a test runs: *default* (the CI slice), all of them under OVERLAYD_TORTURE=1, or
    the list in OVERLAYD_FS_COMBOS."""
    env = os.environ.get("OVERLAYD_FS_COMBOS")
    if env:
        return [c.strip() for c in env.split(",") if c.strip()]
    return list(ALL_COMBOS) if TORTURE else list(default)


def parse(combo):
    """(state kind, base kind, bind?) of a combo name."""
    bind = combo.startswith("bind:")
    name = combo[5:] if bind else combo
    state, _, base = name.partition("/")
    base = base or state
    for k in (state, base):
        if k not in KINDS:
            raise ValueError(f"unknown file system {k!r} in combo {combo!r} (known: {', '.join(KINDS)})")
    if bind and base != state:
        raise ValueError(f"a bind combo has one file system: {combo!r}")
    return state, base, bind


def missing_tool(kind):
    """None, or why *kind* cannot be made here."""
    if os.geteuid() != 0:
        return "loop devices and mounts need root"
    if kind == "tmpfs":
        return None
    tool = MKFS[kind][0]
    if shutil.which(tool) is None:
        return f"{tool} is not installed (scripts/install.sh --test installs it)"
    return None


def require(kind):
    why = missing_tool(kind)
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"{kind}: {why}; CI must run the whole file system slice")
    pytest.skip(f"{kind}: {why}")


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")


class Filesystems:
    """One mounted file system per kind for the session, made on first use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mounted = {}  # kind -> mountpoint
        self.binds = []

    def mountpoint(self, kind) -> Path:
        require(kind)
        mp = self.mounted.get(kind)
        if mp is not None:
            return mp
        mp = self.root / f"fs-{kind}"
        mp.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            _run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "tmpfs", str(mp)])
        else:
            img = self.root / f"{kind}.img"
            _run(["truncate", "-s", IMAGE_SIZE, str(img)])
            _run([*MKFS[kind], str(img)])
            _run(["mount", "-o", "loop", str(img), str(mp)])
        os.chmod(mp, 0o755)
        self.mounted[kind] = mp
        return mp

    def dir(self, kind, name) -> Path:
        """A fresh, empty directory on a file system of *kind*."""
        d = self.mountpoint(kind) / f"{name}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d

    def bind(self, src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(src), str(dst)])
        self.binds.append(dst)
        return dst

    def unbind(self, dst: Path) -> None:
        if dst in self.binds:
            self.binds.remove(dst)
            subprocess.run(["umount", str(dst)], check=False)

    def close(self) -> None:
        for dst in reversed(self.binds):
            subprocess.run(["umount", "-l", str(dst)], check=False)
        self.binds.clear()
        for kind, mp in self.mounted.items():
            # a plain umount frees the loop device (autoclear); lazy only if something is busy
            if subprocess.run(["umount", str(mp)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mp)], check=False)
        self.mounted.clear()


def max_xattr_value(path: Path) -> int:
    """The largest user xattr value (of the sizes the tests draw) a new file in *path* takes."""
    probe = path / f".xattr-probe-{uuid.uuid4().hex[:8]}"
    probe.write_bytes(b"")
    best = 0
    try:
        for size in (1, 255, 1024, 2048, 3000, 3900, 4000, 4096, 8192, 16384):
            try:
                os.setxattr(probe, "user.probe", b"v" * size)
            except OSError:
                break
            best = size
    finally:
        probe.unlink()
    return best


class Place:
    """Where one test's base, state directory, mountpoint and plain reference directory live."""

    def __init__(self, fss: Filesystems, combo: str, name: str):
        self.combo = combo
        state_kind, base_kind, bind = parse(combo)
        # the mountpoint, daemon log and state root go in *work*, on the state file system
        self.work = fss.dir(state_kind, f"{name}-state")
        if bind:
            real = fss.dir(base_kind, f"{name}-base-real")
            self.base_real = real / "base"
            self.base_real.mkdir()
            self.base = fss.bind(real, self.work.parent / f"{self.work.name}-bind") / "base"
        else:
            self.base = fss.dir(base_kind, f"{name}-base") / "base"
            self.base.mkdir()
            self.base_real = self.base
        # the plain reference tree, on the state's file system (the layers' limits apply to it)
        self.ref = fss.dir(state_kind, f"{name}-ref") / "ref"
        self.xattr_max = min(max_xattr_value(self.work), max_xattr_value(self.base_real))
