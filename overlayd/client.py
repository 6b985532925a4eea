"""A small synchronous client of the control socket, for the CLI, tests and agent frameworks.

A leaf: it imports the protocol (overlayd.protocol) and the mount table (overlayd.paths), never
trio, the daemon or the runner (running saga definitions from Python: overlayd.runner, whose
Workspace is this one with ``Saga.run``)."""

import array
import errno
import itertools
import json
import os
import socket
import stat

from .protocol import encode_request, peer_credentials


class ClientError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}


class NoDaemon(ClientError):
    """No daemon listens on the socket."""


class ConflictError(ClientError):
    """A commit was refused: paths changed in the base meanwhile (``.conflicts``).

    Raised by the commit that ends a ``with ws.saga(...)`` block, it also carries the saga
    (``.saga``) and whether the block aborted it (``.aborted``, see :meth:`Workspace.saga`)."""

    saga = None
    aborted = False

    @property
    def conflicts(self):
        return self.data.get("conflicts", [])


class StuckError(ClientError):
    """A compensation command kept failing: the saga is stuck until ``retry``."""


class BusyError(ClientError):
    """Another stack operation (commit, rollback, step, a budget cut) is in flight."""


class PermissionDenied(ClientError):
    """The daemon refused this uid, or its socket cannot be reached by this uid."""


class WrongDaemon(ClientError):
    """The process behind the socket is not the daemon of the expected workspace (another
    user's, or one serving another mountpoint under the same name): nothing was sent to it."""


_ERRORS = {"conflict": ConflictError, "stuck": StuckError, "busy": BusyError, "cutting": BusyError,
           "no-daemon": NoDaemon,
           "permission": PermissionDenied, "wrong-daemon": WrongDaemon}


# ---------------------------------------------------------------------- which daemon serves a mount


from .paths import MountInfo, mount_of  # noqa: E402 - the one mount-table parser is paths.overlayd_mounts


def socket_candidates(name: str) -> list[str]:
    """Where the socket of workspace *name* may be: $RUNTIME_DIRECTORY, your own runtime
    directory, root's /run/overlayd (a root daemon serving a group)."""
    from .paths import SYSTEM_RUNTIME, runtime_dir

    out = []
    env = os.environ.get("RUNTIME_DIRECTORY")
    for d in ([env.split(":")[0]] if env else []) + [str(runtime_dir()), str(SYSTEM_RUNTIME)]:
        if d not in out:
            out.append(d)
    return [os.path.join(d, f"{name}.sock") for d in out]


def connect_to_mount(mount: MountInfo, timeout: float | None = 30.0) -> "Client":
    """A connected, verified Client of the daemon serving *mount* (see Client.verify).

    Raises PermissionDenied (the daemon refused you, or its socket is another user's to reach),
    paths.UnsafePath (a runtime directory somebody else planted or may write) or NoDaemon."""
    from .paths import UnsafePath, check_owned_dir

    trusted = _trusted(mount)
    problems = []
    for path in socket_candidates(mount.name):
        if not os.path.lexists(path):
            continue
        try:
            check_owned_dir(os.path.dirname(path), trusted)
        except UnsafePath as exc:
            problems.append(exc)
            continue
        except OSError:
            continue
        c = Client(path, timeout=timeout, expect=mount)
        try:
            return c.connect()
        except (NoDaemon, WrongDaemon) as exc:
            problems.append(exc)
    for exc in problems:
        if not isinstance(exc, NoDaemon):
            raise exc
    if mount.owner is not None and mount.owner not in (0, os.geteuid()):
        raise PermissionDenied("permission", f"the workspace at {mount.point} is served by a daemon of uid "
                               f"{mount.owner}, whose control socket you cannot reach: ask that user or root "
                               "(members of a workspace's group can drive a root daemon)")
    if problems:
        raise problems[0]
    raise NoDaemon("no-daemon", f"no daemon answers for the workspace {mount.name} ({mount.point}); looked in "
                   + ", ".join(os.path.dirname(p) for p in socket_candidates(mount.name)))


