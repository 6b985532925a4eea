"""Model-based test of the saga workspace: a Hypothesis state machine over the real mount and daemon.

One daemon serves one mount for the whole test run; Hypothesis drives random sequences of
file operations (write, create, truncate, rename of files and directories across layers,
unlink, rmdir, mkdir, hard link, symlink, chmod, chown, setxattr, deep chains) and saga operations (begin, step,
rollback of the open step, rollback to step K, commit, abort, and crash-and-recover: SIGKILL
the daemon, mount again) against it and against a plain-Python model.

The model
    A *tree* is ``{"entries": {path: ("d", mode) | ("f", ino) | ("l", target)},
    "inodes": {ino: {"data": bytes, "mode": int, "xattrs": {name: value}}}}`` (inodes make
    hard links share data). The model keeps the base's tree, the current view's tree, and per
    live saga step the tree of the view when that step began (its layer is everything since).
    Rolling back to step K restores the tree at which step K+1 began; committing makes the
    view the base; a crash rolls back the step that was open (recovery does that).

After every rule, the mount must equal the model's view (names, types, modes, contents,
link targets, user xattrs, hard-link groups) and the base directory the model's base;
``saga.status`` must agree on whether a saga is active and whether the view is writable.
While no step is open every change must fail with EROFS and change nothing.

Between examples the saga is aborted; if the example committed something (the base changed)
the daemon is stopped, the base restored from a pristine copy, and the daemon started again.

The drawn shapes vary as in tests/test_differential.py (docs/TESTING.md): a 255-byte name
among the names, a 256-byte name (ENAMETOOLONG), a chain of directories down to PATH_MAX
(paths are relative to the mount's root, the test's current directory), sizes and offsets
around 4 KiB and 64 KiB, xattr values up to 4 KiB, chown. A commit is compared with the view
just before it, also in the mtimes of files and of the directories it created.

Settings (environment):
    OVERLAYD_MODEL_EXAMPLES   examples to run (default 100, the CI setting; 3000 with
                              OVERLAYD_TORTURE=1)
    OVERLAYD_MODEL_STEPS      rules per example (default 20)

Soak mode: ``OVERLAYD_MODEL_EXAMPLES=10000 OVERLAYD_MODEL_PROGRESS=1 python -m pytest -s
tests/test_model.py`` (0.3-0.4 s per example on a 2-core machine, so about an hour; progress
is printed every 100 state machines with ``-s``). A failure is shrunk and printed as the
sequence of rule calls that reproduces it.
"""

import copy
import errno
import os
import shutil
import stat
import sys
import time

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import fsmatrix
import treecmp
from overlayd.client import ClientError

EXAMPLES = int(os.environ.get("OVERLAYD_MODEL_EXAMPLES", "3000" if fsmatrix.TORTURE else "100"))
STEPS = int(os.environ.get("OVERLAYD_MODEL_STEPS", "20"))
O_NF = os.O_NOFOLLOW | os.O_CLOEXEC
UMASK = os.umask(0o022)
os.umask(UMASK)

NAMES = ["a", "b", "c", "dd", "e", "L" * 255]
TOO_LONG = "T" * 256  # ENAMETOOLONG, in the view as in a plain directory
FILE_MODES = [0o644, 0o600, 0o755, 0o444, 0o640]
DIR_MODES = [0o755, 0o700, 0o750]
LINK_TARGETS = ["a", "b", "../a", "d1/g", "missing", "/nonexistent/overlayd-model", "."]
XATTR_NAMES = ["user.k1", "user.k2"]
XATTR_SIZES = [0, 1, 20, 255, 1024, 2048, 4000, 4096]
SIZES = [0, 1, 4095, 4096, 4097, 65535, 65536, 65537]
OWNERS = [(0, 0), (1000, 1000), (1234, 5678)]
PATH_MAX = 4096
MAX_DEPTH = 3  # for the drawn names; ``deepen`` makes one chain down to PATH_MAX


# ---------------------------------------------------------------------------------- the base


