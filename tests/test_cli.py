"""The CLIs: CliRunner for usage and error paths, real subprocesses against a real daemon."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from overlayd.cli import docs, overlayd_cmd, saga_cmd
from overlayd.client import ClientError, ConflictError, Workspace


def test_cli_docs_are_current():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "CLI.md")
    with open(path) as f:
        assert f.read() == docs.render(), "docs/CLI.md is stale: python -m overlayd.cli.docs > docs/CLI.md"


def test_saga_outside_a_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(saga_cmd.main, ["status"], catch_exceptions=False)
    assert r.exit_code == 5
    assert r.output.startswith(f"Error: {tmp_path} is not inside an overlayd workspace")
    r = CliRunner().invoke(saga_cmd.main, ["status", "--json"], catch_exceptions=False)
    assert r.exit_code == 5
    assert json.loads(r.output)["error"]["exit_code"] == 5


def test_usage_errors():
    r = CliRunner().invoke(saga_cmd.main, ["step"], catch_exceptions=False)
    assert r.exit_code == 2
    r = CliRunner().invoke(saga_cmd.main, ["step", "x", "--timeout", "soon"], catch_exceptions=False)
    assert r.exit_code == 2 and "is not a duration" in r.output
    r = CliRunner().invoke(overlayd_cmd.main, ["mount", "a", "b", "--name", "../evil"], catch_exceptions=False)
    assert r.exit_code == 2 and "invalid workspace name" in r.output


def test_parse_units():
    assert saga_cmd.parse_duration("250ms") == 0.25
    assert saga_cmd.parse_duration("5m") == 300
    assert saga_cmd.parse_size("100M") == 100 << 20
    assert saga_cmd.parse_size("4096") == 4096


#: the workspace of cli_ws: named per test process, since the mount table is the machine's (two suites
#: at once must not find each other's workspace by its name)
WS = f"cliws{os.getpid()}"


#: what the saga CLI must not import: the daemon's world (every saga command pays for its imports)
DAEMON_MODULES = ["trio", "pyfuse3", "lmdb", "overlayd.daemon", "overlayd.layers", "overlayd.engine",
                  "overlayd.runner", "overlayd.commit", "overlayd.journal",
                  # nor the modules of the commands it loads when used (cli.common.Group's lazy)
                  "overlayd.cli.saga_run", "overlayd.cli.saga_diff", "overlayd.cli.saga_resolve",
                  "overlayd.cli.saga_fork"]


@pytest.mark.parametrize("module", DAEMON_MODULES)
def test_the_saga_cli_imports_nothing_of_the_daemon(module):
    """``import cli.saga_cmd`` (all that ``saga status`` imports) pulls in none of the daemon's
    modules; asked of a fresh interpreter."""
    code = f"import sys, cli.saga_cmd; print(any(m == {module!r} or m.startswith({module!r} + '.') for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"import cli.saga_cmd imports {module}"


def sh(m, *args, cwd=None, check=None):
    env = {**m.env, "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or m.mp, env=env,
                       capture_output=True, text=True, timeout=120)
    if check is not None:
        assert r.returncode == check, (args, r.stdout, r.stderr)
    return r


@pytest.fixture
def cli_ws(mount_factory, tmp_path):
    base = tmp_path / "base"
    (base / "src").mkdir(parents=True)
    (base / "src" / "app.py").write_text("print('v1')\n")
    (base / "README").write_text("readme\n")
    return mount_factory(base, name=WS)


def test_end_to_end_cli(cli_ws, tmp_path):
    m = cli_ws
    r = sh(m, "status", check=0)
    assert "no saga is active" in r.stdout
    r = sh(m, "step", "s0", check=1)
    assert r.stderr.strip() == f"Error: no saga is active in {m.mp}; start one with: saga begin NAME"
    sh(m, "begin", "refactor", check=0)
    r = sh(m, "begin", "again", check=1)
    assert "already active" in r.stderr
    sh(m, "step", "edit", "--compensate", f"echo undone > {tmp_path}/undo", check=0)
    (m.mp / "src" / "app.py").write_text("print('v2')\n")
    (m.mp / "NEW").write_text("new\n")
    r = sh(m, "diff", check=0)
    assert "modified  src/app.py" in r.stdout and "+print('v2')" in r.stdout and "added     NEW" in r.stdout
    r = sh(m, "diff", "--name-only", check=0)
    assert r.stdout.split() == ["NEW", "src/app.py"]
    r = sh(m, "--json", "status", check=0)
    st = json.loads(r.stdout)
    assert st["version"] == 1 and st["saga"]["name"] == "refactor" and st["steps"][0]["state"] == "open"
    sh(m, "rollback", check=0)
    assert (tmp_path / "undo").read_text() == "undone\n"
    assert (m.mp / "src" / "app.py").read_text() == "print('v1')\n"
    with pytest.raises(OSError):
        (m.mp / "x").write_text("refused")
    sh(m, "step", "again", check=0)
    (m.mp / "README").write_text("changed\n")
    r = sh(m, "commit", "--dry-run", check=0)
    assert "modified  README" in r.stdout
    sh(m, "commit", check=0)
    assert (m.base / "README").read_text() == "changed\n"
    r = sh(m, "log", "--json", check=0)
    kinds = [json.loads(line)["kind"] for line in r.stdout.splitlines()]
    assert "saga.begin" in kinds and "saga.committed" in kinds
    r = sh(m, "list", check=0)
    assert "'refactor': committed" in r.stdout


def test_read_only_commands_without_daemon(cli_ws):
    m = cli_ws
    sh(m, "begin", "offline", check=0)
    sh(m, "step", "one", check=0)
    (m.mp / "f").write_text("x")
    mp = str(m.mp)
    m.stop()
    # the daemon is down: status, log, list and diff read the journal read-only
    r = sh(m, "-w", mp, "status", cwd="/", check=0)
    assert "saga 1 'offline': active" in r.stdout and "step 1 'one': open" in r.stdout
    assert "daemon not running" in r.stdout
    r = sh(m, "-w", mp, "diff", cwd="/", check=0)
    assert "added     f  (step 1 one)" in r.stdout
    r = sh(m, "-w", mp, "log", "--json", cwd="/", check=0)
    assert [json.loads(x)["kind"] for x in r.stdout.splitlines()][-1] == "daemon.stop"
    r = sh(m, "-w", mp, "list", cwd="/", check=0)
    assert "'offline': active" in r.stdout
    r = sh(m, "-w", mp, "step", "two", cwd="/", check=5)
    assert r.stderr.startswith(f"Error: no daemon serves the workspace {WS}")


def test_offline_diff_is_the_daemons(cli_ws):
    """saga diff without the daemon gives the same changes, given to the same steps, as the
    daemon's (one source: overlayd.commit.changes): a directory created in step 1 and written
    into in step 2 is step 1's change, with last_step 2."""
    m = cli_ws
    sh(m, "begin", "same", check=0)
    sh(m, "step", "one", check=0)
    (m.mp / "d").mkdir()
    (m.mp / "d" / "f").write_text("f")
    sh(m, "step", "two", check=0)
    (m.mp / "d" / "g").write_text("g")
    sh(m, "step", "three", check=0)
    mp = str(m.mp)

    def diff(*args):
        out = json.loads(sh(m, "-w", mp, "diff", "--json", *args, cwd="/", check=0).stdout)
        return sorted(({k: v for k, v in c.items() if k != "process"} for c in out["changes"]),
                      key=lambda c: c["path"])

    online = {args: diff(*args) for args in ((), ("--step", "one"), ("--step", "2"))}
    d = next(c for c in online[()] if c["path"] == "d")
    assert (d["step"], d["step_name"], d["last_step"]) == (1, "one", 2)
    m.stop()
    for args, changes in online.items():
        assert diff(*args) == changes, args
    r = sh(m, "-w", mp, "diff", "--step", "nine", cwd="/", check=1)
    assert "has no live step named 'nine'" in r.stderr