def _trusted(mount: MountInfo) -> set:
    return {0, os.geteuid()} | ({mount.owner} if mount.owner is not None else set())


class Client:
    """One connection to a daemon's control socket.

    With *expect* (a MountInfo), connect() verifies, before any other request goes out, that
    the socket file and the peer (SO_PEERCRED) belong to root, to you or to the mount's owner,
    and that the daemon serves that very mount (its reported device number); else it raises
    WrongDaemon and sends nothing else (a compensation command may carry a secret)."""

    def __init__(self, path, timeout: float | None = 30.0, *, expect: MountInfo | None = None):
        self.path = str(path)
        self.timeout = timeout
        self.expect = expect
        self.identity = None  # the daemon's status, once verified
        self._ids = itertools.count(1)
        self._sock = None
        self._buf = b""

    def connect(self):
        if self._sock is None:
            if self.expect is not None:
                self._check_socket_file()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise NoDaemon("no-daemon", f"no daemon listens on {self.path} ({exc.strerror})") from None
            except PermissionError:
                sock.close()
                raise PermissionDenied("permission", f"permission denied to connect to {self.path}: the "
                                       "workspace belongs to another user; ask its owner or root") from None
            self._sock = sock
            if self.expect is not None:
                try:
                    self.verify()
                except BaseException:
                    self.close()
                    raise
        return self

    def _check_socket_file(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise NoDaemon("no-daemon", f"no daemon listens on {self.path}") from None
        except PermissionError:
            raise PermissionDenied("permission", f"permission denied to reach {self.path}: the workspace "
                                   "belongs to another user; ask its owner or root") from None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in _trusted(self.expect):
            raise WrongDaemon("wrong-daemon", f"refusing {self.path}: it is {'a socket' if stat.S_ISSOCK(st.st_mode) else 'not a socket'} "
                              f"of uid {st.st_uid}, not of root, you or the workspace's owner; somebody may be "
                              "impersonating the daemon")

    def verify(self) -> dict:
        """Check the peer's uid and the workspace it serves against self.expect (see the class)."""
        m = self.expect
        _pid, uid, _gid = peer_credentials(self._sock)
        if uid not in _trusted(m):
            raise WrongDaemon("wrong-daemon", f"refusing the process behind {self.path}: it runs as uid {uid}, "
                              f"not as root, you or the owner of {m.point}; somebody may be impersonating the "
                              "daemon (nothing was sent to it)")
        st = self._request("status")
        if not isinstance(st, dict) or st.get("dev") != m.dev:
            what = (f"the workspace {st.get('name')!r} at {st.get('mountpoint')}" if isinstance(st, dict)
                    else "something else")
            raise WrongDaemon("wrong-daemon", f"the daemon behind {self.path} serves {what}, not the one mounted "
                              f"at {m.point} ({m.name}); two workspaces may share the name {m.name}: unmount one "
                              "and mount it again with another --name")
        self.identity = st
        return st

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def call(self, op: str, *, io_timeout: float | None = ..., **args):
        """Send one request, wait for its answer. *io_timeout* overrides the socket timeout."""
        self.connect()
        return self._request(op, io_timeout, **args)

    def call_fds(self, op: str, **args):
        """Like call, for an op whose reply carries fds (SCM_RIGHTS): returns (result, [fds])."""
        self.connect()
        if self._buf:
            raise ClientError("bad-reply", "unread data before a reply with fds")
        self._sock.sendall(encode_request(next(self._ids), op, args))
        fds, buf = [], b""
        try:
            while b"\n" not in buf:
                data, anc, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(256 * 4),
                                                                   socket.MSG_CMSG_CLOEXEC)
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                        fds.extend(a)
                if not data:
                    raise ClientError("disconnected", "the daemon closed the connection")
                buf += data
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.close()
            raise
        line, _, self._buf = buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or not msg.get("ok"):
            for fd in fds:
                os.close(fd)
            err = (msg.get("error") or {}) if isinstance(msg, dict) else {}
            code = str(err.get("code", "bad-reply"))
            raise _ERRORS.get(code, ClientError)(code, str(err.get("message", "not an overlayd reply")), err)
        return msg.get("result"), fds

    def _request(self, op: str, io_timeout=..., **args):
        if io_timeout is not ...:
            self._sock.settimeout(io_timeout)
        rid = next(self._ids)
        try:
            self._sock.sendall(encode_request(rid, op, args))
        except OSError as exc:  # a refused peer is answered, then disconnected: the answer is still readable
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
        try:
            while b"\n" not in self._buf:
                data = self._sock.recv(65536)
                if not data:
                    raise ClientError("disconnected", "the daemon closed the connection")
                self._buf += data
        except socket.timeout:
            self.close()
            raise ClientError("timeout", f"the daemon did not answer {op!r} within {self._sock_timeout()} s; "
                              "it may be stopped or hung (check 'overlayd list' and its log)") from None
        finally:
            if self._sock is not None and io_timeout is not ...:
                self._sock.settimeout(self.timeout)
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("error", {}), dict):
            self.close()
            raise ClientError("bad-reply", f"the daemon behind {self.path} sent an answer that is not an overlayd "
                              f"reply ({line[:80]!r}); is it another version of overlayd? restart it")
        if not msg.get("ok"):
            err = msg.get("error") or {}
            code = str(err.get("code", "error"))
            raise _ERRORS.get(code, ClientError)(code, str(err.get("message", "unknown error")), err)
        return msg.get("result")

    def _sock_timeout(self):
        return self.timeout


