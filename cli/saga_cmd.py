"""``saga``: drive the saga of the workspace you are in.

Exit codes: 0 ok, 1 error, 2 usage error, 3 commit conflict (or a merge left conflict markers), 4 compensation stuck,
5 no daemon serves this workspace, 7 permission denied (the workspace is another user's).

``--json`` prints one JSON object ``{"version": 1, ...}`` (NDJSON, one event per line, for
``saga log``).
"""

import json
import sys

import click

from overlayd.cli import git_cmd
from overlayd.cli.common import Group
from overlayd.cli.saga_common import (CONTEXT, GC_KEEP, JSON_KEYS, SCHEMA, SagaError, _cut_line, _duration,
                             _left_out_lines, _resume_hint, _saga_line, budget_args, common, complete_sagas,
                             complete_steps, emit, parse_duration, parse_size, run, time_wall, with_budgets,
                             with_rules)
from overlayd import __version__
from overlayd.paths import quote_path

__all__ = ["main", "JSON_KEYS", "SCHEMA", "parse_duration", "parse_size"]  # cli.docs and the tests use these


@click.group(cls=Group, context_settings=CONTEXT,
             lazy={"diff": "overlayd.cli.saga_diff:diff", "fork": "overlayd.cli.saga_fork:fork",
                   "resolve": "overlayd.cli.saga_resolve:resolve", "run": "overlayd.cli.saga_run:run_cmd"})
@click.version_option(__version__, "--version", prog_name="saga")
@click.option("-w", "--workspace", envvar="SAGA_WORKSPACE", type=str, metavar="MOUNTPOINT",
              help="The workspace's mountpoint.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output for every command.")
@click.pass_context
def main(ctx, workspace, as_json):
    """Sagas in an overlayd workspace: steps you can undo, a whole you can commit.

    \b
    Example:
        cd /mnt/ws
        saga begin refactor
        saga step analyse
        saga step migrate --compensate 'dropdb scratch'
        saga rollback            # undo the open step
        saga commit              # merge every step into the base
    """
    ctx.obj = {"workspace": workspace, "json": as_json}


@main.command()
@click.argument("name")
@with_budgets
@common
@click.pass_context
def begin(ctx, name, timeout, max_bytes, max_files, max_spins, workspace, as_json):
    """Begin a saga called NAME (one active saga per workspace).

    Budgets given here apply to the whole saga: when one is exceeded the saga is aborted.
    """
    def go(t):
        r = t.call("saga.begin", name=name, budgets=budget_args(timeout, max_bytes, max_files, max_spins))
        emit(ctx, r, f"began {_saga_line(r['saga'])}; start a step with: saga step NAME")
    run(ctx, workspace, as_json, go)


@main.command()
@click.argument("name")
@click.option("--compensate", metavar="CMD", help="Shell command undoing this step's effects outside the filesystem.")
@with_budgets
@click.option("--on-budget", "policy", type=click.Choice(["step", "saga"]), default="step", show_default=True,
              help="What a budget cut rolls back: this step, or the whole saga.")
