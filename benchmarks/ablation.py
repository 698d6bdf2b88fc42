"""Ablation of the training recipe: one change at a time against a base recipe, at a small scale.

    python benchmarks/ablation.py run [--epochs 5] [--seed 1] [--jobs 2] [--threads 1] [--variant NAME ...]
    python benchmarks/ablation.py table [--out runs/ablation] [--json]

``run`` trains each variant with ``cli.py train`` (``--jobs`` runs side by side, ``--threads`` each),
exports it, scores it like ``digitgen evaluate --cas`` (10,000 digits, seed 0, the reference
classifier) and prints the table. CAS is scaled down with the rest: the classifier trains on
``--cas-images`` generated digits (the release's figure: 60,000) and, once for all variants, on as
many real ones (MNIST's first training images). The "label" variant's classifier is trained first,
once (``train-classifier --seed 1``: the evaluator's recipe on another seed). Everything lands in
``--out``; a variant without scores there is trained (its run resumed, if there is one: a finished run
is not trained again), exported and scored, so an interrupted ablation continues where it stopped.
The base recipe is the one shipped when the ablation ran (variant "shipped": conditional BatchNorm and the
discriminator's own learning rate, no classifier terms; today's recipe adds ADC-GAN and a frozen classifier),
scaled to ``--epochs``: the learning rates fall to zero over the last half.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402

# The base recipe (shipped when the ablation ran; artifacts/MODEL_CARD.md) as `cli.py train` options (None: a
# flag); its decay spans the last half of the epochs.
SHIPPED = {"--conditional-norm": None, "--lr-d": "4e-4"}


@dataclass(frozen=True)
class Variant:
    """The base recipe with one change (a seed variant: another variant on the next seed)."""

    change: str
    options: dict[str, str | bool | None] = field(default_factory=dict)  # differ from SHIPPED; False drops one
    decay_share: float = 0.5  # the share of the epochs over which the learning rates fall
    seed_offset: int = 0
    label_classifier: bool = False  # passes --label-classifier: the ablation's own classifier (LABEL_CLASSIFIER)


VARIANTS = {
    "shipped": Variant("the base recipe (shipped when the ablation ran)"),
    "no-cbn": Variant("conditional BatchNorm off (plain BatchNorm)", {"--conditional-norm": False}),
    "no-lr-d": Variant("one learning rate (discriminator 2e-4, not 4e-4)", {"--lr-d": False}),
    "decay-quarter": Variant("decay over the last quarter, not half", decay_share=0.25),
    "wide-d": Variant("wider discriminator (96-192-384 channels, not 64-128-256)", {"--d-width": "96"}),
    "adc": Variant("ADC-GAN classifier in the discriminator, weight 0.5", {"--adc-weight": "0.5"}),
    "shipped-seed2": Variant("the base recipe on another seed (seed noise)", seed_offset=1),
    "adc-seed2": Variant("ADC-GAN, weight 0.5, on another seed (seed noise)", {"--adc-weight": "0.5"}, seed_offset=1),
    "label": Variant(
        "a frozen classifier's cross-entropy in the generator's loss, weight 0.5 (not the evaluator: seed 1)",
        {"--label-weight": "0.5"},
        label_classifier=True,
    ),
}
# The classifier of the "label" variant: `train-classifier` as the evaluator's, on another seed; weights beside it.
LABEL_CLASSIFIER = "label_classifier.onnx"
LABEL_CLASSIFIER_WEIGHTS = "label_classifier_weights.pt"
LABEL_CLASSIFIER_SEED = 1
SCORES = "scores.json"
CAS_IMAGES = 20_000
REAL_CAS = "real_cas.json"


def train_arguments(name: str, epochs: int, seed: int, label_weights: Path | None = None) -> list[str]:
    """The `cli.py train` options of variant ``name`` at ``epochs`` epochs (``label_weights``: the classifier
    weights of a variant that needs them)."""
    variant = VARIANTS[name]
    arguments = ["--epochs", str(epochs), "--seed", str(seed + variant.seed_offset)]
    if variant.label_classifier:
        if label_weights is None:
            raise ValueError(f"variant {name} needs classifier weights")
        arguments += ["--label-classifier", str(label_weights)]
    arguments += ["--lr-decay-epochs", f"{epochs * variant.decay_share:g}"]
    for flag, value in {**SHIPPED, **variant.options}.items():
        if value is False:
            continue
        arguments += [flag] if value is None else [flag, str(value)]
    return arguments


def training_seconds(metrics: Path, batch_size: int) -> float:
    """Training wall time from the run's metrics log (each record covers its window of steps)."""
    seconds, step = 0.0, 0
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        seconds += (record["step"] - step) * batch_size / record["images_per_s"]
        step = record["step"]
    return seconds


