"""Model, data, checkpoint and loop behaviour on tiny data."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from digitgen.runtime.errors import OutputError
from digitgen.runtime.idx import MNIST_FILES
from digitgen.training.checkpoint import (
    FORMAT_VERSION,
    WEIGHTS_KEYS,
    first_problem,
    load_checkpoint,
    load_weights,
    read_data_file,
    same_kinds,
    save_checkpoint,
    write_payload,
)
from digitgen.training.classifier import Classifier
from digitgen.training.config import GANConfig, TrainConfig, parse_digit_weights
from digitgen.training.data import load_mnist
from digitgen.training.errors import (
    CheckpointError,
    DatasetCorruptError,
    DatasetNotFoundError,
    NonFiniteLossError,
    TrainingError,
)
from digitgen.training.loop import _append_metrics, train
from digitgen.training.models import ConditionalBatchNorm2d, Discriminator, Generator
from digitgen.training.run import check_precision
from digitgen.training.state import (
    TrainState,
    config_from_checkpoint,
    new_state,
    state_from_checkpoint,
    state_to_checkpoint,
)
from tests.conftest import TINY_MODEL, train_tiny
from tests.helpers import run_metrics, write_tiny_mnist


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_checkpoint_write_on_a_full_disk_says_so_in_the_systems_words() -> None:
    """/dev/full answers every write with ENOSPC; torch's own writer had said "unexpected pos ..." instead."""
    with pytest.raises(OutputError) as refused:
        write_payload({"weights": torch.zeros(1000)}, Path("/dev/full"), "runs/a/checkpoint.pt")
    assert str(refused.value) == "cannot write runs/a/checkpoint.pt: No space left on device"


def test_a_metrics_line_the_disk_cannot_take_is_cut_off_and_the_file_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A full disk had left half a line (no longer JSON Lines) and said "No space left on device" of no file."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    opened, room = Path.open, metrics.stat().st_size + 10

    class FullAfter10Bytes(io.FileIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if self.tell() >= room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(bytes(data)[: room - self.tell()])

    monkeypatch.setattr(
        Path,
        "open",
        lambda path, mode="r", **kw: FullAfter10Bytes(path, "a") if path == metrics else opened(path, mode, **kw),
    )
    with pytest.raises(OutputError) as refused:
        _append_metrics(metrics, {"step": 3, "loss_d": 0.5362026095390})
    monkeypatch.undo()
    assert str(refused.value) == f"cannot write {metrics}: No space left on device"
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    _append_metrics(metrics, {"step": 3})
    assert metrics.read_text().splitlines()[-1] == '{"step": 3}'


def test_generator_and_discriminator_shapes() -> None:
    g, d = Generator(TINY_MODEL), Discriminator(TINY_MODEL)
    z, labels = torch.randn(5, TINY_MODEL.latent_dim), torch.arange(5)
    images = g(z, labels)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images, labels).shape == (5,)


