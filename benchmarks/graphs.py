"""Compare ONNX generators side by side: graph size, parity with PyTorch, session start-up, speed.

    python benchmarks/graphs.py artifacts/generator.onnx other.onnx --checkpoint artifacts/generator_weights.pt

Every figure of every file is measured in interleaved rounds (median), so drift of the machine's
speed hits all files alike.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click
import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.runtime import images_per_s  # noqa: E402
from benchmarks.timing import interleaved_medians  # noqa: E402
from digitgen.runtime import DigitGenerator  # noqa: E402
from digitgen.runtime.noise import standard_normal  # noqa: E402
from digitgen.runtime.session import open_session  # noqa: E402

BATCH_SIZES = (1, 64, 256)


def session_seconds(path: Path) -> float:
    start = time.perf_counter()
    open_session(path, "cpu")
    return time.perf_counter() - start


def max_parity_diff(path: Path, checkpoint: str) -> float:
    from digitgen.export.onnx_export import verify_file

    return max(case.max_abs_diff for case in verify_file(path, checkpoint).cases)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Weights they came from: adds max |torch - ort|.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1))
def main(models: tuple[Path, ...], checkpoint: str | None, rounds: int) -> None:
    click.echo(f"machine: {describe()}")
    rows = {path: {"nodes": len(onnx.load(str(path)).graph.node), "MB": path.stat().st_size / 1e6} for path in models}
    if checkpoint:
        for path in models:
            rows[path]["max |torch-ort|"] = max_parity_diff(path, checkpoint)
    starts = interleaved_medians({str(p): functools.partial(session_seconds, p) for p in models}, rounds)
    for path in models:
        rows[path]["session ms"] = starts[str(path)] * 1000
    generators = {path: DigitGenerator.from_path(path, "cpu") for path in models}
    for batch_size in BATCH_SIZES:
        labels = np.arange(batch_size) % 10
        runners = {
            str(path): functools.partial(
                images_per_s,
                functools.partial(gen.run, standard_normal(0, 0, batch_size, gen.latent_dim), labels),
                batch_size,
                0.5,
            )
            for path, gen in generators.items()
        }
        for path, rate in zip(models, interleaved_medians(runners, rounds).values(), strict=True):
            rows[path][f"img/s b{batch_size}"] = rate
    columns = list(rows[models[0]])
    click.echo("| model | " + " | ".join(columns) + " |")
    click.echo("|---" * (len(columns) + 1) + "|")
    for path, row in rows.items():
        cells = [
            f"{v:.1e}" if k.startswith("max") else f"{v:,.2f}" if k == "MB" else f"{v:,.0f}" for k, v in row.items()
        ]
        click.echo(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
