"""``saga``: drive the saga of the workspace you are in.

Exit codes: 0 ok, 1 error, 2 usage error, 3 commit conflict, 4 compensation stuck,
5 no daemon serves this workspace, 7 permission denied (the workspace is another user's).

``--json`` prints one JSON object ``{"version": 1, ...}`` (NDJSON, one event per line, for
``saga log``).
"""

import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import click
import click.shell_completion

from cli.common import Group, json_error
from overlayd import __version__
from overlayd.client import ClientError, NoDaemon, PermissionDenied, connect_to_mount, mount_of
from overlayd.paths import UsageError, known_workspaces, mount_command, quote_path

CONTEXT = {"help_option_names": ["-h", "--help"]}
SCHEMA = 1
#: The keys every ``--json`` answer carries, per command (schema version 1). Objects may gain
#: keys in a compatible way; removing or renaming one bumps SCHEMA. Rendered into docs/CLI.md.
JSON_KEYS = {
    "begin": ["version", "saga"],
    "step": ["version", "step", "seconds"],
    "rollback": ["version", "saga", "compensated"],
    "abort": ["version", "saga", "compensated"],
    "commit": ["version", "saga", "changes", "count", "seconds", "left_out"],
    "commit --dry-run": ["version", "saga", "changes", "conflicts", "left_out", "dry_run"],
    "retry": ["version", "saga", "compensated"],
    "status": ["version", "saga", "steps", "writable", "busy"],
    "diff": ["version", "saga", "changes"],
    "log": ["version", "seq", "ts", "saga", "step", "kind"],
    "list": ["version", "sagas"],
    "gc": ["version", "sagas", "events", "bytes_before", "bytes_after"],
    "error": ["version", "error"],
}
GC_KEEP = 10  # ended sagas 'saga gc' keeps by default
#: Exit codes of the daemon's error codes (others exit 1): a value the daemon refuses is a usage error.
EXIT = {"conflict": 3, "stuck": 4, "no-daemon": 5, "bad-request": 2, "bad-name": 2, "permission": 7}


class SagaError(click.ClickException):
    def __init__(self, message, code=1, data=None):
        super().__init__(message)
        self.exit_code = code
        self.data = data or {}


# ---------------------------------------------------------------------- finding the workspace


def _known_workspaces():
    return [(w.get("mountpoint"), w["name"], Path(w["state_dir"])) for w in known_workspaces()]


