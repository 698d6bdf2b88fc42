"""Class-conditional DCGAN: upsampling generator, spectral-norm projection discriminator."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from digitgen.training.config import GANConfig


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias are chosen by the label (de Vries et al. 2017)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class Generator(nn.Module):
    """Maps noise ``z`` (B, latent_dim) and labels (B,) to images (B, 1, 28, 28) in [-1, 1].

    With ``cfg.conditional_norm`` every BatchNorm takes its gain and bias from the label too.
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        w = cfg.g_width

        def norm(channels: int) -> nn.Module:
            if cfg.conditional_norm:
                return ConditionalBatchNorm2d(channels, cfg.num_classes)
            return nn.BatchNorm2d(channels)

        self.embed = nn.Embedding(cfg.num_classes, cfg.label_embed_dim)
        self.project = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.label_embed_dim, w * 7 * 7, bias=False),
            nn.Unflatten(1, (w, 7, 7)),  # (B, w, 7, 7)
            norm(w),
            nn.ReLU(inplace=True),
        )
        self.body = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),  # (B, 2w, 7, 7)
            norm(2 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1, bias=False),  # (B, w, 14, 14)
            norm(w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1, bias=False),  # (B, w/2, 28, 28)
            norm(w // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w // 2, 1, 3, padding=1),  # (B, 1, 28, 28)
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(labels)], dim=1)
        for layer in (*self.project, *self.body):
            h = layer(h, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(h)
        return h


class Discriminator(nn.Module):
    """Scores (image, label) pairs; higher means "real". Projection conditioning (Miyato 2018).

    ``with_classifier`` adds ADC-GAN's discriminative classifier (Hou et al. 2022): a linear head on
    the same features over ``2 * num_classes`` classes, "real digit k" (k) and "generated digit k"
    (``num_classes + k``).
    """

    def __init__(self, cfg: GANConfig, with_classifier: bool = False) -> None:
        super().__init__()
        w = cfg.d_width
        features = 4 * w * 4 * 4
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, w, 4, stride=2, padding=1)),  # (B, w, 14, 14)
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)),  # (B, 2w, 7, 7)
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)),  # (B, 4w, 4, 4)
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),  # (B, 4w*16)
        )
        self.score = spectral_norm(nn.Linear(features, 1))
        self.class_embed = spectral_norm(nn.Embedding(cfg.num_classes, features))
        self.classifier = spectral_norm(nn.Linear(features, 2 * cfg.num_classes)) if with_classifier else None

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, with_classes: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,); with ``with_classes`` also the classifier's logits (B, 2 * num_classes)."""
        h = self.features(images)
        projection = (self.class_embed(labels) * h).sum(dim=1)
        scores = self.score(h).squeeze(1) + projection
        if not with_classes:
            return scores
        if self.classifier is None:
            raise ValueError("this discriminator has no classifier head")
        return scores, self.classifier(h)