def initial_tree():
    """The model of the base every example starts from."""
    inodes = {
        1: {"data": b"base f1\n", "mode": 0o644, "xattrs": {}},
        2: {"data": bytes(range(256)) * 20, "mode": 0o600, "xattrs": {}},
        3: {"data": b"#!/bin/sh\necho hi\n", "mode": 0o755, "xattrs": {}},
        4: {"data": b"hard linked\n", "mode": 0o644, "xattrs": {}},
        5: {"data": b"in d1\n", "mode": 0o644, "xattrs": {"user.k1": b"base"}},
        6: {"data": b"deep\n" * 100, "mode": 0o640, "xattrs": {}},
        7: {"data": b"", "mode": 0o644, "xattrs": {}},
    }
    entries = {
        "f1": ("f", 1), "f2": ("f", 2), "exe": ("f", 3), "h1": ("f", 4), "h2": ("f", 4),
        "d1": ("d", 0o755), "d1/g": ("f", 5), "d1/sub": ("d", 0o750), "d1/sub/deep": ("f", 6),
        "d1/sub/h3": ("f", 4), "d2": ("d", 0o755), "d2/empty": ("f", 7), "d3": ("d", 0o700),
        "l1": ("l", "f1"), "ldang": ("l", "missing"), "d1/up": ("l", "../f2"),
    }
    return {"entries": entries, "inodes": inodes}


def build_tree(root, tree):
    """Materialize a model tree in the plain directory *root* (which exists and is empty)."""
    first = {}
    for path in sorted(tree["entries"], key=lambda p: (p.count("/"), p)):
        kind = tree["entries"][path]
        full = os.path.join(root, path)
        if kind[0] == "d":
            os.mkdir(full)
            os.chmod(full, kind[1])
        elif kind[0] == "l":
            os.symlink(kind[1], full)
        else:
            ino = kind[1]
            if ino in first:
                os.link(first[ino], full)
                continue
            node = tree["inodes"][ino]
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NF, 0o600)
            try:
                os.write(fd, node["data"])
                for k, v in node["xattrs"].items():
                    os.setxattr(fd, k, v)
                os.fchown(fd, *node.get("owner", (0, 0)))
                os.fchmod(fd, node["mode"])
            finally:
                os.close(fd)
            first[ino] = full


# ---------------------------------------------------------------------------------- comparing trees


def describe_model(tree):
    """path -> comparable description; plus the hard-link groups."""
    out = {}
    names = {}
    for path, kind in tree["entries"].items():
        if kind[0] == "d":
            out[path] = ("d", kind[1])
        elif kind[0] == "l":
            out[path] = ("l", kind[1])
        else:
            node = tree["inodes"][kind[1]]
            out[path] = ("f", node["mode"], node["data"], tuple(sorted(node["xattrs"].items())),
                         tuple(node.get("owner", (0, 0))))
            names.setdefault(kind[1], set()).add(path)
    return out, {frozenset(v) for v in names.values() if len(v) > 1}


def describe_dir(root):
    """The same description of a real directory tree (the mount or the base), never following
    links, walked through directory fds (paths below the root reach PATH_MAX)."""
    out = {}
    inodes = {}
    for path, dfd, name, st_ in treecmp.walk(root):
        if stat.S_ISDIR(st_.st_mode):
            out[path] = ("d", stat.S_IMODE(st_.st_mode))
        elif stat.S_ISLNK(st_.st_mode):
            out[path] = ("l", os.readlink(name, dir_fd=dfd))
        elif stat.S_ISREG(st_.st_mode):
            fd = os.open(name, os.O_RDONLY | O_NF, dir_fd=dfd)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                xattrs = tuple(sorted((x, os.getxattr(fd, x)) for x in os.listxattr(fd)
                                      if x.startswith("user.")))
            finally:
                os.close(fd)
            out[path] = ("f", stat.S_IMODE(st_.st_mode), b"".join(chunks), xattrs, (st_.st_uid, st_.st_gid))
            inodes.setdefault(st_.st_ino, set()).add(path)
        else:
            out[path] = ("other", stat.S_IFMT(st_.st_mode))
    return out, {frozenset(v) for v in inodes.values() if len(v) > 1}


def _short(desc):
    if desc[0] == "f":
        data = desc[2]
        shown = data if len(data) <= 40 else data[:40] + b"..." + f"({len(data)} bytes)".encode()
        xattrs = [(k, v if len(v) <= 20 else f"<{len(v)} bytes>") for k, v in desc[3]]
        return f"file mode={desc[1]:o} data={shown!r} xattrs={xattrs} owner={desc[4]}"
    if desc[0] == "d":
        return f"dir mode={desc[1]:o}"
    return repr(desc)


