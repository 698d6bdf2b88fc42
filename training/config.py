"""Model and training configuration: what a checkpoint needs to rebuild and resume a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from digitgen.runtime.text import finite_number, quoted

AUGMENTATIONS = ("translation", "cutout")  # DiffAugment transforms, in training/augment.py
PRECISIONS = ("fp32", "bf16")  # bf16: autocast of convolutions and matrix products; weights stay fp32
# torch seeds its generators with 64 bits, and an epoch's order is seeded with seed * 100,003 + epoch
TRAIN_MAX_SEED = 2**32 - 1
DEFAULT_RUN_DIR = "runs/latest"  # where a run writes unless told (or resumed from another folder)
MAX_SIZE = 1024  # the largest noise size, class count, embedding or width a configuration may name
MIN_G_WIDTH = 2  # the generator's last block has half its width in channels: at least one
MAX_STEPS = 2**53  # steps a run may take: the learning-rate decay and the progress lines count them in floats
MAX_LR = 3.4028234663852886e38  # float32's largest, the type Adam keeps a learning rate in


def _check_whole(name: str, value: object, low: int, high: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) from ``low`` to ``high``: a checkpoint is data, so
    a float or a bool where a count belongs is refused here rather than failing inside torch."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, not {quoted(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}")


# What each annotation of a setting admits: a checkpoint is data, and a wrong type would fail deep inside torch
_ADMITS = {
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", finite_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("text", lambda v: isinstance(v, str)),
    "tuple[float, float]": ("two finite numbers", lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                            and all(map(finite_number, v))),
}  # fmt: skip


def _check_types(config: object) -> None:
    """ValueError naming the first setting of ``config`` whose value is not of its annotated type."""
    for field in fields(config):
        value, kind = getattr(config, field.name), field.type.removesuffix(" | None")
        words, admits = _ADMITS[kind]
        if not (admits(value) or (value is None and field.type.endswith(" | None"))):
            raise ValueError(f"{field.name} must be {words}, not {quoted(value)}")


def parse_policy(text: str) -> str:
    """The canonical form of a comma-separated DiffAugment policy ("" for none); ValueError names a bad part."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}: choose from {', '.join(AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation {text!r} names a transform twice")
    return ",".join(names)


def parse_digit_weights(text: str, num_classes: int = 10) -> str:
    """The canonical form of per-digit multipliers such as "7=2.5,4=2" ("4=2.5,7=2.5" sorted; "" for none).

    ValueError names a bad part: a digit outside 0..num_classes-1, one given twice, or a multiplier
    that is not a number >= 0.
    """
    weights = _digit_weights(text, num_classes)
    return ",".join(f"{label}={_shortest(weights[label])}" for label in sorted(weights))


def _shortest(number: float) -> str:
    """``number`` as written briefly ("2", "2.5") where that is exact, else in full (never rounded)."""
    brief = f"{number:g}"
    return brief if float(brief) == number else repr(number)


def _digit_weights(text: str, num_classes: int) -> dict[int, float]:
    weights: dict[int, float] = {}
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        digit, sep, value = part.partition("=")
        try:
            label, multiplier = int(digit), float(value)
        except ValueError:
            raise ValueError(f"{part!r} is not DIGIT=MULTIPLIER, e.g. 7=2.5") from None
        if not sep or not 0 <= label < num_classes:
            raise ValueError(f"{part!r} is not DIGIT=MULTIPLIER with a digit from 0 to {num_classes - 1}")
        if not (math.isfinite(multiplier) and multiplier >= 0):
            raise ValueError(f"{part!r}: the multiplier must be a number >= 0")
        if label in weights:
            raise ValueError(f"digit {label} is given twice in {text!r}")
        weights[label] = multiplier
    return weights


