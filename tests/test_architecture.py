"""The host keeps its own rules: the core imports no registry, CLI or plugin; a plugin — built-in or the
example package — imports only the public contract; every hook has a test that implements it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import netdissection
from netdissection.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "netdissection"
EXAMPLE = ROOT / "examples" / "netdissection-example-plugin"


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at any depth, lazily or not), relative imports made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = package.split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                module = ".".join(parent + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def modules(folder: Path, root: Path) -> list[tuple[Path, str]]:
    """(file, the package it lives in) for every module under ``folder``."""
    return [(path, ".".join(path.relative_to(root).parent.parts)) for path in sorted(folder.rglob("*.py"))]


def own_imports(path: Path, package: str) -> list[tuple[int, str]]:
    return [(line, m) for line, m in imports(path, package) if m == "netdissection" or m.startswith("netdissection.")]


def test_the_core_imports_only_the_core() -> None:
    broken = [f"{path.relative_to(ROOT)}:{line} imports {module}"
              for path, package in modules(PACKAGE / "core", ROOT)
              for line, module in own_imports(path, package) if not module.startswith("netdissection.core")]
    assert not broken, "\n".join(broken)


def test_plugins_import_only_the_public_contract() -> None:
    """A built-in plugin imports ``netdissection`` (what it exports), ``netdissection.core`` and the modules of
    its own plugin group — never the CLI, the registry, the API module or another group's internals."""
    broken = []
    for path, package in modules(PACKAGE / "plugins", ROOT):
        group = ".".join(package.split(".")[:3])  # netdissection.plugins.<group>
        for line, module in own_imports(path, package):
            if module == "netdissection" or module.startswith(("netdissection.core.", group)) \
                    or module == "netdissection.core":
                continue
            broken.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not broken, "\n".join(broken)


def test_the_example_plugin_imports_only_the_public_contract() -> None:
    broken = []
    for path, package in modules(EXAMPLE, EXAMPLE):
        tests = "tests" in path.relative_to(EXAMPLE).parts
        for line, module in own_imports(path, package or "netdissection_example"):
            if module == "netdissection" or module.startswith("netdissection.core.") \
                    or (tests and module.startswith("netdissection.testing")):
                continue
            broken.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not broken, "\n".join(broken)


def test_the_import_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "netdissection" / "core" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..registry import build_host\n    from ..cli import main\n")
    assert [m for _, m in imports(module, "netdissection.core")] == ["netdissection.registry", "netdissection.cli"]


HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
               if hasattr(getattr(hookspecs, name), "netdissection_spec"))


def test_the_hooks_are_the_documented_ones() -> None:
    host = netdissection.build_host(entry_points=False)
    assert sorted(n for n in dir(host.hook) if n.startswith("dissect_")) == HOOKS
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc.split()) >= 10, f"{name} needs a docstring saying what it receives and how it is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_that_implements_it(hook: str) -> None:
    """A hook nobody tests is a promise nobody keeps: some test (or the example plugin its tests run) must
    implement it."""
    this = Path(__file__).resolve()
    sources = [*(ROOT / "tests").rglob("*.py"), *EXAMPLE.rglob("*.py")]
    pattern = re.compile(rf"def {hook}\(")
    assert any(pattern.search(p.read_text(encoding="utf-8")) for p in sources if p.resolve() != this), (
        f"no test implements {hook}")
