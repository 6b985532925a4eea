"""The rooms' imports flow one way (docs/ARCHITECTURE.md, Rooms): no import cycles among the
modules of overlayd, and the engine never reaches up into the daemon or raises the wire's error.
Read from the source (ast), nothing imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "overlayd"


def modules() -> dict:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set:
    """The overlayd modules *name* imports (a package's own submodules left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                if cand in known:
                    found.add(cand)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    return {m for m in found if m != name and not m.startswith(name + ".")}


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_engine_does_not_reach_up():
    known = modules()
    for name, path in known.items():
        if not name.startswith(("overlayd.engine", "overlayd.commit")):
            continue
        up = {m for m in imports(name, path, known)
              if m.startswith(("overlayd.daemon", "overlayd.client", "overlayd.runner", "overlayd.layers"))}
        assert not up, f"{name} imports {sorted(up)}"
        tree = ast.parse(path.read_text())
        uses = [n for n in ast.walk(tree) if (isinstance(n, ast.Name) and n.id == "OpError")
                or (isinstance(n, ast.alias) and n.name == "OpError")]
        assert not uses, f"{name} uses the wire's OpError: raise EngineError"
