"""The house plan (ARCHITECTURE.md) holds: rooms import only the rooms before them, no module import
cycle, and the documents name every room that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "ReCoKDLib"

#: the rooms in dependency order (a room may import itself and the rooms before it); ARCHITECTURE.md
#: lists the same order. ``foundation`` is the top-level helpers every room may use.
ROOMS = ["foundation", "models", "data", "losses", "distill", "deployment", "inference", "evaluation",
         "training", "benchmarks", "workflows", "interface"]
FOUNDATION = {"errors", "utils", "resources", "kd_methods", "__init__"}
INTERFACE = {"commands", "cli"}


def _room(module: str) -> str:
    top = module.split(".")[1] if "." in module else "__init__"
    if top in FOUNDATION:
        return "foundation"
    if top in INTERFACE:
        return "interface"
    return top


def _imports(type_only: bool = False) -> dict[str, set[str]]:
    """module -> ReCoKDLib modules it imports (module-level and inside functions alike; with ``type_only``,
    the imports for type hints under ``if TYPE_CHECKING:`` too)."""
    graph: dict[str, set[str]] = {}
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in LIB.rglob("*.py")}
    for path in LIB.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = name.rsplit(".", 1)[0]
        name = name.removesuffix(".__init__")
        found: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]:
            if not type_only:
                block.body = []  # imports for type hints only do not run
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def test_rooms_import_only_earlier_rooms():
    order = {room: i for i, room in enumerate(ROOMS)}
    rooms_found = {_room(m) for m in _imports()}
    assert rooms_found <= set(ROOMS), f"rooms missing from the plan: {sorted(rooms_found - set(ROOMS))}"
    wrong = sorted(f"{a} ({_room(a)}) imports {b} ({_room(b)})" for a, targets in _imports().items() for b in targets
                   if order[_room(b)] > order[_room(a)])
    assert not wrong, "imports against the house's direction:\n" + "\n".join(wrong)


def test_no_import_cycle():
    """No module imports itself through others, type-hint imports included: a circle there is a design
    circle even where it cannot fail at run time (issue 33 took the last one out of ``data/``)."""
    graph = _imports(type_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(cycle[0].rsplit(".", 1)[0]) and c == cycle[0] for c in cycle[1:-1]):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_architecture_and_readme_name_every_room():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| \d+ \| \*\*(\w+)\*\*", text, flags=re.M)
    assert listed == ROOMS, f"ARCHITECTURE.md lists {listed}, the rooms are {ROOMS}"
    folders = sorted(p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for folder in folders:
        assert f"`ReCoKDLib/{folder}`" in readme, f"README's layout table lacks ReCoKDLib/{folder}"
        assert f"`{folder}/`" in text or f"**{folder}**" in text, f"ARCHITECTURE.md lacks {folder}"
    doc = (LIB / "__init__.py").read_text(encoding="utf-8")
    for folder in folders:
        assert f"``{folder}``" in doc, f"ReCoKDLib/__init__.py's package map lacks {folder}"
