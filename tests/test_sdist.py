"""The sdist is a complete source release, and the build requirements match the metadata they must read."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the sdist must carry beyond the wheel's files: the tests' shared fixtures, what the release
# rebuilds from, and the page's sources.
SOURCE_RELEASE = (
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/README.md",  # the README points to it
    "runtime/README.md",  # the README's reference pages
    "serve/README.md",
    "training/README.md",
    "web/README.md",
    "tests/test_runtime.py",
    "artifacts/generator_weights.pt",
    "artifacts/classifier_weights.pt",
    "artifacts/evaluation.json",
    "artifacts/first_run.png",  # the README shows it
    "web/package.json",
    "web/package-lock.json",
    "web/build.mjs",
    "web/index.html",
    "web/app.js",
    "web/digitgen.js",
    "web/style.css",
    "benchmarks/train.py",
    "benchmarks/README.md",  # the README points to it
)


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    # --no-isolation: the installed setuptools, so that the test needs no network.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(next(out.glob("*.tar.gz"))) as sdist:
        return [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]


def test_sdist_carries_the_tests_the_weights_and_the_page(sdist_names: list[str]) -> None:
    missing = [name for name in SOURCE_RELEASE if name not in sdist_names]
    assert not missing, f"the sdist lacks {missing}"
    built = [name for name in sdist_names if re.match(r"web/(node_modules|dist)/|.*__pycache__", name)]
    assert not built, f"the sdist carries build outputs {built[:5]}"


def test_ci_checks_the_sdist_after_the_wheel() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "bash .ci/sdist" in script
    assert script.index("check_wheel.py") < script.index("bash .ci/sdist")


def test_build_requirements_read_the_license_expression() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires = pyproject["build-system"]["requires"]
    setuptools = [re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req) for req in requires if req.startswith("setuptools")]
    assert len(setuptools) == 1 and setuptools[0], requires
    if isinstance(pyproject["project"].get("license"), str):  # a PEP 639 SPDX expression
        assert int(setuptools[0].group(1)) >= 77, "setuptools reads license = '<SPDX>' from version 77 on"
