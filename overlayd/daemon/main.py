"""The daemon: mount the workspace, serve FUSE and the control socket in one trio nursery.

Run by ``overlayd mount`` (which waits on a readiness pipe) or by systemd
(``overlayd mount --foreground``, Type=notify). Everything runs under one root nursery, set
up in an AsyncExitStack so that teardown runs in reverse order: the FUSE loop ends, the
reaper thread stops, then the nursery (control server, engine, signals, watchdog) is
cancelled.
"""

import contextlib
import logging
import os
import signal
import threading
import time

import pyfuse3
import trio

from overlayd.journal import JournalError

from .. import fusecaps, osutil
from ..commit.run import recover_commit
from ..engine.core import SagaEngine
from ..engine.errors import EngineError
from ..engine.lock import StackLock
from ..layers import find_fuse_fd
from ..layers.basewatch import BaseWatch
from ..paths import UsageError, socket_path
from .claim import claim, clear_stale_mount, mount_dev, release_name, set_readahead
from .control import Authorizer, ControlServer
from .systemd import sd_notify, watchdog
from .wire import Wire
from .workspace import Workspace

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, ws: Workspace, *, allow_other: bool, group: str | None = None, crashed: bool = False,
                 keep_open_step: bool = False):
        self.ws = ws
        self.crashed = crashed  # the previous daemon did not stop cleanly
        self.allow_other = allow_other
        self.auth = Authorizer(os.getuid(), group)
        self.lock = StackLock()  # one stack operation at a time: ours and the engine's
        self.started = time.time()
        self.mount_dev = None  # "MAJOR:MINOR" of the mount: clients check they reach the right daemon
        self.engine = SagaEngine(ws, self.lock, keep_open_step=keep_open_step)
        self.wire = Wire(ws.state_dir)
        self.wire.add({
            "status": self.op_status,
            "layer.push": self.op_push,
            "layer.drop": self.op_drop,
            "layer.seal": self.op_seal,
            "shutdown": self.op_shutdown,
        })
        self.wire.add(self.engine.ops)

    # ------------------------------------------------------------------ control ops

    async def op_status(self, args, peer):
        fs = self.ws.fs
        return {
            "name": self.ws.name, "base": str(self.ws.base), "mountpoint": str(self.ws.mountpoint),
            "state_dir": str(self.ws.state_dir), "pid": os.getpid(), "uid": os.geteuid(), "dev": self.mount_dev,
            "layers": [layer.id for layer in fs.layers[1:]], "writable": fs.writable(),
            "busy": self.lock.busy, "uptime": time.time() - self.started,
            "quarantined": self.ws.quarantined(),
            "pyfuse3": fusecaps.describe(),
            "base_view": fs.base_watch.mode if fs.base_watch is not None else None,
            "memory": fs.memory_stats(),
        }

    async def op_push(self, args, peer):
        with self.lock.hold("push a layer"):
            return {"layer": await self.ws.push_layer()}

    async def op_drop(self, args, peer):
        count = args.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int):
            raise EngineError("bad-request", f"count must be an integer, not {count!r}")
        if count < 1 or count > self.ws.fs.top:
            raise EngineError("bad-request", f"cannot drop {count} layer(s): the stack has {self.ws.fs.top}")
        with self.lock.hold("drop layers"):
            t0 = time.perf_counter()
            ids = await self.ws.drop_layers(count, reopen=bool(args.get("reopen", False)))
            return {"dropped": ids, "seconds": time.perf_counter() - t0}

    async def op_seal(self, args, peer):
        with self.lock.hold("seal the top layer"):
            await self.ws.set_sealed(bool(args.get("sealed", True)))
            return {"writable": self.ws.fs.writable()}

    async def op_shutdown(self, args, peer):
        log.info("shutdown requested by pid %d uid %d", peer["pid"], peer["uid"])
        await self.stop()
        return {"stopping": True}

    async def stop(self) -> None:
        """Refuse new stack operations, let the one in flight finish, then end the FUSE loop."""
        sd_notify("STOPPING=1")
        self.lock.stopping = True
        if self.lock.busy is not None:
            sd_notify(f"STATUS=stopping: waiting for {self.lock.busy}")
        await self.lock.wait_idle()
        try:
            await self.engine.audit.flush(essential=True)
        except Exception:
            log.exception("could not journal the audit trail")
        pyfuse3.terminate()

    # ------------------------------------------------------------------ main loop

    @contextlib.contextmanager
    def _reaper(self):
        """The thread that deletes dropped layers (Workspace.reaper_loop), stopped on exit."""
        stop = threading.Event()
        reaper = threading.Thread(target=self.ws.reaper_loop, args=(stop,), daemon=True, name="reaper")
        reaper.start()
        try:
            yield
        finally:
            stop.set()
            self.ws.wake_reaper()

    async def main(self, ready) -> None:
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            stack.callback(nursery.cancel_scope.cancel)  # last: the control server, the engine, ...
            await nursery.start(ControlServer(socket_path(self.ws.name), self.wire.dispatch, self.auth).run)
            nursery.start_soon(self._signals)
            nursery.start_soon(watchdog)
            stack.enter_context(self._reaper())
            nursery.start_soon(self.ws.purge_loop)
            watch = BaseWatch(self.ws.fs)  # a live view of the base (inotify), or revalidation
            stack.callback(watch.close)
            nursery.start_soon(watch.run)
            await nursery.start(self.engine.run)
            nursery.start_soon(self._ready_after_start, ready)
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=64)
            finally:
                log.info("FUSE loop ended; stopping")
                sd_notify("STOPPING=1")

    async def _ready_after_start(self, ready) -> None:
        await trio.sleep(0)  # the FUSE loop runs from here: recovery may run commands in the mount
        await trio.to_thread.run_sync(set_readahead, str(self.ws.mountpoint))
        sd_notify("STATUS=recovering")
        await self.engine.resume(self.crashed)
        ready()
        sd_notify("READY=1\nSTATUS=mounted")
        log.info("mounted %s over %s", self.ws.mountpoint, self.ws.base)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                await self.stop()
                return


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
    daemon = Daemon(ws, allow_other=allow_other, group=group, crashed=crashed, keep_open_step=keep_open_step)
    real_mountpoint = os.path.realpath(ws.mountpoint)
    try:
        pyfuse3.init(ws.fs, str(ws.mountpoint), options)
    except Exception as exc:  # RuntimeError from fuse_session_mount
        log.error("mounting %s failed: %s", ws.mountpoint, exc)
        report(f"error: mounting {ws.mountpoint} failed: {exc}\n")
        ws.close()
        release_name(name)
        return 1
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
        daemon.engine.close()
        ws.close()
        release_name(name)
        log.info("unmounted %s", ws.mountpoint)
    return status
