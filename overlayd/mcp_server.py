"""``overlayd mcp --workspace MNT``: the saga of one workspace as Model Context Protocol tools,
over stdio, built on the official ``mcp`` SDK (``mcp.server.mcpserver.MCPServer``, run on trio
through anyio).

- Scoped to one workspace: every tool talks to the daemon serving the mount at MNT (found and
  checked as the CLI does: ``client.connect_to_mount``), and a path outside MNT is refused.
- Runs as the user who starts it (an agent host spawns it): the daemon authorizes it by its
  uid, as it does the ``saga`` CLI.
- A failure is a tool result with ``isError`` and a structured ``error``: ``code`` (the
  daemon's: ``conflict``, ``stuck``, ``no-daemon``, ``busy``, ...), ``message`` (what happened
  and what to do) and ``exit_code``, the exit status the ``saga`` CLI gives the same failure
  (3 conflict, 4 stuck, 5 no daemon, 2 a refused value, 7 permission denied, 1 otherwise).
- Resources: ``overlayd://workspace/status`` (the saga and its steps) and
  ``overlayd://workspace/diff`` (the open step's changes, with unified diffs of text files).

A commit refused for conflicts names, per path, how to settle it (``resolve``, ``mergeable``);
``saga_resolve`` does it (``how``: merge, theirs or ours), then ``saga_commit`` again.
"""

import difflib
import json
import logging
import os
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent
from pydantic import Field

from . import __version__
from .client import ClientError, NoDaemon, PermissionDenied, connect_to_mount, mount_of
from .paths import UsageError
from .textdiff import read_text

log = logging.getLogger(__name__)

#: The saga CLI's exit status per daemon error code (cli/saga_common.EXIT; a test keeps them equal).
EXIT = {"conflict": 3, "stuck": 4, "no-daemon": 5, "bad-request": 2, "bad-name": 2, "permission": 7}
DIFF_LIMIT = 256 * 1024  # characters of unified diff in one answer
TIMEOUT = 600.0


class ToolFailure(Exception):
    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


