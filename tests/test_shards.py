"""Sharded generation: the parts concatenate to exactly the unsharded output."""

from __future__ import annotations

import itertools
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import digitgen.runtime.merge as merge_module
import digitgen.runtime.shards as shards
from digitgen.cli import main
from digitgen.runtime import DigitGenerator, InvalidRequestError, OutputError, generate_files
from digitgen.runtime.encode import open_npz
from digitgen.runtime.errors import OtherRunError
from digitgen.runtime.idx import check_idx, read_idx
from digitgen.runtime.merge import merge_shards
from digitgen.runtime.noise import NOISE_SCHEME
from digitgen.runtime.shards import WHOLE, Shard
from tests.helpers import write_npz_declaring

N, K = 47, 3


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


def _write(gen: DigitGenerator, out: Path, fmt: str, shard: Shard = WHOLE, **options: object) -> list[Path]:
    return generate_files(gen, out, N, fmt, **{"digits": [3, 1, 4], "seed": 9, "batch_size": 4, **options}, shard=shard)


def test_shard_bounds_cover_every_index_once() -> None:
    bounds = [Shard(i, K).bounds(N) for i in range(K)]
    assert bounds[0][0] == 0 and bounds[-1][1] == N
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merged_shards_equal_unsharded_files(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    whole = _write(gen, tmp_path / "whole", fmt)
    for i in range(K):
        _write(gen, tmp_path / "parts", fmt, Shard(i, K))
    merged = merge_shards(tmp_path / "parts", fmt)
    if fmt == "idx":
        assert [p.read_bytes() for p in merged] == [p.read_bytes() for p in whole]
    else:
        with np.load(merged[0]) as a, np.load(whole[0]) as b:
            assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    records = sorted((tmp_path / "parts").glob(f"digitgen-{fmt}-run-*-of-0000{K}"))
    assert len(records) == K and len({p.read_bytes() for p in records}) == 1  # one run: the same record each
    # pinned to the byte: a later version's --resume must take this version's record as the same run's
    assert (
        records[0].read_text()
        == json.dumps(
            {
                "record": 1,
                "format": fmt,
                "count": N,
                "shards": K,
                "digits": [3, 1, 4],
                "seed": 9,
                "truncation": None,
                "model_sha256": gen.sha256,
                "noise": NOISE_SCHEME,
            },
            indent=1,
        )
        + "\n"
    )
    assert not list((tmp_path / "whole").glob("digitgen-*"))  # an unsharded run has nothing to merge


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merge_refuses_a_shard_run_again_with_other_options(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """A job array's failed shard, run again after its script changed (another seed): its size alone would pass."""
    _write(gen, tmp_path, fmt, Shard(0, 2))
    generate_files(gen, tmp_path, N, fmt, digits=[3, 1, 4], seed=5, batch_size=4, shard=Shard(1, 2), overwrite=True)
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path, fmt)
    assert str(error.value) == (
        f"{tmp_path}: shards 0 and 1 come from different runs (seed 9 against 5); run shard 1 again with the "
        "options of the others"
    )
    generate_files(gen, tmp_path, N, fmt, digits=[3, 1, 4], seed=9, batch_size=4, shard=Shard(1, 2), overwrite=True)
    merge_shards(tmp_path, fmt)  # the shard run again as the others were: merged


def _move_parts_without_records(source: Path, target: Path, fmt: str) -> None:
    """Swap parts by hand: ``source``'s IDX or NPZ parts replace ``target``'s, whose run records stay."""
    for part in source.glob("train-*-of-*" if fmt == "idx" else "digits-*-of-*.npz"):
        part.replace(target / part.name)


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merge_refuses_parts_that_hold_another_count_than_their_records(
    gen: DigitGenerator, tmp_path: Path, fmt: str
) -> None:
    """Every part swapped by hand for one of a run of N + 1 digits, the records left: sizes of one split, not theirs."""
    for i in range(K):
        _write(gen, tmp_path / "ours", fmt, Shard(i, K))
        generate_files(gen, tmp_path / "other", N + 1, fmt, digits=[3, 1, 4], seed=9, shard=Shard(i, K))
    _move_parts_without_records(tmp_path / "other", tmp_path / "ours", fmt)
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path / "ours", fmt)
    assert str(error.value) == (
        f"{tmp_path / 'ours'}: the parts hold {N + 1} digits where their run made {N}: a part was replaced by hand; "
        "run it again"
    )


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merge_refuses_a_part_swapped_for_one_of_other_digits_and_the_same_size(
    gen: DigitGenerator, tmp_path: Path, fmt: str
) -> None:
    """Shard 1 swapped by hand for shard 1 of a run of other digits, the records left: sizes and records agree."""
    for i in range(K):
        _write(gen, tmp_path / "ours", fmt, Shard(i, K))
    _write(gen, tmp_path / "other", fmt, Shard(1, K), digits=[3, 1, 5])  # the same first labels, not all
    _move_parts_without_records(tmp_path / "other", tmp_path / "ours", fmt)
    swapped = Shard(1, K).name("train-labels-idx1-ubyte" if fmt == "idx" else "digits.npz")
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path / "ours", fmt)
    assert str(error.value) == (
        f"{tmp_path / 'ours' / swapped} holds other labels than its run's digits (3,1,4): it was replaced by hand; "
        "run its shard again"
    )
    assert not list((tmp_path / "ours").glob("train-*-ubyte")) and not (tmp_path / "ours" / "digits.npz").exists()
    record = tmp_path / "ours" / f"digitgen-{fmt}-run-00000-of-0000{K}"
    for name in (f"digitgen-{fmt}-run-{i:05d}-of-0000{K}" for i in range(K)):  # every record, so that they agree
        (tmp_path / "ours" / name).write_text(record.read_text().replace('"digits": [\n  3,', '"digits": [\n  "3",'))
    with pytest.raises(OutputError, match=r"the run record names no digits \(damaged\?\); run the shards again$"):
        merge_shards(tmp_path / "ours", fmt)
    for name in (f"digitgen-{fmt}-run-{i:05d}-of-0000{K}" for i in range(K)):  # a digit no int64 label holds
        (tmp_path / "ours" / name).write_text(record.read_text().replace('"3",', f"{2**63},"))
    with pytest.raises(OutputError, match=r"the run record names no digits \(damaged\?\); run the shards again$"):
        merge_shards(tmp_path / "ours", fmt)


