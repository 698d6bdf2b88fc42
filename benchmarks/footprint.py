"""Install footprint: disk size of a runtime-only virtual environment vs one with torch.

    python benchmarks/footprint.py [--torch-spec "torch==2.14.1 torchvision==0.29.1"] [--json]

Builds both environments from this checkout in a temporary directory (needs the package index),
prints their sizes, and removes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> int:
    """Bytes of all regular files under ``root`` (links not followed)."""
    return sum(
        (Path(folder) / name).lstat().st_size
        for folder, _, names in os.walk(root)
        for name in names
        if not (Path(folder) / name).is_symlink()
    )


def venv_with(path: Path, *requirements: str) -> int:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", *requirements], check=True)
    return tree_bytes(path)


@click.command()
@click.option("--torch-spec", default="torch==2.14.1 torchvision==0.29.1", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def main(torch_spec: str, as_json: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "runtime_only_mb": venv_with(Path(tmp) / "runtime", str(REPO)) / 1e6,
            "with_torch_mb": venv_with(Path(tmp) / "train", *torch_spec.split(), f"{REPO}[train]") / 1e6,
            "torch_spec": torch_spec,
        }
    click.echo(f"runtime only (pip install .): {result['runtime_only_mb']:7.0f} MB")
    click.echo(f"with torch ({torch_spec}, [train]): {result['with_torch_mb']:7.0f} MB")
    if as_json:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
