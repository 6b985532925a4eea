"""Saga definitions (overlayd/runner/, ``saga run``): validation, the five-step refactor of
a real small Python project, failure policies, pivots, and resume after SIGKILL of the runner
or of the daemon. ``saga run`` runs as a subprocess against a real daemon."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tree_digest
from overlayd import runner as definitions
from overlayd.runner import Workspace, run_definition
from overlayd.runner import DefinitionError, RunFailed, kill_token, parse
from treecmp import diff, snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "scripts" / "refactor.py"
STEPS = ["analyse", "create-structure", "migrate-functions", "update-imports", "run-tests"]


# ---------------------------------------------------------------------- helpers


def env_of(m):
    return {**m.env, "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"], "OVERLAYD_BACKOFF": "0.01"}


def saga_cmd(m, *args, cwd=None, timeout=120):
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or m.tmp, env=env_of(m),
                          capture_output=True, text=True, timeout=timeout)


def saga_run(m, toml, *args, check=None, timeout=120):
    r = saga_cmd(m, "run", str(toml), "-w", str(m.mp), *args, timeout=timeout)
    if check is not None:
        assert r.returncode == check, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def start_saga_run(m, toml, *args, out=None):
    code = "import sys; from overlayd.cli.saga_cmd import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "run", str(toml), "-w", str(m.mp), *args], cwd=m.tmp,
                            env=env_of(m), stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(path, proc=None, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the runner exited ({proc.returncode}) before {path} appeared")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def build_project(root: Path) -> Path:
    """A small Python package with a unittest suite: geom (shapes), tests, a command line."""
    files = {
        "geom/__init__.py": '"""geom: areas and perimeters."""\n',
        "geom/core.py": '''\
            """The core of geom."""

            import math


            def square_area(a):
                return a * a


            def circle_area(r):
                return math.pi * r * r


            def rectangle_perimeter(a, b):
                return 2 * (a + b)


            def describe(x):
                """How geom shows a number."""
                return f"{x:.2f}"
            ''',
        "geom/cli.py": '''\
            import sys

            from geom.core import circle_area, describe, square_area


            def main(argv=None):
                shape, size = (argv or sys.argv[1:])[:2]
                f = {"square": square_area, "circle": circle_area}[shape]
                print(describe(f(float(size))))
            ''',
        "tests/__init__.py": "",
        "tests/test_geom.py": '''\
            import io
            import math
            import unittest
            from contextlib import redirect_stdout

            from geom.cli import main
            from geom.core import circle_area, describe, rectangle_perimeter, square_area


            class TestGeom(unittest.TestCase):
                def test_areas(self):
                    self.assertEqual(square_area(3), 9)
                    self.assertAlmostEqual(circle_area(1), math.pi)
                    self.assertEqual(rectangle_perimeter(2, 3), 10)

                def test_cli(self):
                    out = io.StringIO()
                    with redirect_stdout(out):
                        main(["square", "2"])
                    self.assertEqual(out.getvalue(), "4.00\\n")
                    self.assertEqual(describe(1), "1.00")
            ''',
        "README.md": "# geom\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-B", "-m", "unittest", "discover", "-s", "tests", "-t", ".", "-q"],
                   cwd=root, check=True, capture_output=True)
    return root


def refactor_toml(path: Path, log: Path, *, fail_step4=False, block=None) -> Path:
    """The five-step refactor of build_project's package; every compensation appends to *log*.

    *block*: (marker, started): step 3, after migrating, waits while *marker* exists (having
    created *started*), so that a test can crash something in the middle of step 3."""
    s = f'python3 "{SCRIPT}"'
    comp = f"echo \"undo $STEP_NAME\" >> '{log}'"
    step3 = f"{s} migrate .refactor/plan.json"
    if block:
        marker, started = block
        step3 += f"\nif [ -e '{marker}' ]; then touch '{started}'; while [ -e '{marker}' ]; do sleep 0.05; done; fi"
    step4 = f"{s} imports .refactor/plan.json"
    if fail_step4:
        step4 += "\necho 'simulated failure of the import rewriter' >&2\nexit 3"
    path.write_text(f"""\
name = "refactor-geom"

[[step]]
name = "analyse"
run = '{s} analyse geom/core.py geom/shapes/area.py .refactor/plan.json --keep describe'
compensate = '''{comp}'''
timeout = "1m"