def test_merge_refuses_a_shard_without_the_record_the_others_have_or_with_a_damaged_one(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    for i in range(3):
        _write(gen, tmp_path, "idx", Shard(i, 3))
    record = tmp_path / "digitgen-idx-run-00000-of-00003"
    record.write_bytes(b'{"count": ')
    with pytest.raises(OutputError, match=rf"^{record} is not a run record \(damaged\?\); run shard 0 again"):
        merge_shards(tmp_path, "idx")
    record.unlink()
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path, "idx")
    assert str(error.value) == (
        f"{tmp_path}: shard 0 has no run record (digitgen-idx-run-00000-of-00003) where shard 1 has one, so nothing "
        "says it is of the same run (it may be another's, or older than records); run it again with the others' "
        "options and --resume, which keeps it if it is theirs"
    )
    assert not list(tmp_path.glob("train-*-ubyte"))
    _write(gen, tmp_path, "idx", Shard(0, 3), resume=True)  # as the message says: the part kept, the record added
    merge_shards(tmp_path, "idx")


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_a_record_whose_parts_are_gone_does_not_stand_in_the_way(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """Parts deleted once merged (the NPZ parts' glob leaves the records): the next sharded run needs no --overwrite."""
    _write(gen, tmp_path, fmt, Shard(0, 2))
    for part in tmp_path.glob("train-*-of-*" if fmt == "idx" else "digits-*-of-*.npz"):
        part.unlink()
    _write(gen, tmp_path, fmt, Shard(0, 2), seed=5)
    assert json.loads((tmp_path / f"digitgen-{fmt}-run-00000-of-00002").read_bytes())["seed"] == 5


def test_png_shards_are_the_unsharded_files(gen: DigitGenerator, tmp_path: Path) -> None:
    _write(gen, tmp_path / "whole", "png")
    for i in range(K):
        _write(gen, tmp_path / "parts", "png", Shard(i, K))
    whole, parts = sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "parts").iterdir())
    assert [p.name for p in parts] == [p.name for p in whole]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(parts, whole, strict=True))


