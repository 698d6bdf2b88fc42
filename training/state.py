"""Everything a run needs to continue exactly where it stopped, and its checkpoint form."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from digitgen.runtime.text import MAX_QUOTED, cut
from digitgen.training.checkpoint import (
    FORMAT_VERSION,
    first_problem,
    load_checkpoint,
    load_optimizer_state,
    load_weights,
)
from digitgen.training.classifier import Classifier
from digitgen.training.config import GANConfig, TrainConfig
from digitgen.training.errors import CheckpointError
from digitgen.training.models import Discriminator, Generator


@dataclass
class TrainState:
    """Everything a training run carries from step to step, and saves in a checkpoint."""

    config: GANConfig
    train: TrainConfig
    generator: Generator
    generator_ema: Generator
    discriminator: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    noise_rng: torch.Generator  # CPU generator for z and fake labels: same draws on any device
    step: int = 0
    # frozen; their mean cross-entropy steers the generator (label_weight)
    label_classifiers: tuple[Classifier, ...] = ()
    saved_by: int = 1  # processes that wrote the checkpoint this state was resumed from
    saved_with: dict[str, Any] | None = None  # its numerics(); None in a checkpoint from before they were recorded


def numerics() -> dict[str, Any]:
    """What a CPU run's bits depend on beyond its checkpoint: torch's build and its intra-op threads (the sums of
    a matrix product are split among them)."""
    # the version as a str: torch.load(weights_only=True) refuses the TorchVersion class it is
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads()}


def _optimizer(module: torch.nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas)


def noise_generator(seed: int, rank: int = 0) -> torch.Generator:
    """Each process of a distributed run draws its own noise stream."""
    return torch.Generator().manual_seed(seed + 1 + 1_000_003 * rank)


def new_state(
    config: GANConfig,
    train: TrainConfig,
    device: torch.device,
    rank: int = 0,
    label_classifiers: Sequence[Classifier] = (),
) -> TrainState:
    """Fresh networks initialised from ``train.seed`` (identical on every rank); ``label_classifiers`` (one or
    more) go with a positive ``train.label_weight``, and only with one (a ``ValueError`` otherwise)."""
    if bool(label_classifiers) != (train.label_weight > 0):
        raise ValueError("a label classifier goes with a positive label weight, and only with one")
    frozen = tuple(classifier.to(device).eval().requires_grad_(False) for classifier in label_classifiers)
    torch.manual_seed(train.seed)
    generator = Generator(config).to(device)
    discriminator = Discriminator(config, with_classifier=train.adc_weight > 0).to(device)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    noise_rng = noise_generator(train.seed, rank)
    return TrainState(
        config,
        train,
        generator,
        generator_ema,
        discriminator,
        _optimizer(generator, train.learning_rate(0), train.betas),
        _optimizer(discriminator, train.discriminator_learning_rate(0), train.betas),
        noise_rng,
        label_classifiers=frozen,
    )


def state_to_checkpoint(state: TrainState, noise_states: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Checkpoint form; ``noise_states`` holds every rank's noise RNG state in a distributed run."""
    classifiers = [classifier.state_dict() for classifier in state.label_classifiers]
    label_classifiers = {"label_classifiers": classifiers} if classifiers else {}
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(state.config),
        "train": asdict(state.train),
        "generator": state.generator.state_dict(),
        "generator_ema": state.generator_ema.state_dict(),
        "discriminator": state.discriminator.state_dict(),
        "optimizers": {"generator": state.opt_g.state_dict(), "discriminator": state.opt_d.state_dict()},
        "step": state.step,
        "rng": {"noise": noise_states or [state.noise_rng.get_state()]},
        "numerics": numerics(),
        **label_classifiers,
    }


def _dataclass_from(cls: type, values: Any, what: str) -> Any:
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {what} is not a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        named = cut(", ".join(sorted(map(str, unknown))), MAX_QUOTED)
        raise CheckpointError(f"checkpoint {what} has unknown fields: {named}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {what} is invalid: {exc}") from exc


def config_from_checkpoint(payload: dict[str, Any]) -> GANConfig:
    """The model configuration a checkpoint records, checked field by field."""
    return _dataclass_from(GANConfig, payload["config"], "config")


def load_generator(path: str) -> tuple[Generator, GANConfig, dict[str, Any]]:
    """Rebuild the EMA generator from a checkpoint or release weights alone; returns it in eval mode, its
    configuration, and the payload with its training settings checked and complete."""
    payload = load_weights(path)
    config = config_from_checkpoint(payload)
    train = _dataclass_from(TrainConfig, payload["train"], "training settings")
    generator = Generator(config)
    _load_weights(generator, payload["generator_ema"], "generator")
    _refuse_non_finite(generator, path)
    return generator.eval(), config, {**payload, "train": asdict(train)}


def _refuse_non_finite(generator: Generator, path: str) -> None:
    """A generator with a NaN or infinite weight (or BatchNorm statistic) draws no digit: say so, not that its
    export differs from PyTorch."""
    for name, tensor in generator.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: the generator's {name} holds NaN or infinite values (a run that diverged); use a checkpoint "
                "from before"
            )


def _load_weights(module: torch.nn.Module, weights: Any, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        problem = first_problem(exc)
        raise CheckpointError(f"{what} weights do not match the checkpoint's configuration: {problem}") from exc


def _label_classifiers(payload: dict[str, Any], path: str) -> tuple[Classifier, ...]:
    """The frozen classifiers a checkpoint keeps (one, under its older key, in checkpoints from before ensembles)."""
    weights = payload.get("label_classifiers", [payload["label_classifier"]] if "label_classifier" in payload else [])
    if not isinstance(weights, list) or not weights:
        raise CheckpointError(f"{path}: a label weight is set but the checkpoint holds no label classifier")
    classifiers = tuple(Classifier() for _ in weights)
    for classifier, state_dict in zip(classifiers, weights, strict=True):
        _load_weights(classifier, state_dict, "label classifier")
    return classifiers


def state_from_checkpoint(path: str, device: torch.device, rank: int = 0) -> TrainState:
    """Restore a run as it was saved: weights, optimizers, noise RNG and step.

    Exact when resumed with the number of processes that saved it; a rank the checkpoint has no
    noise state for gets a fresh stream.
    """
    payload = load_checkpoint(path)
    config = config_from_checkpoint(payload)
    train = _dataclass_from(TrainConfig, payload["train"], "training settings")
    label_classifiers = _label_classifiers(payload, path) if train.label_weight > 0 else ()
    state = new_state(config, train, device, rank, label_classifiers)
    _load_weights(state.generator, payload["generator"], "generator")
    _load_weights(state.generator_ema, payload["generator_ema"], "EMA generator")
    _load_weights(state.discriminator, payload["discriminator"], "discriminator")
    try:
        for optimizer, name in ((state.opt_g, "generator"), (state.opt_d, "discriminator")):
            load_optimizer_state(optimizer, payload["optimizers"][name], name)
        noise_states = payload["rng"]["noise"]
        if not isinstance(noise_states, list) or not noise_states:
            raise ValueError(f"no noise generator's state: {noise_states!r}")
        if rank < len(noise_states):
            state.noise_rng.set_state(noise_states[rank])
        state.saved_by = len(noise_states)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer or RNG state is invalid ({first_problem(exc)})") from exc
    state.step = int(payload["step"])
    saved_with = payload.get("numerics")
    state.saved_with = saved_with if isinstance(saved_with, dict) else None
    return state
