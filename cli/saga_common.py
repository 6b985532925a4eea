"""What every ``saga`` command shares: finding the workspace and its daemon (Target), reading a
stopped workspace's journal, printing answers and errors (``--json``), and the shared options.
The commands themselves are in saga_cmd.py (the group and the saga's life), saga_diff.py and
saga_run.py.
"""

import json
import os
import sys

import click

from overlayd import units
from overlayd.client import ClientError, NoDaemon, PermissionDenied, connect_to_mount, mount_of
from overlayd.paths import UsageError, as_path, known_workspaces, mount_command, quote_path

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
    "resolve": ["version", "saga", "step", "resolved", "unresolved"],
    "status": ["version", "saga", "steps", "writable", "busy"],
    "diff": ["version", "saga", "changes"],
    "log": ["version", "seq", "ts", "saga", "step", "kind"],
    "list": ["version", "sagas"],
    "gc": ["version", "sagas", "events", "bytes_before", "bytes_after"],
    "fork": ["version", "name", "state_dir", "mountpoint", "saga", "steps", "shared"],
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
    return [(w.get("mountpoint"), w["name"], as_path(w["state_dir"])) for w in known_workspaces()]


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
        import shlex

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
        from overlayd.journal import Journal, JournalError
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
    """saga diff of a stopped workspace: the plan of its layers (no commit rules: git would read
    the view), its changes given to steps as the daemon gives them (overlayd.commit.changes)."""
    from overlayd import commit, osutil
    from overlayd.commit import changes as by_step

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
        changes = commit.summarize(commit.plan_commit(base_fd, fds))
    finally:
        os.close(base_fd)
        for _, fd in fds:
            os.close(fd)
    saga, steps = j.saga(sid), j.steps(sid)
    changes = by_step.attribute(by_step.annotate(changes, steps), steps, j.step_paths(sid))
    if step is not None:
        try:
            changes = by_step.of_step(changes, by_step.resolve_step(saga, steps, step))
        except by_step.NoStep as exc:
            raise SagaError(str(exc), 1) from None
    return {"saga": saga, "changes": changes, "daemon": False}


# ---------------------------------------------------------------------- output


def emit(ctx, data, text):
    if ctx.obj["json"]:
        click.echo(json.dumps({"version": SCHEMA, **data}, default=str))
    elif text:
        click.echo(text)


def parse_duration(value, option=None, **limits):
    """overlayd.units.parse_duration (None stays None), as a usage error naming *option*."""
    if value is None:
        return None
    try:
        return units.parse_duration(value, **limits)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def parse_size(value, option=None):
    """overlayd.units.parse_size (None stays None), as a usage error naming *option*."""
    if value is None:
        return None
    try:
        return units.parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _complete_target(ctx):
    workspace = ctx.params.get("workspace") or (ctx.find_root().params or {}).get("workspace")
    return Target(workspace)


def complete_steps(ctx, param, incomplete):
    """Shell completion: the live steps of the active saga, by name (and index)."""
    import click.shell_completion

    try:
        steps = _complete_target(ctx).read("saga.status")["steps"]
    except Exception:  # completion must never print a traceback into the shell
        return []
    live = [st for st in steps if st["state"] in ("open", "done")]
    names = [st["name"] for st in live] + [str(st["index"]) for st in live]
    return [click.shell_completion.CompletionItem(n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


def complete_sagas(ctx, param, incomplete):
    """Shell completion: the workspace's sagas, by name and id."""
    import click.shell_completion

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
    import shlex

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
    return {k: v for k, v in dict(timeout=parse_duration(timeout, "'--timeout'"),
                                  max_bytes=parse_size(max_bytes, "'--max-bytes'"),
                                  max_files=max_files, max_spins=max_spins).items() if v is not None}


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
