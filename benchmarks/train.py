"""Training throughput: the in-memory loop (channels_last or NCHW, eager or torch.compile, fp32 or bf16 autocast)
vs a DataLoader loop.

    python benchmarks/train.py [--data-dir ../shared/datasets] [--steps 30] [--rounds 3] [--json]
    python benchmarks/train.py --to-quality 0.95 5.0 --label-classifier WEIGHTS.pt [--recipe 16-epoch]
    python benchmarks/train.py --to-quality 0.95 5.0 --recipe previous
        [--eval-every 234] [--max-minutes 60] [--threads 1] [--json]

Reports images/s and useful multiply-adds per second (forward and backward of both networks)
as a share of the machine's fp32 GEMM rate measured in the same run. ``--to-quality`` instead
trains a recipe (``RECIPES``: the shipped one or the 30- and 16-epoch ones shipped before it, which need
``--label-classifier``, or the release's before those) from scratch until the EMA generator reaches
that class accuracy and FID ratio to real data by the evaluator's reference classifier (``--samples``
digits, checked every ``--eval-every`` steps) and reports the step, training wall and process CPU
time to each target, evaluation time excluded.
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
from digitgen.training.loop import _to_model_range, precision_context, train_step, use_channels_last  # noqa: E402
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


# in-memory loop variants: name -> (channels_last memory format, torch.compile, `train --precision`); the first
# is what `cli.py train` does on CPU
VARIANTS = {
    "in_memory": (True, False, "fp32"),
    "in_memory_nchw": (False, False, "fp32"),
    "in_memory_compiled": (True, True, "fp32"),
    "in_memory_compiled_nchw": (False, True, "fp32"),
    "in_memory_bf16": (True, False, "bf16"),
}


def in_memory_loop(data, batch_size: int, variant: str) -> Callable[[], None]:
    """One training step per call on consecutive slices of the in-memory dataset."""
    channels_last, compiled, precision = VARIANTS[variant]
    settings = TrainConfig(total_steps=1, batch_size=batch_size, precision=precision)
    state = new_state(GANConfig(), settings, torch.device("cpu"))
    if channels_last:
        use_channels_last(state)
    g, d = state.generator, state.discriminator
    if compiled:  # the generator step calls the bare discriminator, so compile that one in place
        g, d = torch.compile(g, dynamic=False), torch.compile(d, dynamic=False)
        state.discriminator = d
    offsets = itertools.cycle(range(0, len(data.images) - batch_size + 1, batch_size))

    def step() -> None:
        lo = next(offsets)
        with precision_context(settings, torch.device("cpu")):
            train_step(
                state, _to_model_range(data.images[lo : lo + batch_size]), data.labels[lo : lo + batch_size], g, d
            )

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


# `train` options of the recipes timed to quality (artifacts/MODEL_CARD.md, "Recipe" and "Two seeds"); the shipped
# one's label classifier (weights from `train-classifier --seed 1`) is given on the command line
RECIPES = {
    "shipped": {
        "epochs": 40, "lr_decay_epochs": 20, "conditional_norm": True, "lr_d": 4e-4, "adc_weight": 0.5,
        "label_weight": 0.2, "label_weight_falls": True, "label_digit_weights": "1=2.5,4=2.5,7=2.5",
        "precision": "bf16", "seed": 0,
    },
    # shipped 2026-12-03
    "30-epoch": {
        "epochs": 30, "lr_decay_epochs": 15, "conditional_norm": True, "lr_d": 4e-4, "adc_weight": 0.5,
        "label_weight": 0.2, "label_weight_falls": True, "label_digit_weights": "4=2.5,7=2.5", "precision": "bf16",
        "seed": 1,
    },
    # shipped from 2026-11-30 to 2026-12-03
    "16-epoch": {
        "epochs": 16, "lr_decay_epochs": 8, "conditional_norm": True, "lr_d": 4e-4, "adc_weight": 0.5,
        "label_weight": 0.1, "seed": 0,
    },
    # shipped before 2026-11-30
    "previous": {"epochs": 20, "lr_decay_epochs": 10, "conditional_norm": True, "lr_d": 4e-4, "seed": 1},
}  # fmt: skip


def recipe_options(recipe: str, label_classifier: str | None) -> dict[str, object]:
    """The ``RunOptions`` fields of ``recipe``; a recipe with a label weight needs the classifier's weights."""
    options = dict(RECIPES[recipe])
    if "label_weight" in options:
        if label_classifier is None:
            raise click.UsageError(
                f"the {recipe} recipe needs --label-classifier (weights from train-classifier --seed 1)"
            )
        options["label_classifiers"] = (label_classifier,)
    elif label_classifier is not None:
        raise click.UsageError(f"the {recipe} recipe has no label classifier; leave out --label-classifier")
    return options