[[step]]
name = "create-structure"
run = '{s} create .refactor/plan.json'
compensate = '''{comp}'''
max_files = 10

[[step]]
name = "migrate-functions"
run = '''
{step3}
'''
compensate = '''{comp}'''
max_bytes = "1M"

[[step]]
name = "update-imports"
run = '''
{step4}
'''
compensate = '''{comp}'''

[[step]]
name = "run-tests"
run = "python3 -m unittest discover -s tests -t . -q"
env = {{ PYTHONDONTWRITEBYTECODE = "1" }}
compensate = '''{comp}'''
timeout = "5m"
""")
    return path


def expected_refactor(project: Path, dst: Path) -> Path:
    """The refactor done by hand on a plain copy: what a successful run must commit."""
    subprocess.run(["cp", "-a", str(project), str(dst)], check=True)
    for args in (["analyse", "geom/core.py", "geom/shapes/area.py", ".refactor/plan.json", "--keep", "describe"],
                 ["create", ".refactor/plan.json"], ["migrate", ".refactor/plan.json"],
                 ["imports", ".refactor/plan.json"]):
        subprocess.run([sys.executable, str(SCRIPT), *args], cwd=dst, check=True, capture_output=True)
    return dst


def assert_same_tree(actual, expected, what):
    lines = diff(snapshot(expected), snapshot(actual))
    assert not lines, f"{what}:\n" + "\n".join(lines[:40])


def log_lines(log: Path):
    return log.read_text().splitlines() if log.exists() else []


def annotations(m, saga_id=None):
    sagas = m.call("saga.list")["sagas"]
    rec = sagas[-1] if saga_id is None else [s for s in sagas if s["id"] == saga_id][0]
    return rec, rec.get("annotations") or {}


@pytest.fixture
def project(tmp_path):
    return build_project(tmp_path / "project")


@pytest.fixture
def expected(project, tmp_path):
    return expected_refactor(project, tmp_path / "expected")


# ---------------------------------------------------------------------- validation


def test_validation_reports_line_step_and_key():
    text = textwrap.dedent("""\
        name = "v"
        colour = "red"

        [[step]]
        name = "a"
        run = "true"
        retires = 3
        timeout = "5 minutes"

        [[step]]
        name = "a"
        run = 5
        compensatable = "never"

        [[step]]
        name = "c"
        run = "x"
        compensatable = "none"
        compensate = "y"
        max_bytes = "lots"
        env = { "1BAD" = "x" }
        """)
    with pytest.raises(DefinitionError) as ei:
        parse(text, file="v.toml")
    got = [p.format("v.toml") for p in ei.value.problems]
    assert got[0].startswith("v.toml:2: colour: unknown key")
    assert "v.toml:7: step 1 'a': retires: unknown key (did you mean 'retries'?)" in got[1]
    assert got[2] == ("v.toml:8: step 1 'a': timeout: '5 minutes' is not a duration "
                      "(examples: 30s, 5m, 1h, 7d, 250ms)")
    assert "v.toml:11: step 2 'a': name: duplicate step name: step 1 is also called 'a'" in got
    assert "v.toml:12: step 2 'a': run: 5 is not a string (a shell command)" in got
    assert any(g.startswith("v.toml:13: step 2 'a': compensatable: 'never' is not one of") for g in got)
    assert any(g.startswith("v.toml:19: step 3 'c': compensate: compensatable = \"none\"") for g in got)
    assert any(g.startswith("v.toml:20: step 3 'c': max_bytes: 'lots' is not a size") for g in got)
    assert any(g.startswith("v.toml:21: step 3 'c': env: '1BAD'") for g in got)
    assert len(got) == 9, got

    with pytest.raises(DefinitionError) as ei:
        parse('name = "x"\n\n[[step]\nname = "a"\n', file="s.toml")
    assert ei.value.problems[0].format("s.toml").startswith("s.toml:3:7: invalid TOML: ")
    with pytest.raises(DefinitionError) as ei:
        parse('name = "x"\nstep = []\n')
    assert "the definition has no steps" in str(ei.value)
    with pytest.raises(DefinitionError) as ei:
        parse('[[step]]\nrun = "true"\n')
    msgs = str(ei.value)
    assert "name: missing: the saga's name" in msgs and "step 1: name: missing" in msgs
    with pytest.raises(DefinitionError) as ei:
        parse('name = "x"\n[[step]]\nname = "a/b"\nrun = "true"\non_failure = "retry"\nretries = 0\n')
    msgs = str(ei.value)
    assert "invalid step name 'a/b'" in msgs and "retries: on_failure = \"retry\" needs retries >= 1" in msgs
    d = parse('name = "x"\n[[step]]\nname = "a"\nrun = "true"\non_failure = "retry"\ntimeout = 90\n'
              'max_bytes = "2M"\n')
    assert d.steps[0].retries == 2 and d.steps[0].timeout == 90.0 and d.steps[0].max_bytes == 2 << 20
    for f in EXAMPLES.glob("*.toml"):
        definitions.load(f)  # the examples are valid


def test_invalid_definition_runs_nothing(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n\n[[step]]\nname = "one"\nrun = "touch ONE"\n\n'
                   '[[step]]\nname = "two"\nrun = "touch TWO"\nretires = 2\n')
    r = saga_run(m, bad, check=2)
    assert f"{bad}:10: step 2 'two': retires: unknown key (did you mean 'retries'?)" in r.stderr
    r = saga_run(m, bad, "--json", check=2)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    err = lines[0]["error"]
    assert err["exit_code"] == 2 and err["problems"][0]["line"] == 10 and err["problems"][0]["key"] == "retires"
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "invalid" and lines[-1]["exit_code"] == 2
    bad.write_text('name = "bad"\n[[step]]\nname = "one"\nrun = "touch ONE"\n[[step]]\nname = "one"\nrun = "x"\n')
    r = saga_run(m, bad, check=2)
    assert f"{bad}:6: step 2 'one': name: duplicate step name" in r.stderr
    bad.write_text('name = "bad"\n[[step]]\nname = "one"\nrun = "touch ONE\n')
    r = saga_run(m, bad, check=2)
    assert f"{bad}:4:" in r.stderr and "invalid TOML" in r.stderr
    assert m.call("saga.list")["sagas"] == []
    assert not (m.mp / "ONE").exists()
    bad.write_text('name = "fine"\n[[step]]\nname = "one"\nrun = "touch ONE"\n')
    m.stop()
    r = saga_run(m, bad, check=5)
    assert "no daemon serves the workspace" in r.stderr


# ---------------------------------------------------------------------- the five-step refactor


def test_refactor_commits_exactly_the_expected_changes(mount_factory, project, expected, tmp_path):
    m = mount_factory(project, name="defs")
    log = tmp_path / "undo.log"
    toml = refactor_toml(tmp_path / "refactor.toml", log)
    t0 = time.monotonic()
    r = saga_run(m, toml, "--json", check=0)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(e["version"] == 1 for e in events)
    kinds = [e["event"] for e in events if e["event"] != "step.progress"]
    assert kinds == ["saga.begin"] + ["step.start", "step.done"] * 5 + ["committed", "end"], kinds
    assert [e["step"] for e in events if e["event"] == "step.done"] == STEPS
    assert events[-1]["status"] == "committed" and events[-1]["exit_code"] == 0
    done = [e for e in events if e["event"] == "step.done"]
    assert "moved 3 function(s)" in done[2]["tail"] and done[2]["files"] >= 2
    assert_same_tree(project, expected, "the committed base")
    assert "from geom.shapes.area import circle_area, square_area" in (project / "geom" / "cli.py").read_text()
    assert not (project / "geom" / "__pycache__").exists()
    assert log_lines(log) == []
    rec, ann = annotations(m)
    assert rec["state"] == "committed" and rec["name"] == "refactor-geom"
    assert ann["definition"]["sha256"] == definitions.load(toml).sha256
    assert ann["definition"]["text"] == toml.read_text()
    assert [ann["outcomes"][s]["status"] for s in STEPS] == ["ok"] * 5
    assert ann["runner"]["phase"] == "committing"
    print(f"five-step refactor: {time.monotonic() - t0:.2f}s")


def test_refactor_failing_step4_leaves_base_untouched(mount_factory, project, tmp_path):
    digest = tree_digest(project)
    original = snapshot(project)
    m = mount_factory(project, name="defs")
    log = tmp_path / "undo.log"
    toml = refactor_toml(tmp_path / "refactor.toml", log, fail_step4=True)
    r = saga_run(m, toml, check=1)
    assert "[4/5] update-imports: FAILED (exit status 3)" in r.stdout
    assert "simulated failure of the import rewriter" in r.stdout
    assert "every step is compensated and the saga is aborted: the base is untouched" in r.stderr
    # step 4's failed attempt, then 3, 2, 1: newest first
    assert log_lines(log) == ["undo update-imports", "undo migrate-functions", "undo create-structure",
                              "undo analyse"]
    assert tree_digest(project) == digest
    lines = diff(original, snapshot(m.mp))
    assert not lines, "the view is not the original tree:\n" + "\n".join(lines)
    rec, ann = annotations(m)
    assert rec["state"] == "aborted"
    assert ann["outcomes"]["update-imports"]["status"] == "failed"
    assert ann["outcomes"]["update-imports"]["exit_status"] == 3
    assert [ann["outcomes"][s]["status"] for s in STEPS[:3]] == ["compensated"] * 3
    assert "run-tests" not in ann["outcomes"]
    assert m.call("saga.status")["saga"] is None


def test_sigkill_runner_during_step3_then_resume(mount_factory, project, expected, tmp_path):
    m = mount_factory(project, name="defs")
    log = tmp_path / "undo.log"
    marker, started = tmp_path / "block", tmp_path / "started"
    marker.touch()
    toml = refactor_toml(tmp_path / "refactor.toml", log, block=(marker, started))
    proc = start_saga_run(m, toml)
    wait_for(started, proc)
    assert (m.mp / "geom" / "shapes" / "area.py").read_text().count("def ") == 3  # step 3 did its work
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = m.call("saga.status")
    assert [(s["name"], s["state"]) for s in st["steps"]] == [
        ("analyse", "done"), ("create-structure", "done"), ("migrate-functions", "open")]
    assert st["saga"]["annotations"]["outcomes"]["migrate-functions"]["status"] == "running"
    marker.unlink()
    t0 = time.monotonic()
    r = saga_run(m, toml, "--resume", check=0)
    resumed = time.monotonic() - t0
    assert "complete steps: analyse, create-structure" in r.stdout
    assert "compensated step 3 'migrate-functions' (incomplete at the interruption)" in r.stdout
    assert "[3/5] migrate-functions: ok" in r.stdout and "[5/5] run-tests: ok" in r.stdout
    assert log_lines(log) == ["undo migrate-functions"]  # the interrupted step was rolled back once
    assert_same_tree(project, expected, "the base after --resume")
    rec, ann = annotations(m)
    assert rec["state"] == "committed"
    begun = [e["name"] for e in m.call("saga.log", saga=rec["id"])["events"] if e["kind"] == "step.begin"]
    assert begun == STEPS[:3] + STEPS[2:]  # step 3 twice: interrupted, then again
    r = saga_run(m, toml, "--resume", check=0)
    assert "already committed" in r.stdout
    print(f"resume after the runner's SIGKILL: {resumed:.2f}s")


def test_sigkill_daemon_during_step3_then_resume(mount_factory, project, expected, tmp_path):
    m = mount_factory(project, name="defs")
    log = tmp_path / "undo.log"
    marker, started = tmp_path / "block", tmp_path / "started"
    marker.touch()
    toml = refactor_toml(tmp_path / "refactor.toml", log, block=(marker, started))
    out = open(tmp_path / "runner.out", "w+")
    proc = start_saga_run(m, toml, out=out)
    wait_for(started, proc)
    m.kill()
    rc = proc.wait(timeout=30)
    out.seek(0)
    text = out.read()
    assert rc == 5, text
    assert "the workspace's daemon stopped during step 3 'migrate-functions'" in text and "--resume" in text
    m.start()  # recovery rolls back step 3, open at the crash (its compensation runs)
    marker.unlink()
    r = saga_run(m, toml, "--resume", check=0)
    assert "complete steps: analyse, create-structure" in r.stdout
    assert "[3/5] migrate-functions: ok" in r.stdout
    assert log_lines(log) == ["undo migrate-functions"]
    assert_same_tree(project, expected, "the base after the daemon's crash and --resume")
    steps = m.call("saga.list")["sagas"][-1]
    assert steps["state"] == "committed"


# ---------------------------------------------------------------------- pivots and policies


def pivot_toml(path, log, ext, allow):
    comp = f"echo \"undo $STEP_NAME\" >> '{log}'"
    path.write_text(f"""\
