"""How much of ended sagas' space `saga gc` gives back: state directory size before the sagas,
after 20 ended sagas (each 500 files, their audit trail and journal records), and after gc.

    python bench/gc_reclaim.py
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Mount  # noqa: E402


def usage(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def main():
    tmp = Path(tempfile.mkdtemp(prefix="overlayd-gc-", dir="/var/tmp"))
    try:
        base = tmp / "base"
        base.mkdir()
        (tmp / "m").mkdir()
        m = Mount(base, tmp / "m", name="gc").start()
        try:
            m.call("saga.begin", name="warmup")
            m.call("saga.abort")
            time.sleep(0.5)
            before = usage(m.state)
            for i in range(20):
                m.call("saga.begin", name=f"s{i}")
                m.call("saga.step", name="w")
                for j in range(500):
                    (m.mp / f"f{j}").write_bytes(b"x" * 2000)
                m.call("saga.abort")
            time.sleep(1.0)  # the reaper empties the trash
            full = usage(m.state)
            r = m.call("saga.gc", keep=0)
            after = usage(m.state)
        finally:
            m.stop()
        grown = full - before
        print(f"state dir: {before} B before, {full} B after 20 ended sagas, {after} B after gc; "
              f"journal {r['journal_before']} -> {r['journal_after']} B; "
              f"reclaimed {100 * (full - after) / grown:.1f}% of the ended sagas' {grown} B")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
