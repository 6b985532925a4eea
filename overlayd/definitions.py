"""Saga definitions: a whole saga in a TOML file, run by a coordinator (``saga run``).

A definition names the saga and lists its steps; each step has a ``run`` command, an
optional ``compensate`` command and a failure policy (docs/DEFINITIONS.md has the schema).
:func:`load` / :func:`parse` validate a file completely before anything runs and report
every problem with its line and key. :class:`Coordinator` runs a definition against a
workspace's daemon: one saga step (one layer) per definition step, the command with the
mount as its working directory, the failure policy on a failure (compensation newest
first, never past a *pivot*: a completed step with ``compensatable = "none"``), and the
commit at the end.

What the coordinator does is journaled through ``saga.annotate`` in the saga's record:

    annotations.definition  {"sha256", "text", "file", "name"}   (refuses --resume if changed)
    annotations.runner      {"phase", "pid", "token", "target", "failed", "message", ...}
    annotations.outcomes    {step name: {"status", "index", "attempt", "tail", ...}}

so ``saga run FILE --resume`` (after the runner or the daemon died) knows which steps are
complete: a step is complete when its outcome is ``ok`` and the saga step it names
(``index``) is still live. Everything after the last complete step is rolled back (its
compensation runs) and run again.

Python callables may stand for ``run`` and ``compensate`` (see :func:`from_steps`): they
run in the coordinator's process. A callable compensation is called by the coordinator
right before the daemon drops that step's layer.
"""

import dataclasses
import difflib
import fcntl
import hashlib
import json
import math
import os
import queue
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
import tomllib
import traceback
import uuid
from pathlib import Path
from typing import Any

from .client import BusyError, Client, ClientError, ConflictError, NoDaemon, StuckError
from .paths import quote_path

SCHEMA = 1
MAX_FILE = 256 << 10  # bytes of a definition file
MAX_STEPS = 200
TAIL_BYTES = 4096  # output kept per step attempt
TAIL_ANNOTATED = 2000  # characters of it journaled in the outcome
NAME_RE = re.compile(r"[^\x00-\x1f\x7f/]{1,128}")
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COMPENSATABLE = ("full", "partial", "none")
ON_FAILURE = ("compensate", "retry", "stop")
DEFAULT_RETRY_POLICY_RETRIES = 2
BACKOFF = float(os.environ.get("OVERLAYD_BACKOFF", "0.5"))

# exit codes of ``saga run`` (and RunResult.exit_code)
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CONFLICT, EXIT_STUCK, EXIT_NO_DAEMON, EXIT_STOPPED = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130

TOP_KEYS = {
    "name": "the saga's name (a string)",
    "description": "free text",
    "version": "the definition format version: 1",
    "timeout": "wall-time budget of the whole saga (the daemon aborts it when exceeded): a duration",
    "max_bytes": "budget of bytes written by the whole saga: bytes or a size like \"1G\"",
    "max_files": "budget of paths changed by the whole saga: an integer",
    "max_spins": "budget of unchanged rewrites of one file in a row, for the whole saga: an integer",
    "step": "the steps: [[step]] tables",
}
SAGA_BUDGETS = ("timeout", "max_bytes", "max_files", "max_spins")
STEP_KEYS = {
    "name": "the step's name (a string, unique in the definition)",
    "run": "the shell command of the step, run in the mount",
    "compensate": "the shell command undoing the step's effects outside the workspace",
    "description": "free text",
    "timeout": "time budget of one attempt of run: seconds or a duration like \"5m\"",
    "max_bytes": "budget of bytes written by one attempt: bytes or a size like \"100M\"",
    "max_files": "budget of paths changed by one attempt: an integer",
    "max_spins": "budget of unchanged rewrites of one file in a row: an integer",
    "retries": "further attempts of run after a failure: an integer >= 0",
    "compensatable": "\"full\", \"partial\" or \"none\" (none = a pivot)",
    "on_failure": "\"compensate\", \"retry\" or \"stop\"",
    "compensate_retries": "attempts of the compensate command: an integer >= 1",
    "compensate_timeout": "time limit of one attempt of compensate: a duration",
    "env": "extra environment variables of run and compensate: a table of strings",
}


# ---------------------------------------------------------------------- the model


@dataclasses.dataclass
class StepDef:
    """One step of a definition. ``run``/``compensate`` are shell commands or Python callables."""

    name: str
    run: Any
    compensate: Any = None
    description: str | None = None
    timeout: float | None = None
    max_bytes: int | None = None
    max_files: int | None = None
    max_spins: int | None = None
    retries: int = 0
    compensatable: str = "full"
    on_failure: str = "compensate"
    compensate_retries: int | None = None
    compensate_timeout: float | None = None
    env: dict = dataclasses.field(default_factory=dict)
    line: int | None = None

    @property
    def pivot(self) -> bool:
        return self.compensatable == "none"


@dataclasses.dataclass
class Definition:
    name: str
    steps: list
    text: str
    sha256: str
    file: str | None = None
    description: str | None = None
    budgets: dict = dataclasses.field(default_factory=dict)

    @property
    def directory(self) -> str | None:
        return os.path.dirname(self.file) if self.file else None


@dataclasses.dataclass
class Problem:
    message: str
    line: int | None = None
    column: int | None = None
    step: int | None = None  # 1-based position in the definition
    step_name: str | None = None
    key: str | None = None

    def format(self, file=None) -> str:
        where = file or "<definition>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        what = ""
        if self.step is not None:
            what = f"step {self.step}" + (f" {self.step_name!r}" if self.step_name else "") + ": "
        if self.key is not None:
            what += f"{self.key}: "
        return f"{where}: {what}{self.message}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class DefinitionError(Exception):
    """The definition is invalid; ``problems`` lists every problem found (line, step, key)."""

    def __init__(self, problems, file=None):
        self.problems = list(problems)
        self.file = file
        super().__init__(self.text())

    def text(self) -> str:
        head = f"invalid saga definition {self.file or ''}".rstrip() + f" ({len(self.problems)} problem(s)):"
        return "\n".join([head] + ["  " + p.format(self.file) for p in self.problems])


# ---------------------------------------------------------------------- values


class _Bad(Exception):
    pass


MAX_DURATION = 7 * 86400  # the daemon's limit for compensate_timeout too


