"""Where keys are in a TOML text: tomllib gives values but no line numbers, and an error that
names its line is worth a lot. The one line finder, for configuration files (config.py) and saga
definitions.

Best effort, by lines: a key assigned (``key =``, ``"key" =``, dotted ``key.sub =``) or a table
opened (``[key]``, ``[key.sub]``); every ``[[step]]`` array table gets a map of its own (its
header under ""; keys of its ``[step.NAME]`` subtables as ``NAME.key``). Lines inside multi-line
strings are skipped.
"""

import re

_STEP_HEADER = re.compile(r"^\s*\[\[\s*step\s*\]\]\s*(#.*)?$")
_STEP_SUBTABLE = re.compile(r"^\s*\[\s*step\s*\.\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[\s*\[?\s*([A-Za-z0-9_-]+)?")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*(\.|=)""")


def line_map(text: str) -> tuple[dict, list[dict]]:
    """(the 1-based line of each top-level key and table, [per ``[[step]]`` table: its header
    line under "" and the line of each of its keys]); the first line wins."""
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
        elif m := _TABLE.match(line):
            current, prefix = {}, ""
            if m.group(1):
                top.setdefault(m.group(1), n)
        elif m := _KEY.match(line):
            key = m.group(1).strip("\"'")
            current.setdefault(prefix + key, n)
        for q in ('"""', "'''"):
            if line.count(q) % 2 == 1:
                in_string = q
                break
    return top, steps


def key_line(text: str, key: str) -> int | None:
    """The line where top-level *key* is assigned or opens a table, or None."""
    return line_map(text)[0].get(key)
