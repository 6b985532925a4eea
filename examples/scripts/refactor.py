#!/usr/bin/env python3
"""The commands of examples/refactor.toml: move functions of a Python module into a new module.

    refactor.py analyse SOURCE TARGET PLAN [--keep NAME,...]
        list SOURCE's top-level functions (but the kept ones) into PLAN (JSON)
    refactor.py create PLAN     create TARGET's package(s) and TARGET with a docstring
    refactor.py migrate PLAN    move the planned functions from SOURCE to the end of TARGET
    refactor.py imports PLAN    rewrite 'from SOURCE_MODULE import ...' in every .py file

Paths are relative to the current directory (saga run runs steps in the workspace's root).
Only the standard library is used; nothing outside the current directory is written.
"""

import ast
import json
import os
import sys


def module_of(path):
    return os.path.splitext(path)[0].replace(os.sep, ".").removesuffix(".__init__")


def load(plan):
    with open(plan) as f:
        return json.load(f)


def analyse(source, target, plan, keep=()):
    with open(source) as f:
        tree = ast.parse(f.read(), source)
    functions = [n.name for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name not in keep]
    if not functions:
        sys.exit(f"analyse: no functions to move in {source}")
    os.makedirs(os.path.dirname(plan) or ".", exist_ok=True)
    with open(plan, "w") as f:
        json.dump({"source": source, "target": target, "source_module": module_of(source),
                   "target_module": module_of(target), "functions": functions}, f, indent=2)
        f.write("\n")
    print(f"analyse: {len(functions)} function(s) of {source} move to {target}: {', '.join(functions)}")


def create(plan):
    p = load(plan)
    target = p["target"]
    if os.path.exists(target):
        sys.exit(f"create: {target} exists already")
    parts = os.path.dirname(target).split(os.sep)
    for i in range(1, len(parts) + 1):
        d = os.path.join(*parts[:i])
        os.makedirs(d, exist_ok=True)
        init = os.path.join(d, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as f:
                f.write(f'"""{module_of(init)}."""\n')
            print(f"create: {init}")
    with open(target, "w") as f:
        f.write(f'"""Moved here from {p["source_module"]}."""\n')
    print(f"create: {target}")


def _bound(node):
    return {(a.asname or a.name).split(".")[0] for a in node.names}


def _used(nodes):
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def migrate(plan):
    """Move the functions, with the module-level imports they use; drop imports the source
    no longer uses."""
    p = load(plan)
    with open(p["source"]) as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text, p["source"])
    moved = [n for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in p["functions"]]
    missing = set(p["functions"]) - {n.name for n in moved}
    if missing:
        sys.exit(f"migrate: not found in {p['source']}: {', '.join(sorted(missing))}")
    chunks, drop = [], set()
    for node in moved:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        chunks.append("".join(lines[start:node.end_lineno]).rstrip() + "\n")
        drop.update(range(start, node.end_lineno))
    rest = [n for n in tree.body if n not in moved and not isinstance(n, (ast.Import, ast.ImportFrom))]
    needed, still_used = _used(moved), _used(rest)
    imports = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            stmt = "".join(lines[node.lineno - 1:node.end_lineno])
            if _bound(node) & needed:
                imports.append(stmt)
            if not _bound(node) & still_used:
                drop.update(range(node.lineno - 1, node.end_lineno))
    kept = "".join(line for i, line in enumerate(lines) if i not in drop)
    while "\n\n\n\n" in kept:
        kept = kept.replace("\n\n\n\n", "\n\n\n")
    with open(p["source"], "w") as f:
        f.write(kept.rstrip() + "\n")
    with open(p["target"], "a") as f:
        if imports:
            f.write("\n" + "".join(imports))
        for c in chunks:
            f.write("\n\n" + c)
    print(f"migrate: moved {len(chunks)} function(s) to {p['target']}"
          + (f" with {len(imports)} import(s)" if imports else ""))


def imports(plan):
    p = load(plan)
    moved = set(p["functions"])
    changed = 0
    for dirpath, dirnames, filenames in os.walk("."):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.normpath(os.path.join(dirpath, name))
            with open(path) as f:
                text = f.read()
            lines = text.splitlines(keepends=True)
            edits = []
            for node in ast.walk(ast.parse(text, path)):
                if isinstance(node, ast.ImportFrom) and node.module == p["source_module"] and node.level == 0:
                    names = [a for a in node.names if a.name in moved]
                    if not names:
                        continue
                    rest = [a for a in node.names if a.name not in moved]
                    indent = lines[node.lineno - 1][:node.col_offset]

                    def clause(aliases):
                        return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)

                    new = f"{indent}from {p['target_module']} import {clause(names)}\n"
                    if rest:
                        new = f"{indent}from {p['source_module']} import {clause(rest)}\n" + new
                    edits.append((node.lineno - 1, node.end_lineno, new))
            if not edits:
                continue
            for start, end, new in sorted(edits, reverse=True):
                lines[start:end] = [new]
            with open(path, "w") as f:
                f.write("".join(lines))
            changed += 1
            print(f"imports: updated {path}")
    print(f"imports: {changed} file(s) updated")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "analyse":
        keep = ()
        if "--keep" in args:
            i = args.index("--keep")
            keep = tuple(args[i + 1].split(","))
            args = args[:i] + args[i + 2:]
        analyse(*args, keep=keep)
    elif cmd in ("create", "migrate", "imports"):
        {"create": create, "migrate": migrate, "imports": imports}[cmd](*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
