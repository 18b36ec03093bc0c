"""The package layering of docs/development.md's module map holds in the code: every import (lazy
ones inside functions too) goes to the importer's own layer or below, one package sits on one layer,
and no imports go round in a cycle."""

import ast
import re

from conftest import REPO

MAP = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
ROW = re.compile(r"^\| `(runner/[\w/]+\.py)` \| (\d+) \|", re.M)


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def package(module: str) -> str:
    """`runner.storage.s3` -> `runner.storage`; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


MAPPED = {module_name(path): int(layer) for path, layer in ROW.findall(MAP)}
# a package's __init__ (which may re-export its modules' names) is on its modules' layer
LAYERS = {**{package(module): layer for module, layer in MAPPED.items()}, **MAPPED}


def imports_of(module: str) -> set[str]:
    """The runner modules `module` imports, wherever in it the import statement is."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            while name and name not in LAYERS:  # `from runner.x import y`: y a module, or a name in x
                name = name.rpartition(".")[0]
            if name.startswith("runner") and name != module and name in LAYERS:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in LAYERS}


def test_every_module_of_the_map_exists_and_every_module_is_in_it():
    on_disk = {module_name(str(p.relative_to(REPO))) for p in (REPO / "runner").rglob("*.py")
               if p.name != "__init__.py" or p.parent == REPO / "runner"}
    assert set(MAPPED) == on_disk


def test_a_package_sits_on_one_layer():
    by_package: dict[str, set[int]] = {}
    for module, layer in MAPPED.items():
        by_package.setdefault(package(module), set()).add(layer)
    assert {p: layers for p, layers in by_package.items() if len(layers) > 1} == {}


def test_no_import_goes_up_a_layer():
    upward = [f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
              for module, targets in GRAPH.items() for target in sorted(targets) if LAYERS[target] > LAYERS[module]]
    assert upward == []


def test_no_import_cycle():
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join((*path[path.index(module):], module)))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, ())


def test_the_checker_sees_lazy_and_from_imports():
    """The checker is not blind: it finds a lazy import inside a function and a `from package
    import module` (guards against a parser change that would pass everything)."""
    assert "runner.launch.run_at" in GRAPH["runner.cli"]  # imported inside cmd_train
    assert "runner.storage.s3" in GRAPH["runner.storage.location"]  # from runner.storage.s3 import store, lazily
    assert "runner.training.checkpoint" in GRAPH["runner.training.loop"]  # from runner.training import checkpoint
