"""Every third-party module the installed package imports is a core dependency.

`pip install uadjax` installs only `[project] dependencies`; a module imported by the package
(even lazily, inside a function) but listed only in an extra fails for those users at run
time, while the test environment (which installs the extras) never notices.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("uadjax", "configs", "data_prep")  # what setuptools installs


# Import names whose distribution is named otherwise, for installs without the metadata
# `packages_distributions` reads (some conda or source installs).
DISTRIBUTION_OF = {"skimage": "scikit-image", "sklearn": "scikit-learn", "absl": "absl-py",
                   "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-datasets",
                   "SimpleITK": "simpleitk", "tensorboardX": "tensorboardx",
                   "ml_collections": "ml-collections", "array_record": "array-record"}


def _optional_import_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError` (optional by design)."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                               "ModuleNotFoundError")
                for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return optional


def _imported_top_level_modules() -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over the installed packages, leaving out
    imports guarded by `except ImportError`."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            optional = _optional_import_nodes(tree)
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalise(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0])
            for dep in project["dependencies"]}


def test_every_imported_third_party_module_is_a_core_dependency():
    core = _core_distributions()
    providers = metadata.packages_distributions()
    missing = {}
    for module, files in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        distributions = {_normalise(d) for d in providers.get(module, [])}
        distributions.add(_normalise(DISTRIBUTION_OF.get(module, module)))
        # An import name may belong to several distributions (namespace packages): one of
        # them must be a core dependency.
        if not distributions & core:
            missing[module] = (sorted(distributions), sorted(files))
    assert not missing, f"imported by the package but not core dependencies: {missing}"


def test_benchmark_only_libraries_stay_out_of_the_package():
    """torch and monai belong to the `[bench]` extra: only benchmarks/ may import them."""
    imported = _imported_top_level_modules()
    assert not {"torch", "monai"} & imported.keys(), {
        m: imported[m] for m in {"torch", "monai"} & imported.keys()}
