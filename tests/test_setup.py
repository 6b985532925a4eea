"""The setup scripts, run for real: scripts/quickstart.sh twice, scripts/install.sh's failures."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the virtualenv running the tests: already installed


def _env(tmp_path, **extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OVERLAYD_STATE_ROOT": str(tmp_path / "state"),
            "RUNTIME_DIRECTORY": str(tmp_path / "run"), **extra}


def test_quickstart_twice(tmp_path):
    base, mp = tmp_path / "base", tmp_path / "qs mnt"
    base.mkdir()
    (base / "f").write_text("x\n")
    env = _env(tmp_path, OVERLAYD_SKIP_INSTALL="1", OVERLAYD_VENV=str(VENV))
    cmd = [str(ROOT / "scripts" / "quickstart.sh"), str(base), str(mp)]
    try:
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        assert f"mounted {mp} (workspace" in first.stdout and os.path.ismount(mp)
        assert f'export PATH="{VENV}/bin:$PATH"' in first.stdout
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert f"already mounted: {mp}" in second.stdout
        assert (mp / "f").read_text() == "x\n"
    finally:
        if os.path.ismount(mp):
            r = subprocess.run([str(VENV / "bin" / "overlayd"), "unmount", str(mp)], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr


def _fake_venv(tmp_path, fail_on):
    """A virtualenv whose pip fails (with pip's kind of message) when its arguments contain *fail_on*."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    pip = venv / "bin" / "pip"
    pip.write_text("#!/bin/sh\n"
                   f"case \"$*\" in *'{fail_on}'*) echo 'ERROR: Could not find a version that satisfies the "
                   "requirement pip (from versions: none)' >&2; exit 1;; esac\n"
                   f"echo \"$*\" >> {tmp_path}/pip-calls\n")
    pip.chmod(0o755)
    return venv


def test_install_fails_early_when_pip_cannot_upgrade(tmp_path):
    venv = _fake_venv(tmp_path, "--upgrade pip")
    r = subprocess.run([str(ROOT / "scripts" / "install.sh")], env={**os.environ, "OVERLAYD_VENV": str(venv)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"scripts/install.sh: upgrading pip in {venv} failed:" in r.stderr
    assert "Could not find a version that satisfies the requirement pip" in r.stderr
    assert "package index" in r.stderr
    assert not (tmp_path / "pip-calls").exists()  # nothing ran after the failed step


def test_install_says_which_step_failed(tmp_path):
    venv = _fake_venv(tmp_path, "-e")
    r = subprocess.run([str(ROOT / "scripts" / "install.sh"), "--test"],
                       env={**os.environ, "OVERLAYD_VENV": str(venv), "OVERLAYD_STOCK_PYFUSE3": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"installing overlayd into {venv} (pip install -e .[test]) failed:" in r.stderr
    assert "pyfuse3==3.5.0" in (tmp_path / "pip-calls").read_text()  # stock, as asked


def test_install_says_when_the_pyfuse3_sdist_is_missing(tmp_path):
    venv = _fake_venv(tmp_path, "download")
    r = subprocess.run([str(ROOT / "scripts" / "install.sh")], env={**os.environ, "OVERLAYD_VENV": str(venv)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "scripts/install.sh: downloading the sdist of pyfuse3 3.5.0 failed:" in r.stderr
    assert not (venv / ".pyfuse3-build").exists()


def test_readme_points_at_sections_that_exist():
    """README's references to docs/ARCHITECTURE.md sections, and the known gaps it promises."""
    import re

    readme = (ROOT / "README.md").read_text()
    arch = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    headings = set(re.findall(r"^#+ (.+)$", arch, re.M))
    refs = re.findall(r'`docs/ARCHITECTURE\.md` \("([^"]+)"\)', readme)
    assert "Known gaps" in refs
    assert set(refs) <= headings, set(refs) - headings
    gaps = arch.split("## Known gaps", 1)[1].split("\n## ", 1)[0]
    for topic in ("mknod", "fallocate", "behind the daemon's back", "mounted inside the base"):
        assert topic in gaps, topic


def test_readme_first_saga_runs_as_written(tmp_path):
    """The README's quick start and first saga, command by command (the demo directory moved
    to tmp_path): from nothing to a committed saga."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Your first saga, on the demo tree:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    demo = tmp_path / "demo"
    env = _env(tmp_path, OVERLAYD_SKIP_INSTALL="1", OVERLAYD_VENV=str(VENV), OVERLAYD_DEMO_DIR=str(demo),
               PATH=f"{VENV}/bin:{os.environ['PATH']}")
    r = subprocess.run([str(ROOT / "scripts" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        script = "set -euo pipefail\n" + block.replace("/tmp/overlayd-demo", str(demo))
        r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert (demo / "base" / "src" / "hello.py").read_text() == 'print("hello from a saga")\n'
        assert r.stdout.rstrip().endswith(f"unmounted {demo / 'mnt'}")
    finally:
        if os.path.ismount(demo / "mnt"):
            subprocess.run(["fusermount3", "-uz", str(demo / "mnt")])
