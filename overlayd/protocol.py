"""The control protocol, shared by the daemon's control server and the client: no trio here.

Newline-delimited JSON over a Unix socket, peers authenticated by SO_PEERCRED:

Request:  {"v": 1, "id": 7, "op": "status", "args": {...}}
Response: {"v": 1, "id": 7, "ok": true, "result": {...}}
      or  {"v": 1, "id": 7, "ok": false, "error": {"code": "conflict", "message": "...", ...}}

Frames are bounded (MAX_FRAME bytes) and a client must finish a request line within
REQUEST_TIMEOUT seconds.
"""

import json
import re
import socket
import struct

PROTOCOL = 1
MAX_FRAME = 1 << 20
REQUEST_TIMEOUT = 10.0


class OpError(Exception):
    """An operation failed in a way the client should see: code, message, extra fields.
    The wire error: the daemon's control path raises it (domain errors are mapped to it by
    overlayd.daemon.wire); the engine never does."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


NAME_RE = re.compile(r"[^\x00-\x1f\x7f/]{1,128}")
NAME_RULE = "use 1-128 printable characters, no '/', not '.' or '..'"


def name_problem(name) -> str | None:
    """Why *name* is not a valid saga or step name, or None: the one check, of the engine (which
    refuses it: ``bad-name``) and of saga definitions (before anything runs). 1-128 bytes of valid
    UTF-8, printable (no control character), no "/", not "." or ".."."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", "..") \
            or len(name.encode("utf-8", "surrogatepass")) > 128:
        return NAME_RULE
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


class WithFds:
    """An op's result that carries open fds: they go with the reply line (SCM_RIGHTS) and are
    closed once sent (overlayd.daemon.control). The reply says how many; the client reads them
    with ``Client.call_fds``."""

    def __init__(self, result, fds):
        self.result = result
        self.fds = list(fds)


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def encode_request(rid: int, op: str, args: dict) -> bytes:
    return json.dumps({"v": PROTOCOL, "id": rid, "op": op, "args": args}).encode() + b"\n"


def encode_response(rid, result=None, error: OpError | None = None) -> bytes:
    msg = {"v": PROTOCOL, "id": rid, "ok": error is None}
    if error is None:
        msg["result"] = result
    else:
        msg["error"] = {"code": error.code, "message": error.message, **error.extra}
    return json.dumps(msg).encode() + b"\n"