def test_python_client_context_managers(cli_ws):
    m = cli_ws
    ws = Workspace(socket_path=m.socket)
    with ws.saga("client") as s:
        with s.step("one", compensate=["true"]):
            (m.mp / "one").write_text("1")
        with pytest.raises(RuntimeError):
            with s.step("two"):
                (m.mp / "two").write_text("2")
                raise RuntimeError("boom")
        assert not (m.mp / "two").exists()
        with s.step("three"):
            (m.mp / "three").write_text("3")
    assert (m.base / "one").read_text() == "1" and (m.base / "three").read_text() == "3"
    assert not (m.base / "two").exists()
    with pytest.raises(ValueError):
        with ws.saga("aborted") as s:
            with s.step("x"):
                (m.mp / "x").write_text("x")
            raise ValueError("fail")
    assert not (m.base / "x").exists()
    assert ws.status()["saga"] is None


def test_conflict_exit_code(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "shared").write_text("0\n")
    a = mount_factory(base, name="wa")
    b = mount_factory(base, name="wb")
    for m, v in ((a, "a"), (b, "b")):
        sh(m, "begin", f"s{v}", check=0)
        sh(m, "step", "edit", check=0)
        (m.mp / "shared").write_text(v)
    sh(a, "commit", check=0)
    r = sh(b, "commit", check=3)
    assert "conflict: shared" in r.stderr
    assert (base / "shared").read_text() == "a"
    with pytest.raises(ConflictError) as ei:
        Workspace(socket_path=b.socket).call("saga.commit")
    assert [c["path"] for c in ei.value.conflicts] == ["shared"]


