"""``saga``: drive the saga of the workspace you are in.

Exit codes: 0 ok, 1 error, 2 usage error, 3 commit conflict, 4 compensation stuck,
5 no daemon serves this workspace.

``--json`` prints one JSON object ``{"version": 1, ...}`` (NDJSON, one event per line, for
``saga log``).
"""

import difflib
import json
import os
import re
import sys

import click

from overlayd import __version__
from overlayd.client import Client, ClientError, NoDaemon
from overlayd.paths import socket_path, state_root

CONTEXT = {"help_option_names": ["-h", "--help"]}
SCHEMA = 1
#: The keys every ``--json`` answer carries, per command (schema version 1). Objects may gain
#: keys in a compatible way; removing or renaming one bumps SCHEMA. Rendered into docs/CLI.md.
JSON_KEYS = {
    "begin": ["version", "saga"],
    "step": ["version", "step", "seconds"],
    "rollback": ["version", "saga", "compensated"],
    "abort": ["version", "saga", "compensated"],
    "commit": ["version", "saga", "changes", "seconds"],
    "commit --dry-run": ["version", "saga", "changes", "conflicts", "dry_run"],
    "retry": ["version", "saga", "compensated"],
    "status": ["version", "saga", "steps", "writable", "busy"],
    "diff": ["version", "saga", "changes"],
    "log": ["version", "seq", "ts", "saga", "step", "kind"],
    "list": ["version", "sagas"],
    "gc": ["version", "sagas", "events", "bytes_before", "bytes_after"],
    "error": ["version", "error"],
}
EXIT = {"conflict": 3, "stuck": 4, "no-daemon": 5}


class SagaError(click.ClickException):
    def __init__(self, message, code=1, data=None):
        super().__init__(message)
        self.exit_code = code
        self.data = data or {}


# ---------------------------------------------------------------------- finding the workspace


