"""Saga definitions: the schema of a whole saga in a TOML file (``saga run``), and its validation.

A definition names the saga and lists its steps; each step has a ``run`` command, an
optional ``compensate`` command and a failure policy (docs/DEFINITIONS.md has the schema).
:func:`load` / :func:`parse` validate a file completely before anything runs and report
every problem with its line and key; :func:`from_steps` builds a definition from Python (callables
allowed for ``run`` and ``compensate``). Running it is overlayd.runner.coordinator's job.
"""

import dataclasses
import difflib
import hashlib
import json
import os
import re
import tomllib
from typing import Any

from .. import tomllines, units
from ..protocol import name_problem


SCHEMA = 1
MAX_FILE = 256 << 10  # bytes of a definition file
MAX_STEPS = 200
TAIL_BYTES = 4096  # output kept per step attempt
TAIL_ANNOTATED = 2000  # characters of it journaled in the outcome
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COMPENSATABLE = ("full", "partial", "none")
ON_FAILURE = ("compensate", "retry", "stop")
DEFAULT_RETRY_POLICY_RETRIES = 2

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
    "on_conflict": "what a commit refused for conflicts does: \"merge\", \"theirs\" or \"stop\" (the default)",
    "step": "the steps: [[step]] tables",
}
ON_CONFLICT = ("merge", "theirs", "stop")
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
    on_conflict: str = "stop"  # "merge": saga resolve --merge, then commit again; "theirs": --theirs

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


def parse_duration(value) -> float:
    """overlayd.units.parse_duration: more than 0, at most units.MAX_DURATION (7 days)."""
    try:
        return units.parse_duration(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def parse_size(value) -> int:
    """overlayd.units.parse_size: more than 0."""
    try:
        return units.parse_size(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _int(value, low, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{value!r} is not an integer")
    if value < low or (high is not None and value > high):
        raise _Bad(f"{value} is out of range ({low}.." + (f"{high})" if high is not None else ")"))
    return value


def _name(value, kind) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not a string")
    problem = name_problem(value)
    if problem is not None:
        raise _Bad(f"invalid {kind} name {value!r}: {problem}")
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
    top_lines, step_lines = tomllines.line_map(text)
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
    on_conflict = raw.get("on_conflict", "stop")
    if on_conflict not in ON_CONFLICT:
        problems.append(Problem(f"{on_conflict!r}: must be one of " + ", ".join(f'"{c}"' for c in ON_CONFLICT),
                                line=top_lines.get("on_conflict"), key="on_conflict"))
        on_conflict = "stop"
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
                      budgets=budgets, on_conflict=on_conflict)


def _callable_name(fn) -> str:
    return "python:" + getattr(fn, "__module__", "?") + "." + getattr(fn, "__qualname__", repr(fn))


def from_steps(steps, name: str, description=None, budgets=None, on_conflict="stop") -> Definition:
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
                      **(budgets or {}), **({"on_conflict": on_conflict} if on_conflict != "stop" else {})},
                     {}, [], None, callables=True)
    canon = {"name": name, "description": description, "budgets": defn.budgets, "steps": []}
    if defn.on_conflict != "stop":
        canon["on_conflict"] = defn.on_conflict
    for s in defn.steps:
        rec = {f.name: getattr(s, f.name) for f in dataclasses.fields(StepDef) if f.name != "line"}
        for k in ("run", "compensate"):
            if callable(rec[k]):
                rec[k] = _callable_name(rec[k])
        canon["steps"].append(rec)
    defn.text = json.dumps(canon, sort_keys=True, indent=1)
    defn.sha256 = hashlib.sha256(defn.text.encode()).hexdigest()
    return defn
