"""The training loop: hinge-loss conditional GAN with an EMA generator, resumable at any step."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image

from digitgen.runtime.encode import GRID_COLUMNS
from digitgen.runtime.errors import OutputError
from digitgen.runtime.files import publish
from digitgen.runtime.text import read_json
from digitgen.training.augment import diff_augment
from digitgen.training.checkpoint import save_checkpoint
from digitgen.training.config import TrainConfig
from digitgen.training.data import MnistTensors
from digitgen.training.distributed import (
    SINGLE,
    DistContext,
    any_rank,
    gather_objects,
    on_main_first,
    weights_digest,
)
from digitgen.training.errors import NonFiniteLossError, TrainingError, memory_errors_in_words
from digitgen.training.state import TrainState, state_to_checkpoint

STEP_TOO_LARGE = "a training step of this size does not fit; lower --batch-size, --g-width or --d-width"

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# where --overwrite keeps the earlier run's files until this run's first checkpoint (training.run.set_aside)
REPLACED_DIR = ".digitgen-replaced-run"
SAMPLES_DIR = "samples"
SAMPLE_GRID = re.compile(r"step([0-9]{7,})\.png")  # the names grid_name gives


ProgressFn = Callable[[int, dict[str, float]], None]


def grid_name(step: int) -> str:
    """The file name of the sample grid of ``step``, in SAMPLES_DIR: ``step0000042.png``."""
    return f"step{step:07d}.png"


@dataclass(frozen=True)
class TrainResult:
    """Where a training run ended: its last step and checkpoint, whether a stop signal ended it, and its speed."""

    step: int
    checkpoint: Path
    interrupted: bool
    seconds: float
    images_per_s: float  # over all ranks


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Whole batches in one pass over the data (at least one)."""
    return max(1, num_images // batch_size)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run matches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)  # (B, 1, 28, 28) in [-1, 1]


def check_finite(loss: torch.Tensor, name: str, step: int, ctx: DistContext = SINGLE) -> None:
    """:class:`NonFiniteLossError` if ``loss`` is nan or infinite on this process or on any other, so that all
    processes of a torchrun stop together rather than wait in the next all-reduce for the one that stopped."""
    value = loss.item()
    if any_rank(ctx, not math.isfinite(value), loss.device):
        where = f"is {value}" if not math.isfinite(value) else "is not finite on another process"
        raise NonFiniteLossError(
            f"{name} loss {where} at step {step + 1}; stopped before applying it "
            "(the last checkpoint this run saved, if any, is intact and can be exported; to train on, start over "
            "with --overwrite and a lower --lr)"
        )


def _label_term(state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The frozen classifiers' mean cross-entropy, each digit's scaled by its ``label_digit_weights`` multiplier."""
    each = torch.stack(
        [F.cross_entropy(classifier(images)[0], labels, reduction="none") for classifier in state.label_classifiers]
    ).mean(0)
    if state.train.label_digit_weights:
        multipliers = state.train.label_digit_multipliers(state.config.num_classes)
        each = each * torch.tensor(multipliers, device=each.device)[labels]
    return each.mean()


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers(), strict=True):
        ema_b.copy_(b)


def use_channels_last(state: TrainState) -> None:
    """NHWC activations for all three networks: training on CPU measured 4-19% faster (benchmarks/train.py)."""
    for module in (state.generator, state.generator_ema, state.discriminator):
        module.to(memory_format=torch.channels_last)


def precision_context(train: TrainConfig, device: torch.device) -> AbstractContextManager:
    """Where training steps run: under bfloat16 autocast for ``precision="bf16"`` (convolutions and matrix
    products in bf16; weights, gradients, optimiser state and the EMA stay fp32), else as they are."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")


def train_step(
    state: TrainState,
    real: torch.Tensor,
    labels: torch.Tensor,
    g: nn.Module,
    d: nn.Module,
    ctx: DistContext = SINGLE,
) -> dict[str, float]:
    """One discriminator and one generator update; returns the step's losses and D outputs.

    ``g`` and ``d`` are the state's networks, or their DistributedDataParallel wrappers (``ctx`` then
    names this process among the others).
    """
    device = real.device
    batch, latent = real.shape[0], state.config.latent_dim
    for group in state.opt_g.param_groups:
        group["lr"] = state.train.learning_rate(state.step)
    for group in state.opt_d.param_groups:
        group["lr"] = state.train.discriminator_learning_rate(state.step)

    z = torch.randn(batch, latent, generator=state.noise_rng).to(device)
    with torch.no_grad():
        fake = g(z, labels)
    adc_weight, classes = state.train.adc_weight, state.config.num_classes
    policy = state.train.diffaugment
    seen = diff_augment(torch.cat([real, fake]), policy, state.noise_rng)
    if adc_weight:
        scores, logits = d(seen, torch.cat([labels, labels]), with_classes=True)
        # the classifier learns "real k" for real digits and "generated k" for the generator's
        adc_d = F.cross_entropy(logits, torch.cat([labels, labels + classes]))
    else:
        scores, adc_d = d(seen, torch.cat([labels, labels])), 0.0
    d_real, d_fake = scores.split(batch)
    loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean() + adc_weight * adc_d
    check_finite(loss_d, "discriminator", state.step, ctx)
    state.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    state.opt_d.step()

    z = torch.randn(batch, latent, generator=state.noise_rng).to(device)
    fake_labels = torch.randint(0, state.config.num_classes, (batch,), generator=state.noise_rng).to(device)
    generated = g(z, fake_labels)
    seen = diff_augment(generated, policy, state.noise_rng)
    # the bare discriminator: its gradients here are discarded, so they need no all-reduce
    if adc_weight:
        scores, logits = state.discriminator(seen, fake_labels, with_classes=True)
        # ADC-GAN's generator term: cross-entropy to "real k" minus cross-entropy to "generated k",
        # which is the difference of the two logits (the log-normaliser cancels)
        pair = logits.gather(1, torch.stack([fake_labels, fake_labels + classes], dim=1))
        adc_g = (pair[:, 1] - pair[:, 0]).mean()
    else:
        scores, adc_g = state.discriminator(seen, fake_labels), 0.0
    loss_g = -scores.mean() + adc_weight * adc_g
    if state.label_classifiers:
        # the frozen classifiers read pixels in [0, 1]; confidently right digits add (almost) nothing
        label_term = _label_term(state, generated.add(1.0).mul(0.5), fake_labels)
        loss_g = loss_g + state.train.label_classifier_weight(state.step) * label_term
    check_finite(loss_g, "generator", state.step, ctx)
    state.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    state.opt_g.step()

    decay = min(state.train.ema_decay, (1 + state.step) / (10 + state.step))
    _update_ema(state.generator_ema, state.generator, decay)
    state.step += 1
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": d_real.mean().item(),
        "d_fake": d_fake.mean().item(),
    }