@dataclass(frozen=True)
class GANConfig:
    """Architecture of the conditional GAN; stored in every checkpoint."""

    latent_dim: int = 64
    num_classes: int = 10
    image_size: int = 28
    label_embed_dim: int = 16
    g_width: int = 64
    d_width: int = 64
    conditional_norm: bool = False  # class-dependent BatchNorm gain and bias in the generator

    def __post_init__(self) -> None:
        if self.image_size != 28:
            raise ValueError("only 28x28 images are supported")
        for name in ("latent_dim", "num_classes", "label_embed_dim", "g_width", "d_width"):
            _check_whole(name, getattr(self, name), MIN_G_WIDTH if name == "g_width" else 1, MAX_SIZE)
        if not isinstance(self.conditional_norm, bool):
            raise ValueError(f"conditional_norm must be true or false, not {self.conditional_norm!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a run; stored in the checkpoint so `--resume` continues it."""

    total_steps: int
    batch_size: int = 128
    lr: float = 2e-4
    lr_d: float | None = None  # the discriminator's own learning rate (two time-scales); None: lr
    betas: tuple[float, float] = (0.5, 0.999)
    ema_decay: float = 0.999
    lr_decay_steps: int = 0  # the learning rate falls linearly to zero over the last N steps
    adc_weight: float = 0.0  # weight of ADC-GAN's classifier terms in both losses; 0: no classifier
    label_weight: float = 0.0  # weight of a frozen classifier's cross-entropy in the generator's loss; 0: none
    label_weight_falls: bool = False  # the label weight follows the learning-rate decay (none: stays constant)
    label_weight_floor: float = 0.0  # where a falling label weight ends, instead of zero
    label_digit_weights: str = ""  # per-digit multipliers of the label weight, e.g. "4=2.5,7=2.5"; others: 1
    diffaugment: str = ""  # DiffAugment transforms of the discriminator's inputs, e.g. "translation,cutout"
    precision: str = "fp32"  # one of PRECISIONS
    seed: int = 0
    subset: int | None = None  # train on the first N images only (tests, quick experiments)
    train_images: int | None = None  # images the run trains on (after subset): recorded by the run, kept on resume
    train_data_sha256: str | None = None  # of those images and their labels: recorded by the run, kept on resume
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self) -> None:
        _check_types(self)
        if not 1 <= self.total_steps <= MAX_STEPS:
            raise ValueError(f"the number of steps must be from 1 to {MAX_STEPS:,}")
        if self.batch_size < 1:
            raise ValueError("batch size must be positive")
        if self.subset is not None and self.subset < 1:
            raise ValueError("subset must be positive")
        if self.train_images is not None and self.train_images < 1:
            raise ValueError("the number of training images must be positive")
        if not 0 < self.lr <= MAX_LR or (self.lr_d is not None and not 0 < self.lr_d <= MAX_LR):
            raise ValueError(f"learning rate must be positive and at most {MAX_LR:.4g}")
        if not self.adc_weight >= 0 or not self.label_weight >= 0:
            raise ValueError("the classifier weight must be zero or positive")
        if self.label_weight_falls and not self.label_weight > 0:
            raise ValueError("a falling label weight needs a positive label weight")
        floor = self.label_weight_floor
        if floor != 0 and not (self.label_weight_falls and 0 < floor < self.label_weight):
            raise ValueError("a label-weight floor needs a falling label weight above it")
        if self.label_digit_weights and not self.label_weight > 0:
            raise ValueError("per-digit label weights need a positive label weight")
        if parse_digit_weights(self.label_digit_weights) != self.label_digit_weights:
            raise ValueError(f"the per-digit label weights {self.label_digit_weights!r} are not in canonical form")
        if parse_policy(self.diffaugment) != self.diffaugment:
            raise ValueError(f"the augmentation policy {self.diffaugment!r} is not in canonical form")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.lr_decay_steps <= self.total_steps:
            raise ValueError("the learning-rate decay must span 0 to all of the run's steps")
        if not 0 <= self.seed <= TRAIN_MAX_SEED:
            raise ValueError(f"the seed must be 0 to {TRAIN_MAX_SEED}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint and log intervals must be positive")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError("Adam's betas must be two numbers in [0, 1)")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError("the EMA decay must be in [0, 1]")

    def learning_rate(self, step: int) -> float:
        """Constant ``lr``, then a linear fall to zero over the last ``lr_decay_steps`` steps."""
        return self.lr * self._decay(step)

    def discriminator_learning_rate(self, step: int) -> float:
        """``lr_d`` (or ``lr``) on the same schedule."""
        return (self.lr if self.lr_d is None else self.lr_d) * self._decay(step)

    def label_classifier_weight(self, step: int) -> float:
        """``label_weight``, constant or (``label_weight_falls``) on the learning rate's schedule, falling to
        ``label_weight_floor``."""
        if not self.label_weight_falls:
            return self.label_weight
        floor = self.label_weight_floor
        return floor + (self.label_weight - floor) * self._decay(step)

    def label_digit_multipliers(self, num_classes: int) -> list[float]:
        """The multiplier of the label weight for each digit: 1 unless ``label_digit_weights`` says otherwise."""
        weights = _digit_weights(self.label_digit_weights, num_classes)
        return [weights.get(digit, 1.0) for digit in range(num_classes)]

    def _decay(self, step: int) -> float:
        if self.lr_decay_steps == 0:
            return 1.0
        return min(1.0, (self.total_steps - step) / self.lr_decay_steps)
