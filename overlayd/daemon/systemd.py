"""systemd and journald: ``<N>`` priority prefixes on log lines, sd_notify (READY, STOPPING,
STATUS), and the watchdog's keep-alive."""

import logging
import os
import socket
import sys

import trio

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


async def watchdog() -> None:
    """WATCHDOG=1 at half the interval systemd asked for (WatchdogSec=), if it asked us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    interval = int(usec) / 1e6 / 2
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)
