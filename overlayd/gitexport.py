"""A saga as git history: one commit per finished step (or one for the saga), written with git's
plumbing only, as the user running it, into the user's repository.

Objects and one ref are written; the work tree, the index and ``HEAD`` are never touched:
blobs by one ``git fast-import`` (no commit, no ref: it only packs the blobs and exports their
names), trees through a temporary index (``GIT_INDEX_FILE``: ``read-tree`` of the parent,
``update-index --index-info`` of each step's changes, ``write-tree``), commits by
``commit-tree``, the branch by ``update-ref`` (refused over a branch that points elsewhere
unless forced).

The parent is the base's ``HEAD`` when the saga began (journaled as ``base_head`` at ``saga
begin``); a step's tree is that commit's tree plus the saga's changes up to the end of the step
(what a commit would write to the base, by the same rules: the paths git ignores are left out
unless ``include_ignored``). What the base's work tree holds beyond ``HEAD`` (uncommitted edits)
is not the saga's and is not in the commits. The content comes from the daemon (``saga.export``,
overlayd/export.py): it owns the layers, and passes read-only fds of the files.

Commit and author dates are the steps' own times (when the step was sealed), so exporting the
same steps again gives the same commits. Devices, fifos and sockets cannot be held by git: they
are left out and listed in ``skipped``.
"""

import os
import pwd
import socket
import subprocess
import tempfile

BATCH = 200  # fds per saga.export request (the daemon's MAX_FDS)


class GitError(Exception):
    """git failed, or the repository cannot take the export; the message says what to do."""


def git(repo, *args, input=None, env=None, check=True) -> bytes:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True,
                           env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise GitError("git is not installed") from None
    if check and r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed in {repo} (exit {r.returncode}): {err[-1] if err else 'no message'}")
    return r.stdout


def is_work_tree(path) -> bool:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"], capture_output=True)
    return r.returncode == 0 and r.stdout.strip() == b"true"


def head(repo) -> str | None:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", "HEAD^{commit}"], capture_output=True)
    return r.stdout.decode().strip() if r.returncode == 0 else None


def check_branch(repo, branch: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), "check-ref-format", "--branch", branch], capture_output=True)
    if r.returncode != 0:
        raise GitError(f"{branch!r} is not a valid branch name; pass another with --branch")
    return r.stdout.decode().strip()


def _identity_env(repo) -> dict:
    """The user's git identity; a made-up one (user@host) when git has none configured."""
    r = subprocess.run(["git", "-C", str(repo), "var", "GIT_COMMITTER_IDENT"], capture_output=True)
    if r.returncode == 0:
        return {}
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid{os.getuid()}"
    email = f"{name}@{socket.gethostname() or 'localhost'}"
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email}


def _tree_entries(repo, commit) -> dict:
    """{path: (mode, sha)} of every non-tree entry of *commit* (None: empty)."""
    if commit is None:
        return {}
    out = {}
    for rec in git(repo, "ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0"):
        if not rec:
            continue
        meta, _, path = rec.partition(b"\t")
        mode, _kind, sha = meta.split()
        out[os.fsdecode(path)] = (mode.decode(), sha.decode())
    return out


def _remove(state: dict, dirs: set, path: str) -> None:
    state.pop(path, None)
    if path in dirs:
        prefix = path + "/"
        for p in [p for p in state if p.startswith(prefix)]:
            del state[p]


def _dirs(state) -> set:
    out = set()
    for p in state:
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            if p in out:
                break
            out.add(p)
    return out


def apply_ops(parent: dict, ops, blobs: dict, skipped: list) -> dict:
    """The tree entries after *ops* (saga.export's, cumulative from the base) on *parent*."""
    state = dict(parent)
    dirs = _dirs(parent)
    for op in ops:
        path = op["path"]
        if op["op"] in ("delete", "clear"):
            _remove(state, dirs, path)
        elif op["op"] == "put":
            _remove(state, dirs, path)
            a = path
            while "/" in a:
                a = a.rsplit("/", 1)[0]
                if state.get(a, ("",))[0] == "160000":
                    skipped.append({"path": path, "why": f"inside the submodule {a}"})
                    break
                state.pop(a, None)  # a file where the put needs a directory
            else:
                if op["kind"] == "f":
                    state[path] = ("100755" if op["exec"] else "100644", blobs[(op["layer"], path)])
                else:
                    state[path] = ("120000", blobs[("symlink", op["target"])])
        elif op["op"] == "special":
            skipped.append({"path": path, "why": f"a {op['kind']} (git holds files and symlinks only)"})
    return state


def write_blobs(repo, call_fds, wanted, targets) -> dict:
    """Write the blobs of *wanted* [(layer, path)] (their content from the daemon's fds, fetched
    BATCH at a time by *call_fds*(pairs) -> fds) and *targets* (symlink targets) with one
    ``git fast-import``; returns {(layer, path) or ("symlink", target): sha}."""
    keys = list(wanted) + [("symlink", t) for t in targets]
    if not keys:
        return {}
    with tempfile.TemporaryDirectory(prefix="overlayd-export-") as tmp:
        marks = os.path.join(tmp, "marks")
        p = subprocess.Popen(["git", "-C", str(repo), "fast-import", "--quiet", "--done", f"--export-marks={marks}"],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            mark = 0
            for i in range(0, len(wanted), BATCH):
                pairs = wanted[i:i + BATCH]
                fds = call_fds([list(x) for x in pairs])
                try:
                    for (lid, path), fd in zip(pairs, fds):
                        mark += 1
                        _blob(p.stdin, mark, fd, path)
                finally:
                    for fd in fds:
                        os.close(fd)
            for t in targets:
                mark += 1
                data = os.fsencode(t)
                p.stdin.write(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(data), data))
            p.stdin.write(b"done\n")
            p.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            p.kill()
            p.wait()
            raise
        err = p.stderr.read()
        if p.wait() != 0:
            raise GitError(f"git fast-import failed in {repo}: {err.decode(errors='replace').strip()[-300:]}")
        shas = {}
        with open(marks) as f:
            for line in f:
                m, sha = line.split()
                shas[int(m[1:])] = sha
    return {k: shas[i + 1] for i, k in enumerate(keys)}