class Workspace:
    """A workspace seen from an agent framework.

    Example::

        ws = Workspace("/mnt/ws")
        with ws.saga("refactor") as s:          # commits on success, aborts on an exception
            with s.step("migrate", compensate="dropdb scratch"):
                ...                             # an exception rolls this step back, then propagates

    A commit refused for conflicts raises ``ConflictError`` from the ``with`` statement and,
    by default, keeps the saga active (nothing is lost; the next ``ws.saga()`` is refused while
    it is): ``err.saga`` is the saga, to resolve and commit (``err.saga.resolve(*paths,
    how="merge" | "theirs" | "ours")``, then ``err.saga.commit()``) or to
    ``err.saga.abort()``. ``ws.saga(NAME, on_conflict="abort")`` aborts it instead.
    """

    saga_class = None  # the Saga class that begin() and saga() make (overlayd.runner's adds run())

    def __init__(self, mountpoint=None, *, name=None, socket_path=None, timeout=600.0):
        from .paths import socket_path as _socket_path

        self.expect = None
        if socket_path is None:
            if name is None:
                self.expect = _mount_containing(mountpoint)  # the socket is found (and checked) when used
            else:
                socket_path = _socket_path(name)
        self._socket_path = None if socket_path is None else str(socket_path)
        self.timeout = timeout

    @property
    def socket_path(self) -> str:
        """The daemon's socket; for a mountpoint, the first one whose daemon serves that mount."""
        if self._socket_path is None:
            with connect_to_mount(self.expect, timeout=min(self.timeout, 30.0)) as c:
                self._socket_path = c.path
        return self._socket_path

    def call(self, op, **args):
        with Client(self.socket_path, timeout=self.timeout, expect=self.expect) as c:
            return c.call(op, **{k: v for k, v in args.items() if v is not None})

    def status(self):
        return self.call("saga.status")

    def begin(self, name) -> "Saga":
        rec = self.call("saga.begin", name=name)["saga"]
        return (self.saga_class or Saga)(self, rec)

    def saga(self, name, *, commit=True, on_conflict="keep") -> "Saga":
        """A saga as a context manager: begun on entry; on exit committed (unless
        ``commit=False``), or aborted if the block raised. *on_conflict*: what a commit refused
        for conflicts does to the saga, ``"keep"`` (active, for resolution) or ``"abort"``; the
        ``ConflictError`` is raised either way."""
        if on_conflict not in ("keep", "abort"):
            raise ValueError(f"on_conflict must be 'keep' or 'abort', not {on_conflict!r}")
        return (self.saga_class or Saga)(self, None, name=name, commit_on_exit=commit, on_conflict=on_conflict)