def tree_diff(expected, actual) -> list[str]:
    (ea, eg), (aa, ag) = expected, actual
    lines = []
    for p in sorted(set(ea) | set(aa)):
        if p not in aa:
            lines.append(f"missing: {p}: expected {_short(ea[p])}")
        elif p not in ea:
            lines.append(f"unexpected: {p}: {_short(aa[p])}")
        elif ea[p] != aa[p]:
            p = p if len(p) < 120 else f"{p[:40]}...({len(p)})...{p[-60:]}"
            lines.append(f"differs: {p}: expected {_short(ea[p])}, got {_short(aa[p])}")
    if eg != ag:
        lines.append(f"hard-link groups: expected {sorted(map(sorted, eg))}, got {sorted(map(sorted, ag))}")
    return lines


# ---------------------------------------------------------------------------------- the shared mount


class Env:
    """The one mount of this test run (set by the test function)."""

    mount = None
    base = None
    pristine = None
    examples = 0
    xattr_max = 4096


def _plain_setxattr(xattrs: dict, name: str, value: bytes):
    """The errno of setting *name* on a plain file (beside the base, on its file system) that
    carries *xattrs*, or None when it takes it."""
    probe = os.path.join(os.path.dirname(Env.base), "xattr-probe")
    with open(probe, "wb"):
        pass
    try:
        for k, v in xattrs.items():
            os.setxattr(probe, k, v)
        os.setxattr(probe, name, value)
    except OSError as exc:
        return exc.errno
    finally:
        os.unlink(probe)
    return None


def _status(m):
    return m.call("saga.status")