def time_to_quality(
    data_dir: str,
    recipe: dict[str, object],
    targets: tuple[float, float],
    eval_every: int,
    max_steps: int,
    max_minutes: float,
    samples: int,
) -> dict:
    """Train ``recipe`` (``RunOptions`` fields) from scratch until the EMA generator reaches both
    ``targets`` (class accuracy, FID ratio to real), ``max_steps`` or ``max_minutes`` of wall time;
    return when each target was first met (step, training wall and process CPU seconds, evaluation
    excluded) and the history.

    FID of ``samples`` generated digits is divided by the FID of as many real training images (both
    against the MNIST test features), as small samples bias FID upward.
    """
    import tempfile

    import numpy as np

    from digitgen.export.verify import ContractGenerator
    from digitgen.runtime.evaluate import ReferenceClassifier, frechet_distance
    from digitgen.runtime.generator import to_uint8
    from digitgen.runtime.noise import standard_normal
    from digitgen.training.distributed import SINGLE
    from digitgen.training.loop import train
    from digitgen.training.run import RunOptions, prepare_run

    classifier = ReferenceClassifier()
    test_features, _ = classifier.embed(load_mnist(data_dir, train=False).images.numpy())
    accuracy_target, fid_target = targets
    history: list[dict] = []
    reached: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory() as run_dir,
        prepare_run(RunOptions(data_dir, run_dir, **recipe), torch.device("cpu"), SINGLE) as run,
    ):
        pick = np.random.default_rng(0).choice(len(run.data.images), size=samples, replace=False)
        real_fid = frechet_distance(classifier.embed(run.data.images.numpy()[pick])[0], test_features)
        z = torch.from_numpy(standard_normal(0, 0, samples, run.state.config.latent_dim))
        labels = torch.arange(samples) % run.state.config.num_classes
        start_wall, start_cpu, eval_wall, eval_cpu = time.perf_counter(), time.process_time(), 0.0, 0.0

        def check(step: int, info: dict[str, float]) -> None:
            nonlocal eval_wall, eval_cpu
            if step % eval_every:
                return
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                images = to_uint8(ContractGenerator(run.state.generator_ema).eval()(z, labels).numpy())
            features, predictions = classifier.embed(images)
            fid = frechet_distance(features, test_features)
            row = {
                "step": step,
                "train_wall_s": wall - start_wall - eval_wall,
                "train_cpu_s": cpu - start_cpu - eval_cpu,
                "class_accuracy": float((predictions == labels.numpy()).mean()),
                "fid": fid,
                "fid_ratio": fid / real_fid,
            }
            history.append(row)
            if row["class_accuracy"] >= accuracy_target:
                reached.setdefault("class_accuracy", row)
            if row["fid_ratio"] <= fid_target:
                reached.setdefault("fid_ratio", row)
            eval_wall += time.perf_counter() - wall
            eval_cpu += time.process_time() - cpu
            click.echo(
                f"  step {step}: class accuracy {row['class_accuracy']:.2%}, FID {fid:.2f} ({row['fid_ratio']:.2f}x "
                f"real) after {row['train_cpu_s']:.0f} CPU s, {row['train_wall_s']:.0f} s wall of training",
                err=True,
            )

        def should_stop() -> bool:
            out_of_time = time.perf_counter() - start_wall >= 60 * max_minutes
            return len(reached) == 2 or run.state.step >= max_steps or out_of_time

        train(run.state, run.data, run_dir, progress=check, should_stop=should_stop)
    return {
        "recipe": recipe,
        "samples": samples,
        "real_fid": real_fid,
        "targets": {"class_accuracy": accuracy_target, "fid_ratio": fid_target},
        "reached": {name: reached.get(name) for name in ("class_accuracy", "fid_ratio")},
        "history": history,
    }