@torch.no_grad()
def write_sample_grid(state: TrainState, path: Path) -> None:
    """Fixed-noise grid from the EMA generator: one row per digit 0-9, ten styles per row."""
    cfg = state.config
    device = next(state.generator_ema.parameters()).device
    noise = torch.randn(GRID_COLUMNS, cfg.latent_dim, generator=torch.Generator().manual_seed(2024))
    z = noise.repeat(cfg.num_classes, 1).to(device)
    labels = torch.arange(cfg.num_classes).repeat_interleave(GRID_COLUMNS).to(device)
    images = state.generator_ema(z, labels).add(1.0).div(2.0)
    with publish(path) as tmp:
        save_image(images.cpu(), tmp, nrow=GRID_COLUMNS, padding=2, pad_value=0.5, format="png")


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step``, where a resumed run starts: those a hard stop (a kill, a crash)
    left after its last checkpoint would be logged twice, and a line it cut short would break the file. A line
    that is not a record of a step (not UTF-8 or JSON, or its step not a whole number) goes too."""
    if not path.exists():
        return
    kept = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = read_json(line)
        except ValueError:  # UnicodeDecodeError among them
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step:
            kept.append(line + "\n")
    with publish(path) as tmp:
        tmp.write_text("".join(kept))


def _trim_grids(samples: Path, step: int) -> None:
    """Remove the sample grids of steps after ``step``, where a resumed run starts: a hard stop after its last
    checkpoint left them, and a resumed run that ends sooner would leave them beside its own."""
    for path in samples.iterdir():
        grid = SAMPLE_GRID.fullmatch(path.name)
        if grid is not None and int(grid[1]) > step:
            path.unlink()


def _append_metrics(path: Path, record: dict[str, float]) -> None:
    """One line more, whole or not at all: a line the disk cannot take is cut off again, so that the file stays
    JSON Lines for whoever reads it (an :class:`OutputError` names it). Unbuffered: no part of a line waits to be
    written as the file closes."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with path.open("ab", buffering=0) as f:
            whole = f.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(line):
                    written += f.write(line[written:])
            except OSError:
                with suppress(OSError):
                    f.truncate(whole)
                raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _save(state: TrainState, path: Path, ctx: DistContext) -> None:
    """Collective in a distributed run (every rank's noise state is gathered); rank 0 writes, and if it cannot,
    every rank stops (rather than wait for it in the next step)."""
    noise_states = gather_objects(ctx, state.noise_rng.get_state())

    def save() -> None:
        save_checkpoint(state_to_checkpoint(state, noise_states), path)
        drop_replaced(path.parent)

    on_main_first(
        ctx,
        next(state.generator.parameters()).device,
        save,
        "the first process could not write the checkpoint (its error says why)",
    )