name = "release"

[[step]]
name = "prepare"
run = "echo prepared > prepared.txt"
compensate = '''{comp}'''

[[step]]
name = "publish"
run = "mkdir -p '{ext}' && cp prepared.txt '{ext}/published' && echo published > published.txt"
compensatable = "none"

[[step]]
name = "post"
run = "echo post > post.txt"
compensate = '''{comp}'''
compensatable = "partial"

[[step]]
name = "verify"
run = "test -e '{allow}' || {{ echo 'verification service down' >&2; exit 1; }}; echo ok > verify.txt"
compensate = '''{comp}'''
""")
    return path


def test_failure_after_a_pivot_does_not_compensate_past_it(mount_factory, project, tmp_path):
    digest = tree_digest(project)
    m = mount_factory(project, name="defs")
    log, ext, allow = tmp_path / "undo.log", tmp_path / "registry", tmp_path / "allow"
    toml = pivot_toml(tmp_path / "pivot.toml", log, ext, allow)
    r = saga_run(m, toml, check=4)
    assert "after the pivot step 2 'publish'" in r.stderr and "--resume" in r.stderr
    assert "Compensated only partially (compensatable = \"partial\"): post" in r.stderr
    assert log_lines(log) == ["undo verify", "undo post"]  # not prepare: it is below the pivot
    assert (ext / "published").exists()
    st = m.call("saga.status")
    assert st["saga"]["state"] == "active"
    assert [(s["name"], s["state"]) for s in st["steps"]] == [
        ("prepare", "done"), ("publish", "done"), ("post", "compensated"), ("verify", "compensated")]
    assert (m.mp / "prepared.txt").exists() and (m.mp / "published.txt").exists()
    assert not (m.mp / "post.txt").exists() and not (m.mp / "verify.txt").exists()
    assert st["saga"]["annotations"]["runner"]["phase"] == "stuck"
    assert tree_digest(project) == digest
    # a person fixes the cause and goes forward
    allow.touch()
    r = saga_run(m, toml, "--resume", check=0)
    assert "complete steps: prepare, publish" in r.stdout
    assert log_lines(log) == ["undo verify", "undo post"]
    for f in ("prepared.txt", "published.txt", "post.txt", "verify.txt"):
        assert (project / f).exists(), f


def test_interrupted_pivot_needs_a_person(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    marker, started, ext = tmp_path / "block", tmp_path / "started", tmp_path / "ext"
    marker.touch()
    toml = tmp_path / "p.toml"
    toml.write_text(f"""\