def _run(command: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("a") as out:
        if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
            raise click.ClickException(f"{' '.join(command)} failed; see {log}")


def _variant(name: str, out: Path, data_dir: str, epochs: int, seed: int, threads: int, cas_images: int) -> None:
    run_dir = out / name
    checkpoint = run_dir / "checkpoint.pt"
    train = [sys.executable, str(REPO / "cli.py"), "train", "--data-dir", data_dir, "--out", str(run_dir)]
    resume = ["--resume", str(checkpoint)] if checkpoint.exists() else []
    log = out / f"{name}.log"
    if not (run_dir / SCORES).exists():
        _run([*train, *train_arguments(name, epochs, seed, out / LABEL_CLASSIFIER_WEIGHTS), *resume], threads, log)
        onnx = run_dir / "generator.onnx"
        export = [sys.executable, str(REPO / "cli.py"), "export", "--checkpoint", str(checkpoint), "--out", str(onnx)]
        _run([*export, "--overwrite"], threads, log)
        score = [
            sys.executable,
            __file__,
            "score",
            str(run_dir),
            "--data-dir",
            data_dir,
            "--cas-images",
            str(cas_images),
        ]
        _run(score, threads, log)


@click.group()
def main() -> None:
    """Train, score and tabulate the recipe's ablation."""


@main.command()
@click.option("--data-dir", default="../shared/datasets", show_default=True)
@click.option("--out", default="runs/ablation", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--cas-images", default=CAS_IMAGES, show_default=True, type=click.IntRange(min=1000))
@click.option("--variant", "variants", multiple=True, type=click.Choice(list(VARIANTS)), help="Default: all.")
def run(
    data_dir: str,
    out: Path,
    epochs: int,
    seed: int,
    jobs: int,
    threads: int,
    cas_images: int,
    variants: tuple[str, ...],
) -> None:
    """Train and score the variants (``--jobs`` at a time), then print the table."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = variants or list(VARIANTS)
    if any(VARIANTS[name].label_classifier for name in chosen) and not (out / LABEL_CLASSIFIER_WEIGHTS).exists():
        classifier = [sys.executable, str(REPO / "cli.py"), "train-classifier", "--data-dir", data_dir]
        classifier += ["--out", str(out / LABEL_CLASSIFIER), "--seed", str(LABEL_CLASSIFIER_SEED)]
        _run(classifier, threads, out / "label_classifier.log")
    real = [sys.executable, __file__, "real-cas", str(out), "--data-dir", data_dir, "--cas-images", str(cas_images)]
    tasks = [] if (out / REAL_CAS).exists() else [lambda: _run(real, threads, out / "real_cas.log")]
    tasks += [lambda name=name: _variant(name, out, data_dir, epochs, seed, threads, cas_images) for name in chosen]
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()
    click.echo(table_markdown(out))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--data-dir", default="../shared/datasets", show_default=True)
@click.option("--cas-images", default=CAS_IMAGES, show_default=True, type=click.IntRange(min=1000))
def score(run_dir: Path, data_dir: str, cas_images: int) -> None:
    """Score RUN_DIR/generator.onnx as `evaluate --cas` does, less the real-data CAS."""
    from digitgen.runtime import DigitGenerator
    from digitgen.runtime.evaluate import ReferenceClassifier, evaluate
    from digitgen.runtime.idx import read_mnist_split
    from digitgen.training.cas import accuracy_when_trained_on
    from digitgen.training.checkpoint import load_checkpoint

    generator = DigitGenerator.from_path(run_dir / "generator.onnx", "cpu")
    test, train = read_mnist_split(data_dir, "t10k"), read_mnist_split(data_dir, "train")
    scores = evaluate(generator, ReferenceClassifier(), test, train).to_dict()
    fake = generator.generate(cas_images, seed=0)  # digits 0-9 in turn
    scores["cas_generated"] = accuracy_when_trained_on((fake.images, fake.labels), test)
    scores["cas_images"] = cas_images
    batch_size = load_checkpoint(str(run_dir / "checkpoint.pt"))["train"]["batch_size"]
    scores["train_seconds"] = training_seconds(run_dir / "metrics.jsonl", batch_size)
    (run_dir / SCORES).write_text(json.dumps(scores))


@main.command("real-cas")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--data-dir", default="../shared/datasets", show_default=True)
@click.option("--cas-images", default=CAS_IMAGES, show_default=True, type=click.IntRange(min=1000))
def real_cas(out: Path, data_dir: str, cas_images: int) -> None:
    """The CAS recipe trained on MNIST's first ``--cas-images`` training images."""
    from digitgen.runtime.idx import read_mnist_split
    from digitgen.training.cas import accuracy_when_trained_on

    images, labels = read_mnist_split(data_dir, "train")
    accuracy = accuracy_when_trained_on((images[:cas_images], labels[:cas_images]), read_mnist_split(data_dir, "t10k"))
    (out / REAL_CAS).write_text(json.dumps({"real": accuracy, "cas_images": cas_images}))


def table_rows(out: Path) -> list[dict[str, float | str]]:
    """One row per scored variant, in VARIANTS order."""
    real_cas = json.loads((out / REAL_CAS).read_text()) if (out / REAL_CAS).exists() else {}
    rows = []
    for name, variant in VARIANTS.items():
        path = out / name / SCORES
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        g, r = s["generated"], s["real"]
        worst = min(range(10), key=g["per_digit_accuracy"].__getitem__)
        rows.append(
            {
                "variant": name,
                "change": variant.change,
                "class_accuracy": g["class_accuracy"],
                "worst_digit": worst,
                "worst_accuracy": g["per_digit_accuracy"][worst],
                "fid_ratio": g["fid"] / r["fid"],
                "precision_ratio": g["precision"] / r["precision"],
                "recall_ratio": g["recall"] / r["recall"],
                "cas_gap": (
                    100 * (real_cas["real"] - s["cas_generated"])
                    if real_cas.get("cas_images") == s["cas_images"]  # trained on as many images
                    else None
                ),
                "train_minutes": s["train_seconds"] / 60,
            }
        )
    return rows


def table_markdown(out: Path) -> str:
    lines = [
        f"machine: {describe()}",
        "",
        "| variant | change | class acc. | worst digit | FID / real | precision / real | recall / real "
        "| CAS gap (points) | training min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(out):
        gap = "n/a" if row["cas_gap"] is None else f"{row['cas_gap']:.2f}"
        lines.append(
            f"| {row['variant']} | {row['change']} | {row['class_accuracy']:.2%} "
            f"| {row['worst_accuracy']:.1%} ({row['worst_digit']}) | {row['fid_ratio']:.2f}x "
            f"| {row['precision_ratio']:.2f}x | {row['recall_ratio']:.2f}x | {gap} | {row['train_minutes']:.1f} |"
        )
    return "\n".join(lines)


@main.command()
@click.option("--out", default="runs/ablation", show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def table(out: Path, as_json: bool) -> None:
    """Print the table of the variants scored so far."""
    click.echo(json.dumps(table_rows(out)) if as_json else table_markdown(out))


if __name__ == "__main__":
    main()
