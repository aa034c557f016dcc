"""The layout of obsdiff's modules: layers whose imports only point down (`LAYERS`), no import cycles,
`obsdiff.export` never importing `obsdiff.engines`, the subpackages, and modules short enough to read.

The imports are read from the source (ast), not by importing: every `import obsdiff.x`, `from obsdiff.x
import y` and relative import counts, at module level and inside functions (a lazy import still ties two
modules together: neither can be understood or moved without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# import name -> folder, as pyproject.toml's package-dir maps them
PACKAGES = {"obsdiff": ROOT / "obsdiff", "obsdiff.export": ROOT / "export", "obsdiff.engines": ROOT / "engines"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the three folders."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or a name inside one) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the three packages that `module` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` depends on the submodule `pkg.sub` when there is one, else on `pkg`
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                       for alias in node.names]
        for target in targets:
            if not target.startswith("obsdiff"):
                continue
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every strongly connected component of more than one module (Tarjan): one cycle through it, and the
    other modules of the knot when there are more than the cycle shows."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_describe(component, graph) for component in components]


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    cycle = _cycle_in(component, graph)
    rest = [m for m in component if m not in cycle]
    return " -> ".join(cycle) + (f" (same knot: {', '.join(rest)})" if rest else "")


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One closed path through the first module of a strongly connected component (breadth-first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def test_the_parser_sees_every_kind_of_import(tmp_path):
    modules = {"obsdiff.engines.a": tmp_path / "a.py", "obsdiff.engines.b": tmp_path / "b.py",
               "obsdiff.export": tmp_path / "export.py", "obsdiff.export.cli": tmp_path / "cli.py",
               "obsdiff.errors": tmp_path / "errors.py"}
    (tmp_path / "a.py").write_text("from . import b\nfrom obsdiff.errors import ConfigError\n"
                                   "def f():\n    import obsdiff.export.cli\n    from .b import x\n")
    deps = imports_of("obsdiff.engines.a", tmp_path / "a.py", modules)
    assert deps == {"obsdiff.engines.b", "obsdiff.errors", "obsdiff.export.cli"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == ["a -> b -> a (same knot: c)"]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "obsdiff.engines.trt" in graph and "obsdiff.export.cli" in graph
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s): " + "; ".join(cycles))


def test_export_never_imports_engines():
    graph = import_graph()
    offenders = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("obsdiff.export")
                       for d in deps if d.startswith("obsdiff.engines"))
    assert offenders == [], f"obsdiff.export must not import obsdiff.engines: {', '.join(offenders)}"


# Layers, lowest first: a module imports only from its own layer or lower ones. A name is a module or a package
# (then every module inside it). The package root `obsdiff` is at the bottom: Python imports it before any of
# its modules, and it holds only `__version__` and the public API, whose `__getattr__` imports on first use.
LAYERS = [
    ("base", ["obsdiff", "obsdiff.errors", "obsdiff.devices", "obsdiff.progress", "obsdiff.tables"]),
    ("config, solver", ["obsdiff.config", "obsdiff.solver"]),
    ("models", ["obsdiff.models", "obsdiff.builtin"]),
    ("runs", ["obsdiff.runs"]),
    ("calibration", ["obsdiff.calibration"]),
    ("pruning", ["obsdiff.pruning"]),
    ("planning", ["obsdiff.planning"]),  # reads the pruning strategies' own group plan
    ("job, eval, info, testing", ["obsdiff.job", "obsdiff.eval", "obsdiff.info", "obsdiff.testing"]),
    ("cli", ["obsdiff.cli", "obsdiff.cli_utils", "obsdiff.__main__"]),
    ("export", ["obsdiff.export"]),
    ("engines", ["obsdiff.engines"]),
]
SUBPACKAGES = {"solver", "calibration", "pruning", "planning", "runs", "eval", "models", "builtin"}
TOP_LEVEL = {"__init__", "__main__", "config", "errors", "devices", "progress", "tables", "cli", "cli_utils", "info",
             "testing", "job"}
MAX_LINES = 400
# modules over MAX_LINES, with why they stay whole for now
LONG_MODULES = {"obsdiff.models.registry": "the family interface and its value types; models/ kept as it was"}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific name that covers `module` (the root `obsdiff` covers itself only)."""
    best, length = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "obsdiff" and module.startswith(name + "."))
            if covers and len(name) > length:
                best, length = i, len(name)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_layer_check_sees_an_upward_import():
    assert layer_of("obsdiff") == 0 and layer_of("obsdiff.errors") == 0
    assert layer_of("obsdiff.runs.io") == layer_of("obsdiff.runs") == 3
    assert layer_of("obsdiff.export.cli") == 9 and layer_of("obsdiff.cli") == 8 and layer_of("obsdiff.cli_x") is None
    graph = {"obsdiff.calibration.calibrate": {"obsdiff.planning.memory", "obsdiff.runs.loading"},
             "obsdiff.planning.memory": {"obsdiff.devices"}, "obsdiff.runs.loading": set(), "obsdiff.devices": set()}
    assert upward_imports(graph) == ["obsdiff.calibration.calibrate (calibration) -> obsdiff.planning.memory "
                                     "(planning)"]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in module_files() if layer_of(m) is None)
    assert unplaced == [], f"add these modules to LAYERS in {Path(__file__).name}: {', '.join(unplaced)}"


