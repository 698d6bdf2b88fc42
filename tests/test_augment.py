"""DiffAugment: each transform exactly, the policy's spelling, and the training step's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from digitgen.training import loop
from digitgen.training.augment import BACKGROUND, cutout, diff_augment, translate
from digitgen.training.config import TrainConfig, parse_policy
from digitgen.training.data import load_mnist
from digitgen.training.loop import train, train_step
from digitgen.training.state import new_state, state_from_checkpoint
from tests.conftest import TINY_MODEL
from tests.test_training import _weights


def _digits(batch: int = 64) -> torch.Tensor:
    """Distinct pixel values everywhere (none equal to the background), so every move is visible."""
    return torch.arange(batch * 28 * 28, dtype=torch.float32).view(batch, 1, 28, 28) / (batch * 784) + 0.001


def _replay(policy_fn, images: torch.Tensor, seed: int, draws: int) -> list[torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    out = policy_fn(images, rng)
    rng = torch.Generator().manual_seed(seed)
    return [out, *(torch.randint(*draw, (images.shape[0], 1, 1), generator=rng).flatten() for draw in draws)]


def test_translation_shifts_each_image_by_its_own_draw_and_fills_with_background() -> None:
    images = _digits()
    shifted, dy, dx = _replay(translate, images, seed=1, draws=[(-4, 5), (-4, 5)])
    assert {int(v) for v in dy} | {int(v) for v in dx} <= set(range(-4, 5))
    assert len({(int(a), int(b)) for a, b in zip(dy, dx, strict=True)}) > 10  # each image its own shift
    for image, out, y, x in zip(images, shifted, dy.tolist(), dx.tolist(), strict=True):
        expected = torch.full_like(image, BACKGROUND)
        src = image[:, max(0, -y) : 28 - max(0, y), max(0, -x) : 28 - max(0, x)]
        expected[:, max(0, y) : 28 + min(0, y), max(0, x) : 28 + min(0, x)] = src
        assert torch.equal(out, expected), (y, x)


def test_cutout_erases_one_square_of_half_the_side_to_background() -> None:
    images = _digits()
    erased, cy, cx = _replay(cutout, images, seed=2, draws=[(0, 29), (0, 29)])
    for image, out, y, x in zip(images, erased, cy.tolist(), cx.tolist(), strict=True):
        expected = image.clone()
        expected[:, max(0, y - 7) : y + 7, max(0, x - 7) : x + 7] = BACKGROUND
        assert torch.equal(out, expected), (y, x)
    assert (erased == BACKGROUND).sum(dim=(1, 2, 3)).max() == 14 * 14  # a square wholly inside: 196 pixels


def test_the_transforms_pass_gradients_to_the_pixels_they_keep() -> None:
    images = _digits(8).requires_grad_()
    diff_augment(images, "translation,cutout", torch.Generator().manual_seed(3)).sum().backward()
    kept = images.grad.sum().item()
    assert 0 < kept < images.numel()  # some pixels reach the output, some are shifted out or erased
    assert set(images.grad.unique().tolist()) <= {0.0, 1.0}


def test_an_empty_policy_is_the_identity_and_draws_nothing() -> None:
    images, rng = _digits(4), torch.Generator().manual_seed(4)
    before = rng.get_state()
    assert diff_augment(images, "", rng) is images
    assert torch.equal(rng.get_state(), before)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("translation,cutout", "translation,cutout"), (" cutout , translation ", "cutout,translation"), ("", "")],
)
def test_policy_spelling_is_canonicalised(text: str, canonical: str) -> None:
    assert parse_policy(text) == canonical


@pytest.mark.parametrize(("text", "words"), [("color", "unknown augmentation 'color'"), ("cutout,cutout", "twice")])
def test_a_bad_policy_is_refused_in_words(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_policy(text)
    with pytest.raises(ValueError):
        TrainConfig(total_steps=1, diffaugment=text)


def test_the_training_step_shows_the_discriminator_only_augmented_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, str]] = []

    def marked(images: torch.Tensor, policy: str, rng: torch.Generator) -> torch.Tensor:
        seen.append((images.shape[0], policy))
        return torch.full_like(images, 0.5)  # a constant the discriminator could not get otherwise

    monkeypatch.setattr(loop, "diff_augment", marked)
    state = new_state(TINY_MODEL, TrainConfig(total_steps=10, batch_size=8, diffaugment="cutout"), torch.device("cpu"))
    inputs: list[torch.Tensor] = []
    state.discriminator.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
    real, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    train_step(state, real, labels, state.generator, state.discriminator)
    assert seen == [(16, "cutout"), (8, "cutout")]  # real and fake together, then the generator's digits
    assert len(inputs) == 2 and all(torch.all(x == 0.5) for x in inputs)


def test_a_resumed_augmented_run_matches_an_uninterrupted_one(tmp_path: Path, tiny_mnist: Path) -> None:
    data = load_mnist(tiny_mnist, download=False)
    settings = TrainConfig(total_steps=8, batch_size=16, diffaugment="translation,cutout")
    plain = train(
        new_state(TINY_MODEL, TrainConfig(total_steps=8, batch_size=16), torch.device("cpu")), data, tmp_path / "plain"
    )
    straight = train(new_state(TINY_MODEL, settings, torch.device("cpu")), data, tmp_path / "straight").checkpoint
    stops = iter([False] * 2 + [True])
    first = train(
        new_state(TINY_MODEL, settings, torch.device("cpu")),
        data,
        tmp_path / "resumed",
        should_stop=lambda: next(stops),
    )
    assert first.interrupted and first.step == 3
    resumed = train(state_from_checkpoint(str(first.checkpoint), torch.device("cpu")), data, tmp_path / "resumed")
    expected, actual, unaugmented = _weights(straight), _weights(resumed.checkpoint), _weights(plain.checkpoint)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not all(torch.equal(expected[k], unaugmented[k]) for k in expected)  # the policy changed the run
