"""The shape of the `keras_ema` package: what issue 23's table reports.

    python benchmarks/code_shape.py [PACKAGE_DIR]     # default: keras_ema

Prints, for the package's modules (`examples/` and the demos included):
lines per module, modules in import cycles (as `../shared/tools/
import_cycles.py` counts them: every import, also inside functions),
explicit backend checks (`keras.backend.backend()` calls), uses of Keras'
private API (`keras.src` imports, and private attributes of Keras objects
from a fixed list), frame reads (`sys._getframe`, `f_locals`, `f_back`,
`inspect.stack`, `currentframe`), and the Keras methods replaced on
instances (assignments to a model's or optimizer's method attribute, and
calls of `_binding.py`'s one installer).
Static counts from the source text: run it on two checkouts to compare.
"""

import ast
import os
import re
import sys

# Private attributes of Keras objects this package has read or written.
_KERAS_PRIVATE = (
    "_var_key", "_trainable_variables", "_trainable_variables_indices",
    "_variables", "_value", "_layout", "_distribution_strategy",
    "_overwrite_variable_with_gradient", "_track_variable", "_jax_state",
    "_unique_id", "_distributed_container", "_flatten_layers",
    "_iterations", "_get_jax_state",
)
_PRIVATE = re.compile(r"\.(" + "|".join(_KERAS_PRIVATE) + r")\b")
_FRAMES = re.compile(r"_getframe|f_locals|f_back|inspect\.stack|currentframe")
_BACKEND = re.compile(r"backend\.backend\(\)")
# Keras methods that a model, layer or optimizer instance may get replaced.
_METHODS = (
    "train_step", "test_step", "predict_step", "evaluate", "predict",
    "fit", "train_function", "test_function", "predict_function", "save",
    "save_weights", "load_own_variables", "save_own_variables",
    "make_train_function", "make_test_function", "call",
)
_ASSIGN = re.compile(
    r"^\s*[\w.]+\.(" + "|".join(_METHODS) + r")\s*=[^=]"
    r"|setattr\(\s*[\w.]*(model|optimizer|inner)\s*,"
    r"|^\s*_install\("  # the one installer of `_binding.py`
)


def _modules(root):
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _cycles(root):
    package = os.path.basename(root)
    paths = {}
    for path in _modules(root):
        rel = os.path.relpath(path, os.path.dirname(root))[:-3]
        name = rel.replace(os.sep, ".").removesuffix(".__init__")
        paths[name] = path
    edges = {m: set() for m in paths}
    for module, path in paths.items():
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    keep = len(parts) - node.level + path.endswith("__init__.py")
                    base = ".".join(parts[:keep] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            edges[module] |= {
                n for n in names if n in paths and n not in (module, package)
            }
    # Modules that reach themselves through another module.
    def reach(start):
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        return seen
    return sorted(m for m in paths if m in reach(m))


def main(root):
    root = os.path.abspath(root)
    rows, totals = [], dict(backend=0, private=0, frames=0, wrapped=0)
    for path in _modules(root):
        text = open(path).read()
        lines = text.splitlines()
        code = [l for l in lines if not l.lstrip().startswith("#")]
        counts = dict(
            backend=sum(len(_BACKEND.findall(l)) for l in code),
            private=sum(len(_PRIVATE.findall(l)) for l in code)
            + sum("keras.src" in l and "import" in l for l in code),
            frames=sum(len(_FRAMES.findall(l)) for l in code),
            wrapped=sum(bool(_ASSIGN.search(l)) for l in code),
        )
        for key, value in counts.items():
            totals[key] += value
        rows.append((os.path.relpath(path, root), len(lines), counts))
    print(f"{'module':34} {'lines':>5} {'backend':>7} {'private':>7} "
          f"{'frames':>6} {'wrapped':>7}")
    for name, n, c in rows:
        print(f"{name:34} {n:5d} {c['backend']:7d} {c['private']:7d} "
              f"{c['frames']:6d} {c['wrapped']:7d}")
    cyclic = _cycles(root)
    print(f"{'total':34} {sum(r[1] for r in rows):5d} {totals['backend']:7d} "
          f"{totals['private']:7d} {totals['frames']:6d} {totals['wrapped']:7d}")
    wrapping = [name for name, _, c in rows if c["wrapped"]]
    print(f"modules that wrap Keras methods: {', '.join(wrapping) or 'none'}")
    print(f"modules: {len(rows)}; largest: {max(r[1] for r in rows)} lines; "
          f"modules in import cycles: {len(cyclic)}"
          + (f" ({', '.join(cyclic)})" if cyclic else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "keras_ema")
