"""Generate docs/CLI.md from the commands' own help: ``python -m overlayd.cli.docs > docs/CLI.md``."""

import click

from overlayd.cli import overlayd_cmd, saga_cmd

HEADER = """# Command-line reference

Generated from the commands' help by `python -m overlayd.cli.docs > docs/CLI.md`; a test keeps it current.

Exit codes (both commands): 0 ok, 1 error, 2 usage error, 3 commit conflict, 4 compensation
stuck, 5 no daemon serves the workspace, 7 permission denied (the workspace is another user's:
its daemon refused your uid, or its socket is in a directory you cannot enter). `saga run` has
codes of its own (see below). With `--json` every command prints one JSON object
carrying `"version": 1` (`saga log --json` prints one such object per event, NDJSON); errors
print `{"version": 1, "error": {"message": ..., "exit_code": ...}}`.

Before sending anything, `saga` and `overlayd unmount` check the daemon they reach: its socket
and its uid (SO_PEERCRED) must be root's, yours or the mount owner's, and it must serve the
very mount the command is about (its device number, from the kernel's mount table). A daemon
that fails the check gets nothing and the command exits 1 ("impersonating", "serves ...").

Durations (`DUR`: `--timeout`, `--compensate-timeout`, `--older-than`) are seconds (`90`, `2.5`)
or a number with a unit: `250ms`, `30s`, `5m`, `1.5h`, `7d`. Sizes (`--max-bytes`) are bytes
(`4096`) or a whole number with a binary unit: `512K`, `100M`, `2G`, `1T` (`100MiB` and `100MB`
mean the same). A time limit or a size must be more than 0, and a time limit at most `7d`; an
age (`--older-than`) may be 0. Saga definitions take the same values (`overlayd/units.py`).

File names in human-readable output (`saga diff`, `saga commit --dry-run`, conflicts, `saga
status`) are quoted the way git quotes unusual paths (`core.quotePath`): a name with a control
character, a `"` or `\\`, bytes that are not UTF-8, or invisible or line-breaking Unicode is
printed in double quotes with C escapes (`\\n`, `\\t`, `\\"`, `\\\\`) and octal escapes
(`\\377`); printable non-ASCII text is printed as it is. JSON keeps the exact bytes: a `path` is
the name decoded as UTF-8 with surrogate escapes, so a byte that is not UTF-8 appears as a lone
surrogate `\\udc80`-`\\udcff` (Python: `os.fsencode(path)` gives the bytes back).
"""


def _help(cmd, path):
    settings = {**cmd.context_settings, "terminal_width": 100, "max_content_width": 100,
                "help_option_names": ["-h", "--help"]}
    ctx = click.Context(cmd, info_name=path, **settings)
    return cmd.get_help(ctx)


def render() -> str:
    out = [HEADER]
    out.append("\n## JSON output (schema version 1)\n\nKeys every `saga ... --json` answer carries "
               "(objects may gain keys; removing or renaming one bumps the version):\n\n"
               "| command | keys |\n|---|---|\n")
    for cmd, keys in saga_cmd.JSON_KEYS.items():
        out.append(f"| `saga {cmd}` | {', '.join(f'`{k}`' for k in keys)} |\n")
    out.append("\n`saga log --json` prints one object per event (NDJSON). A saga object has `id`, `name`, "
               "`state`, `created`, `updated`, `steps`; a step object `saga`, `index`, `name`, `state`, `layer`, "
               "`compensate`; a change `path`, `change` (added/modified/deleted), `kind`, `step`, `step_name`.\n")
    for prog, group in (("overlayd", overlayd_cmd.main), ("saga", saga_cmd.main)):
        out.append(f"\n## `{prog}`\n\n```\n{_help(group, prog)}\n```\n")
        commands = group.all_commands()
        for name in sorted(commands):
            out.append(f"\n### `{prog} {name}`\n\n```\n{_help(commands[name], f'{prog} {name}')}\n```\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(), end="")