def test_imports_only_point_down():
    """Every import, lazy ones included, goes to the importer's own layer or a lower one."""
    upward = upward_imports(import_graph())
    assert upward == [], "imports that point up a layer (move the code down, or pass it in): " + "; ".join(upward)


def test_the_package_is_its_subpackages_and_a_few_top_level_modules():
    folder = PACKAGES["obsdiff"]
    packages = {p.parent.name for p in folder.glob("*/__init__.py")}
    assert packages == SUBPACKAGES
    assert {p.stem for p in folder.glob("*.py")} == TOP_LEVEL
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert {f"obsdiff.{name}" for name in SUBPACKAGES} <= declared, "pyproject.toml must list every subpackage"


def test_no_module_is_longer_than_it_can_be_read():
    modules = {m: p for m, p in module_files().items() if m == "obsdiff" or m.startswith("obsdiff.")
               and not m.startswith(("obsdiff.export", "obsdiff.engines"))}
    long = sorted(f"{m} ({len(p.read_text().splitlines())} lines)" for m, p in modules.items()
                  if len(p.read_text().splitlines()) > MAX_LINES and m not in LONG_MODULES)
    assert long == [], f"split these modules (at most {MAX_LINES} lines): {', '.join(long)}"


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines at top level (functions, classes, assignments, also under if/try/with)."""
    names: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                             *[h.body for h in getattr(node, "handlers", [])]):
                    visit(part)

    visit(ast.parse(path.read_text()).body)
    return names


def test_core_names_are_imported_from_where_they_are_defined():
    """No re-exports in the core: `from obsdiff.x import name` names something `obsdiff.x` defines (or one of its
    submodules), in the code, tests, benchmarks and tools. `obsdiff.models` is the family package's own API."""
    modules = module_files()
    defined: dict[str, set[str]] = {}
    wrong = []
    for folder in (*PACKAGES.values(), ROOT / "tests", ROOT / "bench", ROOT / "tools"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.ImportFrom) and not node.level and node.module in modules):
                    continue
                module = node.module
                if module.startswith(("obsdiff.export", "obsdiff.engines", "obsdiff.models")) or module == "obsdiff":
                    continue
                names = defined.setdefault(module, _top_level_names(modules[module]))
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{a.name}" for a in node.names
                          if a.name not in names and f"{module}.{a.name}" not in modules]
    assert wrong == [], "import these from the module that defines them: " + "; ".join(wrong)