name = "pivot-crash"

[[step]]
name = "one"
run = "echo 1 > one.txt"

[[step]]
name = "publish"
run = "echo x >> '{ext}'; touch '{started}'; while [ -e '{marker}' ]; do sleep 0.05; done; echo p > p.txt"
compensatable = "none"
""")
    proc = start_saga_run(m, toml)
    wait_for(started, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()
    r = saga_run(m, toml, "--resume", check=4)
    assert "step 2 'publish' was interrupted, and it cannot be compensated" in r.stderr
    assert ext.read_text() == "x\n"  # not run again
    # a person checked; resuming again runs it again
    r = saga_run(m, toml, "--resume", check=0)
    assert ext.read_text() == "x\nx\n"
    assert (project / "p.txt").exists() and (project / "one.txt").exists()


def test_retry_and_stop_policies(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    log, count, allow = tmp_path / "undo.log", tmp_path / "count", tmp_path / "allow"
    toml = tmp_path / "policies.toml"
    toml.write_text(f"""\
name = "policies"

[[step]]
name = "flaky"
run = "echo x >> '{count}'; echo attempt >> attempts.txt; test $(wc -l < '{count}') -ge 2"
compensate = "echo \\"undo $STEP_NAME $ATTEMPT\\" >> '{log}'"
retries = 2

