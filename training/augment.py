"""DiffAugment: random, differentiable transforms of every digit the discriminator sees, real or generated.

The discriminator then cannot memorise the training images, and the generator's gradients pass
through the same transforms (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN
Training", 2020). Digits are in [-1, 1]; uncovered or erased pixels become background (-1).
"""

from __future__ import annotations

import torch

BACKGROUND = -1.0
TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the side: 4 pixels of 28
CUTOUT_RATIO = 0.5  # erase a square of half the side: 14 x 14 pixels


def diff_augment(images: torch.Tensor, policy: str, rng: torch.Generator) -> torch.Tensor:
    """Apply ``policy``'s transforms in order, each with its own draw per image from ``rng`` (a CPU generator)."""
    for name in policy.split(",") if policy else ():
        images = _TRANSFORMS[name](images, rng)
    return images


def _side(size: int, ratio: float) -> int:
    return int(size * ratio + 0.5)


def translate(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-s, s] pixels, filling what is uncovered with background."""
    batch, _, height, width = images.shape
    shift = _side(height, TRANSLATION_RATIO)
    dy, dx = (torch.randint(-shift, shift + 1, (batch, 1, 1), generator=rng).to(images.device) for _ in range(2))
    rows = torch.arange(height, device=images.device).view(1, height, 1) - dy + shift
    cols = torch.arange(width, device=images.device).view(1, 1, width) - dx + shift
    padded = torch.nn.functional.pad(images, [shift] * 4, value=BACKGROUND)
    index = torch.arange(batch, device=images.device).view(batch, 1, 1)
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2)


def cutout(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Erase a square of each image to background, centred anywhere in it (clipped at the border)."""
    batch, _, height, width = images.shape
    size = _side(height, CUTOUT_RATIO)
    top, left = (
        torch.randint(0, extent + 1 - size % 2, (batch, 1, 1), generator=rng).to(images.device) - size // 2
        for extent in (height, width)
    )
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside.unsqueeze(1), BACKGROUND)


_TRANSFORMS = {"translation": translate, "cutout": cutout}
