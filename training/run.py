"""Set up a training run from command-line choices: fresh or resumed state, data, step budget."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from digitgen.training.config import GANConfig, TrainConfig
from digitgen.training.data import MnistTensors, load_mnist
from digitgen.training.distributed import DistContext
from digitgen.training.errors import TrainingError
from digitgen.training.loop import steps_per_epoch
from digitgen.training.state import TrainState, new_state, state_from_checkpoint


@dataclass(frozen=True)
class RunOptions:
    data_dir: str
    epochs: int | None = None
    steps: int | None = None  # wins over epochs; with neither, one epoch (or the resumed run's budget)
    batch_size: int = 128
    lr: float = 2e-4
    latent_dim: int = 64
    seed: int = 0
    subset: int | None = None
    checkpoint_every: int = 500
    resume: str | None = None
    lr_decay_epochs: float | None = None  # None: no decay, or the resumed run's own


@dataclass(frozen=True)
class PreparedRun:
    state: TrainState
    data: MnistTensors
    steps_per_epoch: int
    global_batch: int


def prepare_run(options: RunOptions, device: torch.device, ctx: DistContext) -> PreparedRun:
    """Build or restore the state and load the data.

    A resumed run keeps its own settings and subset; only the step budget and the learning-rate
    decay can be changed (the decay is a function of the step, so a resumed run stays exact).
    """
    if options.resume:
        state = state_from_checkpoint(options.resume, device, ctx.rank)
    else:
        settings = TrainConfig(
            total_steps=1,
            batch_size=options.batch_size,
            lr=options.lr,
            seed=options.seed,
            subset=options.subset,
            checkpoint_every=options.checkpoint_every,
        )
        state = new_state(GANConfig(latent_dim=options.latent_dim), settings, device, ctx.rank)
    data = load_mnist(options.data_dir)
    if state.train.subset is not None:
        data = MnistTensors(data.images[: state.train.subset], data.labels[: state.train.subset])
    global_batch = state.train.batch_size * ctx.world_size
    per_epoch = steps_per_epoch(len(data.images), global_batch)
    if options.steps is not None or options.epochs is not None or not options.resume:
        total = options.steps if options.steps is not None else (options.epochs or 1) * per_epoch
        state.train = replace(state.train, total_steps=total, lr_decay_steps=min(state.train.lr_decay_steps, total))
    if options.lr_decay_epochs is not None:
        decay = round(options.lr_decay_epochs * per_epoch)
        if decay > state.train.total_steps:
            raise TrainingError(
                f"the learning-rate decay ({decay} steps) is longer than the run ({state.train.total_steps} steps)"
            )
        state.train = replace(state.train, lr_decay_steps=decay)
    return PreparedRun(state, data, per_epoch, global_batch)
