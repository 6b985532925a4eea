"""``saga resolve PATH... --theirs | --ours | --merge``: settle a commit conflict in the saga."""

import os
import sys

import click

from overlayd.cli.saga_common import SagaError, _saga_line, common, emit, run
from overlayd.paths import quote_path

#: saga resolve's exit code when --merge left conflict markers: the path is still in conflict
EXIT_MARKERS = 3


def workspace_path(t, path: str) -> str:
    """*path* (absolute, or relative to the current directory) as a path inside the workspace."""
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    root = os.path.normpath(t.mountpoint)
    if full == root or not full.startswith(root.rstrip("/") + "/"):
        raise SagaError(f"{path} is not inside the workspace {t.mountpoint}: give a path in it (relative to the "
                        "current directory, or absolute)", 2)
    return os.path.relpath(full, root)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--theirs", "how", flag_value="theirs", help="Take the base's current version; drop the saga's change.")
@click.option("--ours", "how", flag_value="ours",
              help="Keep the saga's version, overwriting the base's newer change at commit.")
@click.option("--merge", "how", flag_value="merge",
              help="Three-way merge of a text file (base at the saga's first change, base now, the saga's).")
@common
@click.pass_context
def resolve(ctx, paths, how, workspace, as_json):
    """Resolve the commit conflict on each PATH, in a new step named "resolve" (done at once).

    \b
    --theirs  the view gets the base's current version of PATH (removed if the base removed it)
    --ours    the saga's version stays; the commit overwrites the base's change
    --merge   git merge-file of text files: a clean merge replaces the saga's version; if the
              changes overlap, the view gets conflict markers and PATH stays in conflict
              (exit 3): edit it in a step, then: saga resolve PATH --ours
    Then: saga commit. 'saga rollback --to K' (K below the resolve step) undoes a resolution.

    \b
    Example:
        saga commit                     # exit 3: CONFLICT notes.txt
        saga resolve notes.txt --merge
        saga commit

    Exit codes: 0 resolved, 3 --merge left conflict markers, 1 cannot resolve (a binary file,
    a directory, ...: the message says which option can), 2 usage error.
    """
    if how is None:
        raise click.UsageError("say how: --theirs, --ours or --merge")

    def go(t):
        rel = [workspace_path(t, p) for p in paths]
        r = t.call("saga.resolve", paths=rel, how=how)
        lines = []
        for it in r["resolved"]:
            what = {"theirs": "took the base's version", "ours": "kept the saga's version",
                    "merged": "merged cleanly", "unchanged": "not changed in the base: nothing to merge",
                    "conflict-markers": f"CONFLICT: {it.get('conflicts', 1)} overlapping change(s) left between "
                                        "conflict markers in the view"}.get(it["result"], it["result"])
            lines.append(f"{quote_path(it['path'])}: {what}")
        if r["unresolved"]:
            lines.append("edit the marked file(s) in a step (saga step fix), then: saga resolve "
                         + " ".join(quote_path(p) for p in r["unresolved"]) + " --ours")
        elif r["step"] is None:
            lines.append("nothing was in conflict: no step was made")
        else:
            lines.append(f"resolved in step {r['step']} (resolve) of {_saga_line(r['saga'])}; now: saga commit")
        emit(ctx, r, "\n".join(lines))
        if r["unresolved"]:
            sys.exit(EXIT_MARKERS)

    run(ctx, workspace, as_json, go)