def drop_replaced(run_dir: Path) -> None:
    """Delete the earlier run an ``--overwrite`` set aside, now that this run has a checkpoint of its own (a
    failure leaves it for the run's end, or the next run's refusal, to name)."""
    aside = run_dir / REPLACED_DIR
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)


def _wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def train(
    state: TrainState,
    data: MnistTensors,
    run_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    ctx: DistContext = SINGLE,
) -> TrainResult:
    """Train until ``state.train.total_steps``; checkpoint periodically, at each epoch and at the end.

    ``should_stop`` is polled after every step (signal handlers set it); the run then writes a
    checkpoint and returns with ``interrupted=True`` so ``--resume`` can continue it exactly.
    Under torchrun each rank trains on its own slice of every batch of ``world_size * batch_size``
    images; only rank 0 writes files.
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    if ctx.is_main:
        (run_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        _trim_metrics(run_dir / METRICS_NAME, state.step)
        _trim_grids(run_dir / SAMPLES_DIR, state.step)
    device = next(state.generator.parameters()).device
    if device.type == "cpu":
        use_channels_last(state)
    images, labels = data.images.to(device), data.labels.to(device)
    cfg = state.train
    global_batch = cfg.batch_size * ctx.world_size
    per_epoch = steps_per_epoch(len(images), global_batch)
    state.generator.train()
    state.discriminator.train()
    g, d = _wrap(state.generator, ctx, device), _wrap(state.discriminator, ctx, device)

    start, window_start, window_steps, interrupted = time.perf_counter(), time.perf_counter(), 0, False
    first_step, saved_at = state.step, None
    order, order_epoch = None, -1
    while state.step < cfg.total_steps:
        epoch, position = divmod(state.step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_permutation(cfg.seed, epoch, len(images)).to(device), epoch
        offset = position * global_batch + ctx.rank * cfg.batch_size
        idx = order[offset : offset + cfg.batch_size]
        with precision_context(cfg, device), memory_errors_in_words(STEP_TOO_LARGE):
            metrics = train_step(state, _to_model_range(images[idx]), labels[idx], g, d, ctx)
        window_steps += 1
        if state.step % cfg.log_every == 0 or state.step == cfg.total_steps:
            elapsed = time.perf_counter() - window_start
            metrics["images_per_s"] = window_steps * global_batch / max(elapsed, 1e-9)
            if ctx.is_main:
                _append_metrics(run_dir / METRICS_NAME, {"step": state.step, "epoch": epoch, **metrics})
            window_start, window_steps = time.perf_counter(), 0
        if progress is not None:
            progress(state.step, {"epoch": epoch + 1, **metrics})
        epoch_done = state.step % per_epoch == 0
        if ctx.is_main and (epoch_done or state.step == cfg.total_steps):
            write_sample_grid(state, run_dir / SAMPLES_DIR / grid_name(state.step))
        if epoch_done or state.step % cfg.checkpoint_every == 0:
            _save(state, checkpoint, ctx)
            saved_at = state.step
        # a stop asked for during the last step comes after the work: the run is done, not interrupted
        if state.step < cfg.total_steps and any_rank(ctx, should_stop(), device):
            interrupted = True
            break
    # the last step's, unless just written; a complete run resumed saves again: the settings a resume may change
    # (--lr-decay-epochs, --checkpoint-every) are kept for a later extension, and a new folder gets its first
    if saved_at != state.step:
        _save(state, checkpoint, ctx)
    seconds = time.perf_counter() - start
    trained = (state.step - first_step) * global_batch
    if len(set(gather_objects(ctx, weights_digest(state.generator)))) > 1:
        raise TrainingError(f"generator weights differ between ranks after training (checkpoint: {checkpoint})")
    return TrainResult(state.step, checkpoint, interrupted, seconds, trained / max(seconds, 1e-9))