def test_merge_names_missing_shards(gen: DigitGenerator, tmp_path: Path) -> None:
    _write(gen, tmp_path, "idx", Shard(0, K))
    _write(gen, tmp_path, "idx", Shard(2, K))
    with pytest.raises(OutputError, match="shard\\(s\\) 1 of 3"):
        merge_shards(tmp_path, "idx")
    assert not (tmp_path / "train-images-idx3-ubyte").exists()


@pytest.mark.parametrize(("shard", "message"), [(Shard(3, 3), "0..2"), (Shard(0, 60), "empty")])
def test_bad_shards(gen: DigitGenerator, tmp_path: Path, shard: Shard, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _write(gen, tmp_path, "idx", shard)


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merge_command_joins_the_format_asked_for(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    for i in range(K):
        _write(gen, tmp_path, fmt, Shard(i, K))
    result = CliRunner().invoke(main, ["merge", str(tmp_path), "--format", fmt])
    assert result.exit_code == 0, result.output
    expected = {"idx": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"], "npz": ["digits.npz"]}[fmt]
    assert result.output.strip() == "merged into " + ", ".join(str(tmp_path / name) for name in expected)
    assert all((tmp_path / name).stat().st_size > 0 for name in expected)


def test_merge_refuses_what_it_cannot_join(gen: DigitGenerator, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="merge joins idx or npz shards, not 'png'"):
        merge_shards(tmp_path, "png")
    with pytest.raises(OutputError, match="is not a directory"):
        merge_shards(tmp_path / "none", "idx")
    with pytest.raises(OutputError, match=r"^cannot read x{300}: File name too long$"):  # not a bare OSError
        merge_shards("x" * 300, "idx")
    with pytest.raises(OutputError, match=f"no shards of digits.npz in {tmp_path}"):
        merge_shards(tmp_path, "npz")
    _write(gen, tmp_path, "npz", Shard(0, 2))
    _write(gen, tmp_path, "npz", Shard(1, 2))
    other_scripts = "digits-" + "\u0660" * 5 + "-of-" + "\u0660" * 4 + "\u0664.npz"  # digits int() reads
    (tmp_path / other_scripts).write_text("mine")  # not a part: neither counted nor read
    _write(gen, tmp_path, "npz", Shard(1, 3))  # a stray part: named by its run's count
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, "npz")
    assert str(refused.value) == (
        f"{tmp_path} holds shards of digits.npz from runs with different shard counts (2 parts of -of-00002, 1 part "
        "of -of-00003); move the parts of the run that is not this one out of the folder"
    )


def test_merge_of_a_png_folder_says_its_shards_need_no_merge(gen: DigitGenerator, tmp_path: Path) -> None:
    for index in range(2):
        _write(gen, tmp_path, "png", Shard(index, 2))
    for fmt in ("idx", "npz"):
        with pytest.raises(OutputError) as refused:
            merge_shards(tmp_path, fmt)
        assert str(refused.value) == (
            f"{tmp_path} holds PNG digits and no {fmt} shards: a sharded PNG run writes each digit under its final "
            "name, so its folder needs no merge"
        )


def test_merge_refuses_image_and_label_shards_of_different_runs(gen: DigitGenerator, tmp_path: Path) -> None:
    for i in range(2):
        _write(gen, tmp_path, "idx", Shard(i, 2))
    for path in tmp_path.glob("train-labels-*"):
        path.unlink()
    for i in range(3):
        _write(gen, tmp_path / "three", "idx", Shard(i, 3))
    for path in (tmp_path / "three").glob("train-labels-*"):
        path.rename(tmp_path / path.name)
    with pytest.raises(OutputError, match=f"^{tmp_path} holds 2 image shards but 3 label shards$"):
        merge_shards(tmp_path, "idx")
    assert not list(tmp_path.glob("train-*-ubyte"))


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_merge_refuses_shards_of_runs_of_different_counts(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """Shards 0 and 2 of 30 digits and shard 1 of 40: their run records differ; without them (parts written before
    records were kept), their sizes 10, 13, 10 are no one run's split."""
    for index, total in [(0, 30), (1, 40), (2, 30)]:
        generate_files(gen, tmp_path, total, fmt, seed=9, shard=Shard(index, 3))
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path, fmt)
    assert str(error.value) == (
        f"{tmp_path}: shards 0 and 1 come from different runs (count 30 against 40); run shard 1 again with the "
        "options of the others"
    )
    for record in tmp_path.glob(f"digitgen-{fmt}-run-*"):
        record.unlink()
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path, fmt)
    assert str(error.value) == (
        f"{tmp_path}: the shards hold 10, 13, 10 digits, where one run of 33 splits as 11, 11, 11: "
        "they come from different runs"
    )
    assert sorted(path.name for path in tmp_path.iterdir() if "-of-" not in path.name) == []


def test_merge_with_no_shards_says_so_before_anything_about_existing_files(tmp_path: Path) -> None:
    (tmp_path / "digits.npz").write_bytes(b"merged earlier")
    with pytest.raises(OutputError, match=f"^no shards of digits.npz in {tmp_path}$"):
        merge_shards(tmp_path, "npz")


@pytest.mark.parametrize(("written", "merged"), [("npz", "idx"), ("idx", "npz")])
def test_merge_of_the_other_format_names_the_format_the_folder_holds(
    gen: DigitGenerator, tmp_path: Path, written: str, merged: str
) -> None:
    for i in range(K):
        _write(gen, tmp_path, written, Shard(i, K))
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, merged)
    assert str(refused.value) == (
        f"{tmp_path} holds {written} shards and no {merged} ones: merge them as {written} (--format {written})"
    )