[[step]]
name = "guarded"
run = "echo half > half.txt; test -e '{allow}'"
on_failure = "stop"
""")
    r = saga_run(m, toml, check=6)
    assert "[1/2] flaky: FAILED (exit status 1) after" in r.stdout and "trying again" in r.stdout
    assert "[1/2] flaky: ok" in r.stdout
    assert "on_failure = \"stop\"" in r.stderr
    assert log_lines(log) == ["undo flaky 1"]  # the failed attempt was rolled back
    assert (m.mp / "attempts.txt").read_text() == "attempt\n"  # one attempt's layer is left
    st = m.call("saga.status")
    assert [(s["name"], s["state"]) for s in st["steps"]] == [
        ("flaky", "compensated"), ("flaky", "done"), ("guarded", "open")]
    assert (m.mp / "half.txt").exists()  # left for inspection
    allow.touch()
    r = saga_run(m, toml, "--resume", check=0)
    assert "compensated step 3 'guarded' (incomplete at the interruption)" in r.stdout
    assert (project / "attempts.txt").read_text() == "attempt\n" and (project / "half.txt").exists()


def test_timeout_and_budget(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    toml = tmp_path / "limits.toml"
    toml.write_text("""\
name = "limits"

[[step]]
name = "slow"
run = "echo starting; sleep 30"
timeout = "500ms"
on_failure = "stop"
""")
    t0 = time.monotonic()
    r = saga_run(m, toml, "--json", check=6)
    assert time.monotonic() - t0 < 15
    failed = [json.loads(x) for x in r.stdout.splitlines() if json.loads(x)["event"] == "step.failed"][0]
    assert failed["reason"] == "timeout" and failed["exit_status"] == 124 and "starting" in failed["tail"]
    m.call("saga.abort")
    toml.write_text("""\
