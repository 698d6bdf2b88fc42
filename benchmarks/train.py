"""Training throughput: the in-memory loop (channels_last or NCHW, eager or torch.compile) vs a DataLoader loop.

    python benchmarks/train.py [--data-dir ../shared/datasets] [--steps 30] [--rounds 3] [--to-accuracy 0.95] [--json]

Reports images/s and useful multiply-adds per second (forward and backward of both networks)
as a share of the machine's fp32 GEMM rate measured in the same run. With ``--to-accuracy`` it
also trains the shipped recipe from scratch until the EMA generator reaches that class accuracy by
the evaluator's reference classifier (2,000 samples, checked every ``--eval-every`` steps) and
reports the training time it took, evaluation time excluded.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.macs import count_macs, gemm_macs_per_s  # noqa: E402
from benchmarks.timing import interleaved_medians  # noqa: E402
from digitgen.training.config import GANConfig, TrainConfig  # noqa: E402
from digitgen.training.data import load_mnist  # noqa: E402
from digitgen.training.loop import _to_model_range, train_step, use_channels_last  # noqa: E402
from digitgen.training.state import new_state  # noqa: E402


def step_macs_per_image(cfg: GANConfig) -> int:
    """One D step (G forward, D forward+backward on real and fake) and one G step (G and D fwd+bwd).

    Backward is counted as twice the forward: 4 G forwards and 9 D forwards per image.
    """
    state = new_state(cfg, TrainConfig(total_steps=1), torch.device("cpu"))
    z, labels = torch.randn(1, cfg.latent_dim), torch.zeros(1, dtype=torch.long)
    g = count_macs(state.generator.eval(), z, labels)
    d = count_macs(state.discriminator.eval(), torch.zeros(1, 1, 28, 28), labels)
    return 4 * g + 9 * d


# in-memory loop variants: name -> (channels_last memory format, torch.compile); the first is
# what `cli.py train` does on CPU
VARIANTS = {
    "in_memory": (True, False),
    "in_memory_nchw": (False, False),
    "in_memory_compiled": (True, True),
    "in_memory_compiled_nchw": (False, True),
}


def in_memory_loop(data, batch_size: int, variant: str) -> Callable[[], None]:
    """One training step per call on consecutive slices of the in-memory dataset."""
    state = new_state(GANConfig(), TrainConfig(total_steps=1, batch_size=batch_size), torch.device("cpu"))
    channels_last, compiled = VARIANTS[variant]
    if channels_last:
        use_channels_last(state)
    g, d = state.generator, state.discriminator
    if compiled:  # the generator step calls the bare discriminator, so compile that one in place
        g, d = torch.compile(g, dynamic=False), torch.compile(d, dynamic=False)
        state.discriminator = d
    offsets = itertools.cycle(range(0, len(data.images) - batch_size + 1, batch_size))

    def step() -> None:
        lo = next(offsets)
        train_step(state, _to_model_range(data.images[lo : lo + batch_size]), data.labels[lo : lo + batch_size], g, d)

    return step


def dataloader_loop(data_dir: str, batch_size: int) -> Callable[[], None]:
    """The naive recipe: torchvision MNIST with per-item PIL -> ToTensor through a DataLoader."""
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(
        data_dir,
        train=True,
        download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    state = new_state(GANConfig(), TrainConfig(total_steps=1, batch_size=batch_size), torch.device("cpu"))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))

    def step() -> None:
        images, labels = next(batches)
        train_step(state, images, labels, state.generator, state.discriminator)

    return step


def measure(loops: dict[str, Callable[[], None]], batch_size: int, steps: int, rounds: int) -> tuple[dict, dict]:
    """(median images/s of each loop over interleaved rounds of ``steps`` steps, seconds of each
    loop's first three steps, which include any compilation)."""
    first_steps = {}
    for name, step in loops.items():
        start = time.perf_counter()
        for _ in range(3):
            step()
        first_steps[name] = time.perf_counter() - start

    def images_per_s(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_size / (time.perf_counter() - start)

    rates = interleaved_medians({name: functools.partial(images_per_s, step) for name, step in loops.items()}, rounds)
    return rates, first_steps


def time_to_accuracy(data, target: float, batch_size: int, eval_every: int, max_steps: int) -> dict:
    """Train the default recipe until the class accuracy reaches ``target``; return the history."""
    import tempfile

    from digitgen.export.verify import ContractGenerator
    from digitgen.runtime.evaluate import ReferenceClassifier
    from digitgen.runtime.generator import to_uint8
    from digitgen.runtime.noise import standard_normal
    from digitgen.training.loop import train

    classifier = ReferenceClassifier()
    cfg = GANConfig()
    state = new_state(cfg, TrainConfig(total_steps=max_steps, batch_size=batch_size), torch.device("cpu"))
    z = torch.from_numpy(standard_normal(0, 0, 2000, cfg.latent_dim))
    labels = torch.arange(2000) % cfg.num_classes
    history, evaluating = [], 0.0
    start = time.perf_counter()

    def check(step: int, info: dict) -> None:
        nonlocal evaluating
        if step % eval_every:
            return
        begin = time.perf_counter()
        with torch.no_grad():
            images = to_uint8(ContractGenerator(state.generator_ema).eval()(z, labels).numpy())
        accuracy = float((classifier.embed(images)[1] == labels.numpy()).mean())
        history.append({"step": step, "train_s": begin - start - evaluating, "class_accuracy": accuracy})
        evaluating += time.perf_counter() - begin
        click.echo(f"  step {step}: class accuracy {accuracy:.1%} after {history[-1]['train_s']:.0f}s", err=True)

    with tempfile.TemporaryDirectory() as run_dir:
        train(
            state,
            data,
            run_dir,
            progress=check,
            should_stop=lambda: bool(history) and history[-1]["class_accuracy"] >= target,
        )
    reached = history[-1] if history and history[-1]["class_accuracy"] >= target else None
    return {"target": target, "reached": reached, "history": history}


@click.command()
@click.option("--data-dir", envvar="MNIST_ROOT", default=str(REPO.parent / "shared" / "datasets"), show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--steps", default=30, show_default=True, help="Steps per loop in each round.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds; the median is reported.")
@click.option("--to-accuracy", type=click.FloatRange(0, 1), help="Also time training to this class accuracy.")
@click.option("--eval-every", default=234, show_default=True, help="Steps between accuracy checks.")
@click.option("--max-steps", default=9360, show_default=True, help="Give up after this many steps.")
@click.option("--json", "as_json", is_flag=True)
def main(
    data_dir: str,
    batch_size: int,
    steps: int,
    rounds: int,
    to_accuracy: float | None,
    eval_every: int,
    max_steps: int,
    as_json: bool,
) -> None:
    data = load_mnist(data_dir, download=False)
    macs = step_macs_per_image(GANConfig())
    gemm = gemm_macs_per_s()
    loops = {variant: in_memory_loop(data, batch_size, variant) for variant in VARIANTS}
    loops["dataloader"] = dataloader_loop(data_dir, batch_size)
    rates, warmup_s = measure(loops, batch_size, steps, rounds)
    result = {
        "machine": f"{describe()}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "macs_per_image_step": macs,
        "gemm_gmacs_per_s": gemm / 1e9,
        "images_per_s": rates,
        "first_3_steps_s": warmup_s,
        "share_of_gemm": {k: v * macs / gemm for k, v in rates.items()},
    }
    click.echo(
        f"machine: {result['machine']}; fp32 GEMM {gemm / 1e9:.1f} GMAC/s; "
        f"{macs / 1e6:.0f} M multiply-adds per image per training step"
    )
    for name, rate in rates.items():
        click.echo(
            f"{name:>32}: {rate:7.0f} images/s  ({result['share_of_gemm'][name]:.0%} of GEMM rate; "
            f"first 3 steps {warmup_s[name]:.1f}s)"
        )
    if to_accuracy is not None:
        result["time_to_accuracy"] = time_to_accuracy(data, to_accuracy, batch_size, eval_every, max_steps)
        reached = result["time_to_accuracy"]["reached"]
        outcome = f"step {reached['step']} after {reached['train_s']:.0f}s of training" if reached else "not reached"
        click.echo(f"class accuracy {to_accuracy:.0%}: {outcome} (at most {max_steps} steps)")
    if as_json:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
