"""The layers' import rules (README, "Layout"), read from the source: runtime stands alone, training never
reaches for export, and nothing imports the old top-level names."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

OLD_TOP_LEVEL = {"runtime", "training", "export", "cli"}


def imported_modules(package: str) -> set[str]:
    modules = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module)
    return modules


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("runtime", ("torch", "torchvision", "onnx.", "digitgen.training", "digitgen.export", "digitgen.cli")),
        ("training", ("digitgen.export", "digitgen.cli")),
        ("export", ("digitgen.cli",)),
    ],
)
def test_layer_imports_only_what_it_may(package: str, forbidden: tuple[str, ...]) -> None:
    modules = imported_modules(package)
    bad = sorted(m for m in modules if any(m == f.rstrip(".") or m.startswith(f.rstrip(".") + ".") for f in forbidden))
    assert not bad, f"{package}/ imports {bad}"
    assert not {m.split(".")[0] for m in modules} & OLD_TOP_LEVEL


def test_no_code_imports_the_old_top_level_names() -> None:
    for package in ("runtime", "training", "export", "tests", "benchmarks"):
        assert not {m.split(".")[0] for m in imported_modules(package)} & OLD_TOP_LEVEL, package