def test_conditional_norm_gives_every_generator_block_the_label() -> None:
    plain = Generator(TINY_MODEL)
    assert not any(isinstance(m, ConditionalBatchNorm2d) for m in plain.modules())
    g = Generator(GANConfig(latent_dim=8, g_width=16, d_width=16, conditional_norm=True)).eval()
    norms = [m for m in g.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(norms) == 4  # after the projection and after each of the three hidden convolutions
    z, labels = torch.randn(4, 8), torch.tensor([3, 5, 3, 5])
    with torch.no_grad():
        before = g(z, labels)
        for norm in norms:
            norm.bias.weight[3] += 0.5
        after = g(z, labels)
    assert not torch.allclose(before[labels == 3], after[labels == 3])
    assert torch.equal(before[labels == 5], after[labels == 5])


def test_discriminator_learning_rate_follows_the_same_schedule(tmp_path: Path, tiny_mnist: Path) -> None:
    settings = TrainConfig(total_steps=100, lr=1.0, lr_d=3.0, lr_decay_steps=40)
    assert [settings.discriminator_learning_rate(s) for s in (0, 80)] == [3.0, 1.5]
    assert TrainConfig(total_steps=100, lr=1.0).discriminator_learning_rate(80) == 1.0
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(total_steps=1, lr_d=0.0)
    payload = load_checkpoint(train_tiny(tmp_path, tiny_mnist, steps=3, lr=1e-4, lr_d=5e-4))
    assert payload["optimizers"]["generator"]["param_groups"][0]["lr"] == 1e-4
    assert payload["optimizers"]["discriminator"]["param_groups"][0]["lr"] == 5e-4


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        GANConfig(latent_dim=0)
    with pytest.raises(ValueError, match=r"^only 28x28 images are supported$"):
        GANConfig(image_size=32)
    smallest = GANConfig(latent_dim=1, label_embed_dim=1, g_width=2, d_width=1)
    assert Generator(smallest)(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"^g_width must be from 2 to 1024$"):  # no channel in its last block
        GANConfig(g_width=1)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(total_steps=0)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(total_steps=10, lr_decay_steps=11)
    with pytest.raises(ValueError, match="classifier weight"):
        TrainConfig(total_steps=10, adc_weight=-0.1)
    with pytest.raises(ValueError, match=r"^a falling label weight needs a positive label weight$"):
        TrainConfig(total_steps=10, label_weight_falls=True)
    for floor, falls in ((0.1, False), (0.2, True), (0.3, True), (-0.1, True)):
        with pytest.raises(ValueError, match=r"^a label-weight floor needs a falling label weight above it$"):
            TrainConfig(total_steps=10, label_weight=0.2, label_weight_falls=falls, label_weight_floor=floor)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        (" 7=2.5, 4=2 ", "4=2,7=2.5"),
        ("0=0,9=1.50", "0=0,9=1.5"),
        ("3=1e1,", "3=10"),
        ("7=2.1234567,4=1234567", "4=1234567.0,7=2.1234567"),  # never rounded to 6 digits
    ],
)
def test_per_digit_label_weights_have_one_canonical_form(text: str, canonical: str) -> None:
    assert parse_digit_weights(text) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("7", "'7' is not DIGIT=MULTIPLIER, e.g. 7=2.5"),
        ("10=2", "'10=2' is not DIGIT=MULTIPLIER with a digit from 0 to 9"),
        ("-1=2", "'-1=2' is not DIGIT=MULTIPLIER with a digit from 0 to 9"),
        ("seven=2", "'seven=2' is not DIGIT=MULTIPLIER, e.g. 7=2.5"),
        ("7=x", "'7=x' is not DIGIT=MULTIPLIER, e.g. 7=2.5"),
        ("7=-1", "'7=-1': the multiplier must be a number >= 0"),
        ("7=nan", "'7=nan': the multiplier must be a number >= 0"),
        ("7=inf", "'7=inf': the multiplier must be a number >= 0"),
        ("7=2,7=3", "digit 7 is given twice in '7=2,7=3'"),
    ],
)
def test_bad_per_digit_label_weights_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_digit_weights(text)
    assert str(excinfo.value) == message


def test_per_digit_label_weights_multiply_their_digits_only() -> None:
    settings = TrainConfig(total_steps=10, label_weight=0.2, label_digit_weights="4=2.5,7=0")
    assert settings.label_digit_multipliers(10) == [1, 1, 1, 1, 2.5, 1, 1, 0, 1, 1]
    assert TrainConfig(total_steps=10, label_weight=0.2).label_digit_multipliers(3) == [1, 1, 1]
    with pytest.raises(ValueError, match=r"^per-digit label weights need a positive label weight$"):
        TrainConfig(total_steps=10, label_digit_weights="7=2")
    with pytest.raises(ValueError, match="not in canonical form"):
        TrainConfig(total_steps=10, label_weight=0.2, label_digit_weights="7=2,4=2")


def test_a_falling_label_weight_follows_the_learning_rate_to_its_floor_and_a_constant_one_stays() -> None:
    falling = TrainConfig(total_steps=100, lr_decay_steps=40, label_weight=0.2, label_weight_falls=True)
    assert [falling.label_classifier_weight(s) for s in (0, 60, 80, 100)] == [0.2, 0.2, 0.1, 0.0]
    floored = replace(falling, label_weight_floor=0.05)
    assert [floored.label_classifier_weight(s) for s in (0, 60, 80, 100)] == pytest.approx([0.2, 0.2, 0.125, 0.05])
    constant = TrainConfig(total_steps=100, lr_decay_steps=40, label_weight=0.2)
    assert [constant.label_classifier_weight(s) for s in (0, 80, 100)] == [0.2, 0.2, 0.2]


def test_learning_rate_is_constant_then_falls_linearly_to_zero() -> None:
    assert TrainConfig(total_steps=100, lr=1.0).learning_rate(99) == 1.0
    decayed = TrainConfig(total_steps=100, lr=1.0, lr_decay_steps=40)
    assert [decayed.learning_rate(s) for s in (0, 60, 80, 99, 100)] == [1.0, 1.0, 0.5, 1 / 40, 0.0]


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_load_mnist_reads_what_torchvision_reads(tiny_mnist: Path, train: bool) -> None:
    from torchvision.datasets import MNIST

    data, reference = load_mnist(tiny_mnist, train=train), MNIST(str(tiny_mnist), train=train)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert torch.equal(data.images, reference.data) and torch.equal(data.labels, reference.targets)
    assert data.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_mnist_splits_whose_files_disagree_are_corrupt(tmp_path: Path) -> None:
    root = write_tiny_mnist(tmp_path)
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    other = write_tiny_mnist(tmp_path / "other", test_count=10) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(other.read_bytes())
    with pytest.raises(DatasetCorruptError, match="t10k images but 10 labels"):
        load_mnist(root, train=False)