def _blob(out, mark: int, fd: int, path: str) -> None:
    size = os.fstat(fd).st_size
    out.write(b"blob\nmark :%d\ndata %d\n" % (mark, size))
    left = size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise GitError(f"{path} shrank while it was exported (a write in the open step?); export again")
        out.write(chunk)
        left -= len(chunk)
    out.write(b"\n")


def _message(title: str, trailers: list[tuple[str, str]]) -> bytes:
    lines = [title.replace("\n", " "), ""]
    lines += [f"{k}: {' '.join(str(v).split())}" for k, v in trailers]
    return ("\n".join(lines) + "\n").encode()


def _process_trailers(procs) -> list[tuple[str, str]]:
    return [("Saga-Process", f"{p['comm']} (pid {p['pid']}, uid {p['uid']}, {p['changes']} change(s))")
            for p in procs]


def _date(ts) -> str:
    return f"@{int(ts)} +0000"


def build(repo, data: dict, call_fds, *, parent, squash=False) -> dict:
    """Write the objects of the export *data* (saga.export's answer) onto *parent*: returns
    {"commits": [{"sha", "tree", "step", "name"}], "head": sha, "skipped": [...]}. No ref moves."""
    saga = data["saga"]
    steps = data["steps"]
    parent_state = _tree_entries(repo, parent)
    wanted, targets = {}, set()
    for s in (steps[-1:] if squash else steps):
        for op in s["ops"]:
            if op["op"] == "put" and op["kind"] == "f":
                wanted.setdefault((op["layer"], op["path"]), None)
            elif op["op"] == "put":
                targets.add(op["target"])
    blobs = write_blobs(repo, call_fds, list(wanted), sorted(targets))
    ident = _identity_env(repo)
    commits, skipped = [], []
    prev_sha = parent
    with tempfile.TemporaryDirectory(prefix="overlayd-export-") as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        if parent:
            git(repo, "read-tree", parent, env=env)
        else:
            git(repo, "read-tree", "--empty", env=env)
        prev = parent_state
        zero = "0" * len(git(repo, "hash-object", "--stdin", input=b"").strip())  # sha1 or sha256
        todo = steps[-1:] if squash else steps
        for s in todo:
            skipped = []
            state = apply_ops(parent_state, s["ops"], blobs, skipped)
            lines = [f"0 {zero}\t{p}" for p in prev if p not in state]
            lines += [f"{m} {h}\t{p}" for p, (m, h) in state.items() if prev.get(p) != (m, h)]
            if lines:
                git(repo, "update-index", "-z", "--index-info",
                    input=b"".join(os.fsencode(x) + b"\0" for x in lines), env=env)
            tree = git(repo, "write-tree", env=env).decode().strip()
            prev = state
            if squash:
                trailers = [("Saga-Id", saga["id"])]
                trailers += [("Saga-Step", f"{t['index']} {t['name']}") for t in steps]
                trailers += [("Compensate", f"{t['index']} {t['compensate']}") for t in steps if t.get("compensate")]
                procs = {}
                for t in steps:
                    for p in t["processes"]:
                        k = (p["comm"], p["pid"], p["uid"])
                        procs[k] = {**p, "changes": procs.get(k, {}).get("changes", 0) + p["changes"]}
                trailers += _process_trailers(sorted(procs.values(), key=lambda p: -p["changes"])[:20])
                title = saga["name"]
            else:
                trailers = [("Saga-Id", saga["id"]), ("Saga-Step", s["index"])]
                if s.get("compensate"):
                    trailers.append(("Compensate", s["compensate"]))
                trailers += _process_trailers(s["processes"])
                title = s["name"]
            when = _date(s.get("sealed") or s.get("created") or saga.get("created"))
            cenv = {**ident, "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
            sha = git(repo, "commit-tree", tree, *(["-p", prev_sha] if prev_sha else []), "-F", "-",
                      input=_message(title, trailers), env=cenv).decode().strip()
            commits.append({"sha": sha, "tree": tree, "step": None if squash else s["index"],
                            "name": title})
            prev_sha = sha
    return {"commits": commits, "head": prev_sha, "skipped": skipped}


def update_branch(repo, branch: str, sha: str, *, force=False) -> str | None:
    """Point refs/heads/*branch* at *sha*; refused when it exists and points elsewhere, unless
    *force*. Returns the old value."""
    ref = f"refs/heads/{branch}"
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", ref], capture_output=True)
    old = r.stdout.decode().strip() if r.returncode == 0 else None
    if old == sha:
        return old
    if old is not None and not force:
        raise GitError(f"the branch {branch} exists (at {old[:12]}) and is not this export; pass --force to move "
                       "it, or --branch NAME for another one")
    git(repo, "update-ref", "-m", "overlayd: saga export", ref, sha, old or "0" * len(sha))
    return old
