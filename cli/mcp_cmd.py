"""``overlayd mcp``: the Model Context Protocol server of one workspace (overlayd/mcp_server.py).

The ``mcp`` SDK is imported only when the command runs: every other command stays light.
"""

import os

import click

from overlayd.paths import UsageError

EXIT_NO_DAEMON = 5


@click.command("mcp")
@click.option("-w", "--workspace", "workspace", required=True, type=str, metavar="MOUNTPOINT",
              envvar="SAGA_WORKSPACE", help="The mounted workspace the server serves (and nothing else).")
def mcp(workspace):
    """Serve the workspace's saga as MCP tools over stdin/stdout, for an agent host.

    Tools: saga_begin, saga_step, saga_rollback, saga_abort, saga_commit, saga_resolve,
    saga_status, saga_diff, saga_log; resources overlayd://workspace/status and overlayd://workspace/diff.
    A failure is a tool error with the saga CLI's code and exit status (conflict 3, stuck 4,
    no daemon 5, ...). Paths outside MOUNTPOINT are refused. Run it as yourself: the host
    starts it; it talks to the workspace's daemon as the saga CLI does. Exit 5 when no
    workspace is mounted at MOUNTPOINT.

    \b
    Agent host configuration (e.g. an "mcpServers" entry):
        {"command": "overlayd", "args": ["mcp", "--workspace", "/mnt/ws"]}
    """
    try:
        from overlayd import mcp_server
    except ImportError as exc:
        raise click.ClickException(f"the MCP server needs the 'mcp' package ({exc}); install it with: pip install "
                                   "'overlayd[mcp]'") from None
    try:
        server = mcp_server.build(os.path.expanduser(workspace))
    except UsageError as exc:
        err = click.ClickException(str(exc))
        err.exit_code = EXIT_NO_DAEMON
        raise err from None
    mcp_server.serve(server)
