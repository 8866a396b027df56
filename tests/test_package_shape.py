"""The package's shape: its modules import each other without cycles."""

import ast
import pathlib

import keras_ema

PACKAGE = pathlib.Path(keras_ema.__file__).parent


def _imports(path, modules):
    """The modules of keras_ema that `path` imports, at any level (also
    inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _cycles(graph):
    """The strongly connected components with more than one module, or a
    module that imports itself (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1 or node in graph[node]:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def _graph(root):
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    # `keras_ema/__init__.py` imports everything, and every module imports
    # it first as Python's package: only imports between modules count.
    graph = {name: _imports(path, files) - {"keras_ema"}
             for name, path in files.items() if name != "keras_ema"}
    return graph


def test_the_modules_of_keras_ema_import_each_other_without_cycles():
    assert _cycles(_graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_function_level_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert _cycles(_graph(package)) == [["pkg.a", "pkg.b"]]


def test_the_examples_use_only_public_names():
    # What a user copies from them must not reach into private modules.
    private = {
        name for path in (PACKAGE / "examples").glob("*.py")
        for name in _imports(path, _graph_names())
        if any(part.startswith("_") for part in name.split(".")[1:])
    }
    assert private == set()


def _graph_names():
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names.add(".".join(parts))
    return names
