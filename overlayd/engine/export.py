"""The engine's side of ``saga export --git``: one control op, ``saga.export`` (ExportMixin),
and the base's git ``HEAD`` recorded when a saga begins (base_head).

The daemon owns the layers (it may run as root, its state directory 0700), while git objects
must be written by the user in the user's repository. So the daemon hands out what a step
changed, and the client (``overlayd.gitexport``) writes the objects:

- ``{"steps": true}``: for each finished step of the active saga (and the open one with
  ``"open_step": true``), the *cumulative* changes of the steps up to it against the base, as a
  commit would apply them (the commit rules apply: ``exclude``, ``include_ignored``), plus the
  step's name, compensation and the audit trail's process list; and the base's ``HEAD``
  recorded when the saga began (``base_head``).
- ``{"open": [[layer, path], ...]}`` (at most ``MAX_FDS``): read-only fds of those layer files,
  passed with SCM_RIGHTS (``protocol.WithFds``, sent by the control server); a metacopy's fd
  is its origin's in the base. A file the peer could not read by its mode bits is refused
  (``permission``): root's daemon must not become a way around a file's permissions.

The peer is authorized as for every other op (daemon.control.Authorizer). Refusals are
EngineErrors, as everywhere in the engine (the daemon's wire turns them into replies).
"""

import errno
import logging
import os
import stat
import subprocess

import trio

from .. import commit, osutil, rules
from ..gitrun import run_git
from ..protocol import WithFds
from .errors import EngineError

log = logging.getLogger(__name__)

MAX_FDS = 200  # per reply; SCM_MAX_FD is 253
MAX_PROCESSES = 20  # processes named per step


def base_head(base, uid=None, gid=None) -> str | None:
    """The commit ``HEAD`` names in *base*, if it is a git work tree (its root holds ``.git``)
    with at least one commit; None otherwise. Runs git as *uid*/*gid* (the daemon may be root and
    the repository the user's). Blocking: call it on a worker thread."""
    if not os.path.lexists(os.path.join(base, ".git")):
        return None
    try:
        r = run_git(["-c", f"safe.directory={base}", "-C", str(base), "rev-parse", "--verify", "-q", "HEAD^{commit}"],
                    uid=uid, gid=gid, env={"GIT_CEILING_DIRECTORIES": os.path.dirname(str(base).rstrip("/")) or "/"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot read the HEAD of %s: %s", base, exc)
        return None
    head = r.stdout.decode().strip()
    return head if r.returncode == 0 and len(head) in (40, 64) else None


class ExportMixin:
    """SagaEngine's ``saga.export`` (uses ws, fs, audit, the commit rules and the steps)."""

    async def op_export(self, args, peer):
        saga = self.require_active(states=("active", "stuck"))
        # the stack lock: a rollback or commit meanwhile would drop the layers being read
        with self.lock.hold("saga export"):
            return await self._export(saga, args, peer)

    async def _export(self, saga, args, peer):
        layers = {layer.id: layer.path for layer in self.fs.layers[1:]}
        if args.get("open") is not None:
            return await trio.to_thread.run_sync(_open_files, str(self.ws.base), layers, args["open"], peer)
        await self.audit.flush()
        rules_ = self._rules(args, saga)
        live = self.live_steps(saga["id"])
        stack = list(layers)
        wanted = [s for s in live if s["state"] == "done" or (s["state"] == "open" and args.get("open_step"))]
        procs = await trio.to_thread.run_sync(lambda: _processes(self.ws.journal.events(saga=saga["id"])))
        out = []
        for s in wanted:
            if s["layer"] not in stack:
                raise EngineError("bad-state", f"step {s['index']} has no layer in the stack; run this again")
            upto = [(lid, layers[lid]) for lid in stack[:stack.index(s["layer"]) + 1]]
            try:
                ops = await trio.to_thread.run_sync(_plan, str(self.ws.base), upto, rules_, self._entries)
            except rules.RulesError as exc:
                raise EngineError("error", f"{exc} (the export leaves out what a commit would)") from None
            out.append({"index": s["index"], "name": s["name"], "state": s["state"], "layer": s["layer"],
                        "compensate": s.get("compensate"), "created": s.get("created"), "sealed": s.get("sealed"),
                        "uid": s.get("uid"), "processes": procs.get(s["index"], []), "ops": ops})
        return {"saga": saga, "base_head": saga.get("base_head"), "steps": out}


def _processes(events) -> dict:
    """step index -> [{"comm", "pid", "uid", "changes"}] of the audit trail, most changes first."""
    per = {}
    for e in events:
        if e.get("kind") != "op" or e.get("step") is None:
            continue
        key = (e.get("comm", "?"), e.get("pid"), e.get("uid"))
        d = per.setdefault(e["step"], {})
        d[key] = d.get(key, 0) + 1
    return {k: [{"comm": c, "pid": p, "uid": u, "changes": n}
                for (c, p, u), n in sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))][:MAX_PROCESSES]
            for k, d in per.items()}