def test_merge_refuses_image_and_label_shards_of_different_sizes(gen: DigitGenerator, tmp_path: Path) -> None:
    """Three image shards of 47 digits (15, 16, 16) beside three label shards of 50 (16, 17, 17)."""
    for i in range(K):
        _write(gen, tmp_path, "idx", Shard(i, K))
        generate_files(gen, tmp_path / "fifty", 50, "idx", seed=9, shard=Shard(i, K))
    for path in (tmp_path / "fifty").glob("train-labels-*"):
        path.replace(tmp_path / path.name)
    with pytest.raises(OutputError) as error:
        merge_shards(tmp_path, "idx")
    assert str(error.value) == f"{tmp_path}: shard(s) 0, 1, 2 hold different numbers of images and labels"


@pytest.mark.parametrize("count", [0, 1])
def test_merge_names_shard_files_this_project_never_writes(tmp_path: Path, count: int) -> None:
    (tmp_path / f"digits-00000-of-0000{count}.npz").write_bytes(b"")
    with pytest.raises(OutputError, match=f"'-of-0000{count}' shards are not ones this project writes"):
        merge_shards(tmp_path, "npz")


@pytest.mark.parametrize(
    ("stray", "words"),
    [
        ("digits-00004-of-00004.npz", "names shard 4 of a run of 4 shards, which has no such shard"),
        ("digits-000001-of-00004.npz", "is not named as this project names a shard (shard 1 of 4 is "),
    ],
)
def test_merge_refuses_a_part_no_shard_of_the_run_is_named(
    gen: DigitGenerator, tmp_path: Path, stray: str, words: str
) -> None:
    """A part past the last shard had been left out of the merge unsaid; a shard's name with other digits had
    stood for the missing shard, which the merge then called unreadable."""
    for index in (0, 2, 3):
        _write(gen, tmp_path, "npz", Shard(index, 4))
    if "00001" not in stray:
        _write(gen, tmp_path, "npz", Shard(1, 4))
    (tmp_path / stray).write_bytes((tmp_path / "digits-00000-of-00004.npz").read_bytes())
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, "npz")
    assert str(refused.value).startswith(f"{tmp_path / stray} {words}"), str(refused.value)
    assert str(refused.value).endswith("; move it out of the folder")
    assert not (tmp_path / "digits.npz").exists()