def _wait_idle(m, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        st_ = _status(m)
        if st_["busy"] is None and (st_["saga"] is None or st_["saga"]["state"] != "compensating"):
            return st_
        assert time.monotonic() < deadline, f"daemon still busy after {timeout} s: {st_}\n{m.log()}"
        time.sleep(0.02)


def _daemon_alive(m) -> bool:
    return m.proc is not None and m.proc.poll() is None


def _restore_base():
    """The base, while no daemon runs: exactly the pristine tree again."""
    base = Env.base
    for name in os.listdir(base):
        p = os.path.join(base, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    build_tree(base, initial_tree())


# ---------------------------------------------------------------------------------- the machine


RO_CHECKS = 2  # changes tried (expecting EROFS) each time the view becomes read-only


def can_change(cond):
    """Precondition of a file-operation rule: *cond* holds and either a step is open or a few
    EROFS checks of this read-only period are left (then saga rules get their turn)."""
    return precondition(lambda self: (self.open or self.ro_budget > 0) and bool(cond(self)))


class SagaWorkspace(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = Env.mount
        self.mp = str(self.m.mp)
        self.base = initial_tree()
        self.view = copy.deepcopy(self.base)
        self.saga = False
        self.live = []  # [(step index, tree of the view when the step began)]
        self.next_index = 1
        self._open = False  # the last live step is open (the view is writable)
        self.ro_budget = RO_CHECKS
        self.next_ino = 1000
        self.base_changed = False
        self.cwd = os.getcwd()
        os.chdir(self.mp)  # paths are relative to the mount's root: they reach PATH_MAX
        Env.examples += 1
        if os.environ.get("OVERLAYD_MODEL_PROGRESS") and Env.examples % 100 == 0:
            print(f"[model] {Env.examples} examples, {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ model helpers

    @property
    def open(self):
        return self._open

    @open.setter
    def open(self, value):
        if self._open and not value:
            self.ro_budget = RO_CHECKS
        self._open = value

    @property
    def entries(self):
        return self.view["entries"]

    def _paths(self, *kinds):
        return sorted(p for p, k in self.entries.items() if k[0] in kinds)

    def _dirs(self):
        return [""] + self._paths("d")

    def _new_paths(self):
        """Absent paths whose parent is a directory of the view (not too deep)."""
        out = []
        for d in self._dirs():
            if d.count("/") + 1 >= MAX_DEPTH:
                continue
            for n in NAMES:
                p = f"{d}/{n}" if d else n
                if p not in self.entries:
                    out.append(p)
        return out

    def _abs(self, path):
        """*path* relative to the mount's root, the current directory (its absolute name would
        pass PATH_MAX for the deep entries)."""
        return path or "."

    def _new_ino(self):
        self.next_ino += 1
        return self.next_ino

    def _expect_erofs(self, fn, *args):
        try:
            fn(*args)
        except OSError as exc:
            assert exc.errno == errno.EROFS, f"{fn.__name__}{args}: expected EROFS, got {exc!r}"
            return
        raise AssertionError(f"{fn.__name__}{args} succeeded while no step is open (expected EROFS)")

    def _fs_op(self, fn, *args):
        """Run a changing file operation: it works while a step is open, else fails with EROFS."""
        if self.open:
            fn(*args)
            event("change in an open step")
            return True
        self.ro_budget -= 1
        self._expect_erofs(fn, *args)
        event("change refused (EROFS)")
        return False

    def _call(self, op, **args):
        return self.m.call(op, **args)

    def _expect_error(self, code, op, **args):
        try:
            res = self._call(op, **args)
        except ClientError as exc:
            assert exc.code == code, f"{op} {args}: expected error {code!r}, got {exc.code!r}: {exc.message}"
            return
        raise AssertionError(f"{op} {args} succeeded ({res}); expected error {code!r}")

    # ------------------------------------------------------------------ file operations

    @can_change(lambda self: self._paths("f") or self._new_paths())
    @rule(data=st.data(), offset=st.one_of(st.integers(0, 300), st.sampled_from(SIZES)),
          payload=st.one_of(st.binary(min_size=1, max_size=200),
                            st.builds(lambda n, b: bytes([b]) * n, st.sampled_from(SIZES[1:]), st.integers(0, 255))),
          trunc=st.booleans())
    def write(self, data, offset, payload, trunc):
        """Write into an existing file (copy-up) or create a new one; O_TRUNC or not."""
        choices = self._paths("f") + self._new_paths()
        path = data.draw(st.sampled_from(choices), label="path")

        def do(p):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0) | O_NF, 0o644)
            try:
                os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)

        if not self._fs_op(do, self._abs(path)):
            return
        kind = self.entries.get(path)
        if kind is None:
            ino = self._new_ino()
            self.view["inodes"][ino] = {"data": b"", "mode": 0o644 & ~UMASK, "xattrs": {}}
            self.entries[path] = ("f", ino)
        else:
            ino = kind[1]
        node = self.view["inodes"][ino]
        old = b"" if trunc else node["data"]
        if len(old) < offset:
            old += b"\0" * (offset - len(old))
        node["data"] = old[:offset] + payload + old[offset + len(payload):]

    @can_change(lambda self: self._paths("f"))
    @rule(data=st.data(), size=st.sampled_from([7, 100, 5000, 6000] + SIZES))
    def truncate(self, data, size):
        path = data.draw(st.sampled_from(self._paths("f")), label="path")

        def do(p):
            fd = os.open(p, os.O_WRONLY | O_NF)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

        if self._fs_op(do, self._abs(path)):
            node = self.view["inodes"][self.entries[path][1]]
            node["data"] = node["data"][:size] + b"\0" * max(0, size - len(node["data"]))

    @can_change(lambda self: self._paths("f", "l"))
    @rule(data=st.data())
    def rename_file(self, data):
        """A file or symlink to a new name or over another file or symlink."""
        src = data.draw(st.sampled_from(self._paths("f", "l")), label="src")
        dsts = [p for p in self._paths("f", "l") + self._new_paths() if p != src]
        dst = data.draw(st.sampled_from(dsts), label="dst")
        e = self.entries
        if e[src][0] == "f" and e.get(dst) == e[src]:
            # two names of one file: rename(2) does nothing (and the kernel never asks the daemon)
            os.rename(self._abs(src), self._abs(dst))
            return
        if self._fs_op(os.rename, self._abs(src), self._abs(dst)):
            e[dst] = e.pop(src)

    @can_change(lambda self: self._paths("d"))
    @rule(data=st.data())
    def rename_dir(self, data):
        """A directory (and its subtree, from any layers) to a new name or over an empty directory."""
        src = data.draw(st.sampled_from(self._paths("d")), label="src")
        e = self.entries
        empty = [d for d in self._paths("d") if not any(p.startswith(d + "/") for p in e)]
        dsts = [p for p in self._new_paths() + empty
                if p != src and not p.startswith(src + "/") and not src.startswith(p + "/")
                and (p.count("/") + max([q.count("/") - src.count("/") for q in e if q.startswith(src + "/")] or [0])
                     < MAX_DEPTH)]
        if not dsts:
            return
        dst = data.draw(st.sampled_from(dsts), label="dst")
        if self._fs_op(os.rename, self._abs(src), self._abs(dst)):
            moved = {p: k for p, k in e.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del e[p]
            e.pop(dst, None)
            for p, k in moved.items():
                e[dst + p[len(src):]] = k

    @can_change(lambda self: self._paths("f", "l"))
    @rule(data=st.data())
    def unlink(self, data):
        path = data.draw(st.sampled_from(self._paths("f", "l")), label="path")
        if self._fs_op(os.unlink, self._abs(path)):
            kind = self.entries.pop(path)
            if kind[0] == "f" and not any(k == kind for k in self.entries.values()):
                del self.view["inodes"][kind[1]]

    @can_change(lambda self: self._paths("d"))
    @rule(data=st.data())
    def rmdir(self, data):
        path = data.draw(st.sampled_from(self._paths("d")), label="path")
        nonempty = any(p.startswith(path + "/") for p in self.entries)
        if nonempty and self.open:
            try:
                os.rmdir(self._abs(path))
            except OSError as exc:
                assert exc.errno == errno.ENOTEMPTY, f"rmdir {path} (not empty): expected ENOTEMPTY, got {exc!r}"
                return
            raise AssertionError(f"rmdir {path} succeeded, but it is not empty")
        if nonempty:
            return
        if self._fs_op(os.rmdir, self._abs(path)):
            del self.entries[path]

    @can_change(lambda self: self._new_paths())
    @rule(data=st.data(), mode=st.sampled_from(DIR_MODES))
    def mkdir(self, data, mode):
        path = data.draw(st.sampled_from(self._new_paths()), label="path")
        if self._fs_op(os.mkdir, self._abs(path), mode):
            self.entries[path] = ("d", mode & ~UMASK)

    @can_change(lambda self: self._paths("f") and self._new_paths())
    @rule(data=st.data())
    def link(self, data):
        src = data.draw(st.sampled_from(self._paths("f")), label="src")
        dst = data.draw(st.sampled_from(self._new_paths()), label="dst")
        if self._fs_op(lambda a, b: os.link(a, b, follow_symlinks=False), self._abs(src), self._abs(dst)):
            self.entries[dst] = self.entries[src]

    @can_change(lambda self: self._new_paths())
    @rule(data=st.data(), link_target=st.sampled_from(LINK_TARGETS))
    def symlink(self, data, link_target):
        dst = data.draw(st.sampled_from(self._new_paths()), label="dst")
        if self._fs_op(os.symlink, link_target, self._abs(dst)):
            self.entries[dst] = ("l", link_target)

    @can_change(lambda self: self._paths("f", "d"))
    @rule(data=st.data())
    def chmod(self, data):
        path = data.draw(st.sampled_from(self._paths("f", "d")), label="path")
        kind = self.entries[path]
        mode = data.draw(st.sampled_from(DIR_MODES if kind[0] == "d" else FILE_MODES), label="mode")
        full = self._abs(path)
        assert not os.path.islink(full), f"{path} is a symlink in the mount, the model says {kind}"
        if self._fs_op(os.chmod, full, mode):
            if kind[0] == "d":
                self.entries[path] = ("d", mode)
            else:
                self.view["inodes"][kind[1]]["mode"] = mode

    @can_change(lambda self: self._paths("f"))
    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), value=st.binary(min_size=0, max_size=20),
          size=st.sampled_from(XATTR_SIZES), remove=st.booleans())
    def setxattr(self, data, name, value, size, remove):
        path = data.draw(st.sampled_from(self._paths("f")), label="path")
        if size > 20 and size <= Env.xattr_max:
            value = (value or b"v") * (size // max(1, len(value or b"v")) + 1)
            value = value[:size]
        node = self.view["inodes"][self.entries[path][1]]
        full = self._abs(path)
        if remove:
            if name not in node["xattrs"]:
                return
            if self._fs_op(lambda p: os.removexattr(p, name, follow_symlinks=False), full):
                del node["xattrs"][name]
        elif self.open:
            try:
                os.setxattr(full, name, value, follow_symlinks=False)
            except OSError as exc:
                # a file's xattrs share one block (ext4: 4 KiB): the view must refuse exactly
                # what a plain file with the same xattrs on the same file system refuses
                if exc.errno not in (errno.ENOSPC, errno.E2BIG):
                    raise
                native = _plain_setxattr(node["xattrs"], name, value)
                assert native is not None, (f"setxattr {path} {name} ({len(value)} bytes): the view says "
                                            f"{exc!r}, a plain file with the same xattrs takes it")
                assert native == exc.errno, f"setxattr {path}: view {exc!r}, a plain file errno {native}"
                event("xattr room full, as on a plain file")
                return
            event("change in an open step")
            node["xattrs"][name] = value
        else:
            self._fs_op(lambda p: os.setxattr(p, name, value, follow_symlinks=False), full)

    @can_change(lambda self: self._paths("f"))
    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def chown(self, data, owner):
        path = data.draw(st.sampled_from(self._paths("f")), label="path")
        if self._fs_op(lambda p: os.chown(p, *owner, follow_symlinks=False), self._abs(path)):
            self.view["inodes"][self.entries[path][1]]["owner"] = owner

    @can_change(lambda self: True)
    @rule(data=st.data())
    def too_long_name(self, data):
        """A 256-byte name: ENAMETOOLONG (or EROFS while no step is open), nothing created."""
        d = data.draw(st.sampled_from(self._dirs()), label="dir")
        path = f"{d}/{TOO_LONG}" if d else TOO_LONG
        try:
            fd = os.open(self._abs(path), os.O_WRONLY | os.O_CREAT | O_NF, 0o644)
        except OSError as exc:
            want = (errno.ENAMETOOLONG,) if self.open else (errno.ENAMETOOLONG, errno.EROFS)
            assert exc.errno in want, f"create of a 256-byte name: {exc!r}"
            return
        os.close(fd)
        raise AssertionError("a 256-byte name was created")

    @can_change(lambda self: self._dirs())
    @rule(data=st.data(), size=st.sampled_from([0, 1, 4096, 4097]))
    def deepen(self, data, size):
        """A chain of 255-byte directories down to just under PATH_MAX (relative to the root),
        with a file at the bottom."""
        top = data.draw(st.sampled_from(self._dirs()), label="top")
        names = []
        length = len(top)
        while length + 2 * (1 + 255) + 10 < PATH_MAX:
            names.append(f"{len(names):02d}" + "D" * 253)
            length += 1 + 255
        chain = [f"{top}/{'/'.join(names[:i + 1])}" if top else "/".join(names[:i + 1]) for i in range(len(names))]
        if not chain or any(p in self.entries for p in chain):
            return  # *top* is already as deep as a chain may start
        bottom = chain[-1] + "/bottom"
        content = bytes([size % 251]) * size

        def do(_):
            for p in chain:
                os.mkdir(self._abs(p), 0o755)
            fd = os.open(self._abs(bottom), os.O_WRONLY | os.O_CREAT | O_NF, 0o644)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)

        if self._fs_op(do, None):
            for p in chain:
                self.entries[p] = ("d", 0o755 & ~UMASK)
            ino = self._new_ino()
            self.view["inodes"][ino] = {"data": content, "mode": 0o644 & ~UMASK, "xattrs": {}}
            self.entries[bottom] = ("f", ino)

    # ------------------------------------------------------------------ saga operations

    @precondition(lambda self: not self.saga)
    @rule()
    def begin(self):
        res = self._call("saga.begin", name="model")
        assert res["saga"]["state"] == "active"
        self.saga = True
        self.live = []
        self.next_index = 1  # step indexes count per saga
        self.open = False

    @rule()
    def step(self):
        if not self.saga:
            self._expect_error("no-saga", "saga.step", name="s")
            return
        res = self._call("saga.step", name=f"s{self.next_index}")
        assert res["step"]["index"] == self.next_index, (res["step"], self.next_index)
        self.live.append((self.next_index, copy.deepcopy(self.view)))
        self.next_index += 1
        self.open = True

    @precondition(lambda self: self.saga)
    @rule()
    def rollback(self):
        """Roll back the open step."""
        if not self.open:
            self._expect_error("no-open-step", "saga.rollback")
            return
        index, tree = self.live.pop()
        res = self._call("saga.rollback")
        assert res["compensated"] == [index], res
        self.view = tree
        self.open = False

    @precondition(lambda self: self.saga)
    @rule(data=st.data())
    def rollback_to(self, data):
        k = data.draw(st.sampled_from([0] + [i for i, _ in self.live]), label="to")
        res = self._call("saga.rollback", to=k)
        gone = [i for i, _ in self.live if i > k]
        assert res["compensated"] == list(reversed(gone)), (res, gone)
        if gone:
            keep = [(i, t) for i, t in self.live if i <= k]
            self.view = self.live[len(keep)][1]
            self.live = keep
            self.open = False

    @precondition(lambda self: self.saga)
    @rule()
    def commit(self):
        """Commit; the base must then equal the view byte for byte, also in the mtimes of files
        and of the directories the commit created (one the saga only passed through gets the
        commit's own mtime)."""
        old_dirs = {p for p, d in treecmp.snapshot(Env.base, data=False)[0].items() if d["type"] == stat.S_IFDIR}
        files_before = treecmp.snapshot(self.mp, mtimes=True)
        dirs_before = treecmp.snapshot(self.mp, dir_mtimes=True)
        res = self._call("saga.commit")
        state = res["saga"]["state"]
        assert state == "committed", f"saga.commit answered with the saga in state {state!r}: {res}"
        after = treecmp.snapshot(Env.base, mtimes=True)
        lines = treecmp.diff(after, files_before)
        assert not lines, "the committed base differs from the view before the commit:\n" + "\n".join(lines[:20])
        got = treecmp.snapshot(Env.base, dir_mtimes=True)[0]
        new = {p for p, d in dirs_before[0].items() if d["type"] == stat.S_IFDIR and p not in old_dirs}
        lines = treecmp.diff(({p: got.get(p) for p in new}, set()), ({p: dirs_before[0][p] for p in new}, set()))
        assert not lines, "a directory the commit created has another mtime than the view showed:\n" + "\n".join(
            lines[:20])
        self.base = copy.deepcopy(self.view)
        self.base_changed = True
        self.saga = False
        self.live = []
        self.open = False

    @precondition(lambda self: self.saga)
    @rule()
    def abort(self):
        res = self._call("saga.abort")
        assert res["saga"]["state"] == "aborted", res
        self.view = copy.deepcopy(self.base)
        self.saga = False
        self.live = []
        self.open = False

    @precondition(lambda self: self.saga)
    @rule()
    def crash_and_recover(self):
        """SIGKILL the daemon and mount again: recovery rolls back the step open at the crash."""
        os.chdir(self.cwd)
        self.m.kill()
        self.m.start()
        os.chdir(self.mp)
        _wait_idle(self.m)
        if self.open:
            _, tree = self.live.pop()
            self.view = tree
            self.open = False

    # ------------------------------------------------------------------ the checks

    @invariant()
    def view_and_base_match_the_model(self):
        lines = tree_diff(describe_model(self.view), describe_dir(self.mp))
        assert not lines, "the mount differs from the model's view:\n" + "\n".join(lines[:30])
        lines = tree_diff(describe_model(self.base), describe_dir(Env.base))
        assert not lines, "the base differs from the model's base:\n" + "\n".join(lines[:30])
        st_ = _status(self.m)
        assert (st_["saga"] is not None) == self.saga, st_
        if self.saga:
            assert st_["saga"]["state"] == "active", st_
            live = [s["index"] for s in st_["steps"] if s["state"] in ("open", "done")]
            assert live == [i for i, _ in self.live], (st_["steps"], self.live)
        assert st_["writable"] is self.open, (st_, self.open)

    def teardown(self):
        """Abort the saga; restore the base if it changed. Anything unexpected: a full reset (a
        fresh state directory and base) first, so that no example inherits a broken daemon,
        then the error is raised."""
        m = self.m
        os.chdir(self.cwd)
        try:
            if not _daemon_alive(m):
                raise AssertionError(f"the daemon died\n{m.log()}")
            st_ = _wait_idle(m)
            if st_["saga"] is not None:
                m.call("saga.abort")
            if self.base_changed:
                m.stop()
                _restore_base()
                m.start()
                _wait_idle(m)
        except BaseException:
            _full_reset(m)
            raise


def _full_reset(m):
    m.kill()
    shutil.rmtree(m.state, ignore_errors=True)
    _restore_base()
    m.start()


def test_saga_model(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    build_tree(base, initial_tree())
    lines = tree_diff(describe_model(initial_tree()), describe_dir(base))
    assert not lines, lines
    Env.base = str(base)
    Env.mount = mount_factory(base, name="model")
    Env.examples = 0
    Env.xattr_max = fsmatrix.max_xattr_value(tmp_path)
    t0 = time.monotonic()
    cwd = os.getcwd()
    try:
        run_state_machine_as_test(SagaWorkspace, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        os.chdir(cwd)
        print(f"\n[model] {Env.examples} examples in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        Env.mount = None
