"""The daemon process (``python -m overlayd``, started by ``overlayd mount`` or systemd).

- main: Daemon (one root nursery, reverse-order teardown) and run() (claim, recover, mount)
- wire: control operations -> handlers, domain errors -> replies
- control: the control socket server (SO_PEERCRED, bounded frames; protocol in overlayd.protocol)
- workspace: the state directory, the journal, the stack of layers (push, drop, seal, reaper)
- claim: locks on the workspace's name and mountpoint, dead mounts, the mount's device
- systemd: sd_notify, the watchdog, journald log lines
"""

from .main import Daemon, run
from .systemd import setup_logging

__all__ = ["Daemon", "run", "setup_logging"]
