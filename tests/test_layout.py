"""The layers hold (CONTRIBUTING.md): the kernel layer never imports the high-level layer, and no module of
the project imports the facade; the demo package is imported by no library module."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = sorted((ROOT / "unlearn_engine").rglob("*.py"))
HIGH = sorted((ROOT / "python_api").rglob("*.py"))


def is_submodule(package, name):
    if package != "unlearn_engine":
        return False
    folder = ROOT / "unlearn_engine"
    return (folder / f"{name}.py").exists() or (folder / name).is_dir() or any(folder.glob(f"{name}.*.so"))


def imported_modules(path):
    """Every module name an import statement in `path` names (at any depth, lazy imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; any other name comes from the package itself
            subs = [a.name for a in node.names if is_submodule(node.module, a.name)]
            names += [f"{node.module}.{a}" for a in subs]
            if len(subs) < len(node.names):
                names.append(node.module)
    return names


def test_the_sources_were_found():
    assert len(KERNEL) >= 8 and len(HIGH) >= 10


@pytest.mark.parametrize("path", [p for p in KERNEL + HIGH if p.name != "__init__.py" or p.parent.name != "unlearn_engine"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_the_facade(path):
    assert "unlearn_engine" not in imported_modules(path), f"{path.name} imports the facade `unlearn_engine`"


@pytest.mark.parametrize("path", [p for p in KERNEL if p.name != "__init__.py" or p.parent.name != "unlearn_engine"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_layer_never_imports_the_high_level_layer(path):
    bad = [m for m in imported_modules(path) if m.startswith("unlearn_engine.api")]
    assert not bad, f"{path.name} imports {bad}"


# The command line launches the demo (`unlearn-engine demo`); no other module may depend on it.
@pytest.mark.parametrize("path", [p for p in HIGH if "demo" not in p.parts and p.name != "cli.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_never_imports_the_demo(path):
    bad = [m for m in imported_modules(path) if m.startswith("unlearn_engine.api.demo")]
    assert not bad, f"{path.name} imports {bad}"


def test_facade_has_no_lazy_getattr():
    tree = ast.parse((ROOT / "unlearn_engine" / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]


def test_planted_facade_import_is_seen(tmp_path):
    """The scan itself can fail: a module that imports the facade is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import unlearn_engine as ue\n    return ue\n")
    assert "unlearn_engine" in imported_modules(bad)


def test_every_readme_name_is_in_the_facade():
    import re

    import unlearn_engine as ue

    readme = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\bue\.([A-Za-z_]\w*)", readme))
    assert names, "README shows no ue.* names"
    missing = sorted(n for n in names if not hasattr(ue, n))
    assert not missing, f"README names missing from the facade: {missing}"
