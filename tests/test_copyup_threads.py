"""A large copy-up runs in a worker thread: the mount keeps answering meanwhile (issue 18).

The base holds a 256 MiB file (real data, not sparse). A process opens it for writing through
the mount, which copies it up; the daemon's copy is held for a few seconds in its worker thread
(``OVERLAYD_STALL_AT=copyup:S``, a sleep at the start of the thread's work) so that the window
is known without timing the machine. While it runs, this process stats, lists and reads other
files of the mount, and another process changes the same file. The assertions are on the order
of events, never on durations: every request on other files finishes before the writer's open
returns, and the request on the same file returns only once the copy is in place.
"""

import os
import subprocess
import sys
import time

import pytest

from test_saga import O_NF, read

SIZE = 256 << 20
STALL = 4.0


@pytest.fixture
def big_base(tmp_path):
    base = tmp_path / "base"
    (base / "big").mkdir(parents=True)
    chunk = bytes(range(256)) * 4096  # 1 MiB, written 256 times: every block allocated
    fd = os.open(base / "big" / "f", os.O_WRONLY | os.O_CREAT | O_NF, 0o644)
    try:
        for i in range(SIZE // len(chunk)):
            os.write(fd, chunk[i % 256:] + chunk[:i % 256])
    finally:
        os.close(fd)
    (base / "small").mkdir()
    for i in range(50):
        (base / "small" / f"s{i}").write_text(f"small {i}\n")
    return base


def child(code: str) -> subprocess.Popen:
    """A Python process that prints 'start', runs *code*, then prints 'done'."""
    script = "import os, sys\nprint('start', flush=True)\n" + code + "\nprint('done', flush=True)\n"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def wait_for(pred, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_requests_for_other_files_complete_while_a_large_copy_up_runs(mount_factory, big_base, monkeypatch):
    monkeypatch.setenv("OVERLAYD_STALL_AT", f"copyup:{STALL}")
    m = mount_factory(big_base)
    layer = m.state / "layers" / m.push()
    target = m.mp / "big" / "f"
    writer = child(f"fd = os.open({str(target)!r}, os.O_WRONLY | os.O_NOFOLLOW)\nos.pwrite(fd, b'W', 0)\nos.close(fd)")
    try:
        assert writer.stdout.readline().strip() == "start"
        # the copy-up is prepared on the event loop (its parent directory is made in the layer)
        # before its data moves in the thread
        wait_for(lambda: (layer / "big").is_dir(), "the copy-up to begin")
        same = child(f"os.chmod({str(target)!r}, 0o600)\n"
                     f"st = os.stat({str(layer / 'big' / 'f')!r})\n"
                     f"print('layer', st.st_size, st.st_blocks * 512 >= {SIZE}, flush=True)")
        assert same.stdout.readline().strip() == "start"
        done = 0
        for round_ in range(20):
            for i in range(50):
                os.stat(m.mp / "small" / f"s{i}")
                done += 1
            assert len(os.listdir(m.mp / "small")) == 50
            assert read(m.mp / "small" / f"s{round_}") == f"small {round_}\n".encode()
        # every one of those requests was answered while the writer's open was still waiting
        assert writer.poll() is None, "the copy-up finished before the other requests"
        assert done == 1000
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0 and out.split() == ["done"]
        out, _ = same.communicate(timeout=120)
        # the chmod of the same file waited for its copy: it found the full copy in the layer
        assert same.returncode == 0 and out.split() == ["layer", str(SIZE), "True", "done"]
    finally:
        for p in (writer, *([same] if 'same' in locals() else [])):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert os.stat(target).st_size == SIZE
    assert os.stat(target).st_mode & 0o777 == 0o600
    with open(target, "rb") as f:
        head = f.read(4096)
        f.seek(SIZE - 4096)
        tail = f.read(4096)
    chunk = bytes(range(256)) * 4096
    assert head == b"W" + chunk[1:4096]
    last = chunk[255:] + chunk[:255]
    assert tail == last[-4096:]
    with open(big_base / "big" / "f", "rb") as f:
        assert f.read(1) == b"\0"  # the base is never written
