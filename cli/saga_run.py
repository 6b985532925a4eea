"""``saga run FILE``: run a saga definition, with a live display of its steps."""

import json
import os
import sys

import click

from overlayd.cli.common import json_error
from overlayd.cli.saga_common import SCHEMA, SagaError, Target, common, run, time_wall
from overlayd.paths import quote_path

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
        elif kind == "resolved":
            self._line(f"commit conflicts resolved (on_conflict = {ev['how']}, step {ev['step']}): "
                       + ", ".join(f"{quote_path(r['path'])} {r['result']}" for r in ev.get("resolved") or []))
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


@click.command("run")
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
