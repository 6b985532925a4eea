"""``python -m overlayd``: the daemon process started by ``overlayd mount``."""

import argparse
import sys

from . import daemon


def main() -> int:
    p = argparse.ArgumentParser(prog="overlayd-daemon")
    p.add_argument("base")
    p.add_argument("mountpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--group")
    p.add_argument("--log-level", default="info")
    p.add_argument("--keep-open-step", action="store_true")
    p.add_argument("--debug-fuse", action="store_true", help="libfuse's request trace on stderr (tests)")
    a = p.parse_args()
    daemon.setup_logging(a.log_level, a.name)
    return daemon.run(a.base, a.mountpoint, a.state_dir, a.name, allow_other=a.allow_other,
                      ready_fd=a.ready_fd, group=a.group, keep_open_step=a.keep_open_step,
                      debug_fuse=a.debug_fuse)


if __name__ == "__main__":
    sys.exit(main())