class Saga:
    def __init__(self, ws: Workspace, rec, *, name=None, commit_on_exit=True, on_conflict="keep"):
        self.ws = ws
        self.rec = rec
        self.name = name or (rec or {}).get("name")
        self.commit_on_exit = commit_on_exit
        self.on_conflict = on_conflict

    def __enter__(self):
        if self.rec is None:
            self.rec = self.ws.call("saga.begin", name=self.name)["saga"]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.commit_on_exit:
                try:
                    self.commit()
                except ConflictError as err:
                    self._conflicted(err)
                    raise
            return False
        try:
            self.abort()
        except ClientError:
            pass  # the original exception matters more; the saga's state is in the journal
        return False

    def _conflicted(self, err: ConflictError) -> None:
        """The commit at the end of the block was refused: keep the saga, or abort it; say which."""
        err.saga = self
        if self.on_conflict == "abort":
            try:
                self.abort()
            except ClientError as exc:
                err.message += f"; aborting the saga failed too: {exc.message}"
            else:
                err.aborted = True
                err.message += "; the saga was aborted (on_conflict='abort'): its changes are gone"
        else:
            err.message += ("; resolve it (err.saga.resolve(*paths, how='merge' | 'theirs' | 'ours'), or "
                            "err.saga.rollback(to=K) below the steps that changed them; then err.saga.commit()) "
                            "or drop it (err.saga.abort(), or 'saga abort'); until then no other saga can "
                            "begin in this workspace")
        err.args = (err.message,)

    def step(self, name, compensate=None, *, timeout=None, max_bytes=None, max_files=None, retries=None) -> "Step":
        if isinstance(compensate, (list, tuple)):
            import shlex

            compensate = shlex.join(compensate)
        return Step(self, name, dict(compensate=compensate, timeout=timeout, max_bytes=max_bytes,
                                     max_files=max_files, retries=retries))

    def commit(self, dry_run=False):
        return self.ws.call("saga.commit", dry_run=dry_run)

    def resolve(self, *paths, how="merge"):
        """Resolve the commit conflict on *paths* (relative to the workspace) with *how*:
        ``"theirs"`` (the base's current version), ``"ours"`` (the saga's, overwriting the base's
        change) or ``"merge"`` (three-way merge of text files), in a new step named ``resolve``.
        Returns the daemon's answer: ``resolved`` (per path: ``result`` theirs, ours, merged,
        unchanged or conflict-markers) and ``unresolved`` (the paths a merge left conflict
        markers in: still in conflict; edit them in a step, then resolve them with ``"ours"``).
        Raises ClientError (code ``cannot-resolve``) for a path *how* cannot resolve."""
        return self.ws.call("saga.resolve", paths=[os.fspath(p) for p in paths], how=how)

    def rollback(self, to=None):
        return self.ws.call("saga.rollback", to=to)

    def abort(self):
        return self.ws.call("saga.abort")

    def retry(self):
        return self.ws.call("saga.retry")

    def diff(self, step=None):
        return self.ws.call("saga.diff", step=step)["changes"]


class Step:
    def __init__(self, saga: Saga, name, args):
        self.saga = saga
        self.name = name
        self.args = args
        self.rec = None

    def __enter__(self):
        self.rec = self.saga.ws.call("saga.step", name=self.name, **self.args)["step"]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self.saga.rollback()
            except ClientError:
                pass
        return False


def _mount_containing(mountpoint) -> MountInfo:
    mp = os.path.abspath(mountpoint or os.getcwd())
    m = mount_of(mp)
    if m is None:
        raise NoDaemon("no-daemon", f"{mp} is not inside a mounted overlayd workspace")
    return m
