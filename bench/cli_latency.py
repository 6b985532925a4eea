"""How long a ``saga`` command takes end to end, against what no Python CLI can go below: the
interpreter's start (``python -c pass``) and the import of click, interleaved, medians and minima
of several runs. Real daemon, real mount, the installed ``saga`` next to the interpreter.

    python bench/cli_latency.py [--runs 40] [--venv DIR]

The daemon runs from this interpreter (the test venv); the commands measured are those of
``--venv`` (default: this interpreter's). Measure an installed (not editable) package: an
editable install adds its finder's imports (pathlib among them) to every command. A venv with
just click and the package is enough: ``python3 -m venv /tmp/v && /tmp/v/bin/pip install click
&& /tmp/v/bin/pip install --no-deps .``
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Mount  # noqa: E402


def timed(cmd, cwd, env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - t0) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--venv", default=sys.prefix, help="the venv whose saga is measured")
    a = ap.parse_args()
    python = os.path.join(a.venv, "bin", "python")
    saga = os.path.join(a.venv, "bin", "saga")
    if not os.path.exists(saga):
        sys.exit(f"no {saga}: install the package into that venv")
    tmp = Path(tempfile.mkdtemp(prefix="overlayd-bench-", dir="/var/tmp"))
    try:
        base = tmp / "base"
        base.mkdir()
        (base / "seed").write_text("x")
        (tmp / "m").mkdir()
        m = Mount(base, tmp / "m").start()
        try:
            m.call("saga.begin", name="bench")
            m.call("saga.step", name="s1")
            env = {k: v for k, v in m.env.items() if k != "PYTHONPATH"}  # the venv's own install
            rows = {
                "python -c pass": [python, "-c", "pass"],
                "python -c 'import click'": [python, "-c", "import click"],
                "saga status": [saga, "status"],
                "saga --json status": [saga, "--json", "status"],
            }
            times = {k: [] for k in rows}
            for _ in range(a.runs):
                for k, cmd in rows.items():  # interleaved: the machine's noise falls on every row alike
                    times[k].append(timed(cmd, m.mp, env))
        finally:
            m.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'command':28} {'median ms':>10} {'min ms':>8}")
    for k, ts in times.items():
        print(f"{k:28} {statistics.median(ts):10.1f} {min(ts):8.1f}")


if __name__ == "__main__":
    main()
