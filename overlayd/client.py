"""A small synchronous client of the control socket, for the CLI, tests and agent frameworks."""

import json
import socket
import itertools

from .control import PROTOCOL


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
    """A commit was refused: paths changed in the base meanwhile (``.conflicts``)."""

    @property
    def conflicts(self):
        return self.data.get("conflicts", [])


class StuckError(ClientError):
    """A compensation command kept failing: the saga is stuck until ``retry``."""


class BusyError(ClientError):
    """Another stack operation (commit, rollback, step, a budget cut) is in flight."""


_ERRORS = {"conflict": ConflictError, "stuck": StuckError, "busy": BusyError, "cutting": BusyError,
           "no-daemon": NoDaemon}


class Client:
    def __init__(self, path, timeout: float | None = 30.0):
        self.path = str(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock = None
        self._buf = b""

    def connect(self):
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise NoDaemon("no-daemon", f"no daemon listens on {self.path} ({exc.strerror})") from None
            self._sock = sock
        return self

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
        if io_timeout is not ...:
            self._sock.settimeout(io_timeout)
        rid = next(self._ids)
        self._sock.sendall(json.dumps({"v": PROTOCOL, "id": rid, "op": op, "args": args}).encode() + b"\n")
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
        msg = json.loads(line)
        if not msg.get("ok"):
            err = msg.get("error") or {}
            code = err.get("code", "error")
            raise _ERRORS.get(code, ClientError)(code, err.get("message", "unknown error"), err)
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
    """

    def __init__(self, mountpoint=None, *, name=None, socket_path=None, timeout=600.0):
        from .paths import socket_path as _socket_path

        if socket_path is None:
            if name is None:
                name = _name_of_mount(mountpoint)
            socket_path = _socket_path(name)
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def call(self, op, **args):
        with Client(self.socket_path, timeout=self.timeout) as c:
            return c.call(op, **{k: v for k, v in args.items() if v is not None})

    def status(self):
        return self.call("saga.status")

    def begin(self, name) -> "Saga":
        rec = self.call("saga.begin", name=name)["saga"]
        return Saga(self, rec)

    def saga(self, name, *, commit=True) -> "Saga":
        return Saga(self, None, name=name, commit_on_exit=commit)


class Saga:
    def __init__(self, ws: Workspace, rec, *, name=None, commit_on_exit=True):
        self.ws = ws
        self.rec = rec
        self.name = name or (rec or {}).get("name")
        self.commit_on_exit = commit_on_exit

    def __enter__(self):
        if self.rec is None:
            self.rec = self.ws.call("saga.begin", name=self.name)["saga"]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.commit_on_exit:
                self.commit()
            return False
        try:
            self.abort()
        except ClientError:
            pass  # the original exception matters more; the saga's state is in the journal
        return False

    def step(self, name, compensate=None, *, timeout=None, max_bytes=None, max_files=None, retries=None) -> "Step":
        if isinstance(compensate, (list, tuple)):
            import shlex

            compensate = shlex.join(compensate)
        return Step(self, name, dict(compensate=compensate, timeout=timeout, max_bytes=max_bytes,
                                     max_files=max_files, retries=retries))

    def commit(self, dry_run=False):
        return self.ws.call("saga.commit", dry_run=dry_run)

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


def _name_of_mount(mountpoint) -> str:
    import os
    import re

    mp = os.path.abspath(mountpoint or os.getcwd())
    best = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "fuse.overlayd":
                continue
            point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mp == point or mp.startswith(point.rstrip("/") + "/"):
                if best is None or len(point) > len(best[0]):
                    best = (point, fields[sep + 2].split(":", 1)[1])
    if best is None:
        raise NoDaemon("no-daemon", f"{mp} is not inside a mounted overlayd workspace")
    return best[1]


# ---------------------------------------------------------------------- saga definitions


def run_definition(ws: Workspace, definition, *, name=None, commit=True, resume=False, on_event=None):
    """Run a whole saga from a definition; returns an ``overlayd.definitions.RunResult``.

    *definition*: a path to a TOML file, a ``Definition``, or a list of steps (dicts with the
    keys of a ``[[step]]`` table, *name* then names the saga). A step's ``run`` and
    ``compensate`` may be shell commands (run in the mount; a compensate command is run by
    the daemon when the step's layer is dropped) or Python callables ``f(ctx)`` getting a
    ``StepContext`` (``ctx.workspace`` is the mountpoint); they run in this process. A run
    callable fails by raising. A callable compensate is called here, right before the daemon
    drops that step's layer (on a failure of the step or a later one, and on a retry or a
    resume); if it raises on every attempt (``compensate_retries``, 3 by default) the run
    ends ``stuck``. Compensations must tolerate a half-done step. Resume with the same steps
    (``resume=True``); the check covers names, commands and the callables' qualified names.

    Example::

        ws = Workspace("/mnt/ws")
        r = run_definition(ws, [
            {"name": "fetch", "run": "curl -so data.json https://example.org/data.json"},
            {"name": "convert", "run": convert, "compensate": forget_conversion},
            {"name": "test", "run": "python -m unittest -q", "retries": 1},
        ], name="refresh-data")
        if not r.ok:
            print(r.status, r.message)
    """
    from . import definitions

    if isinstance(definition, (list, tuple)):
        definition = definitions.from_steps(definition, name or "saga")
    elif not isinstance(definition, definitions.Definition):
        definition = definitions.load(definition)
    return definitions.Coordinator(definition, ws.socket_path, commit=commit, on_event=on_event).run(resume=resume)


def _saga_run(self, steps, *, commit=None, on_event=None):
    """Run *steps* (as for :func:`run_definition`) in this saga; returns the RunResult, raises
    ``RunFailed`` (a ClientError, with ``.result``) if the run did not finish.

    Inside ``with ws.saga(NAME) as s:`` the steps join the active saga: a failure compensates
    only these steps, then raises, so the ``with`` block aborts the saga; the block commits.
    On a saga not begun yet, ``s.run(steps)`` begins it and commits (``commit=False``: leave
    it open)."""
    from . import definitions

    defn = definitions.from_steps(steps, self.name) if isinstance(steps, (list, tuple)) else steps
    attach = self.rec is not None
    coord = definitions.Coordinator(defn, self.ws.socket_path, on_event=on_event, attach=attach,
                                    commit=(not attach) if commit is None else commit)
    result = coord.run()
    if not attach and result.saga_id is not None:
        self.rec = {"id": result.saga_id, "name": self.name}
    return result.raise_for_status()


Saga.run = _saga_run
