"""Imports point down the layers of STYLE.md §2 only (a module may import its own layer or lower ones)."""

import ast
from pathlib import Path

import jaxdiff

PACKAGE = Path(jaxdiff.__file__).resolve().parent  # the imported package (the installed one in `make test-wheel`)

LAYERS = {
    1: {"_types", "_errors", "_mask", "_runtime", "_programs", "_jit"},
    2: {"spatial", "basis", "stamps", "convolve", "solvers", "decorrelate", "_stats"},
    3: {"_psf", "_exposure", "_sources", "_kernel", "_background", "_config", "_result", "_noise"},
    4: {"_plan", "_subtract", "_fit", "_prepare", "_preconvolve", "_finalize", "_image_fit", "_existing"},
    5: {
        "_task",
        "_io",
        "_sim",
        "_sim_cutouts",
        "_plot",
        "_detect",
        "_quality",
        "real",
        "batch",
        "forward",
        "_inputs",
        "datasets",
        "_align",
    },
    6: {"_cli", "__main__", "__init__", "sim", "plot", "lsst"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _top_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_top_modules(path: Path):
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for jaxdiff/x.py, 1 for jaxdiff/basis/x.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("jaxdiff."):
                    yield node.module.split(".")[1]
                continue
            if node.level - 1 < depth:  # relative import inside the same subpackage
                continue
            if node.module:
                yield node.module.split(".")[0]
            else:
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxdiff."):
                    yield alias.name.split(".")[1]


def test_every_module_has_a_layer():
    modules = {_top_module(p) for p in PACKAGE.rglob("*.py")}
    assert {"__init__", "_subtract", "datasets"} <= modules, PACKAGE
    assert modules - {"py"} <= set(LAYER_OF), sorted(modules - set(LAYER_OF))


def test_imports_point_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = _top_module(path)
        for target in _imported_top_modules(path):
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not upward, upward
