"""Workspace configuration files (``/etc/overlayd/NAME.conf``) and the systemd units that use them.

A configuration file is TOML with top-level keys only::

    base = "/srv/project"        # required: the working tree the workspace overlays
    mountpoint = "/mnt/project"  # required: where the workspace is mounted
    allow_other = true           # optional: let every user use the mount (default: on for root)
    group = "devs"               # optional: members may also drive the daemon (saga commands)
    keep_open_step = false       # optional: after a crash keep the open step instead of rolling it back
    log_level = "info"           # optional: debug, info, warning or error
    state_dir = "/var/lib/x"     # optional: layers and journal ($STATE_DIRECTORY under systemd)

The workspace name is the file's stem (``/etc/overlayd/project.conf`` -> ``project``), which is
also the systemd instance name (``overlayd@project``). Paths must be absolute (``~`` is expanded).
Every error names the file and, where there is one, the line: a typo never passes silently.

``install_service`` copies the units from ``systemd/`` into a systemd unit directory with the
path of the running ``overlayd`` substituted, and writes a sample configuration once.
"""

import dataclasses
import difflib
import grp
import json
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

from . import tomllines
from .paths import UsageError, check_workspace_name

LOG_LEVELS = ("debug", "info", "warning", "error")
PATH_KEYS = ("base", "mountpoint", "state_dir")
BOOL_KEYS = ("allow_other", "keep_open_step")
KEYS = ("base", "mountpoint", "allow_other", "group", "keep_open_step", "log_level", "state_dir")
REQUIRED = ("base", "mountpoint")

SYSTEM_UNIT = "overlayd@.service"
USER_UNIT = "overlayd-user@.service"
UNIT_EXEC_PLACEHOLDER = "/usr/local/bin/overlayd"  # what the shipped units name; replaced on install


