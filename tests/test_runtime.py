"""The torch-free runtime API on a tiny exported model and on the shipped artifact."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

import digitgen.runtime.generator as generator_module
from digitgen.runtime import (
    DigitGenerator,
    DigitgenError,
    InvalidModelError,
    InvalidRequestError,
    ModelContractError,
    ModelNotFoundError,
    ModelRunError,
    OutputError,
    ProviderUnavailableError,
    TooManyDigitsError,
    default_model_path,
    generate_files,
)
from digitgen.runtime.evaluate import ReferenceClassifier
from digitgen.runtime.external_data import external_data_files, without_metadata
from digitgen.runtime.generator import GeneratedDigits, empty_digits, fill_digits, to_uint8
from digitgen.runtime.session import external_files, model_sha256, ort_reason
from tests.helpers import nan_pixels, scaled_pixels


@pytest.fixture(scope="module")
def tiny(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


def test_every_typed_error_is_importable_from_the_package() -> None:
    """An app catches what the runtime raises with ``from digitgen import ...``, as the README's list says."""
    import digitgen
    from digitgen.runtime import errors

    typed = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}
    assert typed <= set(digitgen.__all__)
    assert all(getattr(digitgen, name) is getattr(errors, name) for name in typed)


def test_generate_returns_uint8_images_and_cycling_labels(tiny: DigitGenerator) -> None:
    out = tiny.generate(23, seed=1)
    assert out.images.shape == (23, 28, 28) and out.images.dtype == np.uint8
    assert out.labels.dtype == np.int64
    assert out.labels.tolist() == [i % 10 for i in range(23)]