def test_merge_says_what_to_do_with_a_folder_where_a_record_belongs(gen: DigitGenerator, tmp_path: Path) -> None:
    """It had called the folder a damaged record, to be mended by --resume, which refuses a folder."""
    for index in range(3):
        _write(gen, tmp_path, "idx", Shard(index, 3))
    record = tmp_path / "digitgen-idx-run-00001-of-00003"
    record.unlink()
    record.mkdir()
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, "idx")
    assert str(refused.value) == (
        f"{record} is not a file (a folder, a pipe, a device, or a link to one) where shard 1's run record belongs; "
        "move it, then run that shard again with --resume"
    )
    record.rmdir()
    _write(gen, tmp_path, "idx", Shard(1, 3), resume=True)  # what the words say, and then the merge
    assert len(read_idx(merge_shards(tmp_path, "idx")[1])) == N


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_a_shard_run_again_while_merge_reads_the_parts_leaves_nothing_merged(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A shard rewritten between merge's reading of its header and of its body had given a merged IDX file that its
    header does not describe; between two parts, a merge of two runs."""
    for index in range(K):
        _write(gen, tmp_path, fmt, Shard(index, K))
    reader = "concat_idx" if fmt == "idx" else "concat_npz"
    real = getattr(merge_module, reader)

    def run_again_meanwhile(*args: object) -> object:
        _write(gen, tmp_path, fmt, Shard(1, K), seed=10, overwrite=True)  # a retried job with other options
        return real(*args)

    monkeypatch.setattr(merge_module, reader, run_again_meanwhile)
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, fmt)
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path))}/\S+-0000[1]-of-0000{K}\S* changed while merge read the shards \(a shard run "
        r"again meanwhile\?\); no file was merged: run merge again once every shard is done",
        str(refused.value),
    ), str(refused.value)
    assert not any(path.name in ("digits.npz", "train-images-idx3-ubyte") for path in tmp_path.iterdir())


def test_merge_lists_every_missing_shard_and_keeps_existing_files(gen: DigitGenerator, tmp_path: Path) -> None:
    _write(gen, tmp_path, "idx", Shard(0, 4))
    with pytest.raises(OutputError, match="shard\\(s\\) 1, 2, 3 of 4"):
        merge_shards(tmp_path, "idx")
    for i in range(1, 4):
        _write(gen, tmp_path, "idx", Shard(i, 4))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        merge_shards(tmp_path, "idx")
    assert (tmp_path / "train-images-idx3-ubyte").read_bytes() == b"mine"
    merge_shards(tmp_path, "idx", overwrite=True)
    assert len(read_idx(tmp_path / "train-images-idx3-ubyte")) == N


def test_merge_finds_shards_of_runs_of_100000_or_more_shards(tmp_path: Path) -> None:
    for index in (0, 3):
        (tmp_path / Shard(index, 100_000).name("digits.npz")).write_bytes(b"")
    assert (tmp_path / "digits-00003-of-100000.npz").exists()
    with pytest.raises(OutputError) as missing:
        merge_shards(tmp_path, "npz")
    assert str(missing.value) == (
        f"{tmp_path}: shard(s) 1, 2, 4, 5, 6, 7, 8, 9, 10, 11 and 99,988 more of 100000 of digits.npz missing"
    )


def test_a_labels_shard_under_an_images_name_is_refused(gen: DigitGenerator, tmp_path: Path) -> None:
    """Same count, other kind: its bytes would otherwise be copied in as pixels."""
    for i in range(2):
        _write(gen, tmp_path, "idx", Shard(i, 2))
    labels = (tmp_path / "train-labels-idx1-ubyte-00001-of-00002").read_bytes()
    (tmp_path / "train-images-idx3-ubyte-00001-of-00002").write_bytes(labels)
    with pytest.raises(
        InvalidRequestError, match=r"images-idx3-ubyte-00001-of-00002 is not an MNIST IDX file of images"
    ):
        merge_shards(tmp_path, "idx")
    assert not list(tmp_path.glob("train-*-ubyte"))


def test_a_damaged_shard_is_named_and_nothing_is_merged(gen: DigitGenerator, tmp_path: Path) -> None:
    for i in range(2):
        _write(gen, tmp_path / "idx", "idx", Shard(i, 2))
        _write(gen, tmp_path / "npz", "npz", Shard(i, 2))
    label_shard = tmp_path / "idx" / "train-labels-idx1-ubyte-00001-of-00002"
    label_shard.write_bytes(label_shard.read_bytes()[:-1])
    advice = r"; run shard 1 again with --resume, which replaces a damaged file \(--overwrite: whatever it holds\)$"
    with pytest.raises(InvalidRequestError, match=r"labels-idx1-ubyte-00001-of-00002 is truncated .*" + advice):
        merge_shards(tmp_path / "idx", "idx")
    assert not list((tmp_path / "idx").glob("train-*-ubyte"))  # the images file is not written either
    npz_shard = tmp_path / "npz" / "digits-00001-of-00002.npz"
    npz_shard.write_bytes(npz_shard.read_bytes()[:300])  # cut short, as by a full disk
    with pytest.raises(OutputError, match=r"digits-00001-of-00002\.npz is not a digits NPZ shard .*" + advice):
        merge_shards(tmp_path / "npz", "npz")
    assert not (tmp_path / "npz" / "digits.npz").exists()
    for fmt in ("idx", "npz"):  # as the advice says
        _write(gen, tmp_path / fmt, fmt, Shard(1, 2), resume=True)
        merge_shards(tmp_path / fmt, fmt)


def test_an_npz_shard_holding_one_array_is_named_and_nothing_is_merged(gen: DigitGenerator, tmp_path: Path) -> None:
    _write(gen, tmp_path, "npz", Shard(0, 2))
    (tmp_path / "digitgen-npz-run-00000-of-00002").unlink()  # as parts made before run records were kept
    with (tmp_path / "digits-00001-of-00002.npz").open("wb") as f:
        np.save(f, np.zeros((2, 28, 28), np.uint8))  # .npy bytes under an .npz name
    shard = r"digits-00001-of-00002\.npz is not a digits NPZ shard \(ValueError: it holds one NumPy array"
    with pytest.raises(OutputError, match=shard):
        merge_shards(tmp_path, "npz")
    assert not (tmp_path / "digits.npz").exists()


@pytest.mark.parametrize("content", [b"garbage", b"", b"PK"], ids=["text", "empty", "cut-short-signature"])
def test_an_npz_shard_that_is_no_archive_is_named_as_such(tmp_path: Path, content: bytes) -> None:
    for index in range(2):
        (tmp_path / f"digits-0000{index}-of-00002.npz").write_bytes(content)
    no_archive = r"00000-of-00002\.npz is not a digits NPZ shard \(ValueError: it is not a NumPy archive: a zip file's"
    with pytest.raises(OutputError, match=no_archive) as refused:
        merge_shards(tmp_path, "npz")
    assert "pickle" not in str(refused.value)


def test_npz_arrays_in_numpys_format_version_2_are_read(tmp_path: Path) -> None:
    """What ``np.save`` writes for an array whose header passes 64 KiB; its header is read as version 2's."""
    images, labels = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28), np.array([3, 7])
    with zipfile.ZipFile(tmp_path / "v2.npz", "w") as archive:
        for name, array in (("images", images), ("labels", labels)):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array, version=(2, 0))
    with open_npz(tmp_path / "v2.npz") as archive:
        assert np.array_equal(archive["images"], images) and np.array_equal(archive["labels"], labels)


