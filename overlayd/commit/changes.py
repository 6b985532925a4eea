"""What a saga changed, step by step: the one source of ``saga diff`` and of the changes a commit
reports, with the daemon (the engine's op_diff and op_commit) and without it (the CLI reading a
stopped workspace's journal and layers).

Plain functions of plain data: the plan's summary (plan.summarize), the saga's step records and
the paths each step recorded (the journal's ``paths``).
"""


def live_steps(steps) -> list[dict]:
    """The steps whose layer is in the stack (open, done, or being compensated)."""
    return [s for s in steps if s["state"] in ("open", "done", "compensating")]


def annotate(changes, steps) -> list[dict]:
    """Each change's ``layer`` replaced by the ``step`` (index) and ``step_name`` owning that layer."""
    by_layer = {s["layer"]: s for s in steps if s.get("layer")}
    for c in changes:
        s = by_layer.get(c.pop("layer"), {})
        c["step"] = s.get("index")
        c["step_name"] = s.get("name")
    return changes


def attribute(changes, steps, stored, touched=()) -> list[dict]:
    """Each (annotated) change's ``step`` made the step that first changed the path: the first
    live step whose recorded paths (*stored*: {step index: paths}) hold it, or the open step's
    *touched* paths, else those of its nearest recorded ancestor (the entries of a renamed
    directory). The layer's step (of the visible version) is kept as ``last_step`` when it is a
    later one: a directory created in step 4 and written into in step 5 is step 4's change."""
    live = live_steps(steps)
    first = {}
    names = {s["index"]: s["name"] for s in live}
    for s in live:
        for p in stored.get(s["index"], ()):
            first.setdefault(p, s["index"])
    if live and live[-1]["state"] == "open":
        for p in touched:
            first.setdefault(p, live[-1]["index"])
    for c in changes:
        p = c["path"]
        k = first.get(p)
        while k is None and "/" in p:
            p = p.rsplit("/", 1)[0]
            k = first.get(p)
        if k is None or c["step"] is None or k >= c["step"]:
            continue
        c["last_step"], c["last_step_name"] = c["step"], c["step_name"]
        c["step"], c["step_name"] = k, names.get(k)
    return changes


class NoStep(LookupError):
    """A step reference that names no live step (the daemon's code ``no-step``)."""


def resolve_step(saga, steps, ref) -> int:
    """The index of the live step *ref* names: its index (int, or digits; 0 is the base), or its
    name (the latest live step of that name). Raises NoStep saying what to do."""
    live = live_steps(steps)
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        k = int(ref)
        if k == 0 or any(s["index"] == k for s in live):
            return k
        raise NoStep(f"saga {saga['name']!r} has no live step {k}; see: saga status")
    matches = [s["index"] for s in live if s["name"] == ref]
    if not matches:
        raise NoStep(f"saga {saga['name']!r} has no live step named {ref!r}; see: saga status")
    return matches[-1]


def of_step(changes, k: int) -> list[dict]:
    """The changes step *k* made: first made, or last changed (``last_step``)."""
    return [c for c in changes if k in (c["step"], c.get("last_step"))]
