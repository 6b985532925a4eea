"""``saga diff``: what the saga changed, as a summary, a list or a unified diff."""

import os

import click

from overlayd.cli.saga_common import _left_out_lines, common, complete_steps, emit, run, SagaError, with_rules
from overlayd.paths import quote_path
from overlayd.textdiff import read_text

SUMMARY_OVER = 100  # changes: above this, saga diff prints a summary unless --full


def _who(c):
    """The step that made a change (and the later one that changed it again), and the process."""
    out = f"step {c['step']} {c['step_name']}"
    if c.get("last_step") is not None:
        out += f", again in step {c['last_step']} {c['last_step_name']}"
    if c.get("process"):
        p = c["process"]
        out += f", by {quote_path(str(p['comm']))} pid {p['pid']} uid {p['uid']}"
    return out


def _collapse(changes):
    """Changes with every entry of an added (or replaced) directory folded into the directory's
    line (``entries``: how many), in path order."""
    out = []
    for c in changes:
        top = out[-1] if out else None
        if top is not None and top.get("kind") == "d" and top["change"] != "deleted" \
                and c["path"].startswith(top["path"] + "/"):
            top["entries"] = top.get("entries", 0) + 1
            continue
        out.append(dict(c))
    return out


def _summary_lines(r, limit=SUMMARY_OVER):
    changes = r["changes"]
    counts = {}
    for c in changes:
        counts[c["change"]] = counts.get(c["change"], 0) + 1
    steps = sorted({c["step"] for c in changes if c["step"] is not None})
    lines = [f"{len(changes)} changes (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
             + f") in step(s) {', '.join(map(str, steps)) or '-'}"]
    rows = _collapse(changes)
    for c in rows[:limit]:
        more = f", {c['entries']} entries in it" if c.get("entries") else ""
        slash = "/" if c.get("kind") == "d" else ""
        lines.append(f"{c['change']:9} {quote_path(c['path'] + slash)}  ({_who(c)}{more})")
    if len(rows) > limit:
        lines.append(f"... and {sum(1 + c.get('entries', 0) for c in rows[limit:])} more change(s)")
    lines += _left_out_lines(r.get("left_out", []))
    lines.append(f"(a summary: more than {SUMMARY_OVER} changes. Every change's diff: saga diff --full; every "
                 "path: saga diff --stat; one step: saga diff --step STEP)")
    return lines


@click.command()
@click.option("--step", "step_ref", metavar="STEP", shell_complete=complete_steps,
              help="Only the changes of this step.")
@click.option("--stat", "stat_only", is_flag=True, help="One line per path with its change.")
@click.option("--name-only", is_flag=True, help="Only the paths.")
@click.option("--full", is_flag=True, help=f"Every change's diff, even past {SUMMARY_OVER} changes.")
@with_rules
@common
@click.pass_context
def diff(ctx, step_ref, stat_only, name_only, full, exclude, include_ignored, workspace, as_json):
    """Show what the saga changed: added/modified/deleted per path, with the step (and the
    process) that made it, and a unified diff of each text file.

    Past 100 changes it prints a summary (an added directory on one line) and says how to get
    the rest. Like git diff, it leaves out what a commit would leave out (paths git ignores,
    exclude patterns) and lists that as "left out".
    """
    def go(t):
        r = t.read("saga.diff", step=step_ref, exclude=list(exclude) or None, include_ignored=include_ignored or None)
        if ctx.obj["json"] or name_only or stat_only or r.get("daemon") is False:
            text = "\n".join(quote_path(c["path"]) if name_only else f"{c['change']:9} {quote_path(c['path'])}  ({_who(c)})"
                             for c in r["changes"])
            emit(ctx, r, text)
            return
        if len(r["changes"]) > SUMMARY_OVER and not full:
            click.echo("\n".join(_summary_lines(r)))
            return
        base = r["saga"] and _base_of(t)
        for c in r["changes"]:
            click.echo(click.style(f"{c['change']:9} {quote_path(c['path'])}", bold=True) + f"  ({_who(c)})")
            if c.get("kind") == "f" and base:
                _unified(os.path.join(base, c["path"]), os.path.join(t.mountpoint, c["path"]), c)
        for line in _left_out_lines(r.get("left_out", [])):
            click.echo(line)
    run(ctx, workspace, as_json, go)


def _base_of(t):
    try:
        return t.call("status")["base"]
    except SagaError:
        return None




def _mode(path):
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


DIFF_COLOURS = {"---": dict(bold=True), "+++": dict(bold=True), "@@": dict(fg="cyan"), "-": dict(fg="red"),
                "+": dict(fg="green")}


def _coloured(line):
    """A diff line in git's colours; click.echo drops them when stdout is not a terminal."""
    for prefix, style in DIFF_COLOURS.items():
        if line.startswith(prefix):
            return click.style(line.rstrip("\n"), **style) + ("\n" if line.endswith("\n") else "")
    return line


def _unified(old, new, c):
    if c["change"] == "modified":
        a_mode, b_mode = _mode(old), _mode(new)
        if a_mode is not None and b_mode is not None and a_mode != b_mode:
            click.echo(f"old mode {a_mode:o}\nnew mode {b_mode:o}")
    a = [] if c["change"] == "added" else read_text(old)
    b = [] if c["change"] == "deleted" else read_text(new)
    if a is None or b is None:
        click.echo(f"Binary files {'/dev/null' if c['change'] == 'added' else quote_path('a/' + c['path'])} and "
                   f"{'/dev/null' if c['change'] == 'deleted' else quote_path('b/' + c['path'])} differ")
        return
    import difflib

    for line in difflib.unified_diff(a, b, quote_path(f"a/{c['path']}"), quote_path(f"b/{c['path']}")):
        click.echo(_coloured(line), nl=not line.endswith("\n"))
