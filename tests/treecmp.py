"""Snapshots of directory trees for differential comparisons (mount vs plain directory)."""

import hashlib
import os
import stat


def snapshot(root, *, data=True, owners=True):
    """path -> description; plus the hard-link groups as a set of frozensets of paths."""
    out = {}
    inodes = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            desc = {"type": kind}
            if not stat.S_ISLNK(st.st_mode):
                desc["mode"] = stat.S_IMODE(st.st_mode)
            if owners:
                desc["owner"] = (st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                desc["size"] = st.st_size
                if data:
                    with open(p, "rb") as f:
                        desc["sha"] = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISLNK(st.st_mode):
                desc["target"] = os.readlink(p)
            if not stat.S_ISLNK(st.st_mode):
                try:
                    desc["xattrs"] = sorted((x, os.getxattr(p, x, follow_symlinks=False))
                                            for x in os.listxattr(p, follow_symlinks=False)
                                            if x.startswith("user."))
                except OSError:
                    desc["xattrs"] = None
            out[rel] = desc
    groups = {frozenset(v) for v in inodes.values() if len(v) > 1}
    return out, groups


def diff(a, b) -> list[str]:
    """Human-readable differences between two snapshots."""
    (sa, ga), (sb, gb) = a, b
    lines = []
    for path in sorted(set(sa) | set(sb)):
        if path not in sa:
            lines.append(f"only in second: {path} {sb[path]}")
        elif path not in sb:
            lines.append(f"only in first: {path} {sa[path]}")
        elif sa[path] != sb[path]:
            lines.append(f"differs: {path}: {sa[path]} != {sb[path]}")
    if ga != gb:
        lines.append(f"hard-link groups differ: {sorted(map(sorted, ga))} != {sorted(map(sorted, gb))}")
    return lines
