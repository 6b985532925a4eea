"""The daemon: mount the workspace, serve FUSE and the control socket in one trio nursery.

Run by ``overlayd mount`` (which waits on a readiness pipe) or by systemd
(``overlayd mount --foreground``, Type=notify).
"""

import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pyfuse3
import trio

from . import fusecaps, osutil
from journal import JournalError, JournalFull

from .control import Authorizer, ControlServer, OpError
from .paths import UsageError, ensure_private_dir, runtime_dir, socket_path
from .workspace import Workspace

log = logging.getLogger(__name__)

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournaldFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes, which journald turns into the entry's priority."""

    def __init__(self, workspace: str):
        super().__init__(f"%(name)s: [{workspace}] %(message)s")

    def format(self, record):
        text = super().format(record)
        prio = PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str, workspace: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID") or not sys.stderr.isatty():
        handler.setFormatter(JournaldFormatter(workspace))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [{workspace}] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def sd_notify(message: str) -> None:
    """Send *message* to systemd's NOTIFY_SOCKET, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message, exc)


def clear_stale_mount(mountpoint: str) -> None:
    """A dead FUSE daemon leaves 'Transport endpoint is not connected': unmount it lazily."""
    try:
        os.statvfs(mountpoint)  # stat() may still be answered from the kernel's attribute cache
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    log.warning("clearing the stale mount at %s", mountpoint)
    subprocess.run(["fusermount3", "-uz", mountpoint], check=False)


def set_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Larger kernel readahead for the mount: 1 MiB read requests instead of 128 KiB ones."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == os.path.abspath(mountpoint):
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as bdi:
                        bdi.write(str(kib))
                    return
    except OSError as exc:
        log.debug("readahead not raised: %s", exc)


def mount_dev(real_mountpoint: str, name: str) -> str | None:
    """The device number ("MAJOR:MINOR", as /proc/self/mountinfo gives it) of this daemon's own
    mount, read from the mount table (a stat() of the mountpoint would wait for the FUSE loop):
    the topmost overlayd mount of *name* at *real_mountpoint* (resolved before mounting: once
    mounted, resolving it would wait for the FUSE loop), which the mountpoint's lock makes ours."""
    from .paths import overlayd_mounts

    found = None
    for m in overlayd_mounts():
        if m.point == real_mountpoint and m.name == name:
            found = m.dev
    return found


def is_mounted(mountpoint: str) -> bool:
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == mp:
                return True
    return False


def no_space_message(ws: Workspace, exc) -> str:
    """What a refusal for lack of room on the state filesystem says."""
    try:
        sv = os.statvfs(ws.state_dir)
        free = f"{(sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize // 1024} KiB free"
    except OSError:
        free = "free space unknown"
    return (f"the state file system is full: {ws.state_dir} has {free} ({exc}); "
            "roll back a step (saga rollback) or free space on it, then try again")


def _lock_name(path, name: str) -> int:
    """flock *path* (created 0600); returns the fd. The daemon that holds it unlinks it when it
    stops, so a lock taken on a file that was unlinked meanwhile is taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"the workspace name {name} is in use: another daemon serves it (socket "
                             f"{socket_path(name)}; see 'overlayd list'); unmount that workspace first, or "
                             "give this one another --name") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_name(name: str) -> None:
    """Unlink this daemon's name lock (it still holds it: nobody else can be using the file)."""
    try:
        os.unlink(runtime_dir() / f"{name}.lock")
    except OSError:
        pass