def test_generate_refuses_a_count_it_cannot_hold_before_any_work(
    tiny: DigitGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10**12 digits: 784 TB, past a 64-bit machine's address space; refused at once, not after filling memory."""
    calls: list[int] = []
    monkeypatch.setattr(tiny, "run", lambda z, labels: calls.append(len(z)))
    with pytest.raises(TooManyDigitsError) as refused:  # a DigitgenError and a MemoryError
        tiny.generate(10**12)
    assert isinstance(refused.value, DigitgenError) and isinstance(refused.value, MemoryError)
    assert str(refused.value) == (
        "1000000000000 digits do not fit in memory at once; make them batch by batch with iter_batches"
    )
    assert calls == []


@pytest.mark.parametrize("num", [-1, 0, "5"])
def test_iter_batches_refuses_a_bad_request_when_called_not_when_first_read(tiny: DigitGenerator, num: object) -> None:
    with pytest.raises(InvalidRequestError, match="number of digits must be an integer >= 1"):
        tiny.iter_batches(num)  # type: ignore[arg-type]


def test_digit_list_is_repeated_to_n(tiny: DigitGenerator) -> None:
    assert tiny.generate(7, digits=[3, 0, 9]).labels.tolist() == [3, 0, 9, 3, 0, 9, 3]


def test_digits_compare_equal_by_their_contents(tiny: DigitGenerator) -> None:
    """The obvious determinism check: ``==`` had raised numpy's "truth value of an array is ambiguous"."""
    digits = tiny.generate(5, seed=3)
    assert digits == tiny.generate(5, seed=3)
    assert not digits != tiny.generate(5, seed=3)  # noqa: SIM202 (the != operator, tested)
    assert digits != tiny.generate(5, seed=4)  # other pixels
    assert digits != tiny.generate(5, digits=[1, 2, 3, 4, 5], seed=3)  # other labels
    assert digits != tiny.generate(6, seed=3)  # another count
    assert digits != GeneratedDigits(digits.images, digits.labels, start=1)
    assert digits != (digits.images, digits.labels)
    with pytest.raises(TypeError):
        hash(digits)


def test_same_seed_same_images_whatever_the_batch_size(tiny: DigitGenerator) -> None:
    reference = tiny.generate(50, seed=5, batch_size=50).images
    for batch_size in (1, 7, 1000):
        assert np.array_equal(tiny.generate(50, seed=5, batch_size=batch_size).images, reference)
    assert not np.array_equal(tiny.generate(50, seed=6).images, reference)


@pytest.mark.parametrize("model", ["tiny", "shipped"])
def test_a_digit_is_the_same_float_image_alone_or_in_any_batch(model: str, tiny: DigitGenerator) -> None:
    """Not only after rounding to uint8: a pixel whose value sits at a rounding boundary would otherwise differ
    between a digit made alone (a server's lone request, a last batch of one) and in a batch. The shipped
    model as the ReduceSum graph failed this on AMD EPYC (AVX2): 300 of 300 digits off by up to 3.6e-7."""
    generator = tiny if model == "tiny" else DigitGenerator.from_path(default_model_path(), "cpu", threads=1)
    z = np.random.default_rng(0).standard_normal((40, generator.latent_dim)).astype(np.float32)
    labels = np.arange(40) % 10
    batch = generator.run(z, labels)
    alone = np.concatenate([generator.run(z[i : i + 1], labels[i : i + 1]) for i in range(40)])
    assert np.array_equal(alone, batch), f"{np.abs(alone - batch).max():.2e} off"
    for start, size in ((3, 2), (5, 7), (0, 17)):
        assert np.array_equal(
            generator.run(z[start : start + size], labels[start : start + size]), batch[start : start + size]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num": 0}, "^number of digits must be an integer >= 1, got 0$"),
        ({"num": -3}, "number of digits"),
        ({"num": "5"}, "number of digits"),
        ({"num": 5, "digits": [10]}, r"^digit 10 is not a class of this model \(0-9\)$"),
        ({"num": 5, "digits": [-1]}, "digit -1"),
        ({"num": 5, "digits": ["7"]}, r"^digit '7' is not a class of this model \(0-9\)$"),
        ({"num": 5, "digits": [np.int64(12)]}, r"^digit 12 is not a class of this model \(0-9\)$"),  # not np.int64(12)
        ({"num": 5, "digits": [12, 3, 15, 12]}, r"^digits 12, 15 are not classes of this model \(0-9\)$"),
        ({"num": 5, "digits": list(range(10, 17))}, r"^digits 10, 11, 12, 13, 14 and 2 more are not classes of"),
        ({"num": 5, "digits": list(range(10, 15))}, r"^digits 10, 11, 12, 13, 14 are not classes of this model"),
        ({"num": 5, "digits": [3.0, np.float64(3.0), 11]}, r"^digits 3\.0, 11 are not classes of this model"),
        ({"num": 5, "digits": []}, "^the list of digits is empty$"),
        # a range is a list of classes too, but one this long is refused before it fills memory or overflows
        ({"num": 5, "digits": range(10**18)}, "^the list of digits is too long: at most 100,000,000 classes, which"),
        ({"num": 5, "digits": range(2**64)}, "^the list of digits is too long: at most 100,000,000 classes, which"),
        # integers past the 4,300 digits Python writes out: named by their length, not a bare ValueError
        ({"num": 10**5000}, "^a count of an integer of about 5,000 digits runs past index 9223372036854775807, the"),
        ({"num": 5, "seed": 10**5000}, "^seed must be an integer from 0 to 18446744073709551615, got an integer of a"),
        ({"num": 5, "digits": [-(10**5000), -1]}, "^digits a negative integer of about 5,000 digits, -1 are not"),
        ({"num": 5, "truncation": -(10**5000)}, r"got a negative integer of about 5,000 digits$"),
        ({"num": 5, "seed": 10**2000}, r"got 10{1023}\.\.\. \(2,001 characters\)$"),  # written out, then cut
        ({"num": 5, "truncation": Fraction(10**5000, 3)}, r"got a Fraction too long to write out$"),
        ({"num": 5, "digits": 5}, r"digits must be a list of classes, e\.g\. \[3, 7\], got 5"),
        ({"num": 5, "digits": "37"}, "digits must be a list of classes"),
        ({"num": 5, "digits": {7, 3}}, r"digits must be a list of classes, e\.g\. \[3, 7\], got \{3, 7\}"),
        ({"num": 5, "digits": iter([3, 7])}, "digits must be a list of classes"),
        ({"num": 5, "digits": bytearray(b"\x03")}, "digits must be a list of classes"),
        ({"num": 5, "digits": np.array([[3, 7]])}, "digits must be a list of classes"),
        ({"num": 5, "digits": np.array(7)}, r"digits must be a list of classes, e\.g\. \[3, 7\], got array\(7\)"),
        ({"num": 5, "seed": -1}, "seed"),
        ({"num": 5, "seed": 2**64}, "seed must be an integer from 0 to 18446744073709551615"),
        ({"num": 5, "batch_size": 0}, "^batch size must be an integer from 1 to 8192, got 0$"),
        # 36 TB of the model's working memory: refused, not left to the kernel's out-of-memory killer
        ({"num": 5, "batch_size": 10**8}, "^batch size must be an integer from 1 to 8192, got 100000000$"),
        ({"num": 5, "truncation": 0}, "truncation must be a finite number >= 0.1, got 0"),
        ({"num": 5, "truncation": 0.099}, "truncation must be a finite number >= 0.1, got 0.099"),
        ({"num": 5, "truncation": -1.0}, "truncation must be a finite number >= 0.1"),
        ({"num": 5, "truncation": float("inf")}, "truncation must be a finite number >= 0.1"),
        ({"num": 5, "truncation": "1"}, "truncation must be a finite number >= 0.1"),
        ({"num": 5, "truncation": 10**400}, "^truncation must be a finite number >= 0.1, got 1000"),  # no float
        ({"num": 5, "truncation": np.complex128(1 + 5j)}, r"truncation must be a finite number >= 0\.1, got np\.com"),
    ],
)
def test_bad_requests_raise_typed_errors(tiny: DigitGenerator, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        tiny.generate(**kwargs)


def test_a_list_of_digits_may_hold_up_to_its_limit(tiny: DigitGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator_module, "MAX_DIGITS_LISTED", 5)
    assert tiny.generate(3, digits=range(5)).labels.tolist() == [0, 1, 2]
    with pytest.raises(InvalidRequestError, match=r"^the list of digits is too long: at most 5 classes, which repeat"):
        tiny.generate(3, digits=range(6))


def test_truncation_may_be_any_numpy_real_number(tiny: DigitGenerator) -> None:
    for expected, truncations in ((1.5, (np.float16(1.5), np.float32(1.5), np.longdouble(1.5))), (2, (np.int8(2),))):
        images = tiny.generate(3, truncation=expected).images
        for truncation in truncations:
            assert np.array_equal(tiny.generate(3, truncation=truncation).images, images), truncation


def test_truncation_runs_from_its_least_to_the_largest_float(tiny: DigitGenerator) -> None:
    """At the top, as good as none: every component of the noise is within it."""
    assert np.array_equal(tiny.generate(2, truncation=sys.float_info.max).images, tiny.generate(2).images)
    assert tiny.generate(2, truncation=0.1).images.shape == (2, 28, 28)


def test_a_model_path_that_is_no_path_is_named_with_its_type(tiny: DigitGenerator) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        DigitGenerator.from_path(3)  # type: ignore[arg-type]
    assert str(refused.value) == "the model's path must be a path (a str or a pathlib.Path), got int 3"


def test_an_empty_model_path_is_refused_as_the_cli_does() -> None:
    with pytest.raises(InvalidRequestError, match=r"^the model's path is an empty path; name a file or folder"):
        DigitGenerator.from_path("")


def test_indices_run_to_the_last_int64_and_no_further(tiny: DigitGenerator) -> None:
    last = 2**63 - 1
    (batch,) = tiny.iter_batches(3, start=last - 2)
    assert (batch.start, batch.labels.tolist(), batch.images.shape) == (last - 2, [5, 6, 7], (3, 28, 28))
    with pytest.raises(
        InvalidRequestError, match=f"^digits {last - 2}..{last + 1} run past index {last}, the last one$"
    ):
        list(tiny.iter_batches(4, start=last - 2))
    with pytest.raises(InvalidRequestError, match=r"^start index must be an integer from 0 to "):
        list(tiny.iter_batches(1, start=last + 1))


def test_digits_gathered_from_batches_start_where_the_first_batch_starts(tiny: DigitGenerator) -> None:
    gathered = fill_digits(tiny.iter_batches(5, start=40, batch_size=2), *empty_digits(5))
    (alone,) = tiny.iter_batches(5, start=40)
    assert gathered.start == alone.start == 40 and np.array_equal(gathered.images, alone.images)
    assert fill_digits([], *empty_digits(0)).start == 0


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2", 2**31])
def test_threads_outside_what_onnxruntime_takes_are_refused_in_words(tiny_onnx: Path, threads: object) -> None:
    with pytest.raises(InvalidRequestError, match=f"^threads must be an integer from 1 to 1024, got {threads!r}$"):
        DigitGenerator.from_path(tiny_onnx, "cpu", threads=threads)


def test_threads_may_be_a_numpy_integer_as_counts_and_seeds_may(tiny_onnx: Path) -> None:
    assert DigitGenerator.from_path(tiny_onnx, "cpu", threads=np.int64(2)).generate(2).images.shape == (2, 28, 28)


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        DigitGenerator.from_path(tmp_path / "none.onnx")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a model at all", "Failed to load model because protobuf parsing failed"),
        (b"", "No graph was found in the protobuf"),
    ],
    ids=["text", "empty"],
)
def test_non_onnx_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError) as caught:
        DigitGenerator.from_path(path)
    # onnxruntime's reason, without its "[ONNXRuntimeError] : 7 : ... failed:" prefix or a final period
    assert str(caught.value) == f"{path} is not a valid ONNX model ({reason})"


