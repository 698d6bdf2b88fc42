"""Generation speed of an ONNX generator: throughput, batch-1 latency and CLI cold start.

    python benchmarks/runtime.py [--generator MODEL.onnx] [--checkpoint CKPT] [--json]

With ``--checkpoint`` (needs torch) the same weights also run in PyTorch eager: throughput side by
side (the median of five interleaved half-second rounds each), multiply-adds per image (and so the share of
the machine's fp32 GEMM rate, measured with numpy in the same run), and the cold start of a script
that imports torch to make the same 10 digits. Prints a table; with ``--json`` the last line is one
JSON object.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.timing import interleaved_medians  # noqa: E402
from digitgen.runtime import DigitGenerator  # noqa: E402
from digitgen.runtime.noise import standard_normal  # noqa: E402

BATCH_SIZES = (1, 64, 256, 1024)
LATENCY_RUNS = 2000  # a p99 from 2,000 calls is the 20th slowest, not the 2nd or 3rd


def images_per_s(run, batch_size: int, min_seconds: float = 1.0) -> float:
    """Calls ``run()`` (one batch) until ``min_seconds`` pass, after a warm-up; returns images/s."""
    run()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        run()
        done += batch_size
    return done / (time.perf_counter() - start)


def latency_ms(run) -> tuple[float, float]:
    run()
    samples = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


TORCH_SCRIPT = """
import sys, torch
from PIL import Image
sys.path.insert(0, {repo!r})
from digitgen.export.verify import ContractGenerator
from digitgen.runtime.generator import to_uint8
from digitgen.runtime.noise import standard_normal
from digitgen.training.state import load_generator
generator, config, _ = load_generator({checkpoint!r})
z = torch.from_numpy(standard_normal(0, 0, 10, config.latent_dim))
with torch.inference_mode():
    images = ContractGenerator(generator.eval())(z, torch.arange(10))
for i, image in enumerate(to_uint8(images.numpy())):
    Image.fromarray(image).save(f"{out}/{{i}}.png")
"""


def cold_start_s(command: list[str], repeats: int = 5) -> float:
    """Median wall time of ``command`` in a fresh process; ``{out}`` in it becomes an empty directory."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"d{i}"
            out.mkdir()
            start = time.perf_counter()
            subprocess.run([part.replace("{out}", str(out)) for part in command], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cli_command(generator: Path) -> list[str]:
    cli = [sys.executable, str(REPO / "cli.py"), "generate", "-n", "10", "--generator", str(generator)]
    return [*cli, "--provider", "cpu", "--out", "{out}", "--overwrite"]


def torch_command(checkpoint: str) -> list[str]:
    script = TORCH_SCRIPT.format(repo=str(REPO), checkpoint=str(Path(checkpoint).resolve()), out="{out}")
    return [sys.executable, "-c", script]


def torch_macs_per_image(checkpoint: str) -> int:
    import torch

    from benchmarks.macs import count_macs
    from digitgen.export.verify import ContractGenerator
    from digitgen.training.state import load_generator

    generator, config, _ = load_generator(checkpoint)
    return count_macs(ContractGenerator(generator).eval(), torch.randn(1, config.latent_dim), torch.zeros(1).long())


def torch_runner(checkpoint: str, batch_size: int, latent_dim: int):
    import torch

    from digitgen.export.verify import ContractGenerator
    from digitgen.training.state import load_generator

    generator, _, _ = load_generator(checkpoint)
    model = ContractGenerator(generator).eval()
    z = torch.from_numpy(standard_normal(0, 0, batch_size, latent_dim))
    digits = torch.arange(batch_size) % 10

    def run() -> None:
        with torch.inference_mode():
            model(z, digits)

    return run


@click.command()
@click.option("--generator", "model", type=click.Path(dir_okay=False), help="Default: the shipped model.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Also time PyTorch eager on these weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def main(model: str | None, checkpoint: str | None, as_json: bool) -> None:
    gen = DigitGenerator.from_path(model, "cpu")
    result: dict[str, object] = {
        "machine": describe(),
        "model_bytes": gen.path.stat().st_size,
        "ort_images_per_s": {},
        "torch_images_per_s": {},
    }
    for batch_size in BATCH_SIZES:
        z, labels = standard_normal(0, 0, batch_size, gen.latent_dim), np.arange(batch_size) % 10
        runners = {"ort": lambda z=z, labels=labels: gen.run(z, labels)}
        if checkpoint:
            runners["torch"] = torch_runner(checkpoint, batch_size, gen.latent_dim)
        rates = interleaved_medians(
            {name: functools.partial(images_per_s, run, batch_size, 0.5) for name, run in runners.items()}, rounds=5
        )
        for name, rate in rates.items():
            result[f"{name}_images_per_s"][batch_size] = rate
    z1, l1 = standard_normal(0, 0, 1, gen.latent_dim), np.zeros(1, dtype=np.int64)
    result["ort_latency_ms_p50"], result["ort_latency_ms_p99"] = latency_ms(lambda: gen.run(z1, l1))
    result["cli_cold_start_s"] = cold_start_s(cli_command(gen.path))
    if checkpoint:
        from benchmarks.macs import gemm_macs_per_s

        macs, gemm = torch_macs_per_image(checkpoint), gemm_macs_per_s()
        result["ort_vs_torch_speedup"] = result["ort_images_per_s"][256] / result["torch_images_per_s"][256]
        result["macs_per_image"] = macs
        result["gemm_gmacs_per_s"] = gemm / 1e9
        result["ort_share_of_gemm"] = {b: r * macs / gemm for b, r in result["ort_images_per_s"].items()}
        result["torch_share_of_gemm"] = {b: r * macs / gemm for b, r in result["torch_images_per_s"].items()}
        result["import_torch_s"] = cold_start_s([sys.executable, "-c", "import torch"])
        result["torch_cold_start_s"] = cold_start_s(torch_command(checkpoint))

    click.echo(f"machine: {result['machine']}; model {result['model_bytes'] / 1e6:.2f} MB")
    click.echo(f"{'batch':>6} {'onnxruntime img/s':>18} {'torch eager img/s':>18} {'ort share of GEMM':>18}")
    for batch_size in BATCH_SIZES:
        torch_rate = result["torch_images_per_s"].get(batch_size)
        share = result.get("ort_share_of_gemm", {}).get(batch_size)
        click.echo(
            f"{batch_size:>6} {result['ort_images_per_s'][batch_size]:>18.0f} "
            f"{(f'{torch_rate:.0f}' if torch_rate else '-'):>18} {(f'{share:.0%}' if share else '-'):>18}"
        )
    p50, p99 = result["ort_latency_ms_p50"], result["ort_latency_ms_p99"]
    click.echo(f"batch-1 latency over {LATENCY_RUNS:,} calls: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    click.echo(f"cold start of `generate -n 10`: {result['cli_cold_start_s']:.2f} s")
    if checkpoint:
        click.echo(
            f"onnxruntime / torch at batch 256: {result['ort_vs_torch_speedup']:.2f}x; "
            f"{result['macs_per_image'] / 1e6:.1f} M multiply-adds per image; "
            f"fp32 GEMM {result['gemm_gmacs_per_s']:.1f} GMAC/s"
        )
        click.echo(
            f"cold start, torch script making the same 10 digits: {result['torch_cold_start_s']:.2f} s "
            f"(bare `import torch`: {result['import_torch_s']:.2f} s)"
        )
    if as_json:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
