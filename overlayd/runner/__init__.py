"""Saga definitions and their runner (``saga run``, and the same from Python).

- overlayd.runner.schema: the definition's schema, validated completely before anything runs
- overlayd.runner.coordinator: the client-side Coordinator that runs one against a daemon
- overlayd.runner.attempt: one attempt of a step (its process or callable, its outcome)

From Python, :class:`Workspace` is overlayd.client.Workspace whose sagas can also
``run(steps)``, and :func:`run_definition` runs a whole saga (docs/DEFINITIONS.md).
"""

from .. import client
from .attempt import RunFailed, RunResult, StepContext, human_size, kill_token, measure_layer
from .coordinator import Coordinator
from .schema import Definition, DefinitionError, Problem, StepDef, from_steps, load, parse

__all__ = ["Coordinator", "Definition", "DefinitionError", "Problem", "RunFailed", "RunResult", "Saga",
           "StepContext", "StepDef", "Workspace", "from_steps", "human_size", "kill_token", "load",
           "measure_layer", "parse", "run_definition"]


class Saga(client.Saga):
    def run(self, steps, *, commit=None, on_event=None):
        """Run *steps* (as for :func:`run_definition`) in this saga; returns the RunResult, raises
        ``RunFailed`` (a ClientError, with ``.result``) if the run did not finish.

        Inside ``with ws.saga(NAME) as s:`` the steps join the active saga: a failure compensates
        only these steps, then raises, so the ``with`` block aborts the saga; the block commits.
        On a saga not begun yet, ``s.run(steps)`` begins it and commits (``commit=False``: leave
        it open)."""
        defn = from_steps(steps, self.name) if isinstance(steps, (list, tuple)) else steps
        attach = self.rec is not None
        coord = Coordinator(defn, self.ws.socket_path, on_event=on_event, attach=attach, expect=self.ws.expect,
                            commit=(not attach) if commit is None else commit)
        result = coord.run()
        if not attach and result.saga_id is not None:
            self.rec = {"id": result.saga_id, "name": self.name}
        return result.raise_for_status()


class Workspace(client.Workspace):
    """overlayd.client.Workspace, whose sagas can run steps (``ws.saga(NAME).run(steps)``)."""

    saga_class = Saga


def run_definition(ws: client.Workspace, definition, *, name=None, commit=True, resume=False, on_event=None):
    """Run a whole saga from a definition; returns a :class:`RunResult`.

    *definition*: a path to a TOML file, a ``Definition``, or a list of steps (dicts with the
    keys of a ``[[step]]`` table, *name* then names the saga). A step's ``run`` and
    ``compensate`` may be shell commands (run in the mount; a compensate command is run by
    the daemon when the step's layer is dropped) or Python callables ``f(ctx)`` getting a
    ``StepContext`` (``ctx.workspace`` is the mountpoint); they run in this process. A run
    callable fails by raising. A callable compensate is called here, right before the daemon
    drops that step's layer (on a failure of the step or a later one, and on a retry or a
    resume); if it raises on every attempt (``compensate_retries``, 3 by default) the run
    ends ``stuck``. Compensations must tolerate a half-done step. Resume with the same steps
    (``resume=True``); the check covers names, commands and the callables' qualified names.

    Example::

        ws = Workspace("/mnt/ws")
        r = run_definition(ws, [
            {"name": "fetch", "run": "curl -so data.json https://example.org/data.json"},
            {"name": "convert", "run": convert, "compensate": forget_conversion},
            {"name": "test", "run": "python -m unittest -q", "retries": 1},
        ], name="refresh-data")
        if not r.ok:
            print(r.status, r.message)
    """
    if isinstance(definition, (list, tuple)):
        definition = from_steps(definition, name or "saga")
    elif not isinstance(definition, Definition):
        definition = load(definition)
    return Coordinator(definition, ws.socket_path, commit=commit, on_event=on_event,
                       expect=ws.expect).run(resume=resume)