class Target:
    """The workspace a command talks to: its name, mountpoint and state directory."""

    def __init__(self, workspace):
        path = os.path.abspath(workspace or os.environ.get("SAGA_WORKSPACE") or os.getcwd())
        self.mounted = False
        self.name = self.mountpoint = self.state_dir = None
        self.mount = mount_of(path)  # the kernel's mount table: which daemon must answer
        if self.mount:
            self.mountpoint, self.name = self.mount.point, self.mount.name
            self.mounted = True
        known = _known_workspaces()
        if self.mount:  # the state directory of this mount; a name alone may be another workspace's
            same = [k for k in known if k[1] == self.name]
            exact = [k for k in same if os.path.abspath(k[0]) == self.mountpoint]
            known = exact or (same if len(same) == 1 else [])
        for mp, name, state in known:
            if self.mount or path == mp or path.startswith(mp.rstrip("/") + "/"):
                if not self.mount:
                    self.mountpoint = mp
                self.name, self.state_dir = name, state
                break
        if self.name is None:
            raise SagaError(f"{path} is not inside an overlayd workspace; cd into one or pass -w MOUNTPOINT "
                            "(mount one with: overlayd mount BASE MOUNTPOINT)", 5)

    def remount_hint(self) -> str:
        """How to serve this workspace again: the exact mount command (and clear-mount first
        when its mount is still there, dead)."""
        info = {}
        if self.state_dir is not None:
            try:
                info = json.loads((self.state_dir / "workspace.json").read_text())
            except (OSError, ValueError):
                pass
        mount = mount_command(self.name, info.get("base", "BASE"), self.mountpoint, self.state_dir)
        if self.mounted:
            return (f"its daemon is gone and the mount is dead: clear it with: overlayd clear-mount "
                    f"{shlex.quote(self.mountpoint)}, then mount it again with: {mount}")
        return f"mount it with: {mount}"

    def call_with_progress(self, op, label, **args):
        """A long operation; on a terminal, a progress bar fed by polling saga.status."""
        if not sys.stdout.isatty():
            return self.call(op, **args)
        import threading

        result, error = {}, {}

        def work():
            try:
                result["r"] = self.call(op, **args)
            except BaseException as exc:  # re-raised in the caller's thread
                error["e"] = exc

        t = threading.Thread(target=work, daemon=True)
        t.start()
        shown = None
        while t.is_alive():
            t.join(0.2)
            try:
                with self.client(timeout=2) as c:
                    p = c.call("saga.status").get("progress")
            except (ClientError, OSError):
                p = None
            if p and p.get("total"):
                if shown is None:
                    shown = click.progressbar(length=p["total"], label=label, file=sys.stderr)
                    shown.__enter__()
                shown.update(max(0, p["done"] - shown.pos))
        if shown is not None:
            shown.update(shown.length - shown.pos)
            shown.__exit__(None, None, None)
        if "e" in error:
            raise error["e"]
        return result["r"]

    def client(self, timeout=None):
        """A connected Client of the daemon serving this mount, verified before anything is sent
        (its socket and uid are root's, yours or the mount owner's; it serves this very mount)."""
        if not self.mounted:
            raise NoDaemon("no-daemon", f"{self.mountpoint} is not mounted")
        if timeout is None:
            timeout = float(os.environ.get("SAGA_TIMEOUT", "600"))
        return connect_to_mount(self.mount, timeout)

    def socket(self) -> str:
        """The verified socket path of this mount's daemon (errors as for call)."""
        return self.call(None)

    def call(self, op, **args):
        try:
            with self.client() as c:
                return c.path if op is None else c.call(op, **args)
        except NoDaemon:
            raise SagaError(f"no daemon serves the workspace {self.name} ({self.mountpoint}); "
                            f"{self.remount_hint()}", 5) from None
        except PermissionDenied as exc:
            raise SagaError(f"permission denied: {exc.message}", 7) from None
        except UsageError as exc:  # paths.UnsafePath: a planted runtime directory
            raise SagaError(str(exc), 1) from None
        except ClientError as exc:
            raise SagaError(exc.message, EXIT.get(exc.code, 1), exc.data) from None
        except OSError as exc:
            raise SagaError(f"cannot talk to the daemon of {self.name}: {exc}", 5) from None

    def read(self, op, **args):
        """A read-only op: from the daemon, or from the journal when the daemon is down."""
        try:
            return self.call(op, **args)
        except SagaError as exc:
            if exc.exit_code != 5 or self.state_dir is None:
                raise
        from journal import Journal, JournalError
        from overlayd.engine.records import status_of

        try:
            j = Journal.open(self.state_dir, readonly=True)
        except JournalError as e:
            raise SagaError(str(e), 1) from None
        try:
            if op == "saga.status":
                return {**status_of(j), "daemon": False}
            if op == "saga.log":
                events = j.events(saga=args.get("saga"), since=args.get("since", 0))
                return {"events": [e for e in events if args.get("ops") or e["kind"] != "op"]}
            if op == "saga.list":
                return {"sagas": j.sagas()}
            if op == "saga.diff":
                return _offline_diff(j, self.state_dir, args.get("step"))
        except JournalError as e:
            raise SagaError(str(e), 1) from None
        finally:
            j.close()
        raise SagaError(f"{op} needs the daemon", 5)