TO_QUALITY_ONLY = ("recipe", "label_classifier", "eval_every", "samples", "max_steps", "max_minutes")
THROUGHPUT_ONLY = ("batch_size", "steps", "rounds")


def refuse_options_of_the_other_mode(ctx: click.Context, to_quality: bool) -> None:
    """Options of one mode given in the other would be ignored: refuse them instead."""
    misplaced = THROUGHPUT_ONLY if to_quality else TO_QUALITY_ONLY
    given = [name for name in misplaced if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        spelled = ", ".join("--" + name.replace("_", "-") for name in given)
        mode = "with" if to_quality else "without"
        raise click.UsageError(f"{spelled}: not used {mode} --to-quality")


def _outcome(name: str, reached: dict | None, history: list[dict]) -> str:
    """When a quality target was met, or how far the run got."""
    if reached:
        cpu_min, wall_min = reached["train_cpu_s"] / 60, reached["train_wall_s"] / 60
        return f"step {reached['step']} after {cpu_min:.1f} CPU min, {wall_min:.1f} min wall of training"
    return f"not reached (step {history[-1]['step']}: {history[-1][name]:.4g})" if history else "not reached"


@click.command()
@click.option("--data-dir", envvar="MNIST_ROOT", default=str(REPO.parent / "shared" / "datasets"), show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--steps", default=30, show_default=True, help="Steps per loop in each round.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds; the median is reported.")
@click.option(
    "--to-quality",
    type=(click.FloatRange(0, 1), click.FloatRange(min=0)),
    help="Instead, time a recipe from scratch to this class accuracy and FID ratio, e.g. 0.95 5.0.",
)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="shipped", show_default=True)
@click.option(
    "--label-classifier",
    type=click.Path(exists=True, dir_okay=False),
    help="The shipped recipe's label classifier weights (train-classifier --seed 1).",
)
@click.option("--eval-every", default=234, show_default=True, help="Steps between quality checks.")
@click.option("--samples", default=2000, show_default=True, help="Generated (and real) digits per quality check.")
@click.option("--max-steps", default=9360, show_default=True, help="Give up after this many steps.")
@click.option("--max-minutes", default=60.0, show_default=True, help="Give up after this much wall time.")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads  [default: torch's choice]")
@click.option("--json", "as_json", is_flag=True)
def main(
    data_dir: str,
    batch_size: int,
    steps: int,
    rounds: int,
    to_quality: tuple[float, float] | None,
    recipe: str,
    label_classifier: str | None,
    eval_every: int,
    samples: int,
    max_steps: int,
    max_minutes: float,
    threads: int | None,
    as_json: bool,
) -> None:
    refuse_options_of_the_other_mode(click.get_current_context(), to_quality is not None)
    if threads is not None:
        torch.set_num_threads(threads)
    if to_quality is not None:
        options = recipe_options(recipe, label_classifier)
        result = time_to_quality(data_dir, options, to_quality, eval_every, max_steps, max_minutes, samples)
        result["machine"] = f"{describe()}, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
        click.echo(f"machine: {result['machine']}; real-data FID at {samples} samples: {result['real_fid']:.3f}")
        for name, target in result["targets"].items():
            click.echo(f"{name} {target:g}: {_outcome(name, result['reached'][name], result['history'])}")
        if as_json:
            click.echo(json.dumps(result))
        return
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
    if as_json:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
