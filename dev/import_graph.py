"""
The package's import graph, read from the source (nothing is imported or run): modules, lines, picochat->picochat
import edges, edges from the library up into a stage, edges between stages, cycles, and imports inside function
bodies. tests/test_layering.py asserts on the same functions; dev/LOG.md records before/after figures.

    python dev/import_graph.py [PACKAGE_DIR]      # default: ./picochat
"""
import ast
import sys
from pathlib import Path


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def picochat_imports(path: Path, known: set) -> set:
    """picochat modules imported anywhere in the file (`from picochat import x` counts as picochat.x when that is
    a module, else as picochat)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "picochat"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "picochat":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return out


def graph(package: Path) -> dict:
    mods = modules(package)
    return {name: picochat_imports(path, set(mods)) - {name} for name, path in mods.items()}


def is_stage(name: str) -> bool:
    return name.startswith("picochat.stages.")


def is_library(name: str) -> bool:
    return not is_stage(name) and name not in ("picochat.__main__", "picochat.stages")


def cycles(g: dict) -> list:
    state, found = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if dep not in g:
                continue
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def late_imports(path: Path) -> list:
    """(line number, text, has a comment) of every import that is not at the top level of the file."""
    source = path.read_text(encoding="utf-8")
    lines, tree = source.splitlines(), ast.parse(source)
    top = {id(n) for n in tree.body}
    return [(n.lineno, lines[n.lineno - 1].strip(), "#" in lines[n.lineno - 1]) for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]


def main(argv=None):
    package = Path((argv or sys.argv[1:] or ["picochat"])[0]).resolve()
    mods, g = modules(package), graph(package)
    edges = [(a, b) for a, deps in g.items() for b in deps if b in g]
    late = [(m, *x) for m, p in mods.items() for x in late_imports(p)]
    print(f"modules {len(mods)}, lines {sum(len(p.read_text().splitlines()) for p in mods.values()):,}, "
          f"import edges {len(edges)}")
    print(f"library -> stage edges {sum(is_library(a) and is_stage(b) for a, b in edges)}, "
          f"stage -> stage edges {sum(is_stage(a) and is_stage(b) for a, b in edges)}, cycles {len(cycles(g))}")
    print(f"imports inside functions {len(late)} ({sum(not c for *_, c in late)} without a comment saying why)")
    biggest = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)[:3]
    print("largest files: " + ", ".join(f"{m} {n}" for n, m in biggest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
