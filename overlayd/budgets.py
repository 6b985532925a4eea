"""Fish-or-cut-bait budgets: limits on a step (or a whole saga) that cut it automatically.

A budget is a dict with any of ``timeout`` (seconds of wall time), ``max_bytes`` (bytes
written), ``max_files`` (distinct paths changed), ``max_spins`` (the same file rewritten with
identical content that many times in a row) and ``policy`` (``"step"``: roll back the step;
``"saga"``: abort the saga). Workspace-wide defaults live in ``STATE/budgets.json``::

    {"step": {"timeout": 600, "max_bytes": 1073741824}, "saga": {"timeout": 7200}}
"""

import hashlib
import json
import logging
import os

log = logging.getLogger(__name__)

KEYS = ("timeout", "max_bytes", "max_files", "max_spins", "policy")
SPIN_HASH_LIMIT = 8 << 20  # files larger than this are not hashed for spin detection


#: the largest values that make sense (inf, nan and 1e308 are refused: they mean a typo)
LIMITS = {"timeout": 7 * 86400}


def validate(budget: dict | None, where: str) -> dict:
    out = {}
    for k, v in (budget or {}).items():
        if v is None:
            continue
        if k not in KEYS:
            raise ValueError(f"{where}: unknown budget {k!r} (known: {', '.join(KEYS)})")
        if k == "policy":
            if v not in ("step", "saga"):
                raise ValueError(f"{where}: policy must be 'step' or 'saga', not {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= LIMITS.get(k, 2 ** 63):
            raise ValueError(f"{where}: {k} must be a positive number"
                             + (f" of at most {LIMITS[k]:g}" if k in LIMITS else "") + f", not {v!r}")
        out[k] = v
    return out


def load_defaults(state_dir) -> dict:
    path = os.path.join(state_dir, "budgets.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"step": {}, "saga": {}}
    return {"step": validate(data.get("step"), f"{path}: step"), "saga": validate(data.get("saga"), f"{path}: saga")}


class Meter:
    """What one step (or one saga) has done so far."""

    def __init__(self, budget: dict):
        self.budget = budget
        self.bytes = 0
        self.paths = set()
        self.spins = {}  # node ino -> (digest, count)

    def over(self) -> str | None:
        """The reason the budget is exceeded (``budget:bytes`` ...), or None."""
        b = self.budget
        if "max_bytes" in b and self.bytes > b["max_bytes"]:
            return "budget:bytes"
        if "max_files" in b and len(self.paths) > b["max_files"]:
            return "budget:files"
        if "max_spins" in b and any(c >= b["max_spins"] for _, c in self.spins.values()):
            return "budget:spinning"
        return None

    def rewrite(self, ino: int, fd: int) -> None:
        """A handle that wrote was closed: count identical rewrites in a row."""
        if "max_spins" not in self.budget:
            return
        size = os.fstat(fd).st_size
        if size > SPIN_HASH_LIMIT:
            self.spins.pop(ino, None)
            return
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # the handle may be write-only
        try:
            digest = hashlib.sha256(os.pread(rfd, size, 0)).digest()
        finally:
            os.close(rfd)
        prev = self.spins.get(ino)
        self.spins[ino] = (digest, prev[1] + 1 if prev and prev[0] == digest else 0)