class Scope:
    """The one workspace a server serves: its mount, its daemon, its paths."""

    def __init__(self, workspace: str):
        path = os.path.abspath(workspace)
        self.mount = mount_of(path)
        if self.mount is None:
            raise UsageError(f"{path} is not inside a mounted overlayd workspace; mount one with: overlayd mount "
                             "BASE MOUNTPOINT")
        self.root = self.mount.point

    def call(self, op: str, **args):
        args = {k: v for k, v in args.items() if v is not None}
        try:
            with connect_to_mount(self.mount, TIMEOUT) as c:
                return c.call(op, **args)
        except NoDaemon as exc:
            raise ToolFailure("no-daemon", f"no daemon serves the workspace {self.mount.name} ({self.root}): "
                                           f"{exc.message}; mount it again (overlayd mount)") from None
        except PermissionDenied as exc:
            raise ToolFailure("permission", f"permission denied: {exc.message}") from None
        except ClientError as exc:
            extra = {k: v for k, v in (exc.data or {}).items() if k not in ("code", "message")}
            raise ToolFailure(exc.code, exc.message, **extra) from None
        except (UsageError, OSError) as exc:
            raise ToolFailure("no-daemon", f"cannot talk to the daemon of {self.root}: {exc}") from None

    def relative(self, path: str) -> str:
        """*path* (relative to the workspace, or absolute inside it) as a path in the workspace."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise ToolFailure("bad-request", f"{path!r} is not a path")
        full = os.path.normpath(path if os.path.isabs(path) else os.path.join(self.root, path))
        if full != self.root and not full.startswith(self.root.rstrip("/") + "/"):
            raise ToolFailure("outside-workspace", f"{path} is outside the workspace {self.root}; this server "
                                                   "serves that workspace only")
        return os.path.relpath(full, self.root)


def _ok(result) -> CallToolResult:
    data = result if isinstance(result, dict) else {"result": result}
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data, default=str))],
                          structured_content=data)


def _error(exc: ToolFailure) -> CallToolResult:
    err = {"code": exc.code, "message": exc.message, "exit_code": EXIT.get(exc.code, 1), **exc.extra}
    return CallToolResult(content=[TextContent(type="text", text=f"Error ({exc.code}): {exc.message}")],
                          structured_content={"error": err}, is_error=True)


async def _run(fn, *args) -> CallToolResult:
    try:
        return _ok(await anyio.to_thread.run_sync(fn, *args))
    except ToolFailure as exc:
        return _error(exc)


def unified(base: str, root: str, changes) -> str:
    """Unified diffs (base -> view) of the changed text files, at most DIFF_LIMIT characters."""
    out, size = [], 0
    for c in changes:
        if c.get("kind") != "f":
            continue
        old = [] if c["change"] == "added" else read_text(os.path.join(base, c["path"]))
        new = [] if c["change"] == "deleted" else read_text(os.path.join(root, c["path"]))
        if old is None or new is None:
            text = f"Binary file {c['path']} {c['change']}\n"
        else:
            text = "".join(difflib.unified_diff(old, new, f"a/{c['path']}", f"b/{c['path']}"))
        if size + len(text) > DIFF_LIMIT:
            out.append(f"... (diffs cut at {DIFF_LIMIT} characters: ask for fewer paths)\n")
            break
        out.append(text)
        size += len(text)
    return "".join(out)


def build(workspace: str) -> MCPServer:
    scope = Scope(workspace)
    server = MCPServer("overlayd", version=__version__, instructions=(
        f"Sagas in the overlayd workspace at {scope.root}: every change made in it is recorded in steps that "
        "can be undone. Begin a saga (saga_begin), open a step before each unit of work (saga_step, with a "
        "compensate shell command for effects outside the files), check it (saga_diff, saga_status), undo "
        "what went wrong (saga_rollback), and commit the whole into the base (saga_commit) or drop it "
        "(saga_abort)."))

    def budgets(timeout, max_bytes, max_files, max_spins):
        return {k: v for k, v in dict(timeout=timeout, max_bytes=max_bytes, max_files=max_files,
                                      max_spins=max_spins).items() if v is not None}

    Seconds = Annotated[float | None, Field(gt=0, description="Time budget in seconds.")]
    Bytes = Annotated[int | None, Field(gt=0, description="Budget of bytes written.")]
    Files = Annotated[int | None, Field(gt=0, description="Budget of files changed.")]
    Spins = Annotated[int | None, Field(gt=0, description="Budget of identical rewrites of a file in a row.")]

    @server.tool(description="Begin a saga (one per workspace); its budgets abort it when exceeded.")
    async def saga_begin(name: Annotated[str, Field(description="The saga's name, e.g. 'refactor-auth'.")],
                         timeout: Seconds = None, max_bytes: Bytes = None, max_files: Files = None,
                         max_spins: Spins = None) -> CallToolResult:
        return await _run(lambda: scope.call("saga.begin", name=name,
                                             budgets=budgets(timeout, max_bytes, max_files, max_spins)))

    @server.tool(description="Finish the open step and open a new one; call before each unit of work so it "
                             "can be rolled back alone.")
    async def saga_step(name: Annotated[str, Field(description="The step's name, e.g. 'migrate-schema'.")],
                        compensate: Annotated[str | None, Field(
                            description="Shell command undoing this step's effects outside the files (run in the "
                                        "workspace when the step is rolled back).")] = None,
                        timeout: Seconds = None, max_bytes: Bytes = None, max_files: Files = None,
                        max_spins: Spins = None,
                        on_budget: Annotated[str, Field(pattern="^(step|saga)$",
                                                        description="What a budget cut rolls back.")] = "step",
                        ) -> CallToolResult:
        return await _run(lambda: scope.call("saga.step", name=name, compensate=compensate, policy=on_budget,
                                             **budgets(timeout, max_bytes, max_files, max_spins)))

    @server.tool(description="Undo the open step (or every step after 'to'), running compensations newest "
                             "first; open a new step before writing again.")
    async def saga_rollback(to: Annotated[str | int | None, Field(
            description="Keep the steps up to this one (a name or 1-based index; '0' keeps none).")] = None
    ) -> CallToolResult:
        return await _run(lambda: scope.call("saga.rollback", to=to))

    @server.tool(description="Roll back every step and end the saga: nothing reaches the base.")
    async def saga_abort() -> CallToolResult:
        return await _run(lambda: scope.call("saga.abort"))

    @server.tool(description="Merge every step into the base; refused with code 'conflict' (exit_code 3) when "
                             "the base changed the same paths. dry_run lists changes and conflicts only.")
    async def saga_commit(dry_run: Annotated[bool, Field(description="Change nothing; report.")] = False,
                          exclude: Annotated[list[str] | None, Field(
                              description="Leave out paths matching these gitignore-style globs.")] = None,
                          include_ignored: Annotated[bool, Field(
                              description="Commit the paths git ignores too.")] = False) -> CallToolResult:
        return await _run(lambda: scope.call("saga.commit", dry_run=dry_run, exclude=exclude or None,
                                             include_ignored=include_ignored or None))

    @server.tool(description="Resolve commit conflicts on paths, in a new step named 'resolve': how='merge' "
                             "(three-way merge of text files; overlapping changes leave conflict markers in the file "
                             "and the path in 'unresolved': edit it in a step, then resolve it with how='ours'), "
                             "'theirs' (take the base's current version) or 'ours' (keep the saga's version, "
                             "overwriting the base's change). Then call saga_commit.")
    async def saga_resolve(paths: Annotated[list[str], Field(
                               description="The conflicting paths (relative to the workspace, or absolute in it).")],
                           how: Annotated[Literal["merge", "theirs", "ours"], Field(
                               description="How to resolve every path.")] = "merge") -> CallToolResult:
        def go():
            rel = [scope.relative(p) for p in paths]
            return scope.call("saga.resolve", paths=rel, how=how)

        return await _run(go)

    @server.tool(description="The active saga, its steps and whether the workspace is writable.")
    async def saga_status() -> CallToolResult:
        return await _run(lambda: scope.call("saga.status"))

    @server.tool(description="What the saga changed (per path: added/modified/deleted, step, process); with "
                             "stat=false also unified diffs of text files.")
    async def saga_diff(step: Annotated[str | int | None, Field(description="Only this step (name or index).")] = None,
                        paths: Annotated[list[str] | None, Field(
                            description="Only these paths (relative to the workspace, or absolute inside it) "
                                        "and what is below them.")] = None,
                        stat: Annotated[bool, Field(description="Only the list of changes, no diffs.")] = False
                        ) -> CallToolResult:
        def go():
            wanted = [scope.relative(p) for p in paths or ()]
            r = scope.call("saga.diff", step=step)
            if wanted and "." not in wanted:
                r["changes"] = [c for c in r["changes"]
                                if any(c["path"] == w or c["path"].startswith(w + "/") for w in wanted)]
            if not stat:
                r["diff"] = unified(scope.call("status")["base"], scope.root, r["changes"])
            return r
        return await _run(go)

    @server.tool(description="The journal's events (newest last): steps, rollbacks, commits; ops=true adds "
                             "every file change with its process.")
    async def saga_log(saga: Annotated[int | None, Field(description="Only this saga id.")] = None,
                       ops: Annotated[bool, Field(description="Include file changes.")] = False,
                       limit: Annotated[int, Field(gt=0, le=10000, description="At most this many, the newest.")]
                       = 200) -> CallToolResult:
        def go():
            events = scope.call("saga.log", saga=saga, ops=ops or None)["events"]
            return {"events": events[-limit:], "total": len(events)}
        return await _run(go)

    @server.resource("overlayd://workspace/status", name="status", mime_type="application/json",
                     description="The workspace's saga and steps.")
    async def status_resource() -> str:
        return json.dumps(await anyio.to_thread.run_sync(_resource, lambda: scope.call("saga.status")), default=str)

    @server.resource("overlayd://workspace/diff", name="open step diff", mime_type="text/plain",
                     description="The open step's changes, with unified diffs of text files.")
    async def diff_resource() -> str:
        def go():
            st = scope.call("saga.status")
            open_steps = [s for s in st.get("steps") or [] if s["state"] == "open"]
            if not open_steps:
                return "no step is open\n"
            k = open_steps[-1]["index"]
            r = scope.call("saga.diff", step=k)
            head = "".join(f"{c['change']:9} {c['path']}\n" for c in r["changes"])
            return f"step {k} {open_steps[-1]['name']}\n{head}\n" + unified(scope.call("status")["base"], scope.root,
                                                                              r["changes"])
        return await anyio.to_thread.run_sync(_resource, go)

    return server


def _resource(fn):
    from mcp.server.mcpserver.exceptions import ResourceError

    try:
        return fn()
    except ToolFailure as exc:
        raise ResourceError(f"{exc.code}: {exc.message}") from None


def serve(server: MCPServer) -> None:
    """Serve MCP on stdin/stdout until the host closes them (on trio, as the daemon)."""
    anyio.run(server.run_stdio_async, backend="trio")