def claim(ws: Workspace, group: str | None) -> list[int]:
    """Refuse a workspace name or a mountpoint that a live daemon serves; returns the fds of the
    flocks that prove this daemon is the only one (held for its lifetime, closed on exec).

    The name's lock lives beside its socket, in the runtime directory, which is created or
    verified here (a real directory of ours that nobody else may write): the socket cannot be
    stolen by a second daemon of the same name, nor served from a directory another user
    planted. The mountpoint's lock is on the directory the mount will cover.
    """
    mode = 0o755 if os.geteuid() == 0 else (0o711 if group else 0o700)
    rdir = ensure_private_dir(runtime_dir(), mode)
    fds = []
    try:
        fds.append(_lock_name(rdir / f"{ws.name}.lock", ws.name))
        if is_mounted(str(ws.mountpoint)):
            raise UsageError(f"{ws.mountpoint} is already a mount point; unmount it first "
                             f"(overlayd unmount {ws.mountpoint})")
        fd = os.open(ws.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another daemon is mounting a workspace at {ws.mountpoint}; "
                             "unmount it first") from None
        if is_mounted(str(ws.mountpoint)):  # mounted between the first check and the lock
            raise UsageError(f"{ws.mountpoint} is already a mount point; unmount it first "
                             f"(overlayd unmount {ws.mountpoint})")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class Daemon:
    def __init__(self, ws: Workspace, *, allow_other: bool, group: str | None = None, crashed: bool = False):
        self.ws = ws
        self.crashed = crashed  # the previous daemon did not stop cleanly
        self.allow_other = allow_other
        self.auth = Authorizer(os.getuid(), group)
        self.busy = None  # name of the stack operation in flight
        self.stopping = False
        self.started = time.time()
        self.ops = {
            "status": self.op_status,
            "layer.push": self.op_push,
            "layer.drop": self.op_drop,
            "layer.seal": self.op_seal,
            "shutdown": self.op_shutdown,
        }
        self.saga = None  # the saga engine registers its ops here
        self.mount_dev = None  # "MAJOR:MINOR" of the mount: clients check they reach the right daemon
        self.nursery = None

    # ------------------------------------------------------------------ control ops

    async def dispatch(self, op, args, peer):
        fn = self.ops.get(op)
        if fn is None:
            raise OpError("unknown-op", f"unknown operation {op!r}")
        try:
            return await fn(args, peer)
        except JournalFull as exc:
            raise OpError("no-space", no_space_message(self.ws, exc)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OpError("no-space", no_space_message(self.ws, exc)) from None

    def exclusive(self, name: str):
        """A context for stack-changing operations: a second one racing the first is refused."""
        daemon = self

        class _Excl:
            def __enter__(self_):
                if daemon.stopping:
                    raise OpError("stopping", "the daemon is stopping; run this again once it is back")
                if daemon.busy is not None:
                    raise OpError("busy", f"cannot {name} while another operation ({daemon.busy}) is in progress; "
                                          "wait for it to finish and try again")
                daemon.busy = name

            def __exit__(self_, *exc):
                daemon.busy = None

        return _Excl()

    async def op_status(self, args, peer):
        fs = self.ws.fs
        return {
            "name": self.ws.name, "base": str(self.ws.base), "mountpoint": str(self.ws.mountpoint),
            "state_dir": str(self.ws.state_dir), "pid": os.getpid(), "uid": os.geteuid(), "dev": self.mount_dev,
            "layers": [layer.id for layer in fs.layers[1:]], "writable": fs.writable(),
            "busy": self.busy, "uptime": time.time() - self.started,
            "quarantined": self.ws.quarantined(),
            "pyfuse3": fusecaps.describe(),
        }

    async def op_push(self, args, peer):
        with self.exclusive("push a layer"):
            return {"layer": await self.ws.push_layer()}

    async def op_drop(self, args, peer):
        count = args.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int):
            raise OpError("bad-request", f"count must be an integer, not {count!r}")
        if count < 1 or count > self.ws.fs.top:
            raise OpError("bad-request", f"cannot drop {count} layer(s): the stack has {self.ws.fs.top}")
        with self.exclusive("drop layers"):
            t0 = time.perf_counter()
            ids = await self.ws.drop_layers(count, reopen=bool(args.get("reopen", False)))
            return {"dropped": ids, "seconds": time.perf_counter() - t0}

    async def op_seal(self, args, peer):
        with self.exclusive("seal the top layer"):
            await self.ws.set_sealed(bool(args.get("sealed", True)))
            return {"writable": self.ws.fs.writable()}

    async def op_shutdown(self, args, peer):
        log.info("shutdown requested by pid %d uid %d", peer["pid"], peer["uid"])
        await self.stop()
        return {"stopping": True}

    async def stop(self) -> None:
        """Refuse new stack operations, let the one in flight finish, then end the FUSE loop."""
        sd_notify("STOPPING=1")
        self.stopping = True
        while self.busy is not None:
            sd_notify(f"STATUS=stopping: waiting for {self.busy}")
            await trio.sleep(0.1)
        if self.saga is not None:
            try:
                await self.saga.flush_audit(essential=True)
            except Exception:
                log.exception("could not journal the audit trail")
        pyfuse3.terminate()

    # ------------------------------------------------------------------ main loop

    async def main(self, ready) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            server = ControlServer(socket_path(self.ws.name), self.dispatch, self.auth)
            await nursery.start(server.run)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(self._watchdog)
            stop = threading.Event()
            reaper = threading.Thread(target=self.ws.reaper_loop, args=(stop,), daemon=True, name="reaper")
            reaper.start()
            nursery.start_soon(self._ready_after_start, ready)
            nursery.start_soon(self.ws.purge_loop)
            if self.saga is not None:
                nursery.start_soon(self.saga.audit_loop)
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=64)
            finally:
                log.info("FUSE loop ended; stopping")
                sd_notify("STOPPING=1")
                stop.set()
                self.ws._reaper_wake.set()
                nursery.cancel_scope.cancel()

    async def _ready_after_start(self, ready) -> None:
        await trio.sleep(0)  # the FUSE loop runs from here: recovery may run commands in the mount
        await trio.to_thread.run_sync(set_readahead, str(self.ws.mountpoint))
        if self.saga is not None:
            sd_notify("STATUS=recovering")
            await self.saga.resume()
        ready()
        sd_notify("READY=1\nSTATUS=mounted")
        log.info("mounted %s over %s", self.ws.mountpoint, self.ws.base)

    async def _signals(self, cancel_scope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                await self.stop()
                return

    async def _watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return
        interval = int(usec) / 1e6 / 2
        while True:
            sd_notify("WATCHDOG=1")
            await trio.sleep(interval)


def run(base: str, mountpoint: str, state_dir: str, name: str, *, allow_other: bool,
        ready_fd: int | None = None, group: str | None = None, debug_fuse: bool = False,
        keep_open_step: bool = False) -> int:
    """Mount and serve until unmounted. Returns the exit status."""
    log.info("overlayd daemon pid %d for %s: %s", os.getpid(), mountpoint, fusecaps.describe())
    def report(msg: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, msg.encode())
                os.close(ready_fd)
            except OSError:
                pass

    # umask 0, for the whole process (a umask is per process, and the FUSE handlers run on many
    # threads): an entry created in a layer must get exactly the mode the kernel passed, which
    # already has the caller's umask applied. Everything else the daemon creates names its
    # mode (state 0700/0600, the socket 0666, runtime and lock directories), and its children
    # get a umask of their own (compensation commands: their registering client's).
    os.umask(0)
    osutil.raise_nofile_limit()
    ws = Workspace(name, base, mountpoint, state_dir)
    claimed = False
    try:
        clear_stale_mount(str(ws.mountpoint))
        try:
            ws.check_paths()
        except UsageError as exc:  # a bad argument: exit 2, which systemd does not restart
            log.error("%s", exc)
            report(f"usage: {exc}\n")
            return 2
        claim(ws, group)  # the locks are held until the process exits
        claimed = True
        from .saga import recover_commit

        ws.open(recover=recover_commit)

        def mark_running(txn):
            crashed = bool(txn.get_meta("running"))
            txn.set_meta("running", True)
            if crashed:
                txn.event("daemon.recovered", pid=os.getpid())
            txn.event("daemon.start", pid=os.getpid())
            return crashed

        crashed = ws.journal.transact(mark_running)
    except (UsageError, OSError, JournalError) as exc:
        log.error("%s", exc)
        report(f"error: {exc}\n")
        ws.close()
        if claimed:
            release_name(name)
        return 1
    options = set(pyfuse3.default_options)
    options |= {f"fsname=overlayd:{name}", "subtype=overlayd"}
    if allow_other:
        options.add("allow_other")
    if debug_fuse:
        options.add("debug")
    daemon = Daemon(ws, allow_other=allow_other, group=group, crashed=crashed)
    from .saga import SagaEngine  # the saga engine plugs its ops into the daemon

    daemon.saga = SagaEngine(daemon, keep_open_step=keep_open_step)
    real_mountpoint = os.path.realpath(ws.mountpoint)
    try:
        pyfuse3.init(ws.fs, str(ws.mountpoint), options)
    except Exception as exc:  # RuntimeError from fuse_session_mount
        log.error("mounting %s failed: %s", ws.mountpoint, exc)
        report(f"error: mounting {ws.mountpoint} failed: {exc}\n")
        ws.close()
        release_name(name)
        return 1
    from .fs import find_fuse_fd

    ws.fs.fuse_fd = find_fuse_fd()
    daemon.mount_dev = mount_dev(real_mountpoint, name)
    status = 0
    try:
        trio.run(daemon.main, lambda: report("ok\n"))
    except BaseException:
        log.exception("daemon failed")
        status = 1
    finally:
        pyfuse3.close(unmount=True)
        try:
            def mark_stopped(txn):
                txn.set_meta("running", False)
                txn.event("daemon.stop", pid=os.getpid())

            ws.journal.transact(mark_stopped)
        except Exception:
            log.exception("could not journal the clean stop")
        ws.close()
        release_name(name)
        log.info("unmounted %s", ws.mountpoint)
    return status
