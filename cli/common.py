"""What both commands share: a click group whose usage errors honour ``--json``."""

import importlib
import json
import sys

import click

SCHEMA = 1


def json_error(message: str, exit_code: int, **extra) -> str:
    return json.dumps({"version": SCHEMA, "error": {"message": message, "exit_code": exit_code, **extra}},
                      default=str)


class Group(click.Group):
    """A click group that prints usage errors (a missing argument, an unknown command or option,
    a bad option value) as ``{"version": 1, "error": {...}}`` on stdout when ``--json`` is among
    the arguments, as every other error of a ``--json`` command is printed.

    *lazy* names commands whose module is imported only when the command is used (or listed by
    ``--help``): ``{"run": "overlayd.cli.saga_run:run_cmd"}``. Every ``saga`` command pays for the
    imports of the group's module; ``saga status`` need not pay for ``saga run``'s."""

    def __init__(self, *args, lazy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def all_commands(self) -> dict:
        """Every command, the lazy ones imported (cli.docs)."""
        for name in self.lazy:
            self.get_command(None, name)
        return self.commands

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            if "--json" in argv:
                click.echo(json_error(exc.format_message(), exc.exit_code,
                                      **({"usage": True} if isinstance(exc, click.UsageError) else {})))
            else:
                exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