def _mounts():
    """(mountpoint, workspace name) of every overlayd mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "fuse.overlayd" and fields[sep + 2].startswith("overlayd:"):
                mp = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                out.append((mp, fields[sep + 2].split(":", 1)[1]))
    return out


def _known_workspaces():
    root = state_root()
    out = []
    if root.is_dir():
        for entry in root.iterdir():
            try:
                info = json.loads((entry / "workspace.json").read_text())
            except (OSError, ValueError):
                continue
            out.append((info["mountpoint"], info["name"], entry))
    return out


class Target:
    """The workspace a command talks to: its name, mountpoint and state directory."""

    def __init__(self, workspace):
        path = os.path.abspath(workspace or os.environ.get("SAGA_WORKSPACE") or os.getcwd())
        self.mounted = False
        self.name = self.mountpoint = self.state_dir = None
        best = None
        for mp, name in _mounts():
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) > len(best[0]):
                    best = (mp, name)
        if best:
            self.mountpoint, self.name = best
            self.mounted = True
        for mp, name, state in _known_workspaces():
            if (self.name and name == self.name) or (not self.name and (path == mp or path.startswith(mp.rstrip("/") + "/"))):
                self.mountpoint, self.name, self.state_dir = mp, name, state
                break
        if self.name is None:
            raise SagaError(f"{path} is not inside an overlayd workspace; cd into one or pass -w MOUNTPOINT "
                            "(mount one with: overlayd mount BASE MOUNTPOINT)", 5)

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
                with Client(socket_path(self.name), timeout=2) as c:
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

    def call(self, op, **args):
        try:
            with Client(socket_path(self.name), timeout=float(os.environ.get("SAGA_TIMEOUT", "600"))) as c:
                return c.call(op, **args)
        except NoDaemon:
            raise SagaError(f"no daemon serves the workspace {self.name} ({self.mountpoint}); "
                            f"mount it with: overlayd mount BASE {self.mountpoint}", 5) from None
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
        from overlayd.saga import status_of

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


def parse_duration(value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration (examples: 30s, 5m, 1h, 7d, 250ms)")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_size(value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size (examples: 100M, 2G, 4096)")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]


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
        fn(target)
    except SagaError as exc:
        if ctx.obj["json"]:
            click.echo(json.dumps({"version": SCHEMA, "error": {"message": exc.message, "exit_code": exc.exit_code,
                                                                **{k: v for k, v in exc.data.items() if k != "message"}}},
                                  default=str))
            sys.exit(exc.exit_code)
        raise


@click.group(context_settings=CONTEXT)
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


budget_options = [
    click.option("--timeout", metavar="DUR", help="Wall-time budget (e.g. 10m)."),
    click.option("--max-bytes", metavar="SIZE", help="Budget of bytes written (e.g. 500M)."),
    click.option("--max-files", type=int, metavar="N", help="Budget of paths changed."),
    click.option("--max-spins", type=int, metavar="N",
                 help="Cut when one file is rewritten with identical content N times in a row."),
]


def with_budgets(fn):
    for opt in reversed(budget_options):
        fn = opt(fn)
    return fn


def budget_args(timeout, max_bytes, max_files, max_spins):
    return {k: v for k, v in dict(timeout=parse_duration(timeout), max_bytes=parse_size(max_bytes),
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
@click.option("--retries", type=int, default=3, show_default=True, help="Attempts of the compensation command.")
@click.option("--compensate-timeout", metavar="DUR", default="5m", show_default=True,
              help="Time limit of one compensation attempt.")
@common
@click.pass_context
def step(ctx, name, compensate, timeout, max_bytes, max_files, max_spins, policy, retries, compensate_timeout,
         workspace, as_json):
    """Finish the open step and open a new step NAME, with a fresh layer.

    When a budget is exceeded the daemon rolls the step back by itself (or aborts the saga with
    --on-budget saga); writes then fail with EROFS until the next step, and `saga status` says why.
    """
    args = dict(name=name, compensate=compensate, retries=retries, compensate_timeout=parse_duration(compensate_timeout),
                policy=policy, **budget_args(timeout, max_bytes, max_files, max_spins))

    def go(t):
        r = t.call("saga.step", **{k: v for k, v in args.items() if v is not None})
        emit(ctx, r, f"step {r['step']['index']} {name!r} open")
    run(ctx, workspace, as_json, go)


@main.command()
@click.option("--to", "to", metavar="STEP", help="Roll back every step after STEP (a name or 1-based index; 0 keeps none).")
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
@click.option("--dry-run", is_flag=True, help="Show what would be committed and any conflicts; change nothing.")
@common
@click.pass_context
def commit(ctx, dry_run, workspace, as_json):
    """Merge every step into the base (crash-safe; refused on conflicts, exit 3)."""
    def go(t):
        r = t.call("saga.commit", dry_run=dry_run) if dry_run else t.call_with_progress("saga.commit", "committing",
                                                                                         dry_run=False)
        if dry_run:
            lines = [f"{c['change']:9} {c['path']}  (step {c['step']} {c['step_name']})" for c in r["changes"]]
            lines += [f"CONFLICT  {c['path']}" + (f"  ({c['reason']})" if c.get("reason") else "")
                      for c in r["conflicts"]]
            emit(ctx, r, "\n".join(lines) or "nothing to commit")
            if r["conflicts"]:
                sys.exit(3)
        else:
            emit(ctx, r, f"committed {_saga_line(r['saga'])}: {r['changes']} change(s) in {r['seconds']:.2f}s")

    try:
        run(ctx, workspace, as_json, go)
    except SagaError as exc:
        if exc.exit_code == 3 and not ctx.obj["json"]:
            for c in exc.data.get("conflicts", []):
                click.echo(f"conflict: {c['path']}" + (f" ({c['reason']})" if c.get("reason") else ""), err=True)
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
        else:
            lines = [_saga_line(s)]
            if s.get("cut"):
                c = s["cut"]
                lines.append(f"  step {c['step']} was cut: {c['reason']} (rolled back the {c['policy']})")
            if s.get("error"):
                lines.append(f"  error: {s['error']}")
                if s.get("stderr_tail"):
                    lines.append("  stderr: " + s["stderr_tail"].strip().replace("\n", "\n          "))
            for st in r["steps"]:
                lines.append(f"  step {st['index']} {st['name']!r}: {st['state']}"
                             + (f"  compensate: {st['compensate']}" if st.get("compensate") else ""))
            if r.get("writable") is False and s["state"] == "active":
                lines.append("  no step is open: writes are refused until: saga step NAME")
            if r.get("daemon") is False:
                lines.append("  (daemon not running: read from the journal)")
            text = "\n".join(lines)
        emit(ctx, r, text)
    run(ctx, workspace, as_json, go)


@main.command()
@click.option("--step", "step_ref", metavar="STEP", help="Only the changes of this step.")
@click.option("--stat", "stat_only", is_flag=True, help="One line per path with its change.")
@click.option("--name-only", is_flag=True, help="Only the paths.")
@common
@click.pass_context
def diff(ctx, step_ref, stat_only, name_only, workspace, as_json):
    """Show what the saga changed: added/modified/deleted per path, with the step that did it."""
    def go(t):
        r = t.read("saga.diff", step=step_ref)
        if ctx.obj["json"] or name_only or stat_only or r.get("daemon") is False:
            text = "\n".join(c["path"] if name_only else f"{c['change']:9} {c['path']}  (step {c['step']} {c['step_name']})"
                             for c in r["changes"])
            emit(ctx, r, text)
            return
        base = r["saga"] and _base_of(t)
        for c in r["changes"]:
            who = f", by {c['process']['comm']} pid {c['process']['pid']} uid {c['process']['uid']}" \
                if c.get("process") else ""
            click.echo(f"{c['change']:9} {c['path']}  (step {c['step']} {c['step_name']}{who})")
            if c.get("kind") == "f" and base:
                _unified(os.path.join(base, c["path"]), os.path.join(t.mountpoint, c["path"]), c)
    run(ctx, workspace, as_json, go)


def _base_of(t):
    try:
        return t.call("status")["base"]
    except SagaError:
        return None


def _read_text(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    if b"\0" in data:
        return None
    return data.decode("utf-8", "replace").splitlines(keepends=True)


def _unified(old, new, c):
    a = [] if c["change"] == "added" else _read_text(old)
    b = [] if c["change"] == "deleted" else _read_text(new)
    if a is None or b is None:
        click.echo("  (binary)")
        return
    for line in difflib.unified_diff(a, b, f"a/{c['path']}", f"b/{c['path']}"):
        click.echo(line, nl=not line.endswith("\n"))


@main.command()
@click.argument("saga_id", required=False, type=int, metavar="[SAGA]")
@click.option("--ops", is_flag=True, help="Also show the audit trail: every change, with pid, uid and process.")
@common
@click.pass_context
def log(ctx, saga_id, ops, workspace, as_json):
    """Show the journal's events (NDJSON with --json); works while the daemon is down."""
    def go(t):
        r = t.read("saga.log", saga=saga_id, ops=ops)
        import datetime

        for e in r["events"]:
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
@click.option("--keep", type=int, metavar="N", help="Keep the N most recent ended sagas.")
@common
@click.pass_context
def gc(ctx, older_than, keep, workspace, as_json):
    """Remove ended sagas' journal records, orphaned layers and the trash (never the active saga)."""
    def go(t):
        r = t.call("saga.gc", older_than=parse_duration(older_than), keep=keep)
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
        from overlayd.definitions import human_size

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
            self._line(f"committed: {ev['changes']} change(s) in {ev['seconds']:.2f}s")
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
      130 interrupted (SIGINT/SIGTERM); continue with --resume
    """
    import shlex
    import signal as _signal

    from overlayd.definitions import Coordinator, DefinitionError, load

    ctx.obj = ctx.obj or {}
    as_json = as_json or ctx.obj.get("json", False)
    try:
        definition = load(file)
    except DefinitionError as exc:
        if as_json:
            click.echo(json.dumps({"version": SCHEMA, "error": {
                "message": exc.text(), "exit_code": 2, "problems": [p.as_dict() for p in exc.problems]}}))
        else:
            click.echo(exc.text(), err=True)
        sys.exit(2)

    def go(t):
        hint = f"saga run {shlex.quote(os.path.abspath(file))} -w {shlex.quote(t.mountpoint)} --resume"
        display = _RunDisplay(ctx.obj["json"])
        coord = Coordinator(definition, socket_path(t.name), commit=commit, on_event=display, resume_hint=hint)
        old = {s: _signal.signal(s, _signal.default_int_handler) for s in (_signal.SIGTERM, _signal.SIGHUP)}
        try:
            result = coord.run(resume=resume)
        finally:
            for s, h in old.items():
                _signal.signal(s, h)
        sys.exit(result.exit_code)

    run(ctx, workspace, as_json, go)