def test_missing_mnist_names_all_four_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_mnist(tmp_path, download=False)
    message = str(excinfo.value)
    assert all(name in message for name in MNIST_FILES)
    assert str(tmp_path / "MNIST" / "raw") in message


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("train-images-idx3-ubyte", lambda b: b[:-100]),
        ("train-labels-idx1-ubyte", lambda b: b[:4]),
        ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x09\x99" + b[4:]),
    ],
    ids=["truncated-images", "truncated-header", "bad-magic"],
)
def test_corrupt_mnist_names_the_file(tmp_path: Path, name: str, mutate) -> None:
    root = write_tiny_mnist(tmp_path)
    path = root / "MNIST" / "raw" / name
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DatasetCorruptError, match=name):
        load_mnist(root, download=False)


def test_training_writes_checkpoint_grid_and_metrics(tmp_path: Path, tiny_mnist: Path) -> None:
    checkpoint = train_tiny(tmp_path, tiny_mnist, steps=6, log_every=3)
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["step"] == 6 and payload["config"]["latent_dim"] == TINY_MODEL.latent_dim
    records = run_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    assert {"loss_d", "loss_g", "d_real", "d_fake", "images_per_s"} <= set(records[0])
    assert list((tmp_path / "samples").glob("step*.png"))


def test_a_finished_run_reports_progress_each_step_and_writes_grids_at_epoch_ends(
    tmp_path: Path, tiny_mnist: Path
) -> None:
    data = load_mnist(tiny_mnist, download=False)  # 256 images: 16 steps an epoch
    state = new_state(TINY_MODEL, TrainConfig(total_steps=20, batch_size=16, log_every=8), torch.device("cpu"))
    reported: list[tuple[int, int]] = []
    result = train(state, data, tmp_path, progress=lambda step, info: reported.append((step, info["epoch"])))
    assert not result.interrupted and result.step == 20
    assert reported == [(step, 1 if step <= 16 else 2) for step in range(1, 21)]  # epochs counted from 1
    records = run_metrics(tmp_path)
    assert [(r["step"], r["epoch"]) for r in records] == [(8, 0), (16, 0), (20, 1)]  # the epoch of the step taken
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step0000016.png", "step0000020.png"]
    conv = next(m for m in state.discriminator.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # on CPU: measured faster


def test_images_per_second_counts_the_steps_of_each_logging_window(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import digitgen.training.loop as loop

    clock = [100.0]  # a step takes exactly half a second; nothing else takes time
    real_step = loop.train_step

    def timed_step(*args, **kwargs):
        clock[0] += 0.5
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", timed_step)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    state = new_state(TINY_MODEL, TrainConfig(total_steps=6, batch_size=16, log_every=2), torch.device("cpu"))
    train(state, load_mnist(tiny_mnist, download=False), tmp_path)
    records = run_metrics(tmp_path)
    assert [r["images_per_s"] for r in records] == [32.0, 32.0, 32.0]  # 2 steps of 16 images in 1 s


@pytest.mark.parametrize(
    ("total_steps", "checkpoint_every", "resumed_to", "written"),
    [
        (20, 1000, None, [16, 20]),  # each epoch (16 steps), then the last step
        (16, 1000, None, [16]),  # the last step ends an epoch: written once
        (12, 4, None, [4, 8, 12]),
        (16, 1000, 16, [16]),  # a finished run resumed into another folder: its checkpoint there
    ],
)
def test_each_checkpoint_is_written_once(
    tmp_path: Path,
    tiny_mnist: Path,
    monkeypatch: pytest.MonkeyPatch,
    total_steps: int,
    checkpoint_every: int,
    resumed_to: int | None,
    written: list[int],
) -> None:
    import digitgen.training.loop as loop

    data = load_mnist(tiny_mnist, download=False)  # 256 images: 16 steps an epoch
    settings = TrainConfig(total_steps=total_steps, batch_size=16, checkpoint_every=checkpoint_every)
    state = new_state(TINY_MODEL, settings, torch.device("cpu"))
    if resumed_to is not None:
        state = state_from_checkpoint(str(train(state, data, tmp_path / "first").checkpoint), torch.device("cpu"))
    saved: list[int] = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(
        loop, "save_checkpoint", lambda payload, path: (saved.append(payload["step"]), real_save(payload, path))
    )
    result = train(state, data, tmp_path / "run")
    assert saved == written and load_checkpoint(result.checkpoint)["step"] == total_steps


def test_weights_that_differ_between_ranks_fail_the_run(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import digitgen.training.loop as loop

    real_gather = loop.gather_objects
    # a second rank whose generator ended elsewhere: its digest is not this one's
    monkeypatch.setattr(
        loop, "gather_objects", lambda ctx, obj: real_gather(ctx, obj) + (["another"] if isinstance(obj, str) else [])
    )
    with pytest.raises(TrainingError, match=r"^generator weights differ between ranks after training \(checkpoint: "):
        train_tiny(tmp_path / "run", tiny_mnist, steps=2)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()  # the steps done are kept


def test_a_resumed_run_drops_the_records_a_hard_stop_left_past_its_checkpoint(tmp_path: Path, tiny_mnist: Path) -> None:
    data = load_mnist(tiny_mnist, download=False)
    settings = TrainConfig(total_steps=4, batch_size=16, log_every=1)
    first = train(new_state(TINY_MODEL, settings, torch.device("cpu")), data, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_text()
    with metrics.open("a") as f:  # a run killed after step 6, its last checkpoint at step 4
        f.write('{"step": 5, "loss_d": 1.0}\n{"step": 6, "loss_d": 1.0}\n{"step": 7, "lo')
    state = state_from_checkpoint(str(first.checkpoint), torch.device("cpu"))
    state.train = replace(state.train, total_steps=8)
    train(state, data, tmp_path)
    assert metrics.read_text().startswith(kept)
    assert [record["step"] for record in run_metrics(tmp_path)] == list(range(1, 9))


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    payload = load_checkpoint(checkpoint)
    return {
        f"{part}.{k}": v for part in ("generator", "generator_ema", "discriminator") for k, v in payload[part].items()
    }


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stop_at", [7, 18], ids=["first-epoch", "second-epoch"])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, tiny_mnist: Path, stop_at: int) -> None:
    # 16 steps an epoch: the resumed run crosses an epoch boundary, or starts past one;
    # interrupted while the learning rate is falling
    straight = train_tiny(tmp_path / "straight", tiny_mnist, steps=20, lr_decay_steps=15)
    data = load_mnist(tiny_mnist, download=False)
    settings = TrainConfig(total_steps=20, batch_size=16, lr_decay_steps=15)
    state = new_state(TINY_MODEL, settings, torch.device("cpu"))
    stops = iter([False] * (stop_at - 1) + [True])
    first = train(state, data, tmp_path / "resumed", should_stop=lambda: next(stops))
    assert first.interrupted and first.step == stop_at
    assert state.opt_g.param_groups[0]["lr"] == settings.learning_rate(stop_at - 1) < settings.lr
    resumed = train(state_from_checkpoint(str(first.checkpoint), torch.device("cpu")), data, tmp_path / "resumed")
    assert resumed.step == 20
    expected, actual = _weights(straight), _weights(resumed.checkpoint)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.parametrize(("steps", "interrupted"), [(1, False), (2, True)])
def test_a_stop_during_the_last_step_finishes_the_run(
    tmp_path: Path, tiny_mnist: Path, steps: int, interrupted: bool
) -> None:
    """A stop signal that came during the last step leaves nothing to continue: the run is done."""
    data = load_mnist(tiny_mnist, download=False)
    state = new_state(TINY_MODEL, TrainConfig(total_steps=steps, batch_size=16), torch.device("cpu"))
    result = train(state, data, tmp_path / "run", should_stop=lambda: True)  # asked for since the first step
    assert (result.interrupted, result.step) == (interrupted, 1)


@pytest.mark.usefixtures("one_thread")
def test_resumed_run_with_a_label_classifier_matches_uninterrupted_run(tmp_path: Path, tiny_mnist: Path) -> None:
    data = load_mnist(tiny_mnist, download=False)
    settings = TrainConfig(total_steps=8, batch_size=16, label_weight=0.5)

    def fresh() -> TrainState:
        torch.manual_seed(7)
        return new_state(TINY_MODEL, settings, torch.device("cpu"), label_classifiers=[Classifier()])

    straight = train(fresh(), data, tmp_path / "straight").checkpoint
    stops = iter([False] * 2 + [True])
    first = train(fresh(), data, tmp_path / "resumed", should_stop=lambda: next(stops))
    assert first.interrupted and first.step == 3
    resumed = train(state_from_checkpoint(str(first.checkpoint), torch.device("cpu")), data, tmp_path / "resumed")
    expected, actual = _weights(straight), _weights(resumed.checkpoint)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    [label] = load_checkpoint(resumed.checkpoint)["label_classifiers"]
    assert all(torch.equal(label[k], v) for k, v in load_checkpoint(straight)["label_classifiers"][0].items())


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, tiny_mnist: Path) -> None:
    checkpoint = train_tiny(tmp_path, tiny_mnist, steps=2)
    before = checkpoint.read_bytes()
    state = state_from_checkpoint(str(checkpoint), torch.device("cpu"))
    state.train = TrainConfig(total_steps=4, batch_size=16)
    with torch.no_grad():
        next(state.discriminator.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(state, load_mnist(tiny_mnist, download=False), tmp_path)
    assert checkpoint.read_bytes() == before


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"{path}: not a readable digitgen checkpoint (not a PyTorch file of tensors and plain data; "
        "read with weights_only=True, nothing in it ran)"
    )
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the payload is live when loaded unsafely
    assert marker.exists()


@pytest.mark.parametrize(
    "content", [b"", b"\x00" * 100, bytes(range(256)) * 40], ids=["empty", "zeros", "random-bytes"]
)
def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("part", "name", "value", "message"),
    [
        ("config", "g_width", 32, "do not match"),  # weights from another configuration
        ("train", "label_weight", 0.5, "holds no label classifier"),  # a label weight without its classifier
    ],
)
def test_a_checkpoint_at_odds_with_its_own_settings_is_refused(
    tmp_path: Path, tiny_checkpoint: Path, part: str, name: str, value: object, message: str
) -> None:
    payload = load_checkpoint(tiny_checkpoint)
    payload[part][name] = value
    path = tmp_path / "edited.pt"
    save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match=message):
        state_from_checkpoint(str(path), torch.device("cpu"))


def test_checkpoint_roundtrip_is_self_describing(tiny_checkpoint: Path) -> None:
    state = state_from_checkpoint(str(tiny_checkpoint), torch.device("cpu"))
    assert state.config == TINY_MODEL
    again = state_to_checkpoint(state)
    assert again["step"] == 4 and again["config"] == load_checkpoint(tiny_checkpoint)["config"]


def test_checkpoints_are_read_as_data_only_whatever_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``weights_only=True`` is passed, not left to torch, whose default was False before 2.6."""
    path, calls = tmp_path / "weights.pt", []
    torch.save({key: 1 for key in WEIGHTS_KEYS}, path)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    load_weights(path)
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (None, "checkpoint not found: {path}"),
        ([1, 2], "{path}: not a digitgen checkpoint (keys missing)"),
        ({"format_version": FORMAT_VERSION}, "{path}: not a digitgen checkpoint (keys missing)"),
        ({key: 99 for key in WEIGHTS_KEYS}, "{path}: checkpoint format 99, this version reads " + str(FORMAT_VERSION)),
        (
            {**dict.fromkeys(WEIGHTS_KEYS, 1), "step": "x"},
            "{path}: not a digitgen checkpoint (its step 'x' is not a count of steps)",
        ),
        (
            {**dict.fromkeys(WEIGHTS_KEYS, 1), "step": -1},
            "{path}: not a digitgen checkpoint (its step -1 is not a count of steps)",
        ),
    ],
    ids=["missing", "not-a-dict", "keys-missing", "other-format", "step-not-a-number", "step-negative"],
)
def test_files_that_are_not_our_checkpoints_are_refused_by_name(tmp_path: Path, payload: object, problem: str) -> None:
    path = tmp_path / "weights.pt"
    if payload is not None:
        torch.save(payload, path)
    with pytest.raises(CheckpointError) as error:
        load_weights(path)
    assert str(error.value) == problem.format(path=path)


@pytest.mark.parametrize("kind", ["loop", "through-a-file"])
def test_a_checkpoint_path_that_cannot_be_followed_is_named_as_such_not_missing(tmp_path: Path, kind: str) -> None:
    """A loop of links had been called "checkpoint not found", though the path is there."""
    if kind == "loop":
        path = tmp_path / "a.pt"
        path.symlink_to(tmp_path / "b.pt")
        (tmp_path / "b.pt").symlink_to(path)
        why = "Too many levels of symbolic links"
    else:
        (tmp_path / "file").write_bytes(b"")
        path = tmp_path / "file" / "weights.pt"
        why = "Not a directory"
    with pytest.raises(CheckpointError) as error:
        load_weights(path)
    assert str(error.value) == f"{path}: not a readable digitgen checkpoint ({why})"


def test_a_truncated_checkpoint_is_refused_with_the_first_sentence_of_torchs_reason(tmp_path: Path) -> None:
    whole, path = tmp_path / "whole.pt", tmp_path / "cut.pt"
    torch.save({key: torch.zeros(1000) for key in WEIGHTS_KEYS}, whole)
    path.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(CheckpointError) as error:
        load_weights(path)
    reason = str(error.value.__cause__).strip()
    prefix = f"{path}: not a readable digitgen checkpoint (truncated or corrupt: "
    message = str(error.value)
    assert message.startswith(prefix) and message.endswith(")")
    sentence = message[len(prefix) : -1]
    rest = reason[len(sentence) :]
    assert sentence and reason.startswith(sentence) and (rest == "" or rest.startswith((". ", "\n")))


def test_a_checkpoint_whose_bytes_changed_in_place_is_refused_by_its_crc(tmp_path: Path) -> None:
    """torch.load reads a tensor whose bytes changed (a bit flipped on disk, an edit by hand) without a word; the
    CRC-32 the file keeps for each record says so. A file saved without CRCs is read as before."""
    path = tmp_path / "weights.pt"
    torch.save({key: torch.zeros(1000) for key in WEIGHTS_KEYS}, path)
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length  # after the record's local header
    data[start + 100 : start + 104] = struct.pack("<f", 50.0)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        load_weights(path)
    assert str(error.value) == (
        f"{path}: not a readable digitgen checkpoint (corrupt: its record {record.filename} fails its CRC-32 check)"
    )
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({key: torch.zeros(1000) for key in WEIGHTS_KEYS}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert read_data_file(path, "", "")["step"].shape == (1000,)  # every CRC 0: nothing to check


@pytest.mark.parametrize("data", [b"hi\n", b"\x85#q$", b"j", pickle.dumps({"step": 1})], ids=repr)
def test_a_file_of_stray_bytes_is_refused_in_words_whatever_the_unpickler_raises(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, data: bytes
) -> None:
    """Bytes that make the unpickler raise KeyError, IndexError or struct.error, or a legacy pickle (which torch
    warns about first), all get the one refusal and no warning."""
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: not a readable digitgen checkpoint \\("):
        load_weights(path)
    assert not recwarn.list


def _edited(tmp_path: Path, tiny_checkpoint: Path, edit) -> Path:
    payload = load_checkpoint(tiny_checkpoint)
    edit(payload)
    path = tmp_path / "edited.pt"
    save_checkpoint(payload, path)
    return path


@pytest.mark.parametrize(
    ("part", "what"),
    [("generator", "generator"), ("generator_ema", "EMA generator"), ("discriminator", "discriminator")],
)
def test_weights_that_do_not_fit_are_refused_naming_the_part(
    tmp_path: Path, tiny_checkpoint: Path, part: str, what: str
) -> None:
    other = "discriminator" if part != "discriminator" else "generator"
    path = _edited(tmp_path, tiny_checkpoint, lambda payload: payload.update({part: payload[other]}))
    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(path), torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"{what} weights do not match the checkpoint's configuration: ")
    assert message.endswith("...") and ("Missing key(s)" in message or "Unexpected key(s)" in message), message


def test_a_label_classifier_that_does_not_fit_is_refused_by_name(tmp_path: Path, tiny_checkpoint: Path) -> None:
    def edit(payload: dict) -> None:
        payload["train"]["label_weight"] = 0.5
        payload["label_classifiers"] = [Classifier().state_dict(), payload["generator"]]

    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(_edited(tmp_path, tiny_checkpoint, edit)), torch.device("cpu"))
    assert str(error.value).startswith("label classifier weights do not match the checkpoint's configuration: ")


@pytest.mark.parametrize("kept", [None, [], "not a list"])
def test_a_label_weight_without_its_classifiers_is_refused(tmp_path: Path, tiny_checkpoint: Path, kept: object) -> None:
    def edit(payload: dict) -> None:
        payload["train"]["label_weight"] = 0.5
        if kept is not None:
            payload["label_classifiers"] = kept

    path = _edited(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(path), torch.device("cpu"))
    assert str(error.value) == f"{path}: a label weight is set but the checkpoint holds no label classifier"


def test_a_checkpoint_from_before_ensembles_keeps_its_one_label_classifier(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    torch.manual_seed(5)
    classifier = Classifier()

    def edit(payload: dict) -> None:
        payload["train"]["label_weight"] = 0.5
        payload["label_classifier"] = classifier.state_dict()  # the key of one classifier, before ensembles

    [restored] = state_from_checkpoint(
        str(_edited(tmp_path, tiny_checkpoint, edit)), torch.device("cpu")
    ).label_classifiers
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in classifier.state_dict().items())


def test_unknown_training_settings_and_a_broken_optimizer_state_are_refused_by_name(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    path = _edited(tmp_path, tiny_checkpoint, lambda payload: payload["train"].update({"warp": 9}))
    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(path), torch.device("cpu"))
    assert str(error.value) == "checkpoint training settings has unknown fields: warp"
    path = _edited(tmp_path, tiny_checkpoint, lambda payload: payload.update({"optimizers": {}}))
    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(path), torch.device("cpu"))
    assert str(error.value) == f"{path}: optimizer or RNG state is invalid ('generator')"
    path = _edited(tmp_path, tiny_checkpoint, lambda payload: payload.pop("rng"))
    with pytest.raises(CheckpointError) as error:  # it was said to hold generator weights only
        state_from_checkpoint(str(path), torch.device("cpu"))
    assert str(error.value) == f"{path}: a checkpoint without rng cannot be resumed"
    shapes = []

    def wrong_moment(payload: dict) -> None:
        moments = payload["optimizers"]["discriminator"]["state"][0]
        shapes.append(tuple(moments["exp_avg_sq"].shape))
        moments["exp_avg_sq"] = torch.zeros(3)

    path = _edited(tmp_path, tiny_checkpoint, wrong_moment)
    with pytest.raises(CheckpointError) as error:  # it failed at the first step
        state_from_checkpoint(str(path), torch.device("cpu"))
    moment = f"the discriminator optimizer's exp_avg_sq is (3,) for a parameter of {shapes[0]}"
    assert str(error.value) == f"{path}: optimizer or RNG state is invalid ({moment})"
    path = _edited(tmp_path, tiny_checkpoint, lambda payload: payload["optimizers"]["generator"]["state"].pop(0))
    assert state_from_checkpoint(str(path), torch.device("cpu")).step  # a parameter with no gradient yet has none


NOT_LOADED = "the generator optimizer's state does not load ("


def _first_moments(payload: dict) -> dict:
    return payload["optimizers"]["generator"]["state"][0]


@pytest.mark.parametrize(
    ("exc", "problem"),
    [
        (RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): fc.weight\n"), "Missing key(s): fc.weight"),
        (RuntimeError("Error(s) in loading state_dict"), "Error(s) in loading state_dict"),  # a heading alone stays
        (RuntimeError("first\nsecond"), "first"),
        (ValueError(), "ValueError"),
        (TypeError("  \n "), "TypeError"),
        (RuntimeError("x" * 160), "x" * 160),
        (RuntimeError("x" * 161), "x" * 157 + "..."),
    ],
    ids=["heading-then-finding", "heading-alone", "two-lines", "no-message", "blank-message", "at-limit", "past-it"],
)
def test_first_problem_is_the_first_finding_cut_to_160_characters(exc: BaseException, problem: str) -> None:
    assert first_problem(exc) == problem


def test_same_kinds_takes_the_same_keys_lengths_types_and_finite_numbers_only() -> None:
    fresh = {"lr": 0.1, "betas": (0.5, 0.9), "amsgrad": False, "foreach": None, "steps": [1, 2]}
    assert same_kinds(dict(fresh), fresh)
    for saved in [
        {**fresh, "extra": 1},
        {key: value for key, value in fresh.items() if key != "lr"},
        {**fresh, "lr": 1},  # an int where a float was
        {**fresh, "lr": float("inf")},
        {**fresh, "betas": [0.5, 0.9]},  # a list where a tuple was
        {**fresh, "betas": (0.5,)},
        {**fresh, "betas": (0.5, "0.9")},
        {**fresh, "amsgrad": 0},
        {**fresh, "steps": [1, 2, 3]},
        [fresh],
    ]:
        assert not same_kinds(saved, fresh), saved


def _set_betas(payload: dict, betas: object) -> None:
    payload["optimizers"]["generator"]["param_groups"][0]["betas"] = betas


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda p: p["optimizers"].update({"generator": "x"}), NOT_LOADED),
        (lambda p: p["optimizers"]["generator"].update({"state": "x"}), NOT_LOADED),
        (lambda p: p["optimizers"]["generator"].pop("param_groups"), f"{NOT_LOADED}'param_groups')"),
        (lambda p: _set_betas(p, "ab"), "the generator optimizer's setting betas is 'ab', not of its kind"),
        (lambda p: _set_betas(p, (0.5, float("nan"))), "the generator optimizer's setting betas is (0.5, nan), not"),
        (lambda p: _first_moments(p).update({"exp_avg": torch.tensor(1.0)}), "the generator optimizer's exp_avg is ()"),
        (lambda p: _first_moments(p).update({"exp_avg": 1.0}), "the generator optimizer's exp_avg is 1.0 for a param"),
        (lambda p: _first_moments(p).update({"step": torch.ones(2)}), "the generator optimizer's step is a Tensor, n"),
        (lambda p: _first_moments(p).update({"step": torch.tensor(-1.0)}), "the generator optimizer's step is -1.0, n"),
        (
            lambda p: _first_moments(p).update({"step": torch.tensor(255, dtype=torch.uint8)}),
            "the generator optimizer's step is 255, not one count of steps",
        ),
        (lambda p: _first_moments(p).update({"step": torch.tensor(True)}), "the generator optimizer's step is True, "),
        (
            lambda p: _first_moments(p).update({"step": torch.tensor(2.0**60)}),
            "the generator optimizer's step is 1.152921504606847e+18, not one count of steps",
        ),
        (lambda p: _set_betas(p, (5.0, -3.0)), "the generator optimizer's betas are (5.0, -3.0), not two numbers in"),
        (
            lambda p: _first_moments(p).pop("exp_avg_sq"),
            "the generator optimizer's state of a parameter holds ['exp_avg', 'step'], not ['exp_avg', 'exp_avg_sq', ",
        ),
        (lambda p: p["rng"].update({"noise": []}), "no noise generator's state: []"),
    ],
    ids=[
        "optimizer-text",
        "moments-text",
        "no-param-groups",
        "betas-text",
        "betas-nan",
        "moment-0-dim",
        "moment-number",
        "step-two-numbers",
        "step-negative",  # Adam divides by 1 - beta ** step: 0 at step 0, and for -1 the division went wrong
        "step-integer",
        "step-bool",
        "step-past-any-run",
        "betas-outside",
        "moment-missing",
        "no-noise-state",
    ],
)
def test_an_optimizer_or_noise_state_of_another_kind_is_refused_in_words(
    tmp_path: Path, tiny_checkpoint: Path, edit: Callable[[dict], None], problem: str
) -> None:
    """Not a traceback at load (AttributeError) or at the first step (a TypeError in Adam)."""
    path = _edited(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(CheckpointError) as error:
        state_from_checkpoint(str(path), torch.device("cpu"))
    assert str(error.value).startswith(f"{path}: optimizer or RNG state is invalid ({problem}"), error.value


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([64, 10], "checkpoint config is not a mapping"),
        ({"latent_dim": 0}, "checkpoint config is invalid: latent_dim must be from 1 to 1024"),
        ({"latent_dim": 10**10}, "checkpoint config is invalid: latent_dim must be from 1 to 1024"),
        ({"latent_dim": 64.0}, "checkpoint config is invalid: latent_dim must be a whole number, not 64.0"),
        ({"g_width": True}, "checkpoint config is invalid: g_width must be a whole number, not True"),
        ({"g_width": 1}, "checkpoint config is invalid: g_width must be from 2 to 1024"),  # its last block: 0 channels
        (
            {"conditional_norm": "yes"},
            "checkpoint config is invalid: conditional_norm must be true or false, not 'yes'",
        ),
    ],
)
def test_a_model_configuration_that_cannot_be_built_is_refused_whole(config: object, message: str) -> None:
    with pytest.raises(CheckpointError) as error:
        config_from_checkpoint({"config": config})
    assert str(error.value) == message


def test_a_resumed_run_keeps_adams_betas_as_saved(tmp_path: Path, tiny_mnist: Path) -> None:
    checkpoint = train_tiny(tmp_path, tiny_mnist, steps=2, betas=(0.0, 0.99))
    state = state_from_checkpoint(str(checkpoint), torch.device("cpu"))
    assert state.train.betas == (0.0, 0.99) and state.opt_d.param_groups[0]["betas"] == (0.0, 0.99)


def test_a_rank_the_checkpoint_has_no_noise_state_for_gets_a_fresh_stream(tiny_checkpoint: Path) -> None:
    saved = len(load_checkpoint(tiny_checkpoint)["rng"]["noise"])
    state = state_from_checkpoint(str(tiny_checkpoint), torch.device("cpu"), rank=saved)
    assert state.step == load_checkpoint(tiny_checkpoint)["step"]


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_convolutions_dtype_and_the_saved_weights_stay_fp32(
    tmp_path: Path, tiny_mnist: Path, precision: str, dtype: torch.dtype
) -> None:
    state = new_state(TINY_MODEL, TrainConfig(total_steps=2, batch_size=16, precision=precision), torch.device("cpu"))
    seen: set[torch.dtype] = set()
    first_conv = next(m for m in state.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _module, _inputs, output: seen.add(output.dtype))
    result = train(state, load_mnist(tiny_mnist, download=False), tmp_path)
    assert seen == {dtype}
    payload = load_checkpoint(result.checkpoint)
    assert payload["train"]["precision"] == precision
    weights = [v for part in ("generator", "generator_ema", "discriminator") for v in payload[part].values()]
    assert {w.dtype for w in weights if w.is_floating_point()} == {torch.float32}


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_bf16_run_matches_an_uninterrupted_one_and_differs_from_fp32(
    tmp_path: Path, tiny_mnist: Path
) -> None:
    straight = _weights(train_tiny(tmp_path / "straight", tiny_mnist, steps=6, precision="bf16"))
    fp32 = _weights(train_tiny(tmp_path / "fp32", tiny_mnist, steps=6))
    settings = TrainConfig(total_steps=6, batch_size=16, precision="bf16")
    stops = iter([False, False, True])
    first = train(
        new_state(TINY_MODEL, settings, torch.device("cpu")),
        load_mnist(tiny_mnist, download=False),
        tmp_path / "resumed",
        should_stop=lambda: next(stops),
    )
    assert first.interrupted and first.step == 3
    state = state_from_checkpoint(str(first.checkpoint), torch.device("cpu"))
    assert state.train.precision == "bf16"
    resumed = _weights(train(state, load_mnist(tiny_mnist, download=False), tmp_path / "resumed").checkpoint)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(straight[k], fp32[k]) for k in straight)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16"):
        TrainConfig(total_steps=1, precision="fp16")


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    bf16, cuda = TrainConfig(total_steps=1, precision="bf16"), torch.device("cuda")
    with pytest.raises(TrainingError, match="this GPU has no bfloat16 support for --precision bf16"):
        check_precision(bf16, cuda)
    check_precision(replace(bf16, precision="fp32"), cuda)
    check_precision(bf16, torch.device("cpu"))


APPEND_AT_A_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from digitgen.runtime.errors import OutputError
from digitgen.training.loop import _append_metrics
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as one past a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, resource.RLIM_INFINITY))
try:
    _append_metrics(path, {"step": 3, "loss_d": 0.5362026095390})
except OutputError as exc:
    print(exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
def test_a_metrics_line_cut_short_by_the_system_is_cut_off(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    done = subprocess.run([sys.executable, "-c", APPEND_AT_A_SIZE_LIMIT, str(metrics)], capture_output=True, text=True)
    assert done.stdout == f"cannot write {metrics}: File too large\n", done.stderr
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
