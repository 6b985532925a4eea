"""Commit rules: which changed paths a commit leaves out of the base.

- Paths git ignores, when the base is a git work tree (its root holds ``.git``). The rules of
  the *view* apply (``.gitignore`` files the saga created or changed, ``.git/info/exclude``,
  the user's global excludes), so ``git check-ignore`` runs in the mountpoint, as the uid and
  gid that began the saga, with ``core.fsmonitor`` off (reading the index must run nothing).
  A tracked file is never ignored (git's rule). ``include_ignored`` takes these paths too.
- ``exclude`` patterns, in gitignore syntax (``*.log``, ``/build/``, ``.venv/``): from
  ``STATE/commit.json`` (``{"exclude": [...], "include_ignored": false}``, read at every
  commit) and from the request (``saga commit --exclude GLOB``).

A directory left out takes its whole subtree with it. What is left out stays in the layers and
is dropped with them: it is never written to the base.

Must not run on the trio thread: git reads the view through the daemon's own mount.
"""

import json
import logging
import os
import subprocess

import pathspec

from .gitrun import run_git

log = logging.getLogger(__name__)

CONFIG = "commit.json"
GIT_TIMEOUT = 120.0


class RulesError(Exception):
    """The rules cannot be evaluated; the message says why and what to do."""


def check_patterns(patterns, where: str) -> list[str]:
    """*patterns* as a list of gitignore-style strings, or RulesError naming *where*."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) \
            or not all(isinstance(p, str) and p.strip() and "\0" not in p and "\n" not in p for p in patterns):
        raise RulesError(f"{where} must be a list of non-empty glob patterns (gitignore syntax, e.g. "
                         f"[\"*.log\", \".venv/\"]), not {patterns!r}")
    try:
        pathspec.GitIgnoreSpec.from_lines(patterns)
    except Exception as exc:  # noqa: BLE001 - pathspec raises various errors for bad patterns
        raise RulesError(f"{where}: bad pattern ({exc})") from None
    return list(patterns)


def load_config(state_dir) -> dict:
    """``STATE/commit.json``, checked: ``{"exclude": [...], "include_ignored": bool}``."""
    path = os.path.join(state_dir, CONFIG)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"exclude": [], "include_ignored": False}
    except (OSError, ValueError) as exc:
        raise RulesError(f"{path}: cannot read the commit rules ({exc}); fix or remove the file") from None
    if not isinstance(data, dict) or set(data) - {"exclude", "include_ignored"}:
        raise RulesError(f"{path}: expected an object with 'exclude' (a list of glob patterns) and "
                         f"'include_ignored' (true or false), not {data!r}")
    inc = data.get("include_ignored", False)
    if not isinstance(inc, bool):
        raise RulesError(f"{path}: include_ignored must be true or false, not {inc!r}")
    return {"exclude": check_patterns(data.get("exclude", []), f"{path}: exclude"), "include_ignored": inc}


def is_git_work_tree(base_fd: int) -> bool:
    """Does the base's root hold ``.git`` (a directory, or the file of a linked work tree)?"""
    try:
        os.stat(".git", dir_fd=base_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class Rules:
    """The rules of one commit (or diff). *mountpoint*: run git there (None: no git rules)."""

    def __init__(self, *, exclude=(), mountpoint=None, uid=None, gid=None):
        self.exclude = list(exclude)
        self.spec = pathspec.GitIgnoreSpec.from_lines(self.exclude) if self.exclude else None
        self.mountpoint = str(mountpoint) if mountpoint is not None else None
        self.uid = uid
        self.gid = gid

    def __bool__(self) -> bool:
        return self.spec is not None or self.mountpoint is not None

    def left_out(self, entries) -> dict:
        """*entries*: [(path, is_dir)] parents first. Returns {path: reason} of those left out:
        ``"exclude"`` or ``"ignored"``, ``"inside"`` for an entry under a left-out directory."""
        entries = list(entries)
        ignored = self._git_ignored(entries) if self.mountpoint is not None else set()
        out = {}
        dirs = set()  # left-out directories
        for path, is_dir in entries:
            parts = path.split("/")
            if any("/".join(parts[:i]) in dirs for i in range(1, len(parts))):
                out[path] = "inside"
            elif self.spec is not None and self.spec.match_file(path + "/" if is_dir else path):
                out[path] = "exclude"
            elif path in ignored:
                out[path] = "ignored"
            else:
                continue
            if is_dir:
                dirs.add(path)
        return out

    def _git_ignored(self, entries) -> set:
        if not entries:
            return set()
        data = b"".join(os.fsencode(p) + (b"/" if d else b"") + b"\0" for p, d in entries)
        try:
            r = run_git(["-c", f"safe.directory={self.mountpoint}", "-C", self.mountpoint, "check-ignore",
                         "--stdin", "-z"], uid=self.uid, gid=self.gid, input=data, timeout=GIT_TIMEOUT,
                        env={"GIT_CEILING_DIRECTORIES": os.path.dirname(self.mountpoint.rstrip("/")) or "/"})
        except FileNotFoundError:
            raise RulesError("the base is a git work tree but git is not installed, so the paths git ignores "
                             "cannot be left out: install git, or take them (--include-ignored)") from None
        except subprocess.TimeoutExpired:
            raise RulesError(f"git check-ignore did not answer within {GIT_TIMEOUT:.0f} s; "
                             "retry, or take the ignored paths (--include-ignored)") from None
        if r.returncode not in (0, 1):
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise RulesError(f"git check-ignore failed in {self.mountpoint} (exit {r.returncode}: "
                             f"{err[-1] if err else 'no message'}); fix it, or take the ignored paths "
                             "(--include-ignored)")
        return {os.fsdecode(p).rstrip("/") for p in r.stdout.split(b"\0") if p}


def summarize(left: dict, changes_of: dict | None = None) -> list[dict]:
    """The top-most left-out paths, each with its reason and how many entries it takes along
    (``entries``), in path order."""
    out = []
    for path, reason in left.items():
        if reason == "inside":
            if out:
                out[-1]["entries"] += 1
            continue
        out.append({"path": path, "reason": reason, "entries": 0, **((changes_of or {}).get(path) or {})})
    return out
