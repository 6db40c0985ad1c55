"""The package layers of docs/design.md, checked on the import graph of commlab/.

Every `import` and `from ... import` of every module is read with `ast`, at module level and inside
functions (an import inside a function still ties the modules together), and the graph must have no
circle and no import from a lower layer to a higher one (or sideways between the runtime and the
simulator). The training simulator reaches the network simulator through the `commlab.sim.network`
package's own names (and its hardware presets) only. The synthetic graphs below show that the check
fails when someone adds such an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "commlab"

# Layer of a module: its longest matching prefix. `commlab` itself re-exports the collectives API.
LAYER_OF_PREFIX = {
    "commlab": "package",  # the top-level facade: re-exports the API, registers the torch backend
    "commlab.errors": "base",
    "commlab.shared": "base",
    "commlab.profiles": "base",
    "commlab.collectives": "collectives",
    "commlab.torch_backend": "torch_backend",
    "commlab.sim": "sim",  # the package's re-exports of the network simulator
    "commlab.sim.network": "sim.network",
    "commlab.sim.training": "sim.training",
    "commlab.testbed": "testbed",
    "commlab.parallel": "parallel",
    "commlab.models": "models",
    "commlab.sim.cli": "commands",
    "commlab.bench": "commands",
    "commlab.calibrate": "commands",
    "commlab.cli": "commands",
}
# What each layer may import besides itself: collectives < sim network < sim training; collectives <
# parallel < models; collectives < torch_backend; sim network < testbed; the commands on top.
MAY_IMPORT = {
    "base": set(),
    "collectives": {"base"},
    "torch_backend": {"base", "collectives"},
    "package": {"base", "collectives", "torch_backend"},
    "sim.network": {"base", "collectives"},
    "sim": {"base", "collectives", "sim.network"},
    "sim.training": {"base", "collectives", "sim.network"},
    "testbed": {"base", "collectives", "sim.network"},
    "parallel": {"base", "collectives"},
    "models": {"base", "collectives", "parallel"},
    "commands": set(LAYER_OF_PREFIX.values()),
}
# What sim.training may import from the network side: the package's own names (the collective timer's
# needs: simulate_collective, link_model, Profile, FIDELITIES, Topology, cluster) and the hardware presets.
NETWORK_INTERFACE = ("commlab.sim.network", "commlab.sim.network.hardware")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every .py file of `package` under `root`."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, source: str, is_package: bool, modules: set[str], package: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in `source` (module level or not)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg
            targets = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == package:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = module_files(root, package)
    names = set(files)
    return {
        name: imports_of(name, path.read_text(), path.name == "__init__.py", names, package)
        for name, path in files.items()
    }


def layer_of(module: str) -> str | None:
    """The layer of `module` by its longest listed prefix (None: not in any layer)."""
    best = None
    for prefix in LAYER_OF_PREFIX:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return None if best is None else LAYER_OF_PREFIX[best]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every circle, every module outside the layers, and every import the layers forbid."""
    problems = [f"circle: {' <-> '.join(c)}" for c in circles(graph)]
    for module in sorted(graph):
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module}: in no layer (add it to LAYER_OF_PREFIX and docs/design.md)")
            continue
        for target in sorted(graph[module]):
            target_layer = layer_of(target)
            if target_layer not in MAY_IMPORT[layer] | {layer}:
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
            elif (
                layer == "sim.training" and target_layer == "sim.network" and target not in NETWORK_INTERFACE
            ):
                problems.append(f"{module} imports {target}: the training side uses {NETWORK_INTERFACE[0]}")
    return problems


def test_commlab_has_no_circle_and_no_upward_import():
    graph = import_graph()
    assert len(graph) > 50 and "commlab.sim.network.collective" in graph
    assert violations(graph) == []


def test_function_level_imports_are_edges(tmp_path):
    package = tmp_path / "commlab"
    (package / "collectives").mkdir(parents=True)
    (package / "parallel").mkdir()
    for init in (package, package / "collectives", package / "parallel"):
        (init / "__init__.py").write_text("")
    (package / "collectives" / "api.py").write_text(
        "def late():\n    from commlab.parallel.mesh import Mesh\n    return Mesh\n"
    )
    (package / "parallel" / "mesh.py").write_text("from commlab.collectives import api\nclass Mesh: ...\n")
    graph = import_graph(tmp_path, "commlab")
    assert graph["commlab.collectives.api"] == {"commlab.parallel.mesh"}
    assert graph["commlab.parallel.mesh"] == {"commlab.collectives.api"}
    problems = violations(graph)
    assert "circle: commlab.collectives.api <-> commlab.parallel.mesh" in problems
    assert any("commlab.collectives.api (collectives) imports commlab.parallel.mesh" in p for p in problems)


def test_planted_circle_and_upward_imports_fail():
    clean = {
        "commlab.errors": set(),
        "commlab.shared.ops": {"commlab.errors"},
        "commlab.collectives.schedule": {"commlab.shared.ops"},
        "commlab.sim.network": {"commlab.sim.network.collective"},
        "commlab.sim.network.collective": {"commlab.sim.network.engine", "commlab.collectives.schedule"},
        "commlab.sim.network.engine": {"commlab.shared.ops"},
        "commlab.sim.training.step": {"commlab.sim.network"},
        "commlab.parallel.mesh": {"commlab.shared.layout", "commlab.collectives.schedule"},
        "commlab.shared.layout": set(),
        "commlab.models.gpt": {"commlab.parallel.mesh"},
        "commlab.cli": {"commlab.sim.training.step", "commlab.models.gpt"},
    }
    assert violations(clean) == []

    def planted(module: str, target: str) -> list[str]:
        graph = {k: set(v) for k, v in clean.items()}
        graph[module].add(target)
        return violations(graph)

    # a circle inside one layer: the engine importing what imports it
    assert planted("commlab.sim.network.engine", "commlab.sim.network.collective") == [
        "circle: commlab.sim.network.collective <-> commlab.sim.network.engine"
    ]
    # upward: the network side asking the training side, collectives asking the simulator
    problems = planted("commlab.sim.network.engine", "commlab.sim.training.step")
    assert (
        "commlab.sim.network.engine (sim.network) imports commlab.sim.training.step (sim.training)"
        in problems
    )
    assert any(p.startswith("circle:") for p in problems)
    assert planted("commlab.collectives.schedule", "commlab.sim.network.engine") == [
        "commlab.collectives.schedule (collectives) imports commlab.sim.network.engine (sim.network)"
    ]
    # sideways: the runtime and the simulator never import each other
    assert planted("commlab.parallel.mesh", "commlab.sim.training.step") == [
        "commlab.parallel.mesh (parallel) imports commlab.sim.training.step (sim.training)"
    ]
    assert planted("commlab.models.gpt", "commlab.sim.training.step") != []
    # the shared layer imports nothing of commlab but errors
    assert planted("commlab.shared.ops", "commlab.collectives.schedule") != []
    # the training side past the network package's interface
    assert planted("commlab.sim.training.step", "commlab.sim.network.engine") == [
        "commlab.sim.training.step imports commlab.sim.network.engine: the training side uses "
        "commlab.sim.network"
    ]