def test_a_file_past_the_onnx_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.onnx"
    with path.open("wb") as sparse:  # no disk taken: a hole of 2 GiB
        sparse.truncate(2**31)
    with pytest.raises(InvalidModelError) as caught:
        DigitGenerator.from_path(path)
    assert str(caught.value) == (
        f"{path} is not a valid ONNX model (2,147,483,648 bytes: an ONNX file holds at most 2 GiB; a larger model "
        "keeps its tensors in external data files)"
    )


def test_sha256_names_the_bytes_loaded_even_if_the_file_is_replaced(tmp_path: Path, tiny_onnx: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_onnx.read_bytes())
    gen = DigitGenerator.from_path(path, "cpu")
    path.write_bytes(default_model_path().read_bytes())
    assert gen.sha256 == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert np.array_equal(
        gen.generate(4, seed=2).images, DigitGenerator.from_path(tiny_onnx, "cpu").generate(4, seed=2).images
    )


def test_the_hash_without_metadata_ignores_metadata_only(tmp_path: Path, tiny_onnx: Path) -> None:
    """What lets `export --quality` check that an evaluation scored the model it writes."""
    model = onnx.load(tiny_onnx)
    assert len(model.metadata_props) > 2
    model.metadata_props.add(key="quality_fid", value="1.0")
    model.metadata_props[0].value += "x"
    onnx.save(model, tmp_path / "relabelled.onnx")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, tmp_path / "other_weights.onnx")
    original, relabelled, bare, other = (
        (model_sha256(path.read_bytes(), path), model_sha256(path.read_bytes(), path, with_metadata=False))
        for path in (tiny_onnx, *(tmp_path / f"{name}.onnx" for name in ("relabelled", "bare", "other_weights")))
    )
    assert len({original[0], relabelled[0], bare[0], other[0]}) == 4
    assert original[1] == relabelled[1] == bare[1] != other[1]
    assert bare[1] == bare[0]  # nothing left to leave out
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(tiny_onnx.read_bytes())
    asked, not_asked = DigitGenerator.from_path(copy, "cpu"), DigitGenerator.from_path(copy, "cpu")
    assert (asked.sha256, asked.sha256_without_metadata) == original
    copy.write_bytes((tmp_path / "relabelled.onnx").read_bytes())
    assert asked.sha256_without_metadata == original[1]  # read once
    with pytest.raises(InvalidModelError, match=f"^{re.escape(str(copy))} changed after it was loaded; load it again$"):
        _ = not_asked.sha256_without_metadata