def _plan(base, layers, rules_, entries) -> list[dict]:
    """The changes of *layers* ([(id, path)], bottom to top) against the base, for git: ``delete``
    (the path and anything below it), ``clear`` (a new directory: what was below the path goes,
    its entries follow), ``put`` of a file (``kind`` f, ``exec``) or a symlink (``target``), and
    ``special`` (a device, fifo or socket: git cannot hold it). *entries*: CommitMixin._entries.
    Worker thread: git may read the view."""
    base_fd = os.open(base, osutil.DIR_FLAGS)
    fds = []
    try:
        for lid, path in layers:
            fds.append((lid, os.open(path, osutil.DIR_FLAGS)))
        ops = commit.plan_commit(base_fd, fds)
        if rules_:
            out = rules_.left_out(entries(base_fd, ops))
            if out:
                ops = commit.leave_out(ops, out)
        lfds = dict(fds)
        res = []
        for op in ops:
            path = op["path"]
            if path == ".git" or path.startswith(".git/"):
                continue
            if op["op"] == "delete":
                res.append({"op": "delete", "path": path})
            elif op["op"] == "newdir":
                res.append({"op": "clear", "path": path})
            elif op["op"] == "put":
                st, target = _lstat(lfds[op["layer"]], path)
                if op["kind"] == "f":
                    res.append({"op": "put", "path": path, "kind": "f", "layer": op["layer"],
                                "exec": bool(st.st_mode & stat.S_IXUSR), "size": st.st_size})
                elif op["kind"] == "l":
                    res.append({"op": "put", "path": path, "kind": "l", "target": target})
                else:
                    res.append({"op": "special", "path": path, "kind": op["kind"]})
        return res
    finally:
        os.close(base_fd)
        for _, fd in fds:
            os.close(fd)


def _lstat(layer_fd, path):
    head, _, name = os.fsencode(path).rpartition(b"/")
    dfd = osutil.open_beneath(layer_fd, head)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        target = os.fsdecode(os.readlink(name, dir_fd=dfd)) if stat.S_ISLNK(st.st_mode) else None
        return st, target
    finally:
        os.close(dfd)


def _groups(pid) -> set:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def _may_read(st, peer, groups) -> bool:
    uid, gid = peer.get("uid"), peer.get("gid")
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid or st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _open_files(base, layers, wanted, peer):
    """Read-only fds of [[layer, path], ...] of the stack's *layers* ({id: path}; a metacopy:
    its origin in *base*). Worker thread."""
    if not isinstance(wanted, list) or len(wanted) > MAX_FDS or not all(
            isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w) for w in wanted):
        raise EngineError("bad-request", f"'open' must be a list of at most {MAX_FDS} [layer, path] pairs")
    groups = _groups(peer.get("pid")) if peer.get("uid") != 0 else set()
    fds = []
    base_fd = os.open(base, osutil.DIR_FLAGS)
    try:
        for lid, path in wanted:
            if lid not in layers:
                raise EngineError("bad-state", f"layer {lid} is not in the stack any more (a step was rolled back "
                                           "meanwhile); export again")
            head, _, name = os.fsencode(path).rpartition(b"/")
            try:
                lfd = os.open(layers[lid], osutil.DIR_FLAGS)
                try:
                    dfd = osutil.open_beneath(lfd, head)
                finally:
                    os.close(lfd)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise EngineError("bad-state", f"cannot open {path} in layer {lid}: {exc.strerror}; export again") \
                    from None
            fds.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise EngineError("bad-request", f"{path} in layer {lid} is not a regular file")
            if not _may_read(st, peer, groups):
                raise EngineError("permission", f"uid {peer.get('uid')} may not read {path} (mode "
                                            f"{stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}): it cannot be exported")
            origin = osutil.get_origin(fd)
            if origin is not None:
                try:
                    ofd = osutil.open_origin(base_fd, origin)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EIO):
                        raise
                    raise EngineError("bad-state", f"the base file the renamed {path} takes its data from is gone "
                                               f"({exc.strerror})") from None
                os.close(fd)
                fds[-1] = ofd
        return WithFds({"count": len(fds)}, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(base_fd)
