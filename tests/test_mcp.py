"""overlayd mcp: a real MCP session over stdio, with the SDK's own client, against a real daemon
and mount: list the tools, call each, see the effect in the mount and the base."""

import json
import os
import subprocess
import sys

import pytest

try:
    import mcp  # noqa: F401
except ImportError:  # scripts/install.sh --test installs it (the 'test' extra); CI must not skip
    if os.environ.get("CI"):
        raise
    pytest.skip("the mcp SDK is not installed (pip install -e '.[test]')", allow_module_level=True)

import anyio  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

from conftest import ROOT, put, read  # noqa: E402

TOOLS = {"saga_begin", "saga_step", "saga_rollback", "saga_abort", "saga_commit", "saga_status", "saga_diff",
         "saga_log", "saga_resolve"}
CODE = "import sys; from overlayd.cli.overlayd_cmd import main; sys.exit(main())"


def server_params(m):
    return StdioServerParameters(command=sys.executable, args=["-c", CODE, "mcp", "--workspace", str(m.mp)],
                                 env={k: v for k, v in m.env.items() if k in ("RUNTIME_DIRECTORY", "PYTHONPATH",
                                                                               "OVERLAYD_STATE_ROOT", "PATH", "HOME")},
                                 cwd="/")


async def session_run(m, body):
    with open(m.tmp / "mcp.stderr", "w") as errlog:
        async with stdio_client(server_params(m), errlog=errlog) as (r, w):
            async with ClientSession(r, w) as s:
                await s.initialize()
                return await body(s)


def ok(res):
    assert not res.is_error, res.content
    return res.structured_content


def test_mcp_session_against_a_real_workspace(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "f.txt", "one\n")
    m = mount_factory(base, name="mcp")
    mp = m.mp

    async def body(s):
        tools = {t.name: t for t in (await s.list_tools()).tools}
        assert set(tools) == TOOLS
        for t in tools.values():
            assert t.description and t.input_schema["type"] == "object", t
        assert "compensate" in tools["saga_step"].input_schema["properties"]
        assert tools["saga_begin"].input_schema["required"] == ["name"]

        assert ok(await s.call_tool("saga_begin", {"name": "agent"}))["saga"]["name"] == "agent"
        assert ok(await s.call_tool("saga_step", {"name": "one", "compensate": "true"}))["step"]["index"] == 1
        put(mp / "scratch.txt", "to be undone\n")
        ok(await s.call_tool("saga_rollback", {}))
        assert not (mp / "scratch.txt").exists()  # the effect, in the mount
        ok(await s.call_tool("saga_step", {"name": "two"}))
        put(mp / "new.txt", "hello\n")
        put(mp / "f.txt", "one\ntwo\n")
        st = ok(await s.call_tool("saga_status", {}))
        assert [x["state"] for x in st["steps"]] == ["compensated", "open"] and st["writable"]
        d = ok(await s.call_tool("saga_diff", {}))
        assert {c["path"]: c["change"] for c in d["changes"]} == {"new.txt": "added", "f.txt": "modified"}
        assert "+two\n" in d["diff"] and "+hello\n" in d["diff"]
        d = ok(await s.call_tool("saga_diff", {"paths": [str(mp / "new.txt")], "stat": True}))
        assert [c["path"] for c in d["changes"]] == ["new.txt"] and "diff" not in d
        bad = await s.call_tool("saga_diff", {"paths": ["../../etc/passwd"]})
        assert bad.is_error and bad.structured_content["error"]["code"] == "outside-workspace"
        res = {str(r.uri) for r in (await s.list_resources()).resources}
        assert res == {"overlayd://workspace/status", "overlayd://workspace/diff"}
        status = json.loads((await s.read_resource("overlayd://workspace/status")).contents[0].text)
        assert status["saga"]["name"] == "agent"
        diff = (await s.read_resource("overlayd://workspace/diff")).contents[0].text
        assert diff.startswith("step 2 two\n") and "+hello\n" in diff
        dry = ok(await s.call_tool("saga_commit", {"dry_run": True}))
        assert dry["dry_run"] and not dry["conflicts"] and read(base / "f.txt") == b"one\n"
        assert ok(await s.call_tool("saga_commit", {}))["saga"]["state"] == "committed"
        assert read(base / "new.txt") == b"hello\n" and read(base / "f.txt") == b"one\ntwo\n"
        log = ok(await s.call_tool("saga_log", {"limit": 1000}))
        assert {"saga.begin", "step.begin", "commit.begin"} <= {e["kind"] for e in log["events"]}

        # errors: structured, with the CLI's codes and exit statuses
        ok(await s.call_tool("saga_begin", {"name": "second"}))
        ok(await s.call_tool("saga_step", {"name": "edit"}))
        put(mp / "f.txt", "mine\n")
        put(base / "f.txt", "theirs\n")  # behind the workspace's back
        res = await s.call_tool("saga_commit", {})
        err = res.structured_content["error"]
        assert res.is_error and err["code"] == "conflict" and err["exit_code"] == 3, err
        assert [c["path"] for c in err["conflicts"]] == ["f.txt"]
        assert err["conflicts"][0]["resolve"] == "saga resolve f.txt --merge"
        # both rewrote the one line: the merge leaves conflict markers, and the path unresolved
        merged = ok(await s.call_tool("saga_resolve", {"paths": [str(mp / "f.txt")], "how": "merge"}))
        assert merged["unresolved"] == ["f.txt"] and merged["resolved"][0]["result"] == "conflict-markers"
        assert read(mp / "f.txt").startswith(b"<<<<<<< saga\n")
        res = await s.call_tool("saga_commit", {})
        assert res.is_error and res.structured_content["error"]["code"] == "conflict"
        busy = await s.call_tool("saga_begin", {"name": "third"})
        assert busy.is_error and busy.structured_content["error"]["code"] == "saga-active"
        bad = await s.call_tool("saga_step", {"name": "x", "on_budget": "everything"})
        assert bad.is_error  # refused by the schema
        ok(await s.call_tool("saga_abort", {}))
        assert read(mp / "f.txt") == b"theirs\n"
        none = await s.call_tool("saga_rollback", {})
        assert none.is_error and none.structured_content["error"]["code"] == "no-saga"
        await anyio.to_thread.run_sync(m.stop)  # the daemon goes away under the server
        gone = await s.call_tool("saga_status", {})
        err = gone.structured_content["error"]
        assert gone.is_error and err["code"] == "no-daemon" and err["exit_code"] == 5, err
        return True

    assert anyio.run(session_run, m, body, backend="trio")


def test_mcp_refuses_an_unmounted_workspace_and_matches_the_cli(tmp_path):
    from overlayd.cli.saga_common import EXIT
    from overlayd.mcp_server import EXIT as MCP_EXIT

    assert MCP_EXIT == EXIT
    r = subprocess.run([sys.executable, "-c", CODE, "mcp", "--workspace", str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 5 and "is not inside a mounted overlayd workspace" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cli.overlayd_cmd"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert " mcp" not in r.stderr.replace("overlayd.cli.mcp_cmd", ""), "the CLI must not import the mcp SDK"
