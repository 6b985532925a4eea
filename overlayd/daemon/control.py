"""The control socket server: the protocol of overlayd.protocol over a Unix socket, peers
authenticated by SO_PEERCRED.

A client breaking the frame rules (MAX_FRAME bytes, a request line within REQUEST_TIMEOUT
seconds) is answered with an error and disconnected, without disturbing anybody else.
"""

import array
import errno
import grp
import json
import logging
import os
import socket

import trio

from ..protocol import MAX_FRAME, PROTOCOL, REQUEST_TIMEOUT, OpError, WithFds, encode_response, peer_credentials

log = logging.getLogger(__name__)


class Authorizer:
    """root, the workspace's owner, and members of a configured group may talk to the daemon."""

    def __init__(self, owner_uid: int, group: str | None = None):
        self.owner_uid = owner_uid
        self.gid = grp.getgrnam(group).gr_gid if group else None

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, self.owner_uid):
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return self.gid in {int(g) for g in line.split()[1:]}
        except OSError:
            return False
        return False


class ControlServer:
    """Serves one Unix socket; *dispatch(op, args, peer)* is an async callable returning a result."""

    def __init__(self, path, dispatch, authorizer: Authorizer):
        self.path = str(path)
        self.dispatch = dispatch
        self.auth = authorizer

    def _bind(self):
        # the directory was created and verified (ours, not writable by others) by claim.claim(),
        # whose lock proves that no live daemon serves this name: a socket left here is stale
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        return sock

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        sock = self._bind()
        await sock.bind(self.path)
        # Anybody may connect; SO_PEERCRED decides who is answered (so that refusals are explicit).
        os.chmod(self.path, 0o666)
        sock.listen(64)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve, conn)
        finally:
            sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _serve(self, conn):
        stream = trio.SocketStream(conn)
        try:
            pid, uid, gid = peer_credentials(conn)
            if not self.auth.allowed(pid, uid, gid):
                log.warning("control: refused peer pid=%d uid=%d gid=%d", pid, uid, gid)
                await self._send(stream, None, error=OpError(
                    "permission", f"uid {uid} may not control this workspace; "
                    "ask its owner or root, or join the configured group"))
                return
            peer = {"pid": pid, "uid": uid, "gid": gid}
            buf = b""
            while True:
                line, buf = await self._read_line(stream, buf)
                if line is None:
                    return
                await self._handle(stream, line, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("control: connection error: %s", exc)
        except Exception:  # a bug in serving one client must not take the daemon down
            log.exception("control: connection failed")
        finally:
            await stream.aclose()

    async def _read_line(self, stream, buf):
        """The next request line; None at EOF. Errors and disconnects on oversized or slow frames."""
        with trio.CancelScope() as scope:
            if buf:
                scope.deadline = trio.current_time() + REQUEST_TIMEOUT
            while b"\n" not in buf:
                if len(buf) > MAX_FRAME:
                    await self._send(stream, None, error=OpError(
                        "frame-too-large", f"request larger than {MAX_FRAME} bytes"))
                    return None, b""
                data = await stream.receive_some(65536)
                if not data:
                    return None, b""
                if not buf:
                    scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                buf += data
        if scope.cancelled_caught:
            await self._send(stream, None, error=OpError(
                "timeout", f"request not finished within {REQUEST_TIMEOUT:.0f} s"))
            return None, b""
        line, _, rest = buf.partition(b"\n")
        if len(line) > MAX_FRAME:
            await self._send(stream, None, error=OpError("frame-too-large", f"request larger than {MAX_FRAME} bytes"))
            return None, b""
        return line, rest

    async def _handle(self, stream, line: bytes, peer) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("a request is a JSON object with a string 'op'")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            await self._send(stream, None, error=OpError("bad-request", f"malformed request: {exc}"[:500]))
            return
        rid = req.get("id")
        if req.get("v", PROTOCOL) != PROTOCOL:
            await self._send(stream, rid, error=OpError(
                "protocol", f"protocol version {req.get('v')} not supported (daemon speaks {PROTOCOL})"))
            return
        args = req.get("args") or {}
        if not isinstance(args, dict):
            await self._send(stream, rid, error=OpError("bad-request", "'args' must be an object"))
            return
        try:
            result = await self.dispatch(req["op"], args, peer)
        except OpError as exc:
            await self._send(stream, rid, error=exc)
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("control: %s failed", req["op"])
            await self._send(stream, rid, error=OpError("internal", f"internal error: {exc}"))
        else:
            if isinstance(result, WithFds):
                try:
                    await self._send_fds(stream, rid, result)
                finally:
                    for fd in result.fds:
                        os.close(fd)
                return
            await self._send(stream, rid, result=result)

    @staticmethod
    async def _send_fds(stream, rid, res: WithFds):
        data = encode_response(rid, res.result)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", res.fds))] if res.fds else []
        await stream.socket.wait_writable()
        sent = await stream.socket.sendmsg([data], anc)
        if sent < len(data):
            await stream.send_all(data[sent:])

    @staticmethod
    async def _send(stream, rid, result=None, error: OpError | None = None):
        await stream.send_all(encode_response(rid, result, error))