def test_overlayd_list(cli_ws):
    m = cli_ws
    sh(m, "begin", "listed", check=0)
    env = {**m.env}
    code = "import sys; from overlayd.cli.overlayd_cmd import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "list", "--json"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # the mount table is the machine's: other suites' and people's workspaces are listed too
    rows = [w for w in json.loads(r.stdout)["workspaces"] if w["state_dir"] and w.get("mountpoint") == str(m.mp)]
    assert [(w["name"], w["mounted"], w["saga"]["name"]) for w in rows] == [(WS, True, "listed")]
    assert rows[0]["disk_bytes"] > 0 and rows[0]["base"] == str(m.base)
    m.stop()
    r = subprocess.run([sys.executable, "-c", code, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"{WS}\tstopped\tlisted (active)" in r.stdout, r.stdout


def test_json_schema_of_every_command(cli_ws, tmp_path):
    """Each command's --json answer carries the keys saga_cmd.JSON_KEYS documents."""
    m = cli_ws

    def js(*args, check=0):
        r = sh(m, *args, "--json", check=check)
        return [json.loads(line) for line in r.stdout.splitlines()]

    def has(cmd, obj):
        missing = set(saga_cmd.JSON_KEYS[cmd]) - set(obj)
        assert not missing and obj["version"] == saga_cmd.SCHEMA, (cmd, missing, obj)

    has("error", js("rollback", check=1)[0])
    has("begin", js("begin", "schema")[0])
    has("step", js("step", "one", "--compensate", "true")[0])
    (m.mp / "x").write_text("x")
    has("status", js("status")[0])
    has("diff", js("diff")[0])
    has("rollback", js("rollback")[0])
    has("step", js("step", "two")[0])
    (m.mp / "y").write_text("y")
    has("commit --dry-run", js("commit", "--dry-run")[0])
    has("commit", js("commit")[0])
    for event in js("log"):
        has("log", event)
    has("list", js("list")[0])
    sh(m, "begin", "aborted", check=0)
    has("abort", js("abort")[0])
    has("gc", js("gc", "--keep", "1")[0])


def od(m, *args, check=None, cwd="/", timeout=120):
    """Run the overlayd command against *m*'s runtime and state directories."""
    code = "import sys; from overlayd.cli.overlayd_cmd import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=m.env, capture_output=True, text=True,
                       timeout=timeout)
    if check is not None:
        assert r.returncode == check, (args, r.stdout, r.stderr)
    return r


def test_unmount_returns_when_the_daemon_exits_not_when_it_is_reaped(cli_ws):
    """The daemon is this test's child and stays a zombie until proc.wait(): unmount must not
    wait for the reaping (PID 1 reaps an 'overlayd mount' daemon, seconds later)."""
    m = cli_ws
    t0 = time.monotonic()
    r = od(m, "unmount", str(m.mp), "--timeout", "10", check=0)
    assert time.monotonic() - t0 < 5, r.stdout
    assert r.stdout.strip() == f"unmounted {m.mp}"
    assert m.proc.wait(timeout=5) == 0
    m.proc = None
    assert not os.path.ismount(m.mp)


def test_usage_errors_with_json_are_json():
    """Errors click finds itself (missing argument, unknown command or option, bad value) print
    the JSON error object when --json is given, like every other error."""
    for group, args in ((saga_cmd.main, ["step", "--json"]), (saga_cmd.main, ["--json", "bogus"]),
                        (saga_cmd.main, ["--json", "step", "x", "--timeout", "soon"]),
                        (saga_cmd.main, ["step", "x", "--retries", "0", "--json"]),
                        (overlayd_cmd.main, ["list", "--json", "--bogus"])):
        r = CliRunner().invoke(group, args, catch_exceptions=False)
        assert r.exit_code == 2, (args, r.output)
        err = json.loads(r.output)
        assert err["version"] == 1 and err["error"]["exit_code"] == 2 and err["error"]["message"], args
    r = CliRunner().invoke(saga_cmd.main, ["--json", "step", "x", "--timeout", "soon"], catch_exceptions=False)
    assert json.loads(r.output)["error"]["message"] == \
        "Invalid value for '--timeout': 'soon' is not a duration (examples: 30s, 5m, 1h, 7d, 250ms)"
    r = CliRunner().invoke(saga_cmd.main, ["bogus"], catch_exceptions=False)  # without --json: click's text
    assert r.exit_code == 2 and "No such command 'bogus'" in r.output and not r.output.startswith("{")


def test_refused_values_are_usage_errors(cli_ws, tmp_path):
    m = cli_ws
    for args in (["step", "x", "--compensate-retries", "0"], ["step", "x", "--max-files", "0"],
                 ["begin", "x", "--max-spins", "0"], ["step", "x", "--compensate-timeout", "0s"]):
        r = CliRunner().invoke(saga_cmd.main, args, catch_exceptions=False)
        assert r.exit_code == 2, (args, r.output)
    r = sh(m, "begin", "a/b", check=2)  # refused by the daemon: bad-name
    assert "invalid saga name 'a/b'" in r.stderr
    sh(m, "begin", "ok", check=0)
    r = sh(m, "step", "x/y", check=2)
    assert "invalid step name 'x/y'" in r.stderr
    r = sh(m, "step", "x", "--timeout", "0s", check=2)  # named by its flag, not by its API name
    assert "Invalid value for '--timeout': must be more than 0" in r.stderr
    r = sh(m, "step", "x", "--max-bytes", "0", check=2)
    assert "Invalid value for '--max-bytes': must be more than 0" in r.stderr
    r = sh(m, "step", "x", "--compensate-timeout", "30d", check=2)
    assert "Invalid value for '--compensate-timeout'" in r.stderr and "compensate_timeout" not in r.stderr
    with pytest.raises(ClientError) as ei:  # the daemon refuses it too (bad-request: exit 2 for the CLI)
        m.call("saga.step", name="x", timeout=0)
    assert ei.value.code == "bad-request"
    (tmp_path / "mp2").mkdir()
    r = od(m, "mount", str(tmp_path / "missing"), str(tmp_path / "mp2"), "--name", "nobase", check=2)
    assert f"base {tmp_path / 'missing'} is not a directory" in r.stderr
    r = od(m, "mount", str(m.base), str(tmp_path / "missing-mp"), "--name", "nomp", check=2)
    assert f"create it with: mkdir -p {tmp_path / 'missing-mp'}" in r.stderr


def test_status_says_how_long_a_compensation_may_still_take(cli_ws, tmp_path):
    m = cli_ws
    flag = tmp_path / "go"
    sh(m, "begin", "slow", check=0)
    sh(m, "step", "hangs", "--compensate", f"while [ ! -e {flag} ]; do sleep 0.05; done",
       "--compensate-timeout", "2m", "--compensate-retries", "2", check=0)
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    env = {**m.env, "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}
    rollback = subprocess.Popen([sys.executable, "-c", code, "rollback"], cwd=m.mp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            r = sh(m, "-w", str(m.mp), "status", cwd="/", check=0)
            if "compensating step" in r.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        line = [x for x in r.stdout.splitlines() if "compensating step" in x][0]
        assert line.startswith("  compensating step 1 'hangs': attempt 1/2 of: while [")
        left = re.search(r"at most (\d+)m(\d+)s left", line)
        assert left and 210 <= int(left[1]) * 60 + int(left[2]) <= 240, line  # 2 x 2m + back-off
        assert "(each attempt is cut after 2m00s)" in line
        st = json.loads(sh(m, "-w", str(m.mp), "status", "--json", cwd="/", check=0).stdout)
        assert st["compensation"]["attempt"] == 1 and st["compensation"]["attempts"] == 2
        r = sh(m, "commit", check=1)
        assert "cannot commit while another operation (roll back) is in progress" in r.stderr
    finally:
        flag.touch()
        out, err = rollback.communicate(timeout=60)
    assert rollback.returncode == 0, err
    assert "compensating" not in sh(m, "status", check=0).stdout


def test_status_after_a_saga_budget_cut_says_why(cli_ws):
    m = cli_ws
    sh(m, "begin", "small", "--max-files", "1", check=0)
    sh(m, "step", "writes", check=0)
    for i in range(3):
        try:
            (m.mp / f"f{i}").write_text("x")
        except OSError:
            break
    deadline = time.monotonic() + 30
    while "no saga is active" not in (r := sh(m, "status", check=0)).stdout:
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.1)
    assert r.stdout.splitlines()[1:] == [
        "  the last one: saga 1 'small': aborted",
        "  step 1 was cut: it changed more than --max-files paths; the whole saga was aborted"]
    assert json.loads(sh(m, "status", "--json", check=0).stdout)["last"]["cut"]["reason"] == "budget:files"


def test_status_of_a_saga_run_stuck_after_its_pivot_says_how_to_resume(cli_ws, tmp_path):
    m = cli_ws
    toml = tmp_path / "pivot.toml"
    toml.write_text('name = "p"\n[[step]]\nname = "publish"\nrun = "true"\ncompensatable = "none"\n'
                    '[[step]]\nname = "after"\nrun = "false"\n')
    r = sh(m, "run", str(toml), "-w", str(m.mp), cwd="/", check=4)
    r = sh(m, "status", check=0)
    assert "saga 1 'p': active" in r.stdout
    line = [x for x in r.stdout.splitlines() if x.startswith("  saga run stuck: ")][0]
    assert f"saga run {toml} -w {m.mp} --resume" in line, r.stdout


def test_remount_hint_is_the_exact_command(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="named", start=False)
    m.state = tmp_path / "elsewhere" / "state"  # a --state-dir of its own
    m.start()
    sh(m, "begin", "kept", check=0)
    mp = str(m.mp)
    m.stop()
    r = sh(m, "-w", mp, "step", "x", cwd="/", check=5)
    assert r.stderr.strip().endswith(
        f"mount it with: overlayd mount {base} {mp} --name named --state-dir {m.state}"), r.stderr
    r = sh(m, "-w", mp, "status", cwd="/", check=0)  # found through the daemons' index: the saga is there
    assert "saga 1 'kept': active" in r.stdout
    rows = json.loads(od(m, "list", "--json", check=0).stdout)["workspaces"]
    assert [(w["name"], w["state"], w["state_dir"], w["saga"]) for w in rows if w["name"] == "named"] == \
        [("named", "stopped", str(m.state), {"id": 1, "name": "kept", "state": "active"})]


def test_default_names_do_not_collide(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    m = mount_factory(base, name="unused", start=False)  # only for its environment
    mps = [tmp_path / "a" / "mnt", tmp_path / "b" / "mnt"]
    for mp in mps:
        mp.mkdir(parents=True)
    try:
        names = []
        for mp in mps + [mps[1]]:
            r = od(m, "mount", str(base), str(mp), check=0)
            names.append(re.search(r"\(workspace (\S+),", r.stdout)[1])
            if names[-1] == "b-mnt" and len(names) == 2:
                od(m, "unmount", str(mp), check=0)  # and again: the same workspace, found by its mountpoint
        assert names == ["mnt", "b-mnt", "b-mnt"]
    finally:
        for mp in mps:
            if os.path.ismount(mp):
                od(m, "unmount", str(mp))


def test_a_dead_mount_is_called_dead_with_the_remedy(cli_ws):
    m = cli_ws
    sh(m, "begin", "crashed", check=0)
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    try:
        r = od(m, "unmount", str(m.mp), check=5)
        assert f"its daemon died and left a dead mount; clear it with: overlayd clear-mount {m.mp}, then mount " \
               f"it again with: overlayd mount {m.base} {m.mp} --name {WS}" in r.stderr
        r = od(m, "list", check=0)
        assert f"{WS}\tdead\tcrashed (active)" in r.stdout
        assert f"overlayd clear-mount {m.mp}" in r.stderr
        r = sh(m, "-w", str(m.mp), "step", "x", cwd="/", check=5)
        assert f"overlayd clear-mount {m.mp}" in r.stderr
        od(m, "clear-mount", str(m.mp), check=0)
        assert f"{WS}\tstopped" in od(m, "list", check=0).stdout
    finally:
        subprocess.run(["fusermount3", "-uz", str(m.mp)], stderr=subprocess.DEVNULL)


def test_commit_json_lists_the_changes_as_dry_run_does(cli_ws):
    m = cli_ws
    sh(m, "begin", "shape", check=0)
    sh(m, "step", "edit", check=0)
    (m.mp / "README").write_text("changed\n")
    (m.mp / "new").write_text("new\n")
    dry = json.loads(sh(m, "commit", "--dry-run", "--json", check=0).stdout)
    done = json.loads(sh(m, "commit", "--json", check=0).stdout)
    assert done["changes"] == dry["changes"] and done["count"] == 2
    assert [(c["path"], c["change"], c["step"], c["step_name"]) for c in done["changes"]] == \
        [("README", "modified", 1, "edit"), ("new", "added", 1, "edit")]


def test_log_of_a_saga_by_name_in_time_order(cli_ws):
    m = cli_ws
    sh(m, "begin", "first", check=0)
    sh(m, "abort", check=0)
    sh(m, "begin", "named", check=0)
    sh(m, "step", "one", check=0)
    (m.mp / "f").write_text("x")
    sh(m, "step", "two", check=0)  # closes step one before its audit batch is journaled
    by_id = sh(m, "log", "2", "--ops", "--json", check=0).stdout
    by_name = sh(m, "log", "named", "--ops", "--json", check=0).stdout
    assert by_id == by_name
    events = [json.loads(x) for x in by_name.splitlines()]
    assert {e["saga"] for e in events} == {2}
    kinds = [(e["kind"], e.get("step")) for e in events]
    assert kinds.index(("op", 1)) < kinds.index(("step.done", 1)), kinds
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    r = sh(m, "log", "nosuch", check=1)
    assert r.stderr.strip() == f"Error: no saga 'nosuch' in {m.mp} (give an id or a name); see: saga list"
    sh(m, "log", "99", check=1)


def test_gc_without_options_keeps_recent_history(cli_ws):
    m = cli_ws
    for i in range(12):
        sh(m, "begin", f"s{i}", check=0)
        sh(m, "abort", check=0)
    r = CliRunner().invoke(saga_cmd.main, ["gc", "--help"], catch_exceptions=False)
    assert "default: 10" in r.output
    r = sh(m, "gc", "--json", check=0)
    assert sorted(json.loads(r.stdout)["sagas"]) == [1, 2]
    assert len(json.loads(sh(m, "list", "--json", check=0).stdout)["sagas"]) == 10
    sh(m, "gc", "--all", "--keep", "3", check=2)
    assert sorted(json.loads(sh(m, "gc", "--all", "--json", check=0).stdout)["sagas"]) == list(range(3, 13))


def test_saga_run_json_ends_with_end_even_when_nothing_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "ok.toml"
    toml.write_text('name = "x"\n[[step]]\nname = "a"\nrun = "true"\n')
    r = CliRunner().invoke(saga_cmd.main, ["run", str(toml), "--json"], catch_exceptions=False)
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert r.exit_code == 5 and lines[0]["error"]["exit_code"] == 5
    assert lines[-1]["event"] == "end" and lines[-1]["exit_code"] == 5 and lines[-1]["status"] == "no-daemon"
    assert "is not inside an overlayd workspace" in lines[-1]["message"]


def test_install_service_warns_of_a_checkout_others_cannot_enter(tmp_path):
    private = tmp_path / "home" / "me"
    (private / "ov" / ".venv" / "bin").mkdir(parents=True)
    private.chmod(0o700)
    exe = private / "ov" / ".venv" / "bin" / "overlayd"
    r = CliRunner().invoke(overlayd_cmd.main, ["install-service", "--root", str(tmp_path / "root"),
                                               "--executable", str(exe)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"note: {private} is mode 0700: other users" in r.output and "/opt/overlayd" in r.output
    r = CliRunner().invoke(overlayd_cmd.main, ["install-service", "--root", str(tmp_path / "root"),
                                               "--executable", "/usr/local/bin/overlayd"], catch_exceptions=False)
    assert r.exit_code == 0 and "note:" not in r.output


def test_shell_completion_of_step_and_saga_names(cli_ws):
    m = cli_ws
    sh(m, "begin", "completing", check=0)
    sh(m, "step", "analyse", check=0)
    sh(m, "step", "migrate", check=0)
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main(prog_name='saga'))"

    def complete(words):
        env = {**m.env, "_SAGA_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split(" ")) - 1)}
        r = subprocess.run([sys.executable, "-c", code], cwd=m.mp, env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return [line.split(",", 1)[1] for line in r.stdout.splitlines()]

    assert complete("saga rollback --to ") == ["analyse", "migrate", "1", "2"]
    assert complete("saga diff --step mi") == ["migrate"]
    assert complete("saga log com") == ["completing"]
    assert "rollback" in complete("saga roll")
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert '_SAGA_COMPLETE=bash_source saga' in readme


def test_diff_of_binary_files_and_modes(cli_ws, monkeypatch):
    m = cli_ws
    (m.base / "blob").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 10)
    (m.base / "tool.sh").write_text("echo hi\n")
    sh(m, "begin", "bin", check=0)
    sh(m, "step", "edit", check=0)
    (m.mp / "blob").write_bytes(b"\x89PNG\r\n\x1a\n\xfe\xff" * 10)  # no NUL byte, not UTF-8
    (m.mp / "tool.sh").chmod(0o755)
    (m.mp / "README").write_text("changed\n")
    r = sh(m, "diff", check=0)
    assert "Binary files a/blob and b/blob differ" in r.stdout and "\ufffd" not in r.stdout
    assert "modified  tool.sh" in r.stdout and "old mode 100644\nnew mode 100755\n" in r.stdout
    assert "\x1b[" not in r.stdout  # no colour into a pipe
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(m.run_dir))
    monkeypatch.setenv("OVERLAYD_STATE_ROOT", str(m.state_root))
    r = CliRunner().invoke(saga_cmd.main, ["-w", str(m.mp), "diff"], color=True, catch_exceptions=False)
    assert "\x1b[31m-readme\x1b[0m" in r.output and "\x1b[32m+changed\x1b[0m" in r.output, r.output


def test_forget_a_workspace(cli_ws, tmp_path):
    m = cli_ws
    sh(m, "begin", "unfinished", check=0)
    r = od(m, "forget", WS, check=1)
    assert f"workspace {WS} is mounted at {m.mp}: unmount it first" in r.stderr
    m.stop()
    (m.run_dir / f"{WS}.sock.run.lock").write_text("")  # as an old saga run left it
    r = od(m, "forget", WS, check=1)
    assert f"saga 1 'unfinished' is active in workspace {WS}: commit or abort it first" in r.stderr
    assert (m.state / "journal").is_dir()
    r = od(m, "forget", WS, "--force", check=0)
    assert r.stdout.strip() == f"forgot workspace {WS} (removed {m.state})"
    assert not m.state.exists() and not (m.run_dir / f"{WS}.sock.run.lock").exists()
    assert not (m.state_root / ".index" / f"{WS}.json").exists()
    assert WS not in od(m, "list", check=0).stdout
    assert (m.base / "README").read_text() == "readme\n"
    od(m, "forget", WS, check=1)


def test_a_failed_first_mount_leaves_no_state(cli_ws, tmp_path):
    m = cli_ws
    (tmp_path / "mp2").mkdir()
    od(m, "mount", str(tmp_path / "missing"), str(tmp_path / "mp2"), "--name", "failed", check=2)
    assert not (m.state_root / "failed").exists()
    assert "\nfailed\t" not in od(m, "list", check=0).stdout


def test_saga_run_removes_its_lock_file(cli_ws, tmp_path):
    m = cli_ws
    toml = tmp_path / "one.toml"
    toml.write_text('name = "one"\n[[step]]\nname = "a"\nrun = "touch a"\n')
    r = sh(m, "run", str(toml), "-w", str(m.mp), cwd="/", check=0)
    assert "all 1 steps done; saga 1 'one' committed: 1 change(s)" in r.stdout and (m.base / "a").exists()
    assert not (m.run_dir / f"{WS}.sock.run.lock").exists()