def test_the_model_read_again_for_its_hash_is_checked_as_at_load(tiny_onnx: Path, tmp_path: Path) -> None:
    """A pipe put in the loaded model's place is refused at once, not waited on (evaluate reads it first)."""
    model = tmp_path / "model.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    gens = [DigitGenerator.from_path(model, "cpu") for _ in range(2)]
    model.unlink()
    with pytest.raises(ModelNotFoundError, match=f"^model not found: {re.escape(str(model))}$"):
        _ = gens[0].sha256_without_metadata
    os.mkfifo(model)
    refused: list[BaseException] = []

    def read_hash() -> None:
        try:
            _ = gens[1].sha256_without_metadata
        except InvalidModelError as exc:
            refused.append(exc)

    reader = threading.Thread(target=read_hash, daemon=True)
    reader.start()
    reader.join(timeout=10)
    waited = reader.is_alive()
    if waited:  # blocked opening the pipe: let it go, then fail
        os.close(os.open(model, os.O_WRONLY | os.O_NONBLOCK))
    assert not waited and [str(exc) for exc in refused] == [f"model path is not a file: {model}"]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
def test_a_model_path_that_is_a_folder_or_a_socket_is_named_as_no_file(tmp_path: Path) -> None:
    """Not errno's words for opening a socket ("No such device or address")."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "model.sock"))
        for path in (tmp_path, tmp_path / "model.sock"):
            with pytest.raises(InvalidModelError, match=f"^model path is not a file: {re.escape(str(path))}$"):
                DigitGenerator.from_path(path, "cpu")


def test_a_model_in_a_folder_whose_name_is_not_utf8_loads_or_is_refused_in_words(tmp_path: Path) -> None:
    """onnxruntime takes the folder of a model's external data as UTF-8 text only: every command that loads a model
    from a folder of other bytes had ended in a TypeError's traceback, a whole model included."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe"))
    folder.mkdir()
    whole = folder / "generator.onnx"
    whole.write_bytes(default_model_path().read_bytes())
    assert DigitGenerator.from_path(whole, "cpu").generate(3) == DigitGenerator.from_path().generate(3)
    onnx.save_model(onnx.load(whole), tmp_path / "split.onnx", save_as_external_data=True, location="weights.bin")
    for name in ("split.onnx", "weights.bin"):  # onnx's own writer cannot name that folder either
        (tmp_path / name).rename(folder / name)
    with pytest.raises(InvalidModelError) as refused:
        DigitGenerator.from_path(folder / "split.onnx", "cpu")
    assert str(refused.value) == (
        f"{folder / 'split.onnx'}: onnxruntime cannot read its external data files from a folder whose name is not "
        "UTF-8 text; move the model and its files to another folder"
    )


def test_model_with_external_data_loads_from_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    shipped = default_model_path()
    onnx.save_model(onnx.load(shipped), folder / "split.onnx", save_as_external_data=True, location="weights.bin")
    assert (folder / "weights.bin").stat().st_size > (folder / "split.onnx").stat().st_size
    split = DigitGenerator.from_path(folder / "split.onnx", "cpu")
    whole = DigitGenerator.from_path(shipped, "cpu")
    assert np.array_equal(split.generate(6, seed=3).images, whole.generate(6, seed=3).images)
    assert external_data_files((folder / "split.onnx").read_bytes()) == ["weights.bin"]
    assert external_data_files(shipped.read_bytes()) == []


def test_the_hash_of_a_split_model_covers_its_weights(tmp_path: Path) -> None:
    """Two replicas with one .onnx and different weights files must not share an ETag."""
    model = onnx.load(default_model_path())
    onnx.save_model(model, tmp_path / "split.onnx", save_as_external_data=True, location="weights.bin")
    first = DigitGenerator.from_path(tmp_path / "split.onnx", "cpu").sha256
    assert first == DigitGenerator.from_path(tmp_path / "split.onnx", "cpu").sha256
    assert first != hashlib.sha256((tmp_path / "split.onnx").read_bytes()).hexdigest()
    weights = bytearray((tmp_path / "weights.bin").read_bytes())
    weights[-1] ^= 1
    (tmp_path / "weights.bin").write_bytes(bytes(weights))
    assert DigitGenerator.from_path(tmp_path / "split.onnx", "cpu").sha256 != first


