"""The boundaries between the product's files, checked from their source: no import cycle among
them, no product module imported inside a function (where it would hide a cycle or a cost), no
alias hiding which file a name comes from, and no function longer than a screen."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60


def _product_files():
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py")))
    return {os.path.relpath(p, ROOT)[:-3].replace(os.sep, "."): os.path.relpath(p, ROOT) for p in paths}


PRODUCT = _product_files()


def _product_name(name):
    """The product module an import names (data.shards, model, ...), or None for a third-party one."""
    if name in PRODUCT:
        return name
    if name == "data":
        return "data.__init__"
    return None


def _imports(node):
    """(product module, alias or None, line) of each import statement below node."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            for a in sub.names:
                if _product_name(a.name):
                    yield _product_name(a.name), a.asname, sub.lineno
        elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
            if sub.module == "data":  # from data import prepare, shards
                for a in sub.names:
                    if _product_name(f"data.{a.name}"):
                        yield f"data.{a.name}", a.asname, sub.lineno
            elif _product_name(sub.module):
                yield _product_name(sub.module), None, sub.lineno


def _trees():
    return {name: ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read()) for name, path in PRODUCT.items()}


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_product_module_is_imported_inside_a_function():
    hidden = [f"{PRODUCT[name]}:{line} imports {target}" for name, tree in _trees().items()
              for fn in _functions(tree) for target, _, line in _imports(fn)]
    assert hidden == []


def test_product_modules_are_imported_under_their_own_names():
    aliased = [f"{PRODUCT[name]}:{line} imports {target} as {alias}" for name, tree in _trees().items()
               for target, alias, line in _imports(tree) if alias]
    assert aliased == []


def test_no_import_cycle_among_product_modules():
    graph = {name: {target for target, _, _ in _imports(tree) if target != name} for name, tree in _trees().items()}
    state, cycles = {}, []

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_function_is_longer_than_a_screen():
    long = [f"{PRODUCT[name]}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for name, tree in _trees().items() for fn in _functions(tree)
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_checks_see_what_they_check():
    """The walk finds the product's modules and their imports (a check over nothing passes)."""
    assert {"model", "checkpoint", "train", "eval", "data.shards", "data.prepare", "common"} <= set(PRODUCT)
    trees = _trees()
    assert ("common", None) in {(t, a) for t, a, _ in _imports(trees["train"])}
    assert "model" in {t for t, _, _ in _imports(trees["checkpoint"])}
