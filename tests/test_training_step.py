"""One training step in detail: the hinge losses, the classifier terms, each update's direction, the EMA generator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from digitgen.training.classifier import Classifier
from digitgen.training.config import TrainConfig
from digitgen.training.errors import NonFiniteLossError
from digitgen.training.loop import train_step
from digitgen.training.state import TrainState, new_state
from tests.conftest import TINY_MODEL

BATCH = 16


def _state() -> TrainState:
    return new_state(TINY_MODEL, TrainConfig(total_steps=10_000, batch_size=BATCH), torch.device("cpu"))


def _real_batch() -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, 1, 28, 28, generator=rng) * 2 - 1, torch.arange(BATCH) % 10


def _step(state: TrainState) -> dict[str, float]:
    real, labels = _real_batch()
    return train_step(state, real, labels, state.generator, state.discriminator)


def _scores(d: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Discriminator scores from a frozen copy (eval mode: spectral norm's power iteration stays put)."""
    with torch.no_grad():
        return copy.deepcopy(d).eval()(images, labels)


def _noise_stream(state: TrainState) -> torch.Generator:
    """A copy of the run's noise generator, to replay what the next step will draw."""
    noise = torch.Generator()
    noise.set_state(state.noise_rng.get_state())
    return noise


def _discriminator_step_fakes(state: TrainState, labels: torch.Tensor) -> torch.Tensor:
    """The generated digits the next step's discriminator update will see beside the real ones."""
    z = torch.randn(BATCH, TINY_MODEL.latent_dim, generator=_noise_stream(state))
    with torch.no_grad():
        return copy.deepcopy(state.generator)(z, labels)