def _offline_diff(j, state_dir, step):
    from overlayd import merge, osutil

    info = json.loads((state_dir / "workspace.json").read_text())
    sid = j.meta("active_saga")
    if not sid:
        raise SagaError("no saga is active; nothing to diff", 1)
    stack = j.meta("stack", {"layers": []})["layers"]
    base_fd = os.open(info["base"], osutil.DIR_FLAGS)
    fds = []
    try:
        for lid in stack:
            fds.append((lid, os.open(state_dir / "layers" / lid, osutil.DIR_FLAGS)))
        changes = merge.summarize(merge.plan_commit(base_fd, fds))
    finally:
        os.close(base_fd)
        for _, fd in fds:
            os.close(fd)
    steps = {s["layer"]: s for s in j.steps(sid) if s.get("layer")}
    for c in changes:
        s = steps.get(c.pop("layer"), {})
        c["step"], c["step_name"] = s.get("index"), s.get("name")
    if step is not None:
        changes = [c for c in changes if str(c["step"]) == str(step) or c["step_name"] == step]
    return {"saga": j.saga(sid), "changes": changes, "daemon": False}


# ---------------------------------------------------------------------- output


def emit(ctx, data, text):
    if ctx.obj["json"]:
        click.echo(json.dumps({"version": SCHEMA, **data}, default=str))
    elif text:
        click.echo(text)


def parse_duration(value, option=None):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration (examples: 30s, 5m, 1h, 7d, 250ms)",
                                 param_hint=option)
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_size(value, option=None):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size (examples: 100M, 2G, 4096)", param_hint=option)
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]


def _complete_target(ctx):
    workspace = ctx.params.get("workspace") or (ctx.find_root().params or {}).get("workspace")
    return Target(workspace)


