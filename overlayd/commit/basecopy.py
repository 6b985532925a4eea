"""The base's version of a file at the saga's first touch, and three-way merges (``saga resolve``).

When a saga first changes a regular base file (copy-up, removal, rename over it), the engine
keeps the base's content then (`keep`): content-addressed, ``STATE/basecopies/<sha256>``, one
file per distinct content, journaled per step in the ``bases`` sub-database. ``saga resolve
--merge`` merges that version (the common ancestor), the base's current one and the saga's
(`merge`: ``git merge-file``). Files above `MAX_SIZE` are not kept (the copy is made on the
event loop, like the copy-ups of small files): ``--merge`` says it cannot merge them.

A kept copy is checked against its name when it is read (`read`): a copy a crash left short
reads as missing, never as a wrong ancestor. `sweep` deletes the copies no live step names.
Sync helpers: the engine calls `keep` in a handler's turn and the rest on worker threads.
"""

import errno
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile

from .. import osutil

log = logging.getLogger(__name__)

# kept up to this size (the size copy-ups copy on the event loop: THREAD_COPY); 0 keeps nothing
MAX_SIZE = int(os.environ.get("OVERLAYD_BASECOPY_MAX", 1 << 20))
DIR = "basecopies"
TEXT_PROBE = 8000  # git's heuristic: a NUL byte in the first 8000 bytes makes a file binary


class MergeUnavailable(Exception):
    """No way to merge: git is missing or failed."""


def copies_dir(state_dir) -> str:
    return os.path.join(os.fspath(state_dir), DIR)


def _read_fd(fd: int, size: int) -> bytes | None:
    """Up to *size* bytes of *fd*; None if the file holds more."""
    chunks = []
    left = size + 1
    while left > 0:
        b = os.read(fd, min(left, 1 << 20))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    data = b"".join(chunks)
    return None if len(data) > size else data


def store(directory: str, data: bytes) -> str:
    """Keep *data* as ``directory/<sha256>`` (once per content); returns the hash."""
    h = hashlib.sha256(data).hexdigest()
    path = os.path.join(directory, h)
    if os.path.exists(path):
        return h
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return h


def keep(base_fd: int, path: str, ident, directory: str) -> dict:
    """The base's regular file at *path* (whose identity *ident* was just recorded) kept in
    *directory*: ``{"copy": sha256}``, or ``{"copy": None, "why": ...}`` when it is not."""
    rel = os.fsencode(path)
    try:
        pfd = osutil.open_beneath(base_fd, os.path.dirname(rel))
    except OSError as exc:
        return {"copy": None, "why": f"cannot open its directory: {exc.strerror}"}
    try:
        fd = os.open(os.path.basename(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=pfd)
    except OSError as exc:
        return {"copy": None, "why": f"cannot open it: {exc.strerror}"}
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or ident is None or [st.st_ino, st.st_size, st.st_mtime_ns] != ident[1:4]:
            return {"copy": None, "why": "it changed while it was read"}
        if st.st_size > MAX_SIZE:
            return {"copy": None, "why": f"larger than {limit()}"}
        data = _read_fd(fd, MAX_SIZE)
        if data is None or len(data) != st.st_size:
            return {"copy": None, "why": "it changed while it was read"}
        return {"copy": store(directory, data)}
    except OSError as exc:
        log.warning("cannot keep the base version of %s: %s", path, exc)
        return {"copy": None, "why": f"cannot keep it: {exc.strerror}"}
    finally:
        os.close(fd)


def limit() -> str:
    """MAX_SIZE for messages."""
    return f"{MAX_SIZE >> 20} MiB" if MAX_SIZE and MAX_SIZE % (1 << 20) == 0 else f"{MAX_SIZE} bytes"


def read(directory: str, h: str | None) -> bytes | None:
    """The kept content of hash *h*, or None if it is missing or not what its name says."""
    if not h:
        return None
    try:
        with open(os.path.join(directory, h), "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == h else None


def sweep(directory: str, live: set) -> int:
    """Delete the kept copies whose hash is not in *live*; returns how many went."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    n = 0
    for name in names:
        if name in live:
            continue
        try:
            os.unlink(os.path.join(directory, name))
            n += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EISDIR:
                log.warning("cannot delete the base copy %s: %s", name, exc)
    return n


def is_text(data: bytes) -> bool:
    return b"\0" not in data[:TEXT_PROBE]


def merge(ours: bytes, ancestor: bytes, theirs: bytes, labels=("saga", "base at first touch", "base")) -> tuple:
    """(merged content, number of conflicts) of a three-way merge by ``git merge-file -p``:
    *ours* the saga's version, *ancestor* the base's at the saga's first touch, *theirs* the
    base's now. Conflicting hunks come back between conflict markers."""
    git = shutil.which("git")
    if git is None:
        raise MergeUnavailable("git is not installed (--merge runs 'git merge-file'); resolve with --ours or "
                               "--theirs, or install git")
    with tempfile.TemporaryDirectory(prefix="overlayd-merge-") as tmp:
        names = []
        for name, data in zip(("ours", "ancestor", "theirs"), (ours, ancestor, theirs)):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(data)
            names.append(p)
        args = [git, "merge-file", "-p"]
        for label in labels:
            args += ["-L", label]
        r = subprocess.run(args + names, capture_output=True, stdin=subprocess.DEVNULL, timeout=300,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp,
                                "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"})
    if r.returncode < 0 or r.returncode > 127:
        raise MergeUnavailable(f"git merge-file failed (status {r.returncode}): "
                               f"{r.stderr.decode(errors='replace').strip()}")
    return r.stdout, r.returncode
