"""The package layout: imports between sub-packages form no cycle, so each package can be read (and
tested) knowing only the packages below it. Read statically from the source; imports under
`if TYPE_CHECKING:` are annotations only and do not count."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("edgeacc_ray", "deployments", "kv_store", "benchmarks")


def _node(package: str) -> str:
    """The unit that must not sit in a cycle: a top-level package of the library (`edgeacc_ray.http`
    with its `routes/` and `protocol/`) or one of the engine's sub-packages (`edgeacc_ray.engine.kv`)."""
    parts = package.split(".")
    return ".".join(parts[:3] if parts[:2] == ["edgeacc_ray", "engine"] else parts[:2])


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


def _modules() -> dict[str, Path]:
    found = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, package: str):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _runtime_imports(ast.Module(body=node.orelse, type_ignores=[]), package)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)
        yield from _runtime_imports(node, package)


def package_graph() -> dict[str, set[str]]:
    modules = _modules()
    packages = {
        name: name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for name, path in modules.items()
    }
    graph: dict[str, set[str]] = {_node(package): set() for package in packages.values()}
    for path in modules.values():
        source_package = _package_of(path)
        for imported in _runtime_imports(ast.parse(path.read_text()), source_package):
            if imported in packages and _node(packages[imported]) != _node(source_package):
                graph[_node(source_package)].add(_node(packages[imported]))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_package_imports_are_acyclic():
    graph = package_graph()
    assert "edgeacc_ray.engine.kv" in graph and "edgeacc_ray.config" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_deployments():
    graph = package_graph()
    library = [package for package in graph if package.startswith(("edgeacc_ray", "kv_store"))]
    for package in library:
        assert not {p for p in graph[package] if p.startswith(("deployments", "benchmarks"))}, (
            package
        )


def test_the_router_hashes_prompts_without_torch():
    code = (
        "import sys; from deployments.engine_router import PrefixAffinity; "
        "assert PrefixAffinity(4, 8, 16).keys(list(range(9)))[1]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