name = "limits"

[[step]]
name = "big"
run = "for i in 1 2 3 4 5; do echo $i > f$i; done"
max_files = 3
""")
    r = saga_run(m, toml, check=1)
    assert "[1/1] big: FAILED (over budget: more than max_files = 3 paths changed (the daemon cut the step))" \
        in r.stdout, r.stdout
    assert not (m.mp / "f1").exists()
    rec, ann = annotations(m)
    assert rec["state"] == "aborted" and rec["cut"]["reason"] == "budget:files"
    assert ann["outcomes"]["big"]["reason"] == "budget"
    # a budget of the whole saga (top-level keys): the daemon aborts the saga
    toml.write_text("""\
name = "limits"
timeout = "1s"

[[step]]
name = "quick"
run = "echo q > q.txt"

[[step]]
name = "slow"
run = "sleep 30"
""")
    t0 = time.monotonic()
    r = saga_run(m, toml, check=1)
    assert time.monotonic() - t0 < 15
    assert "the daemon ended the saga while step 'slow' ran: it is aborted (budget:saga-timeout exceeded)" in r.stderr
    assert not (project / "q.txt").exists()


def test_sigterm_interrupts_then_resume(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    marker, started = tmp_path / "block", tmp_path / "started"
    marker.touch()
    toml = tmp_path / "t.toml"
    toml.write_text(f"""\
name = "interrupted"

[[step]]
name = "one"
run = "echo 1 > one.txt"