def _generator_step_draws(state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and labels the next step's generator update will draw."""
    noise = _noise_stream(state)
    torch.randn(BATCH, TINY_MODEL.latent_dim, generator=noise)  # the discriminator step's draw
    z = torch.randn(BATCH, TINY_MODEL.latent_dim, generator=noise)
    return z, torch.randint(0, TINY_MODEL.num_classes, (BATCH,), generator=noise)


def test_discriminator_step_uses_the_hinge_loss_with_real_and_fake_in_their_places() -> None:
    state = _state()
    real, labels = _real_batch()
    fake = _discriminator_step_fakes(state, labels)
    with torch.no_grad():
        d_real, d_fake = copy.deepcopy(state.discriminator)(torch.cat([real, fake]), torch.cat([labels, labels])).split(
            BATCH
        )
    before_real, before_fake = _scores(state.discriminator, real, labels), _scores(state.discriminator, fake, labels)

    metrics = _step(state)

    expected = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    assert metrics["loss_d"] == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["d_real"] == pytest.approx(d_real.mean().item(), abs=1e-6)
    assert metrics["d_fake"] == pytest.approx(d_fake.mean().item(), abs=1e-6)
    after_real, after_fake = _scores(state.discriminator, real, labels), _scores(state.discriminator, fake, labels)
    assert after_real.mean() > before_real.mean()  # the update scores real digits higher
    assert after_fake.mean() < before_fake.mean()  # and the generator's lower


def test_generator_step_raises_the_discriminators_score_of_its_digits() -> None:
    state = _state()
    z, labels = _generator_step_draws(state)
    generator_before = copy.deepcopy(state.generator)

    metrics = _step(state)

    with torch.no_grad():
        before = _scores(state.discriminator, copy.deepcopy(generator_before)(z, labels), labels)
        after = _scores(state.discriminator, copy.deepcopy(state.generator)(z, labels), labels)
    assert after.mean() > before.mean()
    assert metrics["loss_g"] == pytest.approx(-before.mean().item(), abs=0.05)  # minus the score, not plus


# decay = min(ema_decay, (1 + step) / (10 + step)): a short warm-up, then the configured 0.999
@pytest.mark.parametrize(("step", "decay"), [(0, 0.1), (1, 2 / 11), (20, 0.7), (5_000, 0.999)])
def test_ema_generator_moves_towards_the_live_one_by_the_decay(step: int, decay: float) -> None:
    state = _state()
    _step(state)  # the live generator and the average now differ
    state.step = step
    ema_before = [p.clone() for p in state.generator_ema.parameters()]

    _step(state)

    live, ema = list(state.generator.parameters()), list(state.generator_ema.parameters())
    for before, p, e in zip(ema_before, live, ema, strict=True):
        assert torch.allclose(e, before + (1 - decay) * (p - before), rtol=0, atol=1e-6)
    assert not all(torch.equal(e, b) for e, b in zip(ema, ema_before, strict=True))  # it moved
    assert not all(torch.allclose(e, p, rtol=0, atol=1e-7) for e, p in zip(ema, live, strict=True))  # not the live one
    assert all(e.grad_fn is None and not e.requires_grad for e in ema)  # updated outside autograd
    for e, b in zip(state.generator_ema.buffers(), state.generator.buffers(), strict=True):
        assert torch.equal(e, b)  # BatchNorm statistics are copied, not averaged


def _adc_state(weight: float = 0.5) -> TrainState:
    settings = TrainConfig(total_steps=10_000, batch_size=BATCH, adc_weight=weight)
    return new_state(TINY_MODEL, settings, torch.device("cpu"))


def test_without_the_adc_weight_the_discriminator_has_no_classifier() -> None:
    state = _state()
    assert state.discriminator.classifier is None
    real, labels = _real_batch()
    with pytest.raises(ValueError, match="no classifier head"):
        state.discriminator(real, labels, with_classes=True)


def test_adc_discriminator_step_adds_the_classifier_loss_on_real_k_and_generated_k() -> None:
    state = _adc_state(0.5)
    real, labels = _real_batch()
    fake = _discriminator_step_fakes(state, labels)
    with torch.no_grad():
        scores, logits = copy.deepcopy(state.discriminator)(
            torch.cat([real, fake]), torch.cat([labels, labels]), with_classes=True
        )
    assert logits.shape == (2 * BATCH, 2 * TINY_MODEL.num_classes)
    d_real, d_fake = scores.split(BATCH)
    hinge = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    classes = F.cross_entropy(logits, torch.cat([labels, labels + TINY_MODEL.num_classes]))

    metrics = _step(state)

    assert metrics["loss_d"] == pytest.approx((hinge + 0.5 * classes).item(), abs=1e-5)
    assert classes.item() > 0.1  # the classifier term is not negligible, so the check above can fail


def test_adc_generator_step_pulls_its_digits_to_real_k_and_away_from_generated_k() -> None:
    state = _adc_state(2.0)
    z, labels = _generator_step_draws(state)
    generator_before = copy.deepcopy(state.generator)

    metrics = _step(state)

    d = copy.deepcopy(state.discriminator).eval()  # the discriminator as the generator step saw it
    pairs = torch.stack([labels, labels + TINY_MODEL.num_classes], dim=1)  # "real k", "generated k"
    with torch.no_grad():
        scores, logits = d(copy.deepcopy(generator_before)(z, labels), labels, with_classes=True)
        _, logits_after = d(copy.deepcopy(state.generator)(z, labels), labels, with_classes=True)
    real_k, generated_k = logits.gather(1, pairs).unbind(1)
    assert metrics["loss_g"] == pytest.approx((-scores.mean() + 2.0 * (generated_k - real_k).mean()).item(), abs=0.05)
    real_k_after, generated_k_after = logits_after.gather(1, pairs).unbind(1)
    assert (real_k_after - generated_k_after).mean() > (real_k - generated_k).mean()  # "real k" gained


def _label_state(weight: float, **schedule: object) -> TrainState:
    torch.manual_seed(3)
    settings = TrainConfig(**{"total_steps": 10_000, "batch_size": BATCH, "label_weight": weight, **schedule})
    return new_state(TINY_MODEL, settings, torch.device("cpu"), label_classifiers=[Classifier()])


def _cross_entropy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(classifier(images.add(1.0).mul(0.5))[0], labels)


@pytest.mark.parametrize(
    ("weight", "schedule", "step"),
    [
        (2.0, {}, 0),
        (4.0, {"total_steps": 10, "lr_decay_steps": 4, "label_weight_falls": True}, 8),  # halfway down: 2.0
        (3.0, {"total_steps": 10, "lr_decay_steps": 4, "label_weight_falls": True, "label_weight_floor": 1.0}, 8),
    ],
)
def test_label_classifier_adds_its_weighted_cross_entropy_to_the_generator_loss_and_stays_frozen(
    weight: float, schedule: dict[str, object], step: int
) -> None:
    state = _label_state(weight, **schedule)
    state.step = step
    classifier = copy.deepcopy(state.label_classifiers[0])
    z, labels = _generator_step_draws(state)
    generated = copy.deepcopy(state.generator)(z, labels)

    metrics = _step(state)

    scores = _scores(state.discriminator, generated, labels)
    label_term = _cross_entropy(classifier, generated, labels)
    assert label_term.item() > 1.0  # an untrained classifier: the term is large, so the check below can fail
    assert metrics["loss_g"] == pytest.approx((-scores.mean() + 2.0 * label_term).item(), abs=0.05)
    assert state.label_classifiers[0].training is False  # BatchNorm statistics and dropout stay fixed
    frozen, now = classifier.state_dict(), state.label_classifiers[0].state_dict()
    assert all(torch.equal(frozen[name], now[name]) for name in frozen)


def test_per_digit_multipliers_scale_each_generated_digit_s_label_term() -> None:
    state = _label_state(2.0, label_digit_weights="0=0,1=0,2=0,3=0,4=0,5=0,6=0,7=5,8=0")  # 7: 5x, 9: 1x
    classifier = copy.deepcopy(state.label_classifiers[0])
    z, labels = _generator_step_draws(state)
    generated = copy.deepcopy(state.generator)(z, labels)
    assert 0 < int((labels == 7).sum()) < BATCH  # the batch mixes sevens and others

    metrics = _step(state)

    with torch.no_grad():
        each = F.cross_entropy(classifier(generated.add(1.0).mul(0.5))[0], labels, reduction="none")
    label_term = (each * (5.0 * (labels == 7) + (labels == 9))).mean()
    assert abs(label_term - each.mean()) > 0.2  # far from the unweighted term, so the check below can fail
    scores = _scores(state.discriminator, generated, labels)
    assert metrics["loss_g"] == pytest.approx((-scores.mean() + 2.0 * label_term).item(), abs=0.05)


def _generator_after_one_step(state: TrainState) -> list[torch.Tensor]:
    _step(state)
    return [p.detach().clone() for p in state.generator.parameters()]


@pytest.mark.parametrize(
    ("digit_weights", "moves"),
    [("", True), ("7=5", True), (",".join(f"{digit}=0" for digit in range(10)), False)],
)
def test_the_label_term_s_gradient_reaches_the_generator_unless_every_digit_s_multiplier_is_zero(
    digit_weights: str, moves: bool
) -> None:
    """The same step with and without the frozen classifier: only the generator's update may differ."""
    settings = TrainConfig(total_steps=10_000, batch_size=BATCH)
    without = new_state(TINY_MODEL, settings, torch.device("cpu"))
    with_label = _label_state(2.0, label_digit_weights=digit_weights)
    plain = _generator_after_one_step(without)
    steered = _generator_after_one_step(with_label)
    same = all(torch.equal(a, b) for a, b in zip(plain, steered, strict=True))
    assert same is not moves
    assert all(  # the discriminator's step does not involve the classifier
        torch.equal(a, b)
        for a, b in zip(without.discriminator.parameters(), with_label.discriminator.parameters(), strict=True)
    )


def test_several_label_classifiers_add_their_mean_cross_entropy() -> None:
    state = _label_state(2.0)
    torch.manual_seed(4)
    second = Classifier().eval()
    with torch.no_grad():
        second.head.bias[0] = 5.0  # reads most digits as zeros: a reading unlike the first classifier's
    state.label_classifiers = (*state.label_classifiers, second)
    first = copy.deepcopy(state.label_classifiers[0])
    z, labels = _generator_step_draws(state)
    generated = copy.deepcopy(state.generator)(z, labels)

    metrics = _step(state)

    terms = [_cross_entropy(classifier, generated, labels) for classifier in (first, second)]
    assert abs(terms[0] - terms[1]) > 0.1  # two different readings, so that their mean differs from either
    scores = _scores(state.discriminator, generated, labels)
    assert metrics["loss_g"] == pytest.approx((-scores.mean() + 2.0 * (terms[0] + terms[1]) / 2).item(), abs=0.02)


def test_label_classifier_pulls_the_generated_digits_to_their_labels() -> None:
    state = _label_state(50.0)
    z, labels = _generator_step_draws(state)
    generator_before = copy.deepcopy(state.generator)

    _step(state)

    with torch.no_grad():
        before = _cross_entropy(state.label_classifiers[0], generator_before(z, labels), labels)
        after = _cross_entropy(state.label_classifiers[0], copy.deepcopy(state.generator)(z, labels), labels)
    assert after < before


class _RecordingClassifier(torch.nn.Module):
    """A stand-in that keeps what it is shown (a linear map, so gradients flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(images.detach().clone())
        return self.linear(images.flatten(1)), images.flatten(1)


def test_label_classifier_sees_the_generated_digits_as_pixels_in_0_1() -> None:
    settings = TrainConfig(total_steps=10_000, batch_size=BATCH, label_weight=1.0)
    recorder = _RecordingClassifier()
    state = new_state(TINY_MODEL, settings, torch.device("cpu"), label_classifiers=[recorder])
    z, labels = _generator_step_draws(state)
    with torch.no_grad():
        generated = copy.deepcopy(state.generator)(z, labels)

    _step(state)

    assert len(recorder.seen) == 1  # the generator step only
    torch.testing.assert_close(recorder.seen[0], (generated + 1) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("weight", "classifiers"), [(0.5, []), (0.0, [Classifier()])])
def test_a_label_classifier_comes_with_a_weight_and_only_with_one(weight: float, classifiers: list[Classifier]) -> None:
    settings = TrainConfig(total_steps=10, label_weight=weight)
    with pytest.raises(ValueError, match="label classifier goes with a positive label weight"):
        new_state(TINY_MODEL, settings, torch.device("cpu"), label_classifiers=classifiers)


def test_each_update_takes_its_learning_rate_from_the_schedule_and_the_step_advances_by_one() -> None:
    settings = TrainConfig(total_steps=10, batch_size=BATCH, lr=2e-4, lr_d=4e-4, lr_decay_steps=4)
    state = new_state(TINY_MODEL, settings, torch.device("cpu"))
    state.step = 8  # halfway down the decay: 2 of its 4 steps left

    _step(state)

    assert [group["lr"] for group in state.opt_g.param_groups] == [pytest.approx(1e-4)]
    assert [group["lr"] for group in state.opt_d.param_groups] == [pytest.approx(2e-4)]
    assert state.step == 9


def _poisoned(module: torch.nn.Module) -> None:
    with torch.no_grad():
        next(module.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("network", ["discriminator", "generator"])
def test_a_non_finite_loss_names_its_network_and_step_and_is_not_applied(network: str) -> None:
    state = _label_state(1.0)
    state.step = 6
    # a NaN discriminator spoils its own loss first; a NaN label classifier only the generator's
    _poisoned(state.discriminator if network == "discriminator" else state.label_classifiers[0])
    weights = [p.detach().clone() for p in state.generator.parameters()]

    with pytest.raises(NonFiniteLossError) as error:
        _step(state)

    assert str(error.value) == (
        f"{network} loss is nan at step 7; stopped before applying it (the last checkpoint this run saved, if any, "
        "is intact and can be exported; to train on, start over with --overwrite and a lower --lr)"
    )
    assert all(torch.equal(before, now) for before, now in zip(weights, state.generator.parameters(), strict=True))