class ConfigError(UsageError):
    """A configuration file is missing, unreadable or invalid; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    name: str
    base: str
    mountpoint: str
    allow_other: bool | None = None
    group: str | None = None
    keep_open_step: bool = False
    log_level: str = "info"
    state_dir: str | None = None


def load(path) -> Config:
    """Read and validate one configuration file. Raises ConfigError with FILE[:LINE]: what and what to do."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file; create it "
                          f"(overlayd install-service --name NAME --base DIR --mountpoint DIR writes one)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path}: invalid TOML: arrays or inline tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)$", msg)
        where = f"{path}:{m.group(1)}" if m else path
        msg = msg[:m.start()].rstrip() if m else msg
        raise ConfigError(f"{where}: invalid TOML: {msg} (write key = value, strings in double quotes)") from None

    def fail(key, message):
        line = tomllines.key_line(text, key)
        raise ConfigError(f"{path}:{line}: {message}" if line else f"{path}: {message}")

    name = Path(path).name
    name = name[:-len(".conf")] if name.endswith(".conf") else Path(path).stem
    try:
        check_workspace_name(name)
    except UsageError as exc:
        raise ConfigError(f"{path}: the file's name gives the workspace name: {exc}") from None

    for key, value in data.items():
        if isinstance(value, dict):
            fail(key, f"unexpected section [{key}]: put every key at the top level, before any [section]")
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            fail(key, f"unknown key {key!r}; {hint}known keys: {', '.join(KEYS)}")
    for key in REQUIRED:
        if key not in data:
            raise ConfigError(f"{path}: missing required key {key!r}; add a line: {key} = \"/absolute/path\"")

    values = {}
    for key in PATH_KEYS:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, str) or not value:
            fail(key, f"{key} must be a non-empty string (a path in double quotes), got {value!r}")
        if "\0" in value:
            fail(key, f"{key} contains a NUL character")
        expanded = os.path.expanduser(value)
        if not os.path.isabs(expanded):
            fail(key, f"{key} must be an absolute path, got {value!r} "
                      f"(the service does not run in your directory; write {os.path.abspath(expanded)!r}?)")
        values[key] = os.path.normpath(expanded)
    for key in BOOL_KEYS:
        if key in data:
            if not isinstance(data[key], bool):
                fail(key, f"{key} must be true or false (without quotes), got {data[key]!r}")
            values[key] = data[key]
    if "log_level" in data:
        level = data["log_level"]
        if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
            fail("log_level", f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        values["log_level"] = level.lower()
    if "group" in data:
        group = data["group"]
        if not isinstance(group, str) or not group:
            fail("group", f"group must be a group name in double quotes, got {group!r}")
        try:
            grp.getgrnam(group)
        except KeyError:
            fail("group", f"group {group!r} does not exist on this machine (create it with groupadd, or remove the key)")
        values["group"] = group
    if values["base"] == values["mountpoint"]:
        fail("mountpoint", "mountpoint must differ from base: the workspace is mounted beside its base, not over it")
    return Config(path=path, name=name, **values)


def mountpoint_of(path) -> str:
    """The mountpoint of a configuration file, even one with other mistakes (ExecStart= reports those)."""
    try:
        return load(path).mountpoint
    except ConfigError:
        try:
            with open(path, "rb") as f:
                value = tomllib.load(f).get("mountpoint")
        except (OSError, tomllib.TOMLDecodeError, RecursionError):
            value = None
        if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
            return os.path.normpath(os.path.expanduser(value))
        raise


# ---------------------------------------------------------------------- sample configuration


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def render_sample(name: str, base: str | None, mountpoint: str | None) -> str:
    base_line = f"base = {_toml_string(base)}" if base else 'base = "/srv/CHANGE-ME"          # edit me'
    mp_line = f"mountpoint = {_toml_string(mountpoint)}" if mountpoint else f'mountpoint = "/mnt/{name}"    # edit me'
    return f"""\
# overlayd workspace {name!r}: read by `overlayd mount --config` (systemd unit overlayd@{name}).
# TOML, top-level keys only; paths absolute. Reference: README, "Running as a systemd service".

# The working tree the workspace overlays; never written until a saga commits.
{base_line}
# Where the workspace is mounted (an existing, empty directory).
{mp_line}

# Let every user's processes use the mount (default: true when the daemon runs as root).
#allow_other = true
# Members of this group may also drive the daemon (saga commands), besides root and the owner.
#group = "devs"
# After a crash, keep the step that was open instead of rolling it back.
#keep_open_step = false
# debug, info, warning or error.
#log_level = "info"
# Layers and journal (default: $STATE_DIRECTORY, /var/lib/overlayd/{name} under systemd).
#state_dir = "/var/lib/overlayd/{name}"
"""


# ---------------------------------------------------------------------- installing the units


def unit_source_dir() -> Path:
    """Where the shipped unit files are: the source checkout's systemd/, or share/overlayd/systemd."""
    candidates = [Path(__file__).resolve().parent.parent / "systemd",
                  Path(sys.prefix) / "share" / "overlayd" / "systemd"]
    for c in candidates:
        if (c / SYSTEM_UNIT).is_file():
            return c
    raise UsageError("the unit files were not found (looked in " + ", ".join(map(str, candidates)) +
                     "); install overlayd from its source checkout (pip install -e .)")


def systemd_quote(word: str) -> str:
    """Quote one word of an Exec*= command line as systemd parses it (specifiers and $ escaped)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r"""[\s"'\\;]""", word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def overlayd_executable() -> str:
    """The absolute path of the ``overlayd`` command that belongs to this installation."""
    beside = Path(sys.executable).parent / "overlayd"  # the venv's console script
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    argv0 = Path(sys.argv[0])
    if argv0.name == "overlayd" and argv0.is_file():
        return str(argv0.resolve())
    found = shutil.which("overlayd")
    if found:
        return os.path.abspath(found)
    raise UsageError("cannot find the overlayd executable; pass --executable PATH")


def render_unit(source: Path, executable: str) -> str:
    lines = source.read_text().splitlines(keepends=True)
    return "".join(line.replace(UNIT_EXEC_PLACEHOLDER, systemd_quote(executable)) if line.startswith("Exec") else line
                   for line in lines)


def _under(root: str, path: Path) -> Path:
    return Path(root) / str(path).lstrip("/") if root not in ("", "/") else path


def _write_if_changed(path: Path, text: str, mode: int) -> str:
    try:
        if path.read_text() == text:
            return "unchanged"
        verb = "updated"
    except FileNotFoundError:
        verb = "installed"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return verb


def install_service(*, root: str = "/", user: bool = False, name: str | None = None,
                    base: str | None = None, mountpoint: str | None = None,
                    executable: str | None = None) -> dict:
    """Install the unit (and a sample config for *name*, never overwriting one). Idempotent.

    Returns {"unit": path, "unit_action": ..., "config": path|None, "config_action": ..., "commands": [...]}.
    """
    if name is not None:
        check_workspace_name(name)
    for label, value in (("--base", base), ("--mountpoint", mountpoint)):
        if value is not None and not os.path.isabs(os.path.expanduser(value)):
            raise UsageError(f"{label} must be an absolute path, got {value!r}")
    executable = executable or overlayd_executable()
    if not os.path.isabs(executable):
        raise UsageError(f"--executable must be an absolute path, got {executable!r}")
    source = unit_source_dir()
    if user:
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        unit_name, unit_dir, config_dir = USER_UNIT, config_home / "systemd" / "user", config_home / "overlayd"
        systemctl = "systemctl --user"
    else:
        unit_name, unit_dir, config_dir = SYSTEM_UNIT, Path("/etc/systemd/system"), Path("/etc/overlayd")
        systemctl = "systemctl"
    unit_path = _under(root, unit_dir / unit_name)
    result = {"unit": str(unit_path),
              "unit_action": _write_if_changed(unit_path, render_unit(source / unit_name, executable), 0o644),
              "executable": executable, "config": None, "config_action": None}
    _under(root, config_dir).mkdir(parents=True, exist_ok=True)
    instance = unit_name.replace("@.service", f"@{name or 'NAME'}")
    commands = [f"{systemctl} daemon-reload"]
    if name is not None:
        config_path = _under(root, config_dir / f"{name}.conf")
        result["config"] = str(config_path)
        if config_path.exists():
            result["config_action"] = "kept"
        else:
            sample = render_sample(name, base and os.path.normpath(os.path.expanduser(base)),
                                   mountpoint and os.path.normpath(os.path.expanduser(mountpoint)))
            result["config_action"] = _write_if_changed(config_path, sample, 0o644)
    commands.append(f"{systemctl} enable --now {instance}")
    if user:
        commands.append("loginctl enable-linger $USER   # keep it running while you are logged out")
    result["commands"] = commands
    return result
