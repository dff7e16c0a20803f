"""The package's import graph: no cycles (type-only imports included), and each layer imports
only the layers below it. Read from the sources (ast), so nothing is imported to check it.

    kv_layout, job_tally, hashing, log      (no vllm_llmd import: the neutral homes)
    ops                                     (block copies, the CUDA driver helper)
    transfer, offload, shared_tier          (transfer may use ops; the tiers never transfer)
    connector                               (the facade over all of them)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_llmd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module, type_only: bool) -> set[str]:
    """vllm_llmd modules imported at module level (type_only: those under TYPE_CHECKING too)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if type_only:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in MODULES)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        found.add(full)
                    elif node.module in MODULES:
                        found.add(node.module)

    visit(tree.body)
    return found


def _graph(type_only: bool) -> dict[str, set[str]]:
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    return {name: _imports(tree, type_only) for name, tree in trees.items()}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_cycles_even_through_type_only_imports():
    graph = _graph(type_only=True)
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            # a package's __init__ importing its own modules is the package's interface
            if not imported.startswith(module + "."):
                walk(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_each_layer_imports_only_the_layers_below_it():
    runtime, typed = _graph(type_only=False), _graph(type_only=True)
    neutral = ("vllm_llmd.kv_layout", "vllm_llmd.job_tally", "vllm_llmd.hashing", "vllm_llmd.log")
    rules = [
        # (importers, what they must not import, also type-only imports?)
        (neutral, ("vllm_llmd",), True),
        (("vllm_llmd.ops",), ("vllm_llmd.transfer", "vllm_llmd.offload"), True),
        (("vllm_llmd.ops",), ("vllm_llmd.shared_tier", "vllm_llmd.connector"), True),
        (("vllm_llmd.offload", "vllm_llmd.shared_tier"), ("vllm_llmd.transfer",), True),
        # the tiers' planners name the connector's RequestState and metadata in types only
        (("vllm_llmd.offload", "vllm_llmd.shared_tier"), ("vllm_llmd.connector",), False),
        (("vllm_llmd.transfer",), ("vllm_llmd.connector", "vllm_llmd.offload"), True),
        # the simulator runs the router's code over simulated pods: none of the engine side
        (
            ("vllm_llmd.sim",),
            ("vllm_llmd.connector", "vllm_llmd.offload", "vllm_llmd.transfer", "vllm_llmd.ops"),
            True,
        ),
        (("vllm_llmd.sim",), ("vllm_llmd.shared_tier",), True),
    ]
    wrong = []
    for importers, forbidden, with_types in rules:
        graph = typed if with_types else runtime
        for module, imported in graph.items():
            if not _in(module, *importers):
                continue
            wrong += [(module, i) for i in sorted(imported) if _in(i, *forbidden) and i != module]
    assert wrong == [], wrong


def test_connector_and_tiers_import_no_dev_helpers():
    # the shared tier's LMCache launcher is itself a dev helper (tests and benchmarks only)
    production = ("vllm_llmd.connector", "vllm_llmd.transfer", "vllm_llmd.offload")
    production += ("vllm_llmd.shared_tier", "vllm_llmd.ops")
    wrong = [
        (module, imported)
        for module, imports in _graph(type_only=True).items()
        if _in(module, *production) and module != "vllm_llmd.shared_tier.lmcache_server"
        for imported in imports
        if _in(imported, "vllm_llmd.devtools", "vllm_llmd.shared_tier.lmcache_server")
    ]
    assert wrong == [], wrong


def test_nothing_imports_the_simulator():
    wrong = [
        (module, imported)
        for module, imports in _graph(type_only=True).items()
        if not _in(module, "vllm_llmd.sim")
        for imported in imports
        if _in(imported, "vllm_llmd.sim")
    ]
    assert wrong == [], wrong