def complete_steps(ctx, param, incomplete):
    """Shell completion: the live steps of the active saga, by name (and index)."""
    try:
        steps = _complete_target(ctx).read("saga.status")["steps"]
    except Exception:  # completion must never print a traceback into the shell
        return []
    live = [st for st in steps if st["state"] in ("open", "done")]
    names = [st["name"] for st in live] + [str(st["index"]) for st in live]
    return [click.shell_completion.CompletionItem(n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


def complete_sagas(ctx, param, incomplete):
    """Shell completion: the workspace's sagas, by name and id."""
    try:
        sagas = _complete_target(ctx).read("saga.list")["sagas"]
    except Exception:
        return []
    names = [sg["name"] for sg in sagas] + [str(sg["id"]) for sg in sagas]
    return [click.shell_completion.CompletionItem(n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema version 1).")
# type=str, not click.Path: Path stat()s its value, which hangs on the mount of a stopped daemon
ws_option = click.option("-w", "--workspace", "workspace", envvar="SAGA_WORKSPACE", type=str, metavar="MOUNTPOINT",
                         help="The workspace's mountpoint (default: the one containing the current directory).")


def common(fn):
    fn = json_option(fn)
    fn = ws_option(fn)
    return fn


def run(ctx, workspace, as_json, fn):
    ctx.obj = ctx.obj or {}
    ctx.obj["json"] = as_json or ctx.obj.get("json", False)
    try:
        target = Target(workspace or ctx.obj.get("workspace"))
        try:
            fn(target)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            # fn only renders the daemon's answers: one that lacks a field is not an overlayd reply
            raise SagaError(f"the daemon's answer is not what this saga command expects ({type(exc).__name__}: "
                            f"{exc}); is the daemon another version of overlayd? restart it "
                            "(overlayd unmount, then mount)", 1) from None
    except SagaError as exc:
        if ctx.obj["json"]:
            click.echo(json.dumps({"version": SCHEMA, "error": {"message": exc.message, "exit_code": exc.exit_code,
                                                                **{k: v for k, v in exc.data.items() if k != "message"}}},
                                  default=str))
            sys.exit(exc.exit_code)
        raise


@click.group(cls=Group, context_settings=CONTEXT)
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


def _saga_line(s):
    return f"saga {s['id']} {s['name']!r}: {s['state']}"


def _cut_line(cut):
    what = {"budget:timeout": "its time budget (--timeout) ran out", "budget:saga-timeout":
            "the saga's time budget (saga begin --timeout) ran out", "budget:bytes": "it wrote more than --max-bytes",
            "budget:files": "it changed more than --max-files paths", "budget:spinning":
            "it rewrote one file with the same content --max-spins times"}.get(cut["reason"], cut["reason"])
    undone = "the whole saga was aborted" if cut.get("policy") == "saga" else "the step was rolled back"
    return f"step {cut['step']} was cut: {what}; {undone}"


def _resume_hint(s, t):
    file = ((s.get("annotations") or {}).get("definition") or {}).get("file") or "FILE"
    return f"continue with: saga run {shlex.quote(file)} -w {shlex.quote(str(t.mountpoint))} --resume"


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def time_wall():
    import time

    return time.time()


budget_options = [
    click.option("--timeout", metavar="DUR", help="Wall-time budget (e.g. 10m)."),
    click.option("--max-bytes", metavar="SIZE", help="Budget of bytes written (e.g. 500M)."),
    click.option("--max-files", type=click.IntRange(min=1), metavar="N", help="Budget of paths changed."),
    click.option("--max-spins", type=click.IntRange(min=1), metavar="N",
                 help="Cut when one file is rewritten with identical content N times in a row."),
]


def with_budgets(fn):
    for opt in reversed(budget_options):
        fn = opt(fn)
    return fn


def budget_args(timeout, max_bytes, max_files, max_spins):
    for flag, value in (("--timeout", parse_duration(timeout, "'--timeout'")),
                        ("--max-bytes", parse_size(max_bytes, "'--max-bytes'"))):
        if value is not None and value <= 0:
            raise click.BadParameter("must be more than 0", param_hint=f"'{flag}'")
    return {k: v for k, v in dict(timeout=parse_duration(timeout, "'--timeout'"),
                                  max_bytes=parse_size(max_bytes, "'--max-bytes'"),
                                  max_files=max_files, max_spins=max_spins).items() if v is not None}


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
    if not 0 < comp_timeout <= 7 * 86400:
        raise click.BadParameter("must be more than 0 and at most 7d", param_hint="'--compensate-timeout'")
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


def _left_out_lines(left):
    """One line per left-out path (a directory counts what it takes along)."""
    out = []
    for c in left:
        why = {"ignored": "ignored by git", "exclude": "excluded"}.get(c["reason"], c["reason"])
        more = f", and {c['entries']} entries in it" if c.get("entries") else ""
        out.append(f"left out  {quote_path(c['path'])}  ({why}{more}; step {c['step']} {c['step_name']})")
    return out


rules_options = [
    click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
                 help="Leave out paths matching GLOB (gitignore syntax; repeatable), besides the "
                      "workspace's exclude list (STATE/commit.json)."),
    click.option("--include-ignored", is_flag=True,
                 help="Take the paths git ignores too (by default a base that is a git work tree gets none of them)."),
]


def with_rules(fn):
    for opt in reversed(rules_options):
        fn = opt(fn)
    return fn


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
            lines += [f"CONFLICT  {quote_path(c['path'])}" + (f"  ({c['reason']})" if c.get("reason") else "")
                      for c in r["conflicts"]]
            emit(ctx, r, "\n".join(lines) or "nothing to commit")
            if r["conflicts"]:
                sys.exit(3)
        else:
            n = sum(1 + c.get("entries", 0) for c in r.get("left_out", []))
            emit(ctx, r, f"committed {_saga_line(r['saga'])}: {r['count']} change(s) in {r['seconds']:.2f}s"
                 + (f"; {n} path(s) left out (ignored or excluded), dropped with the layers" if n else ""))

    try:
        run(ctx, workspace, as_json, go)
    except SagaError as exc:
        if exc.exit_code == 3 and not ctx.obj["json"]:
            for c in exc.data.get("conflicts", []):
                click.echo(f"conflict: {quote_path(c['path'])}" + (f" ({c['reason']})" if c.get("reason") else ""), err=True)
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


@main.command()
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


def _read_text(path):
    """The lines of a text file; None for a binary one (a NUL byte or not UTF-8, as git decides);
    [] when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    if b"\0" in data[:8000]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 4:  # not merely a character cut at the 1 MiB limit
            return None
        text = data[:exc.start].decode("utf-8")
    return text.splitlines(keepends=True)


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
    a = [] if c["change"] == "added" else _read_text(old)
    b = [] if c["change"] == "deleted" else _read_text(new)
    if a is None or b is None:
        click.echo(f"Binary files {'/dev/null' if c['change'] == 'added' else quote_path('a/' + c['path'])} and "
                   f"{'/dev/null' if c['change'] == 'deleted' else quote_path('b/' + c['path'])} differ")
        return
    for line in difflib.unified_diff(a, b, quote_path(f"a/{c['path']}"), quote_path(f"b/{c['path']}")):
        click.echo(_coloured(line), nl=not line.endswith("\n"))


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
        r = t.call("saga.gc", older_than=parse_duration(older_than, "'--older-than'"), keep=keep)
        emit(ctx, r, f"removed {len(r['sagas'])} saga(s) and {r['events']} event(s); "
                     f"state {r['bytes_before']} -> {r['bytes_after']} bytes")
    run(ctx, workspace, as_json, go)


# ---------------------------------------------------------------------- saga run FILE


class _RunDisplay:
    """Renders a saga run's events: NDJSON (--json), or lines with a live status line on a terminal."""

    def __init__(self, as_json, stream=None):
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.tty = not as_json and self.stream.isatty()
        self.status_shown = False
        self.last_progress = 0.0

    def _line(self, text, err=False):
        self._clear()
        click.echo(text, err=err)

    def _clear(self):
        if self.status_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.status_shown = False

    def _status(self, text):
        import shutil

        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()
        self.status_shown = True

    def __call__(self, ev):
        from overlayd.runner import human_size

        kind = ev["event"]
        if self.as_json:
            if kind == "step.output":
                return
            if kind == "step.progress":
                if time_now() - self.last_progress < 2.0:
                    return
                self.last_progress = time_now()
            click.echo(json.dumps(ev, default=str))
            return
        if kind == "saga.begin":
            if ev.get("resume"):
                done = ", ".join(ev.get("complete") or []) or "none"
                self._line(f"resuming saga {ev['saga']} {ev['name']!r} in {ev['mountpoint']}; complete steps: {done}")
            else:
                self._line(f"saga {ev['saga']} {ev['name']!r}: {ev['steps']} step(s) in {ev['mountpoint']}")
        elif kind == "saga.retry":
            self._line(f"the saga was {ev['state']}: retrying its compensation")
        elif kind == "step.start":
            self.of = ev["of"]
            attempt = f" (attempt {ev['attempt']}/{ev['attempts']})" if ev["attempts"] > 1 else ""
            if self.tty:
                self._status(f"[{ev['position']}/{ev['of']}] {ev['step']}{attempt} ...")
            else:
                self._line(f"[{ev['position']}/{ev['of']}] {ev['step']}{attempt}: started")
        elif kind == "step.output":
            self._line(f"    | {ev['line']}")
            if self.tty and getattr(self, "_last_status", None):
                self._status(self._last_status)
        elif kind == "step.progress":
            if self.tty:
                size = f"  {ev['files']} file(s) {human_size(ev['bytes'])}" if ev.get("bytes") is not None else ""
                line = f"  | {ev['line']}" if ev.get("line") else ""
                self._last_status = f"[{ev['position']}/{ev['of']}] {ev['step']}  {ev['elapsed']:.0f}s{size}{line}"
                self._status(self._last_status)
        elif kind in ("step.done", "step.failed"):
            self._last_status = None
            size = f", {ev['files']} file(s), {human_size(ev['bytes'])}" if ev.get("bytes") is not None else ""
            where = f"[{ev['position']}/{getattr(self, 'of', '?')}] {ev['step']}"
            if kind == "step.done":
                self._line(f"{where}: ok in {ev['seconds']:.1f}s{size}")
            else:
                why = ev.get("detail") or (f"exit status {ev['exit_status']}" if ev.get("exit_status") is not None
                                           else ev.get("reason"))
                retry = "; trying again" if ev.get("will_retry") else ""
                self._line(f"{where}: FAILED ({why}) after {ev['seconds']:.1f}s{retry}")
        elif kind == "compensated":
            why = {"retry": " (the failed attempt)", "resume": " (incomplete at the interruption)"}.get(ev["reason"], "")
            self._line(f"compensated step {ev['index']} {ev['step']!r}{why}"
                       + (" - only partially (compensatable = partial)" if ev.get("partial") else ""))
        elif kind == "committed":
            self._line(f"committed: {ev['count']} change(s) in {ev['seconds']:.2f}s")
        elif kind == "aborted":
            self._line("the saga is aborted")
        elif kind == "end":
            if ev["exit_code"] == 0:
                self._line(ev["message"])
            else:
                self._line(f"saga run: {ev['message']}", err=True)


def time_now():
    import time

    return time.monotonic()


@main.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--commit/--no-commit", default=True, show_default=True,
              help="Commit when every step is done, or leave the saga open for review.")
@click.option("--resume", is_flag=True,
              help="Continue the active saga started from FILE after a crash or a stop (refused if FILE changed).")
@common
@click.pass_context
def run_cmd(ctx, file, commit, resume, workspace, as_json):
    """Run the saga defined in FILE (TOML; see docs/DEFINITIONS.md): every step in its own layer.

    A failed step triggers its on_failure policy: compensate the steps before it, newest
    first (never past a completed step with compensatable = "none"), retry forward, or stop.
    The definition and each step's outcome are journaled, so after a crash of this command or
    of the daemon, --resume continues after the last complete step. The whole definition is
    validated before anything runs.

    \b
    Exit codes:
      0  every step done; committed (or left open with --no-commit)
      1  a step failed: every step was compensated, the saga aborted (or another error)
      2  the definition is invalid (each problem is printed with its line and key)
      3  the commit was refused (conflicts); the saga stays active
      4  stuck, a person must decide: a failure after a pivot step, retries used up,
         a compensation failing, or an interrupted pivot step
      5  no daemon serves the workspace (or it stopped during the run)
      6  a step failed with on_failure = "stop"; the saga is left as it is
      7  permission denied: the workspace is another user's
      130 interrupted (SIGINT/SIGTERM); continue with --resume
    """
    import shlex
    import signal as _signal

    from overlayd.runner import Coordinator, DefinitionError, load

    ctx.obj = ctx.obj or {}
    as_json = as_json or ctx.obj.get("json", False)

    def end(status, exit_code, message):
        """The `end` event, always the last line of --json, also when nothing could run."""
        click.echo(json.dumps({"version": SCHEMA, "event": "end", "saga": None, "time": round(time_wall(), 3),
                               "status": status, "exit_code": exit_code, "message": message}))

    try:
        definition = load(file)
    except DefinitionError as exc:
        if as_json:
            click.echo(json.dumps({"version": SCHEMA, "error": {
                "message": exc.text(), "exit_code": 2, "problems": [p.as_dict() for p in exc.problems]}}))
            end("invalid", 2, exc.text())
        else:
            click.echo(exc.text(), err=True)
        sys.exit(2)

    def go(t):
        hint = f"saga run {shlex.quote(os.path.abspath(file))} -w {shlex.quote(t.mountpoint)} --resume"
        display = _RunDisplay(ctx.obj["json"])
        coord = Coordinator(definition, t.socket(), commit=commit, on_event=display, resume_hint=hint,
                            expect=t.mount)
        old = {s: _signal.signal(s, _signal.default_int_handler) for s in (_signal.SIGTERM, _signal.SIGHUP)}
        try:
            result = coord.run(resume=resume)
        finally:
            for s, h in old.items():
                _signal.signal(s, h)
        sys.exit(result.exit_code)

    if as_json:
        try:
            Target(workspace or ctx.obj.get("workspace"))
        except SagaError as exc:
            click.echo(json_error(exc.message, exc.exit_code))
            end("no-daemon" if exc.exit_code == 5 else "error", exc.exit_code, exc.message)
            sys.exit(exc.exit_code)
    run(ctx, workspace, as_json, go)
