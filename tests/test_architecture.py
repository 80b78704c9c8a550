"""The layering of ARCHITECTURE.md, checked on every import statement of the package (lazy ones included):
imports only point down, parts of one layer (two tasks, say) do not import each other, no private name is
imported from another part, and no modules import each other (directly or round a loop)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dinoseg"

# Layers, top to bottom; a module belongs to the first part whose prefix it starts with.
LAYERS = {"cli": 6, "tasks": 5, "engine": 4, "hub": 3, "task-models": 2, "models": 1, "layers": 0, "data": 0}


def part_of(module: str) -> tuple[str, str] | None:
    """(part, layer name) of a dotted module name inside dinoseg; None for the package facade itself."""
    parts = module.split(".")
    if parts == ["dinoseg"]:
        return None
    top = parts[1]
    if top in ("cli", "__main__"):
        return "cli", "cli"
    if top == "eval":
        if len(parts) == 2:
            return "tasks", "tasks"  # the task registry
        if parts[2] == "utils":
            return "models", "models"  # the official dinov3.eval.utils path: backbone feature extraction
        task = parts[2]
        if len(parts) > 3 and parts[3] in ("models", "util"):  # detection's official `util`: boxes, padded batches
            return f"task-models:{task}", "task-models"
        return f"tasks:{task}", "tasks"
    if top in ("engine", "hub", "models", "layers", "data"):
        return top, top
    raise AssertionError(f"{module}: no layer assigned; add it to ARCHITECTURE.md and this test")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(module: str, path: Path, known: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in `path`."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("dinoseg")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dinoseg"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (target, alias.name, node.lineno))
    return found


def test_imports_point_down_and_stay_public():
    known = modules()
    problems = []
    for module, path in sorted(known.items()):
        source = part_of(module)
        if source is None:
            continue
        for target, name, line in imports(module, path, known):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            dest = part_of(target)
            if dest is None:
                problems.append(f"{where}: imports the package facade `dinoseg` (import the defining module)")
                continue
            (src_part, src_layer), (dst_part, dst_layer) = source, dest
            if src_part == dst_part:
                continue
            if LAYERS[dst_layer] > LAYERS[src_layer]:
                problems.append(f"{where}: {src_part} imports {target} from the higher layer {dst_part}")
            elif LAYERS[dst_layer] == LAYERS[src_layer]:
                problems.append(f"{where}: {src_part} imports {target} from {dst_part} of the same layer")
            if name.startswith("_") and name != "__all__":
                problems.append(f"{where}: private name {name} imported from another part ({target})")
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for module in modules():
        part_of(module)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of a module import graph: its strongly connected components of more than one module (Tarjan),
    each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (every import statement, lazy ones included)."""
    known = modules()
    return {module: {target for target, _, _ in imports(module, path, known) if target in known and target != module}
            for module, path in known.items()}


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)