@pytest.mark.parametrize(
    ("shape", "declared"),
    [
        ((382_653_061, 28, 28), r"299999999824 bytes of uint8 \[382653061, 28, 28\] but holds 1024"),  # 279 GiB
        # numpy's header reader lets (True, 28, 28) through, and reading the array then raised a TypeError
        ((True, 28, 28), r"a shape of \[True, 28, 28\], not of whole numbers"),
    ],
    ids=["more-than-it-holds", "not-whole-numbers"],
)
def test_an_npz_shard_declaring_a_shape_it_cannot_hold_is_named_without_allocating_it(
    gen: DigitGenerator, tmp_path: Path, shape: tuple, declared: str
) -> None:
    _write(gen, tmp_path, "npz", Shard(0, 2))
    (tmp_path / "digitgen-npz-run-00000-of-00002").unlink()  # as parts made before run records were kept
    write_npz_declaring(tmp_path / "digits-00001-of-00002.npz", shape)
    shard = rf"digits-00001-of-00002\.npz is not a digits NPZ shard \(ValueError: images\.npy declares {declared}\)"
    with pytest.raises(OutputError, match=shard):
        merge_shards(tmp_path, "npz")
    assert not (tmp_path / "digits.npz").exists()


@pytest.mark.parametrize("garble", [b"\xff" * 40, bytes(40)], ids=["ones", "zeros"])
def test_an_npz_shard_with_garbled_compressed_data_is_named(gen: DigitGenerator, tmp_path: Path, garble: bytes) -> None:
    """Bytes changed inside a member's deflate stream: zlib's own error (or a failed CRC), named in one line."""
    for index in range(2):
        _write(gen, tmp_path, "npz", Shard(index, 2))
    part = tmp_path / "digits-00001-of-00002.npz"
    with zipfile.ZipFile(part) as archive:
        member = archive.getinfo("images.npy")
    data = bytearray(part.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    middle = member.header_offset + 30 + name_length + extra_length + member.compress_size // 2
    data[middle : middle + len(garble)] = garble
    part.write_bytes(bytes(data))
    with pytest.raises(OutputError, match=r"digits-00001-of-00002\.npz is not a digits NPZ shard \((error|BadZipFile)"):
        merge_shards(tmp_path, "npz")
    assert not (tmp_path / "digits.npz").exists()


BAD_NPZ_SHARDS = {
    "more labels than images": (np.zeros((2, 28, 28), np.uint8), np.zeros(5, np.int64)),
    "float images": (np.zeros((2, 28, 28), np.float64), np.zeros(2, np.int64)),
    "5x5 images": (np.zeros((2, 5, 5), np.uint8), np.zeros(2, np.int64)),
    "int32 labels": (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int32)),
}