def parse_duration(value) -> float:
    if isinstance(value, bool) or value is None:
        raise _Bad(f"{value!r} is not a duration (seconds, or a string like \"30s\", \"5m\", \"1h\", \"250ms\")")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise _Bad(f"{value!r} is not a duration (examples: \"30s\", \"5m\", \"1h\", \"250ms\", or seconds)")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    else:
        raise _Bad(f"{value!r} is not a duration (seconds, or a string like \"5m\")")
    if not seconds > 0:
        raise _Bad(f"{value!r}: a duration must be more than 0")
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise _Bad(f"{value!r}: a duration must be finite and at most {MAX_DURATION // 86400} days")
    return seconds


def parse_size(value) -> int:
    if isinstance(value, bool) or value is None:
        raise _Bad(f"{value!r} is not a size (bytes, or a string like \"100M\", \"2G\")")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", value)
        if not m:
            raise _Bad(f"{value!r} is not a size (examples: \"4096\", \"512K\", \"100M\", \"2G\")")
        n = int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[
            (m.group(2) or "b")[0].lower()]
    else:
        raise _Bad(f"{value!r} is not a size (bytes, or a string like \"100M\")")
    if n <= 0:
        raise _Bad(f"{value!r}: a size must be more than 0")
    return n


def _int(value, low, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{value!r} is not an integer")
    if value < low or (high is not None and value > high):
        raise _Bad(f"{value} is out of range ({low}.." + (f"{high})" if high is not None else ")"))
    return value


def _name(value, kind) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not a string")
    if not NAME_RE.fullmatch(value) or value in (".", "..") or len(value.encode("utf-8", "surrogatepass")) > 128:
        raise _Bad(f"invalid {kind} name {value!r}: use 1-128 printable characters, no '/', not '.' or '..'")
    return value


def _command(value, callables) -> Any:
    if callables and callable(value):
        return value
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not a string (a shell command)" + (" or a callable" if callables else ""))
    if not value.strip():
        raise _Bad("the command is empty")
    if "\0" in value:
        raise _Bad("the command contains a NUL character")
    return value


def _choice(value, choices) -> str:
    if value not in choices:
        raise _Bad(f"{value!r} is not one of " + ", ".join(f'"{c}"' for c in choices))
    return value


def _text(value) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not a string")
    return value


def _env(value) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{value!r} is not a table of strings (env = {{ NAME = \"value\" }})")
    for k, v in value.items():
        if not ENV_RE.fullmatch(k):
            raise _Bad(f"{k!r} is not an environment variable name")
        if not isinstance(v, str) or "\0" in v:
            raise _Bad(f"the value of {k} must be a string")
    return dict(value)


_STEP_PARSERS = {
    "name": lambda v, c: _name(v, "step"),
    "run": lambda v, c: _command(v, c),
    "compensate": lambda v, c: _command(v, c),
    "description": lambda v, c: _text(v),
    "timeout": lambda v, c: parse_duration(v),
    "max_bytes": lambda v, c: parse_size(v),
    "max_files": lambda v, c: _int(v, 1),
    "max_spins": lambda v, c: _int(v, 1),
    "retries": lambda v, c: _int(v, 0, 100),
    "compensatable": lambda v, c: _choice(v, COMPENSATABLE),
    "on_failure": lambda v, c: _choice(v, ON_FAILURE),
    "compensate_retries": lambda v, c: _int(v, 1, 100),
    "compensate_timeout": lambda v, c: parse_duration(v),
    "env": lambda v, c: _env(v),
}


# ---------------------------------------------------------------------- where keys are


_STEP_HEADER = re.compile(r"^\s*\[\[\s*step\s*\]\]\s*(#.*)?$")
_STEP_SUBTABLE = re.compile(r"^\s*\[\s*step\s*\.\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*(\.|=)""")


def _line_map(text: str):
    """Best effort: the line of each top-level key, and per [[step]] table its header line
    ("") and the line of each of its keys. Multi-line strings are skipped."""
    top, steps = {}, []
    current, prefix = top, ""
    in_string = None
    for n, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        if _STEP_HEADER.match(line):
            current, prefix = {"": n}, ""
            steps.append(current)
        elif (m := _STEP_SUBTABLE.match(line)) and steps:
            current, prefix = steps[-1], m.group(1) + "."
            current.setdefault(m.group(1), n)
        elif _TABLE.match(line):
            current, prefix = {}, ""
            if re.match(r"^\s*\[\s*([A-Za-z0-9_-]+)", line):
                top.setdefault(re.match(r"^\s*\[\s*([A-Za-z0-9_-]+)", line).group(1), n)
        elif m := _KEY.match(line):
            key = m.group(1).strip("\"'")
            current.setdefault(prefix + key, n)
        for q in ('"""', "'''"):
            if line.count(q) % 2 == 1:
                in_string = q
                break
    return top, steps


def _suggest(key, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------- parsing


def load(path) -> Definition:
    """Read and validate a TOML definition file; raises DefinitionError."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise DefinitionError([Problem(f"cannot read the definition: {exc.strerror}")], path) from None
    if len(data) > MAX_FILE:
        raise DefinitionError([Problem(f"the file is larger than {MAX_FILE} bytes")], path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DefinitionError([Problem(f"not UTF-8 text (byte {exc.start})")], path) from None
    return parse(text, file=path, sha256=hashlib.sha256(data).hexdigest())


def parse(text: str, file=None, sha256=None) -> Definition:
    """Validate a TOML definition given as text; raises DefinitionError with every problem."""
    try:
        raw = tomllib.loads(text)
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise DefinitionError([Problem("invalid TOML: arrays or inline tables nested too deeply")], file) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if m:
            msg = msg[:m.start()].rstrip()
        raise DefinitionError([Problem(f"invalid TOML: {msg}", line=int(m.group(1)) if m else None,
                                       column=int(m.group(2)) if m else None)], file) from None
    top_lines, step_lines = _line_map(text)
    defn = _validate(raw, top_lines, step_lines, file, callables=False)
    defn.text = text
    defn.sha256 = sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    return defn


def _validate(raw: dict, top_lines: dict, step_lines: list, file, callables: bool) -> Definition:
    problems = []
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(Problem(f"unknown key{_suggest(key, TOP_KEYS)}; the top level has: "
                                    + ", ".join(TOP_KEYS), line=top_lines.get(key), key=key))
    name = raw.get("name")
    if name is None:
        problems.append(Problem("missing: the saga's name (name = \"...\") at the top of the file", line=1,
                                key="name"))
    else:
        try:
            _name(name, "saga")
        except _Bad as exc:
            problems.append(Problem(str(exc), line=top_lines.get("name"), key="name"))
    if "version" in raw and (raw["version"] != SCHEMA or isinstance(raw["version"], bool)):
        problems.append(Problem(f"{raw['version']!r}: this overlayd reads version {SCHEMA}",
                                line=top_lines.get("version"), key="version"))
    budgets = {}
    for key in SAGA_BUDGETS:
        if key in raw:
            try:
                budgets[key] = _STEP_PARSERS[key](raw[key], False)
            except _Bad as exc:
                problems.append(Problem(str(exc), line=top_lines.get(key), key=key))
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(Problem(f"{description!r} is not a string", line=top_lines.get("description"),
                                key="description"))
    tables = raw.get("step")
    steps = []
    if tables is None or tables == []:
        problems.append(Problem("the definition has no steps: add at least one [[step]] table with name and run",
                                line=top_lines.get("step"), key="step"))
        tables = []
    elif not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(Problem("must be an array of tables: write each step as a [[step]] table",
                                line=top_lines.get("step"), key="step"))
        tables = []
    elif len(tables) > MAX_STEPS:
        problems.append(Problem(f"{len(tables)} steps: at most {MAX_STEPS}", line=top_lines.get("step"), key="step"))
        tables = []
    seen = {}
    for i, table in enumerate(tables, 1):
        lines = step_lines[i - 1] if i - 1 < len(step_lines) else {}
        sname = table.get("name") if isinstance(table.get("name"), str) else None
        values, ok = {}, True

        def bad(key, message, lines=lines, i=i, sname=sname):
            problems.append(Problem(message, line=lines.get(key, lines.get("")), step=i, step_name=sname, key=key))

        for key, value in table.items():
            if key not in STEP_KEYS:
                bad(key, f"unknown key{_suggest(key, STEP_KEYS)}; a step has: " + ", ".join(STEP_KEYS))
                ok = False
                continue
            try:
                values[key] = _STEP_PARSERS[key](value, callables)
            except _Bad as exc:
                bad(key, str(exc))
                ok = False
        for key in ("name", "run"):
            if key not in table:
                bad(key, f"missing: {STEP_KEYS[key]}")
                ok = False
        if sname is not None and "name" in values:
            if sname in seen:
                bad("name", f"duplicate step name: step {seen[sname]} is also called {sname!r}")
                ok = False
            seen.setdefault(sname, i)
        if values.get("compensatable") == "none" and values.get("compensate") is not None:
            bad("compensate", "compensatable = \"none\" says the step cannot be compensated, but it has a "
                              "compensate command: remove one of the two")
            ok = False
        if values.get("on_failure") == "retry" and values.get("retries") == 0:
            bad("retries", "on_failure = \"retry\" needs retries >= 1 (or leave retries out: 2 by default)")
            ok = False
        if not ok:
            continue
        if values.get("on_failure") == "retry" and "retries" not in values:
            values["retries"] = DEFAULT_RETRY_POLICY_RETRIES
        steps.append(StepDef(line=lines.get(""), **values))
    if problems:
        raise DefinitionError(sorted(problems, key=lambda p: (p.line is None, p.line or 0)), file)
    return Definition(name=name, steps=steps, text="", sha256="", file=file, description=description,
                      budgets=budgets)


def _callable_name(fn) -> str:
    return "python:" + getattr(fn, "__module__", "?") + "." + getattr(fn, "__qualname__", repr(fn))


def from_steps(steps, name: str, description=None, budgets=None) -> Definition:
    """A definition from Python: *steps* are dicts with the keys of a [[step]] table, or
    StepDef objects; ``run`` and ``compensate`` may be callables ``f(ctx: StepContext)``.

    The definition's hash (checked on resume) covers the names, commands and the callables'
    qualified names, not the callables' code."""
    tables = []
    for s in steps:
        if isinstance(s, StepDef):
            d = {f.name: getattr(s, f.name) for f in dataclasses.fields(StepDef) if f.name != "line"}
            d = {k: v for k, v in d.items() if v is not None and not (k == "env" and not v)}
            tables.append(d)
        elif isinstance(s, dict):
            tables.append(dict(s))
        else:
            raise DefinitionError([Problem(f"{s!r} is not a step (a dict or a StepDef)")])
    defn = _validate({"name": name, "step": tables, **({"description": description} if description else {}),
                      **(budgets or {})}, {}, [], None, callables=True)
    canon = {"name": name, "description": description, "budgets": defn.budgets, "steps": []}
    for s in defn.steps:
        rec = {f.name: getattr(s, f.name) for f in dataclasses.fields(StepDef) if f.name != "line"}
        for k in ("run", "compensate"):
            if callable(rec[k]):
                rec[k] = _callable_name(rec[k])
        canon["steps"].append(rec)
    defn.text = json.dumps(canon, sort_keys=True, indent=1)
    defn.sha256 = hashlib.sha256(defn.text.encode()).hexdigest()
    return defn


# ---------------------------------------------------------------------- running


@dataclasses.dataclass
class StepContext:
    """What a Python callable step gets: where the workspace is and which attempt this is."""

    workspace: Path
    saga_id: int
    saga_name: str
    step: str
    index: int  # the saga step's 1-based index in the daemon (grows with retries)
    position: int  # 1-based position in the definition
    attempt: int
    env: dict


@dataclasses.dataclass
class RunResult:
    """How a run ended. ``status``: committed, open (left for review, --no-commit), done (steps
    done in an attached saga), aborted (a step failed; every step compensated), stuck (a person
    must decide: after a pivot, after retries, or a compensation failing), stopped
    (on_failure = "stop"), conflict (the commit was refused), interrupted, daemon-lost, error."""

    status: str
    exit_code: int
    message: str
    saga_id: int | None = None
    outcomes: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def raise_for_status(self):
        if not self.ok:
            raise RunFailed(self)
        return self


class RunFailed(ClientError):
    """A saga run did not finish; ``.result`` says how it ended."""

    def __init__(self, result: RunResult):
        super().__init__(result.status, result.message, {"exit_code": result.exit_code})
        self.result = result


class _Finish(Exception):
    def __init__(self, result: RunResult):
        self.result = result


class _DaemonLost(Exception):
    pass


def _child_setup():
    """In the step's shell before exec: die with the runner (the shell itself; what it started
    is found by its OVERLAYD_RUN_TOKEN on --resume)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def kill_token(token: str) -> int:
    """SIGKILL every process whose environment carries OVERLAYD_RUN_TOKEN=token (leftovers of a
    runner that died). Returns how many were signalled."""
    if not token:
        return 0
    needle = f"OVERLAYD_RUN_TOKEN={token}".encode()
    total = 0
    for _ in range(5):
        found = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needle in env:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    found += 1
                except OSError:
                    pass
        total += found
        if not found:
            break
        time.sleep(0.05)
    return total


def measure_layer(path) -> tuple[int, int] | None:
    """(bytes of regular files, entries that are not directories) in a layer directory."""
    size = files = 0
    try:
        os.stat(path)
    except OSError:
        return None
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: None):
        for n in filenames:
            files += 1
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return size, files


def human_size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _Tail:
    def __init__(self, limit=TAIL_BYTES):
        self.limit = limit
        self.data = b""

    def add(self, chunk: bytes):
        self.data = (self.data + chunk)[-self.limit:]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclasses.dataclass
class _Attempt:
    ok: bool
    status: Any = None  # exit status (int) or None
    reason: str = "exit"  # exit, timeout, budget, exception, interrupted
    tail: str = ""
    seconds: float = 0.0
    bytes: int | None = None
    files: int | None = None
    detail: str = ""


class Coordinator:
    """Runs a :class:`Definition` against the daemon listening on *socket_path*.

    *on_event(dict)* receives every event (``{"version": 1, "event": ..., ...}``, the NDJSON of
    ``saga run --json``); ``step.output`` events carry each output line of a step.
    *attach*: run inside the saga already active (begun by the caller): no begin, no commit,
    no abort, and never compensate the steps that were live before the run.
    """

    def __init__(self, definition: Definition, socket_path, *, commit=True, on_event=None, attach=False,
                 resume_hint=None, progress_interval=1.0, expect=None):
        self.defn = definition
        self.socket_path = str(socket_path)
        self.expect = expect  # a client.MountInfo: verify the daemon before each request (Client)
        self.commit = commit
        self.on_event = on_event or (lambda ev: None)
        self.attach = attach
        self.by_name = {s.name: s for s in definition.steps}
        self.position = {s.name: i for i, s in enumerate(definition.steps)}
        self.token = uuid.uuid4().hex
        self.outcomes = {}
        self.runner = {}
        self.completed = []  # [(position, saga step index)]
        self.saga_id = None
        self.floor = 0
        self.mountpoint = self.state_dir = self.daemon_pid = None
        self.progress_interval = progress_interval
        self.resume_hint = resume_hint or (
            f"saga run {shlex.quote(definition.file)} --resume" if definition.file else "run it again with resume=True")
        self._current = None  # (position, index) of the step running

    # ------------------------------------------------------------------ plumbing

    def _call(self, op, timeout=60.0, busy_wait=True, **args):
        """One request; waits while the daemon is busy with another stack operation (its
        recovery, or a budget cut rolling a step back)."""
        deadline = time.monotonic() + 3600
        while True:
            try:
                with Client(self.socket_path, timeout=timeout, expect=self.expect) as c:
                    return c.call(op, **{k: v for k, v in args.items() if v is not None})
            except NoDaemon:
                raise _DaemonLost() from None
            except BusyError:
                if not busy_wait or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except ClientError as exc:
                if exc.code == "disconnected":
                    raise _DaemonLost() from None
                raise

    def emit(self, event, **fields):
        self.on_event({"version": SCHEMA, "event": event, "saga": self.saga_id, "time": round(time.time(), 3),
                       **fields})

    def _annotate(self, **fields):
        self._call("saga.annotate", fields=fields)

    def _set_runner(self, **fields):
        self.runner.update(fields, updated=time.time())
        self._annotate(runner=self.runner)

    def _set_outcome(self, name, **fields):
        rec = self.outcomes.setdefault(name, {})
        if fields.get("status") == "running":
            rec.clear()
        rec.update(fields)
        if "tail" in rec and rec["tail"]:
            rec["tail"] = rec["tail"][-(TAIL_ANNOTATED if rec.get("status") == "ok" else TAIL_BYTES):]
        self._annotate(outcomes=self.outcomes)

    def _lock_path(self):
        return self.socket_path + ".run.lock"

    def _lock(self):
        """flock the runner's lock file, which the holder removes when it is done: a file
        locked but no longer at the path (removed, or replaced, by a runner that ended
        meanwhile) does not count, so take the one that is there."""
        path = self._lock_path()
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError:
                return None  # no lock where we may not write: the daemon still refuses a second saga
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    other = os.pread(fd, 32, 0).decode().strip()
                finally:
                    os.close(fd)
                raise _Finish(RunResult("error", EXIT_FAILED, f"another 'saga run' (pid {other or '?'}) is driving "
                                                              "this workspace; wait for it to end or stop it first"))
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _unlock(self, fd):
        try:
            os.unlink(self._lock_path())  # still ours: we hold the lock on the file at the path
        except OSError:
            pass
        os.close(fd)

    def _result(self, status, code, message) -> RunResult:
        return RunResult(status, code, message, self.saga_id, json.loads(json.dumps(self.outcomes)))

    def _live(self, st=None, floor=None):
        st = st or self._call("saga.status")
        floor = self.floor if floor is None else floor
        return [s for s in st["steps"] if s["state"] in ("open", "done", "compensating") and s["index"] > floor]

    # ------------------------------------------------------------------ entry

    def run(self, resume=False) -> RunResult:
        try:
            lock = self._lock()
        except _Finish as f:
            self.emit("end", status=f.result.status, exit_code=f.result.exit_code, message=f.result.message)
            return f.result
        try:
            try:
                if resume:
                    self._start_resumed()
                else:
                    self._start_fresh()
                for pos in range(self.next_pos, len(self.defn.steps)):
                    self._run_step(pos)
                result = self._finish()
            except _Finish as f:
                result = f.result
            except _DaemonLost:
                result = self._daemon_lost()
            except KeyboardInterrupt:
                result = self._interrupted()
            except ClientError as exc:
                code = {"conflict": EXIT_CONFLICT, "stuck": EXIT_STUCK, "no-daemon": EXIT_NO_DAEMON}.get(exc.code, 1)
                result = self._result("error", code, exc.message)
        finally:
            if lock is not None:
                self._unlock(lock)
        self.emit("end", status=result.status, exit_code=result.exit_code, message=result.message)
        return result

    def _daemon_lost(self) -> RunResult:
        if self.daemon_pid is None:
            return self._result("daemon-lost", EXIT_NO_DAEMON,
                                f"no daemon serves the workspace ({self.socket_path}); mount it "
                                "(overlayd mount BASE MOUNTPOINT), then run this again")
        where = ""
        if self._current is not None:
            pos, index = self._current
            where = f" during step {pos + 1} {self.defn.steps[pos].name!r} (its command was stopped)"
        return self._result("daemon-lost", EXIT_NO_DAEMON,
                            f"the workspace's daemon stopped{where}; once it is mounted again "
                            f"(overlayd mount BASE {self.mountpoint or 'MOUNTPOINT'}), continue with: {self.resume_hint}")

    def _interrupted(self) -> RunResult:
        try:
            if self._current is not None:
                pos, index = self._current
                self._set_outcome(self.defn.steps[pos].name, status="interrupted", index=index, ended=time.time())
            if self.runner.get("phase") == "running":
                self._set_runner(phase="interrupted")
        except (ClientError, _DaemonLost, OSError):
            pass
        return self._result("interrupted", EXIT_INTERRUPTED,
                            f"interrupted; the saga is left as it is; continue with: {self.resume_hint}")

    def _status_info(self):
        info = self._call("status")
        self.mountpoint = info["mountpoint"]
        self.state_dir = info.get("state_dir")
        self.daemon_pid = info.get("pid")

    def _start_fresh(self):
        self._status_info()
        if self.attach:
            st = self._call("saga.status")
            if st["saga"] is None:
                raise _Finish(self._result("error", EXIT_FAILED, "no saga is active to run the steps in"))
            self.saga_id = st["saga"]["id"]
            live = [s for s in st["steps"] if s["state"] in ("open", "done")]
            self.floor = live[-1]["index"] if live else 0
        else:
            try:
                rec = self._call("saga.begin", name=self.defn.name, budgets=self.defn.budgets or None)["saga"]
            except ClientError as exc:
                if exc.code != "saga-active":
                    raise
                st = self._call("saga.status")
                saga = st["saga"] or {}
                mine = (saga.get("annotations") or {}).get("definition", {}).get("sha256") == self.defn.sha256
                hint = (f"it was started from this definition: continue it with: {self.resume_hint}, or abort it "
                        "with: saga abort" if mine else "commit or abort it first (saga commit / saga abort)")
                raise _Finish(self._result("error", EXIT_FAILED, f"{exc.message.split(';')[0]}; {hint}")) from None
            self.saga_id = rec["id"]
        self.runner = {"phase": "running", "pid": os.getpid(), "token": self.token, "floor": self.floor,
                       "started": time.time(), "commit": self.commit}
        self._annotate(definition={"sha256": self.defn.sha256, "text": self.defn.text, "file": self.defn.file,
                                   "name": self.defn.name},
                       runner={**self.runner, "updated": time.time()}, outcomes={})
        self.next_pos = 0
        self.emit("saga.begin", name=self.defn.name, definition=self.defn.sha256, file=self.defn.file,
                  steps=len(self.defn.steps), resume=False, mountpoint=self.mountpoint)

    # ------------------------------------------------------------------ resume

    def _wait_idle(self, timeout=600.0):
        """The daemon may be finishing its recovery (rolling back the step open at a crash)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._call("saga.status")
            if not st.get("busy"):
                return st
            if time.monotonic() > deadline:
                raise _Finish(self._result("error", EXIT_FAILED, f"the daemon stays busy ({st['busy']}); try later"))
            time.sleep(0.1)

    def _start_resumed(self):
        self._status_info()
        st = self._wait_idle()
        saga = st["saga"]
        if saga is None:
            mine = [s for s in self._call("saga.list")["sagas"]
                    if (s.get("annotations") or {}).get("definition", {}).get("sha256") == self.defn.sha256]
            if mine and mine[-1]["state"] == "committed":
                self.saga_id = mine[-1]["id"]
                raise _Finish(self._result("committed", EXIT_OK, f"nothing to resume: saga {mine[-1]['id']} "
                                                                  f"{self.defn.name!r} from this definition is "
                                                                  "already committed"))
            if mine:
                raise _Finish(self._result("error", EXIT_FAILED,
                                           f"nothing to resume: saga {mine[-1]['id']} {self.defn.name!r} from this "
                                           f"definition ended {mine[-1]['state']}; run it again without --resume"))
            raise _Finish(self._result("error", EXIT_FAILED, f"nothing to resume: no saga is active in "
                                                             f"{self.mountpoint}; run it without --resume"))
        self.saga_id = saga["id"]
        ann = saga.get("annotations") or {}
        recorded = ann.get("definition")
        if not recorded:
            raise _Finish(self._result("error", EXIT_FAILED,
                                       f"saga {saga['id']} {saga['name']!r} was not started by 'saga run' "
                                       "(no definition in its journal); drive it with saga step/commit/abort"))
        if recorded.get("sha256") != self.defn.sha256:
            raise _Finish(self._result(
                "error", EXIT_FAILED,
                f"the definition changed since saga {saga['id']} {saga['name']!r} began (sha256 "
                f"{recorded.get('sha256', '?')[:12]} in the journal, {self.defn.sha256[:12]} now): refusing to "
                "resume. Resume with the original definition (its text: saga status --json, "
                "saga.annotations.definition.text), or end the saga (saga abort) and run the new one"))
        self.outcomes = ann.get("outcomes") or {}
        previous = ann.get("runner") or {}
        self.floor = int(previous.get("floor") or 0)
        self.attach = self.attach or bool(self.floor)
        kill_token(previous.get("token"))
        self.runner = {**previous, "pid": os.getpid(), "token": self.token, "resumed": time.time(),
                       "commit": self.commit}
        if saga["state"] in ("stuck", "compensating"):
            self.emit("saga.retry", state=saga["state"], error=saga.get("error"))
            try:
                self._call("saga.retry", timeout=None)
            except StuckError as exc:
                self._set_runner()
                raise _Finish(self._result("stuck", EXIT_STUCK, f"{exc.message} (then: {self.resume_hint})")) from None
        phase = previous.get("phase")
        self._set_runner()
        live = self._live()
        prefix = 0
        for s, d in zip(live, self.defn.steps):
            o = self.outcomes.get(d.name) or {}
            if s["name"] == d.name and o.get("status") == "ok" and o.get("index") == s["index"]:
                prefix += 1
            else:
                break
        self.completed = [(i, live[i]["index"]) for i in range(prefix)]
        self.next_pos = prefix
        self.emit("saga.begin", name=self.defn.name, definition=self.defn.sha256, file=self.defn.file,
                  steps=len(self.defn.steps), resume=True, mountpoint=self.mountpoint, phase=phase,
                  complete=[self.defn.steps[i].name for i in range(prefix)])
        if phase in ("compensating", "aborted"):
            self._compensate_to(int(previous.get("target") or self.floor), reason="compensate")
            self._after_compensation(previous.get("failed"), previous.get("failure"))
        if prefix < len(self.defn.steps):
            d = self.defn.steps[prefix]
            o = self.outcomes.get(d.name) or {}
            if d.pivot and o.get("status") in ("running", "interrupted") and phase != "stuck" \
                    and d.on_failure != "retry":
                self._set_outcome(d.name, status="interrupted")
                msg = (f"step {prefix + 1} {d.name!r} was interrupted, and it cannot be compensated "
                       "(compensatable = \"none\"): its effects outside the workspace may be half done. Check them; "
                       f"then run it again with: {self.resume_hint}; or end the saga with: saga abort")
                self._set_runner(phase="stuck", failed=d.name, message=msg)
                raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        keep = self.completed[-1][1] if self.completed else self.floor
        if any(s["index"] > keep for s in live):
            self._compensate_to(keep, reason="resume")
        self._set_runner(phase="running", failed=None, message=None, target=None)

    # ------------------------------------------------------------------ steps

    def _pivot(self):
        for pos, index in reversed(self.completed):
            if self.defn.steps[pos].pivot:
                return pos, index
        return None

    def _compensate_command(self, d: StepDef):
        if not isinstance(d.compensate, str):
            return None
        exports = dict(d.env)
        if self.defn.file:
            exports = {"SAGA_DEFINITION": self.defn.file, "SAGA_DEFINITION_DIR": self.defn.directory, **exports}
        if not exports:
            return d.compensate
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()) + "; " + d.compensate

    def _run_step(self, pos):
        d = self.defn.steps[pos]
        attempts = 1 + d.retries
        for attempt in range(1, attempts + 1):
            rec = self._call("saga.step", name=d.name, compensate=self._compensate_command(d), timeout=d.timeout,
                             max_bytes=d.max_bytes, max_files=d.max_files, max_spins=d.max_spins, policy="step",
                             retries=d.compensate_retries,
                             compensate_timeout=d.compensate_timeout)["step"]
            index = rec["index"]
            self._current = (pos, index)
            self._set_outcome(d.name, status="running", index=index, attempt=attempt, position=pos + 1,
                              started=time.time())
            self.emit("step.start", step=d.name, position=pos + 1, of=len(self.defn.steps), index=index,
                      attempt=attempt, attempts=attempts)
            res = self._attempt(d, pos, rec, attempt)
            fields = dict(seconds=round(res.seconds, 3), bytes=res.bytes, files=res.files, tail=res.tail,
                          ended=time.time())
            if res.ok:
                self._set_outcome(d.name, status="ok", **fields)
                self.emit("step.done", step=d.name, position=pos + 1, index=index, attempt=attempt, **fields)
                self.completed.append((pos, index))
                self._current = None
                return
            self._set_outcome(d.name, status="failed", exit_status=res.status, reason=res.reason, detail=res.detail,
                              **fields)
            self.emit("step.failed", step=d.name, position=pos + 1, index=index, attempt=attempt, attempts=attempts,
                      exit_status=res.status, reason=res.reason, detail=res.detail, will_retry=attempt < attempts,
                      **fields)
            self._current = None
            if attempt < attempts:
                self._compensate_to(self.completed[-1][1] if self.completed else self.floor, reason="retry")
                time.sleep(min(BACKOFF * (2 ** (attempt - 1)), 30.0))
        self._on_failure(pos, d, res)

    def _describe(self, pos, d, res) -> str:
        if res.reason == "exit":
            how = f"exit status {res.status}"
        else:
            how = res.detail or res.reason
        tries = f" ({1 + d.retries} attempts)" if d.retries else ""
        return f"step {pos + 1} {d.name!r} failed{tries}: {how}"

    def _on_failure(self, pos, d, res):
        what = self._describe(pos, d, res)
        if d.on_failure == "stop":
            msg = (f"{what}; on_failure = \"stop\": the saga is left as it is, with the failed step open for "
                   f"inspection (saga diff, saga status). Then: {self.resume_hint} (runs the step again), "
                   "or saga abort")
            self._set_runner(phase="stopped", failed=d.name, message=msg)
            raise _Finish(self._result("stopped", EXIT_STOPPED, msg))
        if d.on_failure == "retry":
            kept = self._kept_text()
            msg = (f"{what}; on_failure = \"retry\" goes forward only: the failed attempt is rolled back, "
                   f"{kept} kept. Fix the cause, then: {self.resume_hint}; or end it with: saga abort")
            self._set_runner(phase="stuck", failed=d.name, message=msg, target=None)
            self._compensate_to(self._keep_index(), reason="retry")
            raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        pivot = self._pivot()
        target = max(pivot[1] if pivot else 0, self.floor)
        self._set_runner(phase="compensating", failed=d.name, target=target, failure=what)
        self._compensate_to(target, reason="compensate")
        self._after_compensation(d.name, what)

    def _keep_index(self):
        return self.completed[-1][1] if self.completed else self.floor

    def _kept_text(self):
        if not self.completed:
            return "no earlier step is"
        return "step(s) " + ", ".join(f"{p + 1} {self.defn.steps[p].name!r}" for p, _ in self.completed) + " are"

    def _after_compensation(self, failed, what=None):
        what = what or (f"step {failed!r} failed" if failed else "a step failed")
        pivot = self._pivot()
        partial = [n for n, o in self.outcomes.items() if o.get("status") == "compensated"
                   and self.by_name.get(n) and self.by_name[n].compensatable == "partial"]
        note = (" Compensated only partially (compensatable = \"partial\"): " + ", ".join(partial) + "."
                if partial else "")
        if pivot is not None:
            ppos, pindex = pivot
            msg = (f"{what}, after the pivot step {ppos + 1} {self.defn.steps[ppos].name!r} (compensatable = "
                   f"\"none\"), which cannot be undone: the steps after it are compensated, the saga is kept at "
                   f"step {ppos + 1} and needs a person.{note} Fix the cause and go forward: {self.resume_hint}; "
                   "or keep what is done: saga commit; or undo the rest too: saga abort")
            self._set_runner(phase="stuck", message=msg, target=None)
            raise _Finish(self._result("stuck", EXIT_STUCK, msg))
        if self.attach:
            msg = f"{what}; the definition's steps are compensated.{note}"
            self._set_runner(phase="failed", message=msg, target=None)
            raise _Finish(self._result("aborted", EXIT_FAILED, msg))
        msg = f"{what}; every step is compensated and the saga is aborted: the base is untouched.{note}"
        self._set_runner(phase="aborted", message=msg, target=None)
        r = self._call("saga.abort", timeout=None)
        self.emit("aborted", compensated=r.get("compensated", []))
        raise _Finish(self._result("aborted", EXIT_FAILED, msg))

    def _compensate_to(self, target, reason):
        """Compensate and drop every live step above *target*, newest first, one at a time (a
        callable compensation is called right before its step's layer is dropped)."""
        live = self._live(floor=0)
        for n, s in reversed(list(enumerate(live))):
            if s["index"] <= target:
                break
            prev = live[n - 1]["index"] if n > 0 else 0
            d = self.by_name.get(s["name"])
            if d is not None and callable(d.compensate):
                self._call_compensation(d, s)
            try:
                self._call("saga.rollback", to=prev, timeout=None)
            except StuckError as exc:
                raise _Finish(self._result("stuck", EXIT_STUCK, f"{exc.message}; then continue with: "
                                                                 f"{self.resume_hint}")) from None
            o = self.outcomes.get(s["name"])
            if o is not None and o.get("index") == s["index"]:
                # a failed step stays "failed" (with the time it was compensated)
                status = o["status"] if o.get("status") == "failed" else "compensated"
                self._set_outcome(s["name"], status=status, compensated=reason, compensated_at=time.time())
            self.completed = [(p, i) for p, i in self.completed if i < s["index"]]
            self.emit("compensated", step=s["name"], index=s["index"], reason=reason,
                      partial=bool(d and d.compensatable == "partial"))

    def _call_compensation(self, d, s):
        attempts = d.compensate_retries or 3
        for attempt in range(1, attempts + 1):
            try:
                d.compensate(self._context(d, self.position.get(d.name, -1), s["index"], attempt))
                return
            except Exception as exc:  # noqa: BLE001 - a failed compensation makes the saga stuck
                err = f"{type(exc).__name__}: {exc}"
                if attempt == attempts:
                    raise _Finish(self._result(
                        "stuck", EXIT_STUCK, f"the compensation of step {s['index']} {d.name!r} failed {attempts} "
                                             f"times (last: {err}); the saga is stuck: fix the cause, then "
                                             f"{self.resume_hint}")) from None
                time.sleep(min(BACKOFF * (2 ** (attempt - 1)), 30.0))

    def _context(self, d, pos, index, attempt) -> StepContext:
        return StepContext(workspace=Path(self.mountpoint), saga_id=self.saga_id, saga_name=self.defn.name,
                           step=d.name, index=index, position=pos + 1, attempt=attempt, env=self._env(d, pos, index,
                                                                                                     attempt))

    def _env(self, d, pos, index, attempt) -> dict:
        env = {**os.environ, **d.env, "SAGA_ID": str(self.saga_id), "SAGA_NAME": self.defn.name,
               "STEP_NAME": d.name, "STEP_INDEX": str(index), "STEP_POSITION": str(pos + 1),
               "ATTEMPT": str(attempt), "WORKSPACE": str(self.mountpoint), "SAGA_WORKSPACE": str(self.mountpoint),
               "OVERLAYD_RUN_TOKEN": self.token}
        if self.defn.file:
            env.update(SAGA_DEFINITION=self.defn.file, SAGA_DEFINITION_DIR=self.defn.directory)
        return env

    # ------------------------------------------------------------------ one attempt

    def _layer_path(self, rec):
        if not self.state_dir or not rec.get("layer"):
            return None
        return os.path.join(self.state_dir, "layers", rec["layer"])

    def _daemon_state(self):
        """(alive, writable) of the daemon; a daemon that answers slowly counts as alive."""
        try:
            info = self._call("status", timeout=10.0, busy_wait=False)
        except _DaemonLost:
            return False, None
        except ClientError:
            return True, None
        return info.get("pid") == self.daemon_pid, info.get("writable")

    def _settle(self, index):
        """saga.status once the daemon is done with the step: a budget cut seals the layer at
        once and rolls the step back in the background."""
        deadline = time.monotonic() + 3600
        sealed_since = None
        while True:
            st = self._call("saga.status")
            saga = st["saga"]
            step = [s for s in st["steps"] if s["index"] == index]
            pending = saga is not None and saga["id"] == self.saga_id and step and step[0]["state"] == "open" \
                and st.get("writable") is False
            if not st.get("busy") and not pending:
                return st
            if pending and not st.get("busy"):
                sealed_since = sealed_since or time.monotonic()
                if time.monotonic() - sealed_since > 5.0:
                    return st  # sealed for some other reason
            if time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def _check_cut(self, d, index, res: _Attempt) -> _Attempt:
        """Did the daemon cut the step (a budget) or end the saga while the attempt ran?"""
        st = self._settle(index)
        saga = st["saga"]
        if saga is None or saga["id"] != self.saga_id:
            rec = [s for s in self._call("saga.list")["sagas"] if s["id"] == self.saga_id]
            cut = (rec[0].get("cut") if rec else None) or {}
            state = rec[0]["state"] if rec else "gone"
            why = f" ({cut.get('reason')} exceeded)" if cut.get("reason") else ""
            raise _Finish(self._result("aborted", EXIT_FAILED,
                                       f"the daemon ended the saga while step {d.name!r} ran: it is {state}{why}"))
        cut = saga.get("cut") or {}
        if cut.get("step") == index:
            reason = cut.get("reason", "budget")
            budget = ([s for s in st["steps"] if s["index"] == index] or [{}])[0].get("budgets") or {}
            if reason == "budget:timeout":
                return dataclasses.replace(res, ok=False, reason="timeout", status=124,
                                           detail=f"timed out after {budget.get('timeout', d.timeout):g} s "
                                                  "(the daemon cut the step)")
            what = {"budget:bytes": f"more than max_bytes = {budget.get('max_bytes')} bytes written",
                    "budget:files": f"more than max_files = {budget.get('max_files')} paths changed",
                    "budget:spinning": f"a file rewritten unchanged max_spins = {budget.get('max_spins')} times"}
            return dataclasses.replace(res, ok=False, reason="budget",
                                       detail=f"over budget: {what.get(reason, reason)} (the daemon cut the step)")
        step = [s for s in st["steps"] if s["index"] == index]
        if res.ok and (not step or step[0]["state"] != "open"):
            return dataclasses.replace(res, ok=False, reason="rolled-back",
                                       detail="the step was rolled back while it ran")
        return res

    def _attempt(self, d, pos, rec, attempt) -> _Attempt:
        if callable(d.run):
            res = self._attempt_callable(d, pos, rec, attempt)
        else:
            res = self._attempt_command(d, pos, rec, attempt)
        return self._check_cut(d, rec["index"], res)

    def _attempt_callable(self, d, pos, rec, attempt) -> _Attempt:
        t0 = time.monotonic()
        try:
            d.run(self._context(d, pos, rec["index"], attempt))
            res = _Attempt(ok=True)
        except Exception as exc:  # noqa: BLE001 - a failing step
            res = _Attempt(ok=False, reason="exception", detail=f"{type(exc).__name__}: {exc}",
                           tail=traceback.format_exc()[-TAIL_BYTES:])
        res.seconds = time.monotonic() - t0
        measured = measure_layer(self._layer_path(rec)) if self._layer_path(rec) else None
        if measured:
            res.bytes, res.files = measured
        return res

    def _attempt_command(self, d, pos, rec, attempt) -> _Attempt:
        env = self._env(d, pos, rec["index"], attempt)
        layer = self._layer_path(rec)
        proc = subprocess.Popen(["/bin/sh", "-c", d.run], cwd=self.mountpoint, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup)
        lines = queue.Queue()

        def reader():
            try:
                for chunk in iter(lambda: proc.stdout.readline(65536), b""):
                    lines.put(chunk)
            finally:
                lines.put(None)

        threading.Thread(target=reader, daemon=True, name="step-output").start()

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        tail = _Tail()
        t0 = time.monotonic()
        next_check = t0 + self.progress_interval
        last_line = ""
        measured = None
        reason, detail = "exit", ""
        eof = False
        exited_at = None
        try:
            while True:
                try:
                    chunk = lines.get(timeout=0.1)
                except queue.Empty:
                    chunk = b""
                if chunk is None:
                    eof = True
                elif chunk:
                    tail.add(chunk)
                    line = chunk.decode("utf-8", "replace").rstrip("\r\n")
                    last_line = line or last_line
                    self.emit("step.output", step=d.name, position=pos + 1, line=line)
                    continue
                now = time.monotonic()
                if proc.poll() is not None:
                    if eof:
                        break
                    exited_at = exited_at or now
                    if now - exited_at > 1.0:
                        kill()  # background processes still hold its output open
                # the daemon enforces the step's timeout (it seals the layer); this is the backstop
                # that stops the command itself
                if d.timeout is not None and now - t0 > d.timeout + 1.0 and reason == "exit":
                    reason, detail = "timeout", f"timed out after {d.timeout:g} s"
                    kill()
                if now >= next_check:
                    alive, writable = self._daemon_state()
                    if not alive:
                        kill()
                        proc.wait()
                        raise _DaemonLost()
                    if writable is False and reason == "exit":
                        reason, detail = "cut", "the daemon sealed the step's layer"  # a budget cut
                        kill()
                    w0 = time.monotonic()
                    measured = measure_layer(layer) if layer else None
                    spent = time.monotonic() - w0
                    next_check = now + max(self.progress_interval, 10 * spent)
                    self.emit("step.progress", step=d.name, position=pos + 1, of=len(self.defn.steps),
                              elapsed=round(now - t0, 1), bytes=measured[0] if measured else None,
                              files=measured[1] if measured else None, line=last_line)
        except BaseException:
            kill()
            proc.wait()
            raise
        status = proc.wait()
        kill()  # whatever it left running in the background
        if status < 0:
            status = 128 - status
        if reason == "timeout":
            status = 124
        measured = measure_layer(layer) if layer else None
        res = _Attempt(ok=(reason == "exit" and status == 0), status=status, reason=reason, tail=tail.text(),
                       seconds=time.monotonic() - t0, detail=detail)
        if measured:
            res.bytes, res.files = measured
        return res

    # ------------------------------------------------------------------ the end

    def _finish(self) -> RunResult:
        n = len(self.defn.steps)
        if self.attach:
            self._set_runner(phase="done")
            return self._result("done", EXIT_OK, f"all {n} steps done")
        if not self.commit:
            self._set_runner(phase="done")
            self.emit("saga.open")
            return self._result("open", EXIT_OK,
                                f"all {n} steps done; the saga is left open for review: saga diff, then saga commit "
                                "(or saga abort)")
        self._set_runner(phase="committing")
        try:
            r = self._call("saga.commit", timeout=None)
        except ConflictError as exc:
            self._set_runner(phase="done", message=exc.message)
            paths = ", ".join(quote_path(c["path"]) for c in exc.conflicts[:10])
            raise _Finish(self._result("conflict", EXIT_CONFLICT,
                                       f"all {n} steps done, but {exc.message} ({paths}). Resolve, then: saga commit "
                                       f"(or {self.resume_hint}); or saga abort")) from None
        self.emit("committed", changes=r.get("changes"), count=r.get("count"), seconds=r.get("seconds"))
        return self._result("committed", EXIT_OK, f"all {n} steps done; saga {self.saga_id} {self.defn.name!r} "
                                                  f"committed: {r.get('count')} change(s)")


def run_definition(socket_path, definition, *, commit=True, resume=False, on_event=None, attach=False) -> RunResult:
    """Run *definition* (a Definition, a path to a TOML file) against the daemon at *socket_path*."""
    if not isinstance(definition, Definition):
        definition = load(definition)
    return Coordinator(definition, socket_path, commit=commit, on_event=on_event, attach=attach).run(resume=resume)