[[step]]
name = "two"
run = "echo 2 > two.txt; touch '{started}'; while [ -e '{marker}' ]; do sleep 0.05; done"
""")
    out = open(tmp_path / "runner.out", "w+")
    proc = start_saga_run(m, toml, out=out)
    wait_for(started, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    out.seek(0)
    assert "interrupted; the saga is left as it is; continue with: saga run" in out.read()
    st = m.call("saga.status")
    assert st["saga"]["annotations"]["outcomes"]["two"]["status"] == "interrupted"
    assert st["saga"]["annotations"]["runner"]["phase"] == "interrupted"
    marker.unlink()
    saga_run(m, toml, "--resume", check=0)
    assert (project / "one.txt").exists() and (project / "two.txt").exists()


def test_changed_definition_refuses_resume(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    toml = tmp_path / "d.toml"
    text = 'name = "changing"\n[[step]]\nname = "one"\nrun = "echo 1 > one.txt"\n'
    toml.write_text(text)
    r = saga_run(m, toml, "--no-commit", check=0)
    assert "left open for review" in r.stdout
    r = saga_run(m, toml, check=1)
    assert "already active" in r.stderr and "--resume" in r.stderr
    toml.write_text(text + '[[step]]\nname = "two"\nrun = "echo 2 > two.txt"\n')
    r = saga_run(m, toml, "--resume", check=1)
    assert "the definition changed since saga 1 'changing' began" in r.stderr
    assert "refusing to resume" in r.stderr
    assert m.call("saga.status")["saga"]["state"] == "active"
    assert not (project / "one.txt").exists()
    toml.write_text(text)
    saga_run(m, toml, "--resume", check=0)
    assert (project / "one.txt").read_text() == "1\n" and not (project / "two.txt").exists()


# ---------------------------------------------------------------------- Python API


def test_python_api_with_callables(mount_factory, project, tmp_path):
    m = mount_factory(project, name="defs")
    ws = Workspace(socket_path=m.socket)
    calls = []
    log = tmp_path / "undo.log"

    def write_a(ctx):
        calls.append(("run", ctx.step, ctx.position, ctx.attempt))
        (ctx.workspace / "a.txt").write_text("a\n")

    def undo_a(ctx):
        calls.append(("undo", ctx.step))
        assert (ctx.workspace / "a.txt").exists()  # called before the layer is dropped

    def boom(ctx):
        (ctx.workspace / "c.txt").write_text("c\n")
        raise RuntimeError("boom")

    steps = [{"name": "a", "run": write_a, "compensate": undo_a},
             {"name": "b", "run": "echo b > b.txt", "compensate": f"echo undo-b >> '{log}'"},
             {"name": "c", "run": boom}]
    events = []
    r = run_definition(ws, steps, name="py", on_event=events.append)
    assert r.status == "aborted" and r.exit_code == 1 and "RuntimeError: boom" in r.message
    assert calls == [("run", "a", 1, 1), ("undo", "a")]
    assert log_lines(log) == ["undo-b"]
    assert [e["step"] for e in events if e["event"] == "compensated"] == ["c", "b", "a"]
    assert not (project / "a.txt").exists() and ws.status()["saga"] is None

    # passing: commits; the same steps inside a with-block (attached) commit with the block
    r = run_definition(ws, steps[:2], name="py2")
    assert r.ok and r.status == "committed"
    assert (project / "a.txt").exists() and (project / "b.txt").exists()
    with ws.saga("py3") as s:
        with s.step("manual"):
            (m.mp / "manual.txt").write_text("m\n")
        with pytest.raises(RunFailed) as ei:
            s.run([{"name": "ok", "run": "echo ok > ok.txt"}, {"name": "bad", "run": "exit 7"}])
        assert ei.value.result.status == "aborted"
        assert (m.mp / "manual.txt").exists() and not (m.mp / "ok.txt").exists()
        s.run([{"name": "ok", "run": "echo ok > ok.txt"}])
    assert (project / "manual.txt").exists() and (project / "ok.txt").exists()
    with pytest.raises(DefinitionError):
        run_definition(ws, [{"name": "x"}], name="bad")


def test_kill_token_finds_leftovers():
    token = "test-" + os.urandom(6).hex()
    p = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env={**os.environ, "OVERLAYD_RUN_TOKEN": token})
    time.sleep(0.2)
    assert kill_token(token) >= 1
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert kill_token(token) == 0


# ---------------------------------------------------------------------- the examples, as documented


def test_examples_as_documented(mount_factory, tmp_path):
    base = tmp_path / "calc"
    shutil.copytree(EXAMPLES / "calc", base)
    digest = tree_digest(base)
    m = mount_factory(base, name="calc")
    fails_log = Path(f"{m.mp}.refactor-fails.log")  # next to this workspace's mountpoint, nowhere shared
    r = saga_run(m, EXAMPLES / "refactor-fails.toml", check=1)
    assert tree_digest(base) == digest
    assert log_lines(fails_log) == ["undo update-imports", "undo migrate-functions", "undo create-structure",
                                    "undo analyse"]
    r = saga_run(m, EXAMPLES / "refactor.toml", check=0)
    assert "[5/6] run-tests: ok" in r.stdout and "[6/6] tidy: ok" in r.stdout
    assert (base / "calc" / "ops" / "arith.py").exists()
    assert "from calc.ops.arith import add, div, mul, sub" in (base / "calc" / "cli.py").read_text()
    assert not (base / ".refactor").exists()  # the scratch plan is not committed
    subprocess.run([sys.executable, "-B", "-m", "unittest", "discover", "-s", "tests", "-t", ".", "-q"],
                   cwd=base, check=True, capture_output=True)
    # the pivot, as its header says; then a second time, which works the same
    out = Path(f"{m.mp}.pivot-example")
    for run in (1, 2):
        r = saga_run(m, EXAMPLES / "pivot.toml", check=4)
        assert "after the pivot step 2 'publish'" in r.stderr
        (out / "allow-notify").touch()
        r = saga_run(m, EXAMPLES / "pivot.toml", "--resume", check=0)
        assert (base / "NOTIFIED").exists() and (out / "registry" / "release.tar.gz").exists()
        (out / "allow-notify").unlink()
    assert log_lines(out / "log") == ["notify undone", "notify undone"]