def _split_model_naming(folder: Path, location: str) -> Path:
    """The shipped model with its tensors in ``weights.bin``, whose location entries then name ``location``."""
    onnx.save_model(
        onnx.load(default_model_path()), folder / "split.onnx", save_as_external_data=True, location="weights.bin"
    )
    model = onnx.load(folder / "split.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, folder / "split.onnx")
    return folder / "split.onnx"


OUTSIDE = "which is not a path inside its folder; external data lies beside the model"
NOT_A_FILE = "which is not a regular file (a folder, a pipe or a device)"


@pytest.mark.parametrize(
    ("location", "named", "why"),
    [
        ("../weights.bin", "'../weights.bin'", OUTSIDE),
        ("/etc/hostname", "'/etc/hostname'", OUTSIDE),
        ("sub", "{folder}/sub", NOT_A_FILE),
        ("null", "'null'", OUTSIDE),  # a link to /dev/null
        ("out.bin", "'out.bin'", OUTSIDE),  # a link to ../weights.bin: it would be hashed, however large
        ("gone.bin", "{folder}/gone.bin", "which does not exist"),
        # names no file can have, or whose path cannot be followed: refused in words, not a traceback
        ("loop.bin", "'loop.bin'", "which cannot be read (Too many levels of symbolic links)"),
        ("w" * 5000, "'" + "w" * 1023 + "... (5,000 characters)", "which cannot be read (File name too long)"),
        ("../" + "w" * 5000, "'../" + "w" * 1020 + "... (5,003 characters)", OUTSIDE),  # outside, by its name alone
    ],
    ids=lambda value: repr(value)[:24],
)
def test_external_data_outside_the_folder_or_not_a_file_is_refused_before_it_is_read(
    tmp_path: Path, location: str, named: str, why: str
) -> None:
    """An untrusted model is data: it cannot make the runtime read a file outside its folder, or a device or a
    pipe (a pipe would be read for ever)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "null").symlink_to("/dev/null")
    (folder / "out.bin").symlink_to(tmp_path / "weights.bin")
    (folder / "loop.bin").symlink_to("loop.bin")
    path = _split_model_naming(folder, location)
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())  # what ../ would reach
    with pytest.raises(InvalidModelError) as refused:
        DigitGenerator.from_path(path, "cpu")
    assert str(refused.value) == f"{path} keeps tensors in {named.format(folder=folder)}, {why}"


def test_external_data_named_with_a_nul_is_refused_in_words(tmp_path: Path) -> None:
    path = _split_model_naming(tmp_path, "w\0b.bin")
    with pytest.raises(InvalidModelError) as refused:
        DigitGenerator.from_path(path, "cpu")
    assert str(refused.value) == f"{path} keeps tensors in 'w\\x00b.bin': a NUL character, which no file name can hold"


def test_external_data_linked_within_the_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "alias.bin").symlink_to("weights.bin")
    path = _split_model_naming(folder, "alias.bin")
    assert DigitGenerator.from_path(path, "cpu").generate(3, seed=1).images.shape == (3, 28, 28)


def test_a_pipe_as_external_data_is_refused_before_onnxruntime_opens_it(tmp_path: Path) -> None:
    """Refused in the runtime's words before onnxruntime or the model's hash opens it: opening a pipe waits for a
    writer, and the hash had done so for ever. In a process of its own with a time limit, so that a regression
    fails rather than hangs."""
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    path = _split_model_naming(folder, "pipe")
    load = f"from digitgen.runtime import DigitGenerator; DigitGenerator.from_path({str(path)!r}, 'cpu')"
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert f"InvalidModelError: {path} keeps tensors in {folder / 'pipe'}, {NOT_A_FILE}" in done.stderr


def test_external_files_of_bytes_that_are_no_protobuf_name_the_model() -> None:
    with pytest.raises(InvalidModelError) as refused:
        external_files(b"\x0e", Path("m.onnx"))
    assert str(refused.value) == "m.onnx is not a valid ONNX model (unsupported wire type 6)"


def test_a_group_field_a_writer_left_is_skipped_as_onnxruntime_skips_it(tmp_path: Path) -> None:
    """A contract-valid model with an unknown field of proto2's group type: onnxruntime loads it, so the runtime
    reads it too, and its external data are still looked at (the parse had failed, and the look was skipped)."""
    group = b"\xbb\x06\x08\x05\xbc\x06"  # group 103 holding field 1 = 5
    folder = tmp_path / "model"
    folder.mkdir()
    path = _split_model_naming(folder, "../weights.bin")
    path.write_bytes(path.read_bytes() + group)
    assert external_data_files(path.read_bytes()) == ["../weights.bin"]
    with pytest.raises(InvalidModelError, match=f"keeps tensors in '../weights.bin', {OUTSIDE}"):
        DigitGenerator.from_path(path, "cpu")
    shipped = tmp_path / "grouped.onnx"
    shipped.write_bytes(default_model_path().read_bytes() + group)
    info = subprocess.run([sys.executable, "-m", "digitgen", "info", shipped], capture_output=True, text=True)
    assert info.returncode == 0 and DigitGenerator.from_path(shipped, "cpu").sha256 in info.stdout, info.stderr


def test_external_data_entries_of_a_tensor_kept_inside_the_model_are_never_read(tmp_path: Path) -> None:
    """onnxruntime reads a tensor's data from a file only when its data_location says EXTERNAL; entries beside
    data kept in the model name nothing the runtime reads or hashes (they had been hashed: a pipe there hung)."""
    model = onnx.load(default_model_path())
    model.graph.initializer[0].external_data.add(key="location", value="missing-or-a-pipe.bin")
    onnx.save_model(model, tmp_path / "stray.onnx")
    stray = DigitGenerator.from_path(tmp_path / "stray.onnx", "cpu")
    assert external_data_files((tmp_path / "stray.onnx").read_bytes()) == []
    assert np.array_equal(stray.generate(3, seed=1).images, DigitGenerator.from_path().generate(3, seed=1).images)


def test_without_metadata_walks_every_wire_type_and_refuses_broken_bytes() -> None:
    """Top-level fields of each wire type (an ONNX file need not hold them all, a newer one may) are kept; only
    metadata_props (field 14) go."""
    varint, fixed64, fixed32 = b"\x08\x96\x01", b"\x11" + bytes(range(8)), b"\x1d" + bytes(range(4))
    graph, metadata = b"\x3a\x02\x0a\x00", b"\x72\x05\x0a\x01k\x12\x00"  # field 7 (graph), field 14
    group = b"\x0b" + varint + b"\x13\x1a\x02hi\x14\x0c"  # group 1 holding a varint and group 2 (a string)
    deepest = b"\x0b" * 100 + b"\x0c" * 100
    model = varint + metadata + fixed64 + graph + metadata + fixed32 + group + deepest
    assert b"".join(without_metadata(model)) == varint + fixed64 + graph + fixed32 + group + deepest
    for broken, reason in [
        (graph[:-1], "truncated field"),
        (b"\x11" + bytes(7), "truncated field"),
        (b"\x1d" + bytes(3), "truncated field"),
        (b"\x08\x96", "truncated or overlong varint"),
        (b"\x0e", "unsupported wire type 6"),
        (group[:-1], "truncated or overlong varint"),
        (b"\x0b\x1a\x05hi", "truncated field"),
        (b"\x0c", "a group ends that never started"),
        (b"\x0b\x14", "a group ends with another group's number"),
        (b"\x0b" * 101 + b"\x0c" * 101, "groups nested more than 100 deep"),  # 100 are read, as onnxruntime does
    ]:
        with pytest.raises(ValueError, match=f"^{reason}$"):
            list(without_metadata(broken))


def test_external_data_is_found_in_subgraphs_and_sparse_tensors() -> None:
    from onnx import TensorProto

    def external(name: str, location: str) -> onnx.TensorProto:
        tensor = numpy_helper.from_array(np.ones(3, np.float32), name)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        tensor.external_data.add(key="offset", value="0")
        return tensor

    branch = helper.make_graph([], "branch", [], [], [external("b", "branch.bin")])
    node = helper.make_node("If", ["cond"], [], then_branch=branch, else_branch=branch)
    sparse = helper.make_sparse_tensor(external("v", "values.bin"), external("i", "indices.bin"), [3])
    graph = helper.make_graph([node], "g", [], [], [external("w", "top.bin")], sparse_initializer=[sparse])
    model = helper.make_model(graph).SerializeToString()
    assert external_data_files(model) == ["branch.bin", "indices.bin", "top.bin", "values.bin"]
    with pytest.raises(ValueError, match="truncated"):
        external_data_files(model[:-3])


def _nested_graphs(depth: int, innermost: bytes) -> bytes:
    """The bytes of a model whose graph holds a node whose attribute holds a graph ..., ``depth`` subgraphs deep,
    the last holding ``innermost`` as its initializer."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint((number << 3) | 2) + _varint(len(payload)) + payload

    graph = field(5, innermost)  # GraphProto.initializer
    for _ in range(depth):
        graph = field(1, field(5, field(6, graph)))  # GraphProto.node, NodeProto.attribute, AttributeProto.g
    return field(7, graph)  # ModelProto.graph


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def test_subgraphs_nested_past_protobufs_limit_are_refused_in_words(tmp_path: Path) -> None:
    """Found at protobuf's limit of 100 nested subgraphs, refused past it (a ValueError, as for broken bytes, not
    Python's RecursionError); a file nested 600 deep is an invalid model, in one line."""
    tensor = numpy_helper.from_array(np.ones(3, np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="deep.bin")
    innermost = tensor.SerializeToString()
    assert external_data_files(_nested_graphs(100, innermost)) == ["deep.bin"]
    with pytest.raises(ValueError, match=r"^subgraphs nested more than 100 deep$"):
        external_data_files(_nested_graphs(101, innermost))
    path = tmp_path / "nested.onnx"
    path.write_bytes(_nested_graphs(600, innermost))
    with pytest.raises(InvalidModelError, match=f"^{re.escape(str(path))} is not a valid ONNX model"):
        DigitGenerator.from_path(path, "cpu")


def test_default_seed_is_zero(tiny: DigitGenerator) -> None:
    assert np.array_equal(tiny.generate(5).images, tiny.generate(5, seed=0).images)


def test_truncated_model(tmp_path: Path, tiny_onnx: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(tiny_onnx.read_bytes()[: len(tiny_onnx.read_bytes()) // 2])
    with pytest.raises(InvalidModelError):
        DigitGenerator.from_path(path)


def _rewrite(tiny_onnx: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(tiny_onnx))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _rename_input(model: onnx.ModelProto) -> None:
    old = model.graph.input[0].name
    model.graph.input[0].name = "noise"
    for node in model.graph.node:
        node.input[:] = ["noise" if name == old else name for name in node.input]


def _drop_metadata(model: onnx.ModelProto) -> None:
    kept = [p for p in model.metadata_props if p.key != "latent_dim"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


@pytest.mark.parametrize(
    ("edit", "message"),
    [(_rename_input, "inputs must be 'z' and 'digit'"), (_drop_metadata, "latent_dim")],
    ids=["input-name", "metadata"],
)
def test_contract_violations_are_named(tmp_path: Path, tiny_onnx: Path, edit, message: str) -> None:
    with pytest.raises(ModelContractError, match=message):
        DigitGenerator.from_path(_rewrite(tiny_onnx, tmp_path, edit))


def test_a_model_that_returns_nan_is_refused_not_drawn_black(tmp_path: Path, tiny_onnx: Path) -> None:
    generator = DigitGenerator.from_path(_rewrite(tiny_onnx, tmp_path, nan_pixels))
    with pytest.raises(ModelContractError, match=r"edited.onnx: the model returned pixels that are NaN or infinite"):
        generator.generate(3)


@pytest.mark.parametrize("factor", [255.0, -1.0, 1.01])
def test_a_model_whose_pixels_are_not_0_to_1_is_refused_not_clipped_to_flat_squares(
    tmp_path: Path, factor: float
) -> None:
    """A graph without the contract's last step (tanh's -1 to 1, or bytes' 0 to 255) had written white or black
    squares with exit 0: the writer's clip took any value. Made from the shipped model, whose pixels reach 1."""
    generator = DigitGenerator.from_path(
        _rewrite(default_model_path(), tmp_path, lambda model: scaled_pixels(model, factor))
    )
    with pytest.raises(ModelContractError) as refused:
        generator.generate(20)
    assert str(refused.value) == (
        f"{tmp_path / 'edited.onnx'}: the model returned pixels outside 0 to 1, not finished pixels (0 black, 1 white)"
    )


def test_pixels_past_0_to_1_by_less_than_half_a_grey_level_are_taken(tmp_path: Path) -> None:
    """Float error (about 1e-7 below 0 in the shipped model) is no contract breach: rounding takes it back."""
    scaled = _rewrite(default_model_path(), tmp_path, lambda model: scaled_pixels(model, 1 + 0.4 / 255))
    generator = DigitGenerator.from_path(scaled, "cpu")
    z = np.random.default_rng(0).standard_normal((20, generator.latent_dim)).astype(np.float32)
    raw = generator.run(z, np.arange(20, dtype=np.int64) % 10)
    assert 1 < raw.max() <= 1 + 0.5 / 255  # past 1, by less than half a grey level
    assert generator.generate(20).images.max() == 255


def test_unknown_provider(tiny_onnx: Path) -> None:
    with pytest.raises(ProviderUnavailableError, match="unknown provider"):
        DigitGenerator.from_path(tiny_onnx, "tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_cuda_request_without_cuda_lists_what_can_run(tiny_onnx: Path) -> None:
    with pytest.raises(ProviderUnavailableError, match="available: cpu"):
        DigitGenerator.from_path(tiny_onnx, "cuda")
    auto = DigitGenerator.from_path(tiny_onnx, "auto")
    assert auto.provider == "cpu" and auto.note == ""


def test_shipped_model_follows_the_contract() -> None:
    gen = DigitGenerator.from_path()
    assert gen.path == default_model_path()
    assert gen.info.metadata["producer"] == "digitgen"
    assert int(gen.info.metadata["train_steps"]) > 1000
    out = gen.generate(20, seed=0)
    assert out.images.shape == (20, 28, 28)
    assert out.images.mean() < 128  # black background, white strokes
    assert out.images.max() > 200


def test_truncation_changes_digits_whatever_the_batch_size(tiny: DigitGenerator) -> None:
    truncated = tiny.generate(40, seed=3, truncation=0.5, batch_size=40).images
    assert np.array_equal(tiny.generate(40, seed=3, truncation=0.5, batch_size=7).images, truncated)
    assert not np.array_equal(tiny.generate(40, seed=3).images, truncated)


class _FailingSession:
    """Stands in for an onnxruntime session whose execution provider fails mid-run (a GPU reset, say)."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def run(self, *_args: object) -> None:
        raise self.error("[ONNXRuntimeError] : 11 : EP_FAIL : the device went away")


@pytest.mark.parametrize("error", [ort_state.EPFail, ort_state.DeviceReset, ort_state.EngineError])
def test_any_onnxruntime_failure_while_running_is_a_model_run_error(
    tiny_onnx: Path, tiny_classifier: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    monkeypatch.setattr(gen, "_session", _FailingSession(error))
    with pytest.raises(ModelRunError, match=r"the model failed to run: the device went away$"):
        gen.generate(2)
    classifier = ReferenceClassifier(tiny_classifier)
    monkeypatch.setattr(classifier, "_session", _FailingSession(error))
    with pytest.raises(ModelRunError, match=r"the classifier failed to run: the device went away$"):
        classifier.embed(np.zeros((2, 28, 28), np.uint8))


def test_where_a_cuda_session_cannot_be_created_auto_runs_on_the_cpu_quietly(
    tiny_onnx: Path, monkeypatch, capfd
) -> None:
    """onnxruntime-gpu whose CUDA session fails to build: the runtime retries on the CPU itself (onnxruntime's own
    retry would print a banner on stdout); auto says so in its note, an explicit cuda is refused."""
    real_session = ort.InferenceSession
    asked = []

    def session(model: bytes, sess_options: object, providers: list[str], **kwargs: object) -> ort.InferenceSession:
        asked.append(providers)
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient")
        return real_session(model, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    gen = DigitGenerator.from_path(tiny_onnx, "auto")
    assert (gen.provider, gen.note) == ("cpu", "CUDA failed to start in onnxruntime; running on the CPU")
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    with pytest.raises(ProviderUnavailableError, match=r"^provider 'cuda' failed to start"):
        DigitGenerator.from_path(tiny_onnx, "cuda")
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::"
            "Model(onnx::ModelProto&&, const onnxruntime::PathString&, const onnxruntime::logging::Logger&) Unsupported"
            " model IR version: 999, max supported IR version: 14\n",
            "Unsupported model IR version: 999, max supported IR version: 14",
        ),
        (
            "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from g.onnx failed:Protobuf parsing failed.",
            "Protobuf parsing failed",
        ),
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Expand node. "
            "Name:'big' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
            "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
            "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 8000000000\n",
            "Expand node 'big': Failed to allocate memory for requested buffer of size 8000000000",
        ),
        (
            "[ONNXRuntimeError] : 1 : FAIL : Deserialize tensor W failed.env.cc:538 OpenRandomAccessFile Random-access "
            "reads require a regular file: /dev/zero",
            "Deserialize tensor W failed. Random-access reads require a regular file: /dev/zero",
        ),
        (
            "[ONNXRuntimeError] : 1 : FAIL : External data path validation failed for initializer: W. Error: "
            "tensorprotoutils.cc:592 ValidateExternalDataPathFromDir Absolute path not allowed: /etc/hostname",
            "External data path validation failed for initializer: W. Error: Absolute path not allowed: /etc/hostname",
        ),
        (
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: z for the following "
            "indices\n index: 1 Got: 5 Expected: 64\n Please fix either the inputs/outputs or the model.",
            "Got invalid dimensions for input: z for the following indices; index: 1 Got: 5 Expected: 64; Please fix "
            "either the inputs/outputs or the model",
        ),
        (
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Name:'c' Status "
            "Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:83 virtual OrtValue* onnxruntime::"
            "OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) status.IsOK() was false. Shape "
            "mismatch",
            "Conv node 'c': status.IsOK() was false. Shape mismatch",
        ),
        (  # a signature at a line's end: the next line's words are kept
            "/src/x.cc:12 void f(int)\nshape (1, 64) is wrong (expected 2) here",
            "shape (1, 64) is wrong (expected 2) here",
        ),
        ("", "RuntimeError"),
    ],
    ids=[
        "source-location",
        "load-prefix",
        "a-node-failed",
        "after-a-full-stop",
        "plain-function",
        "lines",
        "two-word-return-type",
        "at-a-lines-end",
        "empty",
    ],
)
def test_onnxruntimes_reason_is_its_words_without_its_codes_or_source(message: str, reason: str) -> None:
    assert ort_reason(RuntimeError(message)) == reason


def test_to_uint8_rounds_half_to_even_in_float32_and_clips() -> None:
    """The contract's conversion, against Python's round() (half to even) of each float32 product."""
    ties = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)
    values = np.concatenate([ties, np.nextafter(ties, np.float32(1)), np.float32([-0.5, -0.0, 1.0, 1.5, np.inf])])
    products = np.clip(values.astype(np.float32), 0, 1) * np.float32(255)
    assert np.count_nonzero(products % 1 == 0.5) > 50  # ties, where rounding half up or down differs
    images = values.astype(np.float32).reshape(len(values), 1, 1, 1)
    converted = to_uint8(images)
    assert converted.dtype == np.uint8 and converted.shape == (len(values), 1, 1)
    assert converted.ravel().tolist() == [round(float(p)) for p in products]


def test_a_name_too_long_is_a_typed_error_in_one_line(tmp_path: Path) -> None:
    """Path.exists() lets ENAMETOOLONG through: an app got a bare OSError where the CLI's line is a typed error."""
    long_name = tmp_path / ("a" * 300)
    with pytest.raises(InvalidModelError, match=f"^cannot read model {long_name}: File name too long$"):
        DigitGenerator.from_path(long_name)
    with pytest.raises(OutputError, match=f"^output directory {long_name} cannot be looked at: File name too long$"):
        generate_files(DigitGenerator.from_path(), long_name, 3, "npz")


@pytest.mark.parametrize(
    ("z", "labels", "refusal"),
    [
        (np.zeros((2, 8), np.float32), np.array([3, -1]), "digit -1 is not a class of this model (0-9)"),
        (np.zeros((2, 8), np.float32), np.array([3, 10, 12, 10]), "labels must be an int64 array of shape (2,), got"),
        (np.zeros((2, 8), np.float32), np.array([10, 12]), "digits 10, 12 are not classes of this model (0-9)"),
        (
            np.zeros((2, 5), np.float32),
            np.array([1, 2]),
            "z must be a float32 array of shape (B, 8), got float32 (2, 5)",
        ),
        (np.zeros((2, 8)), np.array([1, 2]), "z must be a float32 array of shape (B, 8), got float64 (2, 8)"),
        ([[0.0] * 8], [1], "z must be a float32 array of shape (B, 8), got list"),
        (
            np.zeros((2, 8), np.float32),
            np.array([1, 2], np.int32),
            "labels must be an int64 array of shape (2,), got int32 (2,)",
        ),
        (np.full((2, 8), np.nan, np.float32), np.array([1, 2]), "z holds NaN or infinite values"),
        (np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "z and labels hold no digit"),
    ],
    ids=[
        "negative-label",
        "labels-of-another-length",
        "labels-past-the-classes",
        "z-too-short",
        "z-float64",
        "lists",
        "labels-int32",
        "nan",
        "empty",
    ],
)
def test_run_refuses_inputs_the_model_would_fail_on_or_misread(
    tiny: DigitGenerator, z: object, labels: object, refusal: str
) -> None:
    """A label of -1 had drawn class 9 (a Gather reads it from the end), and the rest had reached onnxruntime, whose
    failure was blamed on the model."""
    with pytest.raises(InvalidRequestError) as refused:
        tiny.run(z, labels)
    assert str(refused.value).startswith(refusal)
    assert tiny.run(np.zeros((2, 8), np.float32), np.array([1, 2])).shape == (2, 1, 28, 28)  # usable after it