@pytest.mark.parametrize(("images", "labels"), BAD_NPZ_SHARDS.values(), ids=BAD_NPZ_SHARDS.keys())
def test_an_npz_shard_that_is_not_digits_is_named_and_nothing_is_merged(
    gen: DigitGenerator, tmp_path: Path, images: np.ndarray, labels: np.ndarray
) -> None:
    _write(gen, tmp_path, "npz", Shard(0, 2))
    (tmp_path / "digitgen-npz-run-00000-of-00002").unlink()  # as parts made before run records were kept
    np.savez(tmp_path / "digits-00001-of-00002.npz", images=images, labels=labels)
    with pytest.raises(OutputError, match=r"digits-00001-of-00002\.npz is not a digits NPZ shard: images "):
        merge_shards(tmp_path, "npz")
    assert not (tmp_path / "digits.npz").exists()


def test_an_npz_shard_holding_more_than_digits_is_named_not_merged_without_it(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    _write(gen, tmp_path, "npz", Shard(0, 2))
    (tmp_path / "digitgen-npz-run-00000-of-00002").unlink()  # as parts made before run records were kept
    digits = gen.generate(2)
    extra = {"notes": np.zeros(3), "more": np.ones(2)}
    np.savez(tmp_path / "digits-00001-of-00002.npz", images=digits.images, labels=digits.labels, **extra)
    with pytest.raises(OutputError) as refused:
        merge_shards(tmp_path, "npz")
    part = tmp_path / "digits-00001-of-00002.npz"
    assert str(refused.value) == f"{part} is not a digits NPZ shard: it holds more, notes beside images and labels"
    assert not (tmp_path / "digits.npz").exists()


def test_a_shard_index_is_checked_against_its_count_and_the_count_against_the_digits() -> None:
    with pytest.raises(InvalidRequestError) as alone:
        Shard(1, 1).check(5)
    assert str(alone.value) == "shard index 1 needs a number of shards (--num-shards, Shard.count) above it"
    with pytest.raises(InvalidRequestError, match=r"^shard index must be in 0\.\.1 for 2 shards$"):
        Shard(2, 2).check(5)
    assert Shard(4, 5).check(5).bounds(5) == (4, 5)  # one digit a shard: none left empty
    with pytest.raises(InvalidRequestError, match=r"^6 shards for 5 digits would leave some empty$"):
        Shard(0, 6).check(5)


def test_a_shard_count_below_one_is_named() -> None:
    with pytest.raises(InvalidRequestError, match=r"^the number of shards must be at least 1, got 0$"):
        Shard(0, 0).check(5)


def test_cli_says_how_many_digits_its_shard_wrote(tiny_onnx: Path, tmp_path: Path) -> None:
    args = ["generate", "--generator", str(tiny_onnx), "-n", str(N), "--num-shards", "3", "--shard-index", "1"]
    result = CliRunner().invoke(main, [*args, "--format", "npz", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {Shard(1, 3).size(N)} digits (shard 1 of 3) as npz" in result.output
    assert Shard(1, 3).size(N) == 16 and Shard(2, 3).size(N) == 16 and Shard(0, 3).size(N) == 15


def test_merge_reads_each_idx_shards_header_once(gen: DigitGenerator, tmp_path: Path, monkeypatch) -> None:
    for index in range(3):
        _write(gen, tmp_path, "idx", Shard(index, 3))
    read: list[str] = []

    def counted_check_idx(path: Path, images: bool) -> tuple[int, ...]:
        read.append(Path(path).name)
        return check_idx(path, images)

    monkeypatch.setattr(shards, "check_idx", counted_check_idx)
    merge_shards(tmp_path, "idx")
    assert len(read) == 6 and sorted(read) == sorted(set(read))
    assert read_idx(tmp_path / "train-labels-idx1-ubyte").shape == (N,)


@pytest.mark.parametrize(
    ("shard", "words"),
    [
        (Shard(True, 2), "the shard index must be an integer, got True"),
        (Shard(1.0, 2), "the shard index must be an integer, got 1.0"),
        (Shard(1, "2"), "the number of shards must be an integer, got '2'"),
    ],
)
def test_a_shard_of_other_types_is_refused_before_any_folder(
    gen: DigitGenerator, tmp_path: Path, shard: Shard, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        generate_files(gen, tmp_path / "out", 10, "npz", shard=shard)
    assert str(refused.value) == words and not (tmp_path / "out").exists()


def test_shard_is_part_of_the_runtime_api() -> None:
    import digitgen.runtime

    assert digitgen.runtime.Shard is Shard and "Shard" in digitgen.runtime.__all__


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_merge_takes_overwrite_as_true_or_false_only(gen: DigitGenerator, tmp_path: Path, flag: object) -> None:
    """A truthy "no" must not replace the merged file a first merge wrote."""
    for i in range(K):
        _write(gen, tmp_path, "npz", Shard(i, K))
    [merged] = merge_shards(tmp_path, "npz")
    before = merged.read_bytes()
    with pytest.raises(InvalidRequestError, match=f"^overwrite must be True or False, got {re.escape(repr(flag))}$"):
        merge_shards(tmp_path, "npz", overwrite=flag)
    assert merged.read_bytes() == before


@pytest.mark.parametrize("fmt", ["npz", "idx"])
def test_a_resume_whose_record_is_another_runs_is_refused_before_any_digit(
    gen: DigitGenerator, tmp_path: Path, fmt: str
) -> None:
    """The shard's run record alone tells that the request differs (here the total count): no work first."""
    generate_files(gen, tmp_path, 40, fmt, shard=Shard(1, 2))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    made: list[int] = []
    record = tmp_path / f"digitgen-{fmt}-run-00001-of-00002"
    with pytest.raises(OtherRunError, match=f"^{record} holds other digits than this command makes"):
        generate_files(gen, tmp_path, 39, fmt, shard=Shard(1, 2), resume=True, on_batch=made.append)
    assert made == [] and {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert generate_files(gen, tmp_path, 40, fmt, shard=Shard(1, 2), resume=True)  # the same request resumes


def test_a_file_named_like_an_orphan_record_that_is_no_record_is_never_removed(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    """A shard's record without its parts is removed as an orphan; a file of its name that is no record is
    someone's: refused as any file in the way (it had been deleted)."""
    notes = tmp_path / "digitgen-npz-run-00000-of-00002"
    notes.write_text("my notes\n")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        _write(gen, tmp_path, "npz", Shard(0, 2))
    assert notes.read_text() == "my notes\n"
    orphan = tmp_path / "digitgen-npz-run-00001-of-00002"
    _write(gen, tmp_path, "npz", Shard(1, 2))
    (tmp_path / "digits-00001-of-00002.npz").unlink()  # merged, say: the record describes nothing now
    assert orphan.exists()
    _write(gen, tmp_path, "npz", Shard(1, 2))  # the orphan record goes, and the shard is written again
    assert orphan.exists() and (tmp_path / "digits-00001-of-00002.npz").exists()
