"""Dependencies point one way (SPEC 5): the quantity layer never imports the faces above it, and
nothing inside the package imports the package face (``sam_diagnostics/__init__.py``)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sam_diagnostics"

#: The quantity layer: rules, plan, engine, the per-example quantities and the optimizers.
QUANTITY = ["rules", "plan.py", "engine.py", "jacobian.py", "perturb.py", "probe.py", "hooks.py",
            "norms.py", "logit_terms.py", "errors.py", "_version.py", "optim"]
FACES = {"record", "store", "plots", "cli", "summary", "train", "data", "integrations",
         "sweep", "runs", "sources", "accessor", "live"}


def _files(entries):
    for e in entries:
        p = PKG / e
        yield from sorted(p.rglob("*.py")) if p.is_dir() else [p]


def _package_imports(path: Path):
    """``(module parts relative to the package root, imported names)`` of relative imports."""
    rel = path.relative_to(PKG).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                yield mod, [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "sam_diagnostics":
                yield node.module.split(".")[1:], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "sam_diagnostics":
                    yield a.name.split(".")[1:], []


@pytest.mark.parametrize("path", list(_files(QUANTITY)), ids=lambda p: str(p.relative_to(PKG)))
def test_quantity_layer_never_imports_the_faces(path):
    for mod, names in _package_imports(path):
        targets = {mod[0]} if mod else set(names)
        assert not targets & FACES, f"{path.name} imports {mod or names}"


@pytest.mark.parametrize("path", sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py"
                                        or p.parent != PKG),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_nothing_imports_the_package_face(path):
    for mod, names in _package_imports(path):
        if not mod:  # ``from . import X`` / ``from sam_diagnostics import X``
            modules = {p.stem for p in PKG.iterdir()} | {p.name for p in PKG.iterdir()}
            assert set(names) <= modules, f"{path.name} imports {names} from the package face"
