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

    def call(self, op: str, timeout: float | None = ..., **args):
        self.connect()
        if timeout is not ...:
            self._sock.settimeout(timeout)
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
            if self._sock is not None and timeout is not ...:
                self._sock.settimeout(self.timeout)
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise ClientError(err.get("code", "error"), err.get("message", "unknown error"), err)
        return msg.get("result")

    def _sock_timeout(self):
        return self.timeout