@click.option("--compensate-retries", "retries", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Attempts of the compensation command before the saga is stuck (as compensate_retries in "
                   "a definition).")
@click.option("--retries", "old_retries", type=click.IntRange(1, 100), hidden=True)  # the old name
@click.option("--compensate-timeout", metavar="DUR", default="1m", show_default=True,
              help="Time limit of one compensation attempt (a failed attempt is retried after 0.5 s, then 1 s).")
@common
@click.pass_context
def step(ctx, name, compensate, timeout, max_bytes, max_files, max_spins, policy, retries, old_retries,
         compensate_timeout, workspace, as_json):
    """Finish the open step and open a new step NAME, with a fresh layer.

    When a budget is exceeded the daemon rolls the step back by itself (or aborts the saga with
    --on-budget saga); writes then fail with EROFS until the next step, and `saga status` says why.
    A compensation command that hangs holds the workspace for at most about
    --compensate-retries x --compensate-timeout (3 minutes by default).
    """
    comp_timeout = parse_duration(compensate_timeout, "'--compensate-timeout'")
    args = dict(name=name, compensate=compensate, retries=old_retries or retries, compensate_timeout=comp_timeout,
                policy=policy, **budget_args(timeout, max_bytes, max_files, max_spins))

    def go(t):
        r = t.call("saga.step", **{k: v for k, v in args.items() if v is not None})
        emit(ctx, r, f"step {r['step']['index']} {name!r} open")
    run(ctx, workspace, as_json, go)


@main.command()
@click.option("--to", "to", metavar="STEP", shell_complete=complete_steps,
              help="Roll back every step after STEP (a name or 1-based index; 0 keeps none).")
@common
@click.pass_context
def rollback(ctx, to, workspace, as_json):
    """Undo the open step, or every step after --to STEP (newest first)."""
    def go(t):
        r = t.call_with_progress("saga.rollback", "rolling back", to=to)
        done = r.get("compensated") or []
        emit(ctx, r, f"rolled back step(s) {', '.join(map(str, done))}; writes are refused until: saga step NAME"
             if done else "nothing to roll back")
    run(ctx, workspace, as_json, go)


@main.command()
@common
@click.pass_context
def abort(ctx, workspace, as_json):
    """Roll back every step and end the saga as aborted."""
    def go(t):
        r = t.call_with_progress("saga.abort", "aborting")
        emit(ctx, r, f"aborted {_saga_line(r['saga'])}")
    run(ctx, workspace, as_json, go)


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would be committed, left out, and any conflicts; change nothing.")
@with_rules
@common
@click.pass_context
def commit(ctx, dry_run, exclude, include_ignored, workspace, as_json):
    """Merge every step into the base (crash-safe; refused on conflicts, exit 3).

    Paths git ignores (when the base is a git work tree, by the rules of the view) and paths
    matching the exclude patterns are left out: they are dropped with the layers, never
    written to the base. --dry-run lists them as "left out".
    """
    rule_args = {"exclude": list(exclude) or None, "include_ignored": include_ignored or None}

    def go(t):
        r = t.call("saga.commit", dry_run=dry_run, **rule_args) if dry_run \
            else t.call_with_progress("saga.commit", "committing", dry_run=False, **rule_args)
        if dry_run:
            lines = [f"{c['change']:9} {quote_path(c['path'])}  (step {c['step']} {c['step_name']})"
                     for c in r["changes"]]
            lines += _left_out_lines(r.get("left_out", []))
            lines += [f"settled   {quote_path(c['path'])}  (git: {c['how']})" for c in r.get("settled", [])]
            lines += [f"CONFLICT  {quote_path(c['path'])}" + (f"  ({c['reason']})" if c.get("reason") else "")
                      + (f"  resolve: {c['resolve']}" if c.get("resolve") else "") for c in r["conflicts"]]
            emit(ctx, r, "\n".join(lines) or "nothing to commit")
            if r["conflicts"]:
                sys.exit(3)
        else:
            n = sum(1 + c.get("entries", 0) for c in r.get("left_out", []))
            g = len(r.get("settled", []))
            emit(ctx, r, f"committed {_saga_line(r['saga'])}: {r['count']} change(s) in {r['seconds']:.2f}s"
                 + (f"; {n} path(s) left out (ignored or excluded), dropped with the layers" if n else "")
                 + (f"; {g} path(s) under .git/ changed on both sides, settled by the git policy" if g else ""))

    try:
        run(ctx, workspace, as_json, go)
    except SagaError as exc:
        if exc.exit_code == 3 and not ctx.obj["json"]:
            for c in exc.data.get("conflicts", []):
                click.echo(f"conflict: {quote_path(c['path'])}" + (f" ({c['reason']})" if c.get("reason") else "")
                           + (f"  resolve: {c['resolve']}" if c.get("resolve") else ""), err=True)
        raise


@main.command()
@common
@click.pass_context
def retry(ctx, workspace, as_json):
    """Resume a stuck compensation after fixing its cause."""
    def go(t):
        r = t.call("saga.retry")
        emit(ctx, r, f"compensation finished: {_saga_line(r['saga'])}")
    run(ctx, workspace, as_json, go)


@main.command()
@common
@click.pass_context
def status(ctx, workspace, as_json):
    """Show the active saga and its steps (works while the daemon is down)."""
    def go(t):
        r = t.read("saga.status")
        s = r["saga"]
        if s is None:
            text = f"no saga is active in {t.mountpoint}"
            last = r.get("last")
            if last:
                text += f"\n  the last one: {_saga_line(last)}"
                if last.get("cut"):
                    text += f"\n  {_cut_line(last['cut'])}"
        else:
            lines = [_saga_line(s)]
            if s.get("cut"):
                lines.append(f"  {_cut_line(s['cut'])}")
            comp = r.get("compensation")
            if comp:
                left = max(0, comp["deadline"] - time_wall())
                lines.append(f"  compensating step {comp['step']} {comp['name']!r}: attempt {comp['attempt']}/"
                             f"{comp['attempts']} of: {comp['command']}; at most {_duration(left)} left "
                             f"(each attempt is cut after {_duration(comp['timeout'])})")
            runner = (s.get("annotations") or {}).get("runner") or {}
            if s["state"] == "active" and runner.get("phase") in ("stopped", "stuck", "interrupted"):
                lines.append(f"  saga run {runner['phase']}: " + (runner.get("message") or _resume_hint(s, t)))
            if s.get("error"):
                lines.append(f"  error: {s['error']}")
                if s.get("stderr_tail"):
                    lines.append("  stderr: " + s["stderr_tail"].strip().replace("\n", "\n          "))
            for st in r["steps"]:
                lines.append(f"  step {st['index']} {st['name']!r}: {st['state']}"
                             + (f"  compensate: {quote_path(st['compensate'])}" if st.get("compensate") else ""))
            if r.get("writable") is False and s["state"] == "active":
                lines.append("  no step is open: writes are refused until: saga step NAME")
            if r.get("daemon") is False:
                lines.append("  (daemon not running: read from the journal)")
            text = "\n".join(lines)
        emit(ctx, r, text)
    run(ctx, workspace, as_json, go)


@main.command()
@click.argument("saga_ref", required=False, metavar="[SAGA]", shell_complete=complete_sagas)
@click.option("--ops", is_flag=True, help="Also show the audit trail: every change, with pid, uid and process.")
@common
@click.pass_context
def log(ctx, saga_ref, ops, workspace, as_json):
    """Show the journal's events, of every saga or of SAGA (an id, or a name: its latest saga),
    in time order (NDJSON with --json); works while the daemon is down.

    The audit trail (--ops) is journaled in batches, so an op event's seq may come after the
    step transition that followed it; it is shown where its time puts it.
    """
    def go(t):
        saga_id = None
        if saga_ref is not None:
            sagas = t.read("saga.list")["sagas"]
            ids = [s["id"] for s in sagas if str(s["id"]) == saga_ref] or \
                [s["id"] for s in sagas if s["name"] == saga_ref]
            if not ids:
                raise SagaError(f"no saga {saga_ref!r} in {t.mountpoint} (give an id or a name); see: saga list", 1)
            saga_id = max(ids)
        r = t.read("saga.log", saga=saga_id, ops=ops)
        import datetime

        events = sorted(r["events"], key=lambda e: e["ts"]) if ops else r["events"]
        for e in events:
            if ctx.obj["json"]:
                click.echo(json.dumps({"version": SCHEMA, **e}, default=str))
            else:
                ts = datetime.datetime.fromtimestamp(e["ts"]).isoformat(sep=" ", timespec="milliseconds")
                extra = {k: v for k, v in e.items() if k not in ("seq", "ts", "saga", "step", "kind")}
                where = f"saga {e['saga']}" + (f" step {e['step']}" if e.get("step") else "") if e.get("saga") else ""
                click.echo(f"{e['seq']:6} {ts} {e['kind']:20} {where} {json.dumps(extra) if extra else ''}".rstrip())
    run(ctx, workspace, as_json, go)


@main.command("list")
@common
@click.pass_context
def list_(ctx, workspace, as_json):
    """List this workspace's sagas, past and present."""
    def go(t):
        r = t.read("saga.list")
        emit(ctx, r, "\n".join(_saga_line(s) for s in r["sagas"]) or "no sagas yet")
    run(ctx, workspace, as_json, go)


@main.command()
@click.option("--older-than", metavar="DUR", help="Remove ended sagas that ended longer ago than this (e.g. 7d).")
@click.option("--keep", type=click.IntRange(min=0), metavar="N",
              help=f"Keep the N most recent ended sagas (default: {GC_KEEP}, unless --older-than or --all is given).")
@click.option("--all", "remove_all", is_flag=True, help="Remove every ended saga's records.")
@common
@click.pass_context
def gc(ctx, older_than, keep, remove_all, workspace, as_json):
    """Remove ended sagas' journal records, orphaned layers and the trash (never the active saga).

    With no option it keeps the 10 most recent ended sagas.

    \b
    Example:
        saga gc --older-than 30d
    """
    if remove_all and (keep is not None or older_than):
        raise click.UsageError("--all removes every ended saga: give it alone, or --keep/--older-than instead")
    if remove_all:
        keep = 0
    elif keep is None and not older_than:
        keep = GC_KEEP

    def go(t):
        r = t.call("saga.gc", older_than=parse_duration(older_than, "'--older-than'", zero=True, maximum=None),
                   keep=keep)
        emit(ctx, r, f"removed {len(r['sagas'])} saga(s) and {r['events']} event(s); "
                     f"state {r['bytes_before']} -> {r['bytes_after']} bytes")
    run(ctx, workspace, as_json, go)


# commands with a module of their own: diff, fork, resolve and run are imported when used (Group.lazy)
git_cmd.register(main)  # saga export --git, and commit's --git options
