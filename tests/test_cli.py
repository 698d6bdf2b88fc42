"""The Click CLI: every command through CliRunner, errors as one line with a non-zero exit."""

from __future__ import annotations

import hashlib
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from digitgen.cli import main
from digitgen.runtime import DigitGenerator
from digitgen.runtime.idx import read_idx


def run(*args: str) -> tuple[int, str]:
    """The exit status and output of the CLI; an exception that escaped the command (a traceback, outside the
    runner) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"the command raised {result.exception!r}") from result.exception
    return result.exit_code, result.output


def test_generate_png_default_count(tmp_path: Path, tiny_onnx: Path) -> None:
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path)
    assert code == 0, output
    assert len(list(tmp_path.glob("*.png"))) == 10


@pytest.mark.parametrize("flag", ["-n", "--num-digits", "--num_digits", "--count"])
def test_num_digits_spellings(tmp_path: Path, tiny_onnx: Path, flag: str) -> None:
    code, output = run("generate", "--generator", tiny_onnx, flag, 3, "--out", tmp_path, "--format", "npz")
    assert code == 0, output
    assert len(np.load(tmp_path / "digits.npz")["labels"]) == 3


COUNT = "-n / --num-digits / --num_digits / --count"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("generate", "-n", "5", "--count", "7"), f"{COUNT} is given twice"),
        (("generate", "--format", "npz", "--format=idx"), "--format is given twice"),
        (("generate", "-n3", "--num_digits", "4"), f"{COUNT} is given twice"),
        (("generate", "--digit", "3", "--digit", "4"), "--digit is given twice"),
        (("train", "--steps", "3", "--steps", "4"), "--steps is given twice"),
        (("generate", "--generator", "--", "-n", "3", "--count", "4"), f"{COUNT} is given twice"),  # "--": a value
    ],
)
def test_an_option_given_twice_is_refused_not_settled_silently(tmp_path: Path, args: tuple, words: str) -> None:
    code, output = run(*args, "--out", tmp_path / "out")
    assert (code, output) == (2, f"Error: {words}; give it once (see --help)\n")
    assert not (tmp_path / "out").exists()


def test_options_that_collect_values_may_repeat_and_a_value_may_look_like_an_option(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = run("serve", "--cors-origin", "https://a.example", "--cors-origin", "https://b.example", "-h")
    assert code == 0 and "--cors-origin" in output
    code, output = run("generate", "--seed", "-1", "--out", tmp_path)  # "-1" is a value, refused for its range
    assert code == 2 and "is given twice" not in output and "-1" in output
    monkeypatch.chdir(tmp_path)
    code, output = run("generate", "--generator", tiny_onnx, "--out", "-nine", "--count", "3")  # a folder "-nine"
    assert code == 0 and len(list((tmp_path / "-nine").glob("*.png"))) == 3, output
    code, output = run("generate", "-n", "3", "-n", "4", "--help")  # help first, as for any command line
    assert code == 0 and output.startswith("Usage: ")


def test_digit_and_digits_choose_labels(tmp_path: Path, tiny_onnx: Path) -> None:
    code, _ = run(
        "generate", "--generator", tiny_onnx, "-n", 5, "--digit", 7, "--out", tmp_path / "a", "--format", "idx"
    )
    assert code == 0 and read_idx(tmp_path / "a" / "train-labels-idx1-ubyte").tolist() == [7] * 5
    code, _ = run(
        "generate", "--generator", tiny_onnx, "-n", 5, "--digits", "1,2", "--out", tmp_path / "b", "--format", "idx"
    )
    assert code == 0 and read_idx(tmp_path / "b" / "train-labels-idx1-ubyte").tolist() == [1, 2, 1, 2, 1]
    code, _ = run(  # signed, as --digit +7 reads
        "generate", "--generator", tiny_onnx, "-n", 3, "--digits", "+1, -0", "--out", tmp_path / "c", "--format", "idx"
    )
    assert code == 0 and read_idx(tmp_path / "c" / "train-labels-idx1-ubyte").tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0"], "number of digits must be an integer >= 1, got 0 (see --help)"),
        (["-n", "-4"], "number of digits must be an integer >= 1, got -4 (see --help)"),
        (["-n", "ten"], "number of digits must be an integer >= 1, got 'ten' (see --help)"),
        (["-n", "1_0"], "number of digits must be an integer >= 1, got '1_0' (see --help)"),  # int() reads it
        (["--seed", "\u0663"], "seed must be an integer from 0 to 18446744073709551615, got '\u0663'"),
        (["--digit", "\u0663"], "Error: digit '\u0663' is not a class of this model (0-9)"),
        (["--truncation", "1_0"], "truncation must be a finite number >= 0.1, got '1_0' (see --help)"),
        (["--digits", "1,x"], "comma-separated list of digits"),
        (["--digits", "1_0"], "'1_0' is not a comma-separated list of digits such as 0,3,7"),
        (["--digits", "3,12"], "digit 12 is not a class"),
        (["--digit", "10"], "digit 10 is not a class"),
        (["--digits", "12,3,15"], "Error: digits 12, 15 are not classes of this model (0-9)"),  # every bad one
        (
            ["--digits", "3," + "9" * 41],
            f"Error: digit '{'9' * 41}' is not a class of this model (0-9)",
        ),  # a list, of a long number
        (["--digit", "1", "--digits", "2"], "not both"),
        (["--format", "jpg"], "'jpg' is not one of"),
        (["--provider", "tpu"], "'tpu' is not one of"),
        (["--generator", "/nonexistent/g.onnx"], "model not found"),
        (["--out", "/proc/digitgen-cannot-write"], "directory /proc/digitgen-cannot-write: No such file or directory"),
        (["--num-shards", "3", "--shard-index", "3"], "shard index must be in 0..2"),
        (["--shard-index", "1"], "shard index 1 needs a number of shards (--num-shards, Shard.count) above it"),
        (["--out", ""], "Invalid value for '--out': an empty path; name a file or folder (. for the current folder)"),
        (["--truncation", "0.05"], "truncation must be a finite number >= 0.1, got 0.05"),
        (["--seed", str(2**64)], "seed must be an integer from 0 to 18446744073709551615, got 18446744073709551616"),
        (["-n", str(2**32), "--format", "idx"], "an IDX file holds at most 4,294,967,295 digits"),
        (["-n", str(2**33), "--format", "idx", "--num-shards", "4"], "not 8,589,934,592"),  # the merged file's count
        (["--format", "mnist", "--test-count", str(2**32)], "(its count is 32 bits), not 4,294,967,296"),
        (["-n", "20", "--format", "grid", "--num-shards", "2"], "the grid format writes one contact sheet"),
        (["--batch-size", "8193"], "8193 is not in the range 1<=x<=8192"),
        # a value pasted by mistake: its first 1,024 characters quoted, then its length, as the page and server do
        (["-n", "9" * 5000], f"got '{'9' * 1023}... (5,000 characters) (see --help)"),
        (["--digits", "3," * 2000], f"'{'3,' * 511}3... (4,000 characters) is not a comma-separated list"),
        (["--batch-size", "x" * 3000], f"'{'x' * 1023}... (3,000 characters) is not a valid integer."),
    ],
)
def test_bad_generate_input_is_one_clear_line(tmp_path: Path, tiny_onnx: Path, args: list[str], message: str) -> None:
    base = ["generate"] if "--out" in args else ["generate", "--out", tmp_path / "out"]
    if "--generator" not in args:
        base += ["--generator", tiny_onnx]
    code, output = run(*base, *args)
    assert code != 0
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA can run here")
def test_auto_provider_on_a_cpu_only_onnxruntime_says_nothing(tmp_path: Path, tiny_onnx: Path) -> None:
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "--provider", "auto")
    assert code == 0, output
    assert "note:" not in output and "CUDA" not in output


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_auto_provider_says_once_when_installed_cuda_fails(tmp_path: Path, tiny_onnx: Path, monkeypatch) -> None:
    """onnxruntime-gpu on a machine without a usable GPU: auto falls back to the CPU and says so once."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "--provider", "auto")
    assert code == 0, output
    assert output.count("note: CUDA failed to start in onnxruntime; running on the CPU") == 1
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path / "cuda", "--provider", "cuda")
    assert code == 1 and "provider 'cuda' failed to start" in output and len(output.strip().splitlines()) == 1


def test_generate_refuses_to_overwrite(tmp_path: Path, tiny_onnx: Path) -> None:
    args = ("generate", "--generator", tiny_onnx, "--out", tmp_path, "--format", "grid")
    assert run(*args)[0] == 0
    code, output = run(*args)
    assert code == 1 and "already exists; pass --overwrite" in output
    assert run(*args, "--overwrite")[0] == 0


def test_an_interrupted_png_run_run_again_is_offered_resume_and_overwrite(tmp_path: Path, tiny_onnx: Path) -> None:
    """The same command again, without --resume: the refusal names both ways on, and --resume takes the first."""
    args = ("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", "6")
    assert run(*args)[0] == 0
    for index in (3, 5):  # as an interrupted run leaves the folder: some digits missing
        next(tmp_path.glob(f"0000000{index}_label*.png")).unlink()
    code, output = run(*args)
    assert (code, output.strip().splitlines()) == (
        1,
        [
            f"Error: {tmp_path / '00000000_label0.png'} and 3 more already exist; pass --resume to continue an "
            "interrupted run of this command, or --overwrite to replace them"
        ],
    )
    assert run(*args, "--resume")[0] == 0 and len(list(tmp_path.glob("*.png"))) == 6


@pytest.mark.parametrize("fmt", ["png", "idx", "mnist"])
def test_the_folder_written_to_is_named_alike_whatever_the_format(tmp_path: Path, tiny_onnx: Path, fmt: str) -> None:
    test_split = ["--test-count", "2"] if fmt == "mnist" else []
    code, output = run(
        "generate", "--generator", tiny_onnx, "-n", 3, "--format", fmt, "--out", f"{tmp_path}/out/", *test_split
    )
    digits = 5 if fmt == "mnist" else 3
    assert code == 0 and output.startswith(f"wrote {digits} digits as {fmt} to {tmp_path / 'out'} in "), output


def test_plain_digitgen_prints_the_help_not_an_error() -> None:
    code, output = run()
    assert code == 0 and output.startswith("Usage:") and "Error" not in output, output


def test_an_os_error_the_library_did_not_foresee_is_one_line(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import digitgen.runtime.layout as layout

    def unlistable(out_dir: Path, *_bounds: int) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr(layout, "pngs_in_range", unlistable)
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path / "out")
    assert (code, output) == (1, f"Error: Permission denied: {tmp_path / 'out'}\n")


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--generator", "no\nsuch\x1b[31m.onnx"],  # from the library
        ["generate", "--format", "jp\neg"],  # from Click
        ["merge", "no\rsuch"],  # an OSError
    ],
)
def test_an_error_quoting_control_characters_stays_one_line_that_cannot_drive_a_terminal(args: list[str]) -> None:
    code, output = run(*args)
    assert code in (1, 2) and output.startswith("Error: ") and output.count("\n") == 1, output
    assert not any(character in output for character in "\r\x1b")
    assert any(escaped in output for escaped in ("\\n", "\\r", "\\x1b")), output


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_a_success_line_quoting_control_characters_stays_one_line(tmp_path: Path, tiny_onnx: Path, fmt: str) -> None:
    out = tmp_path / "a\nb\x1b[31m"
    code, output = run("generate", "--generator", tiny_onnx, "-n", 2, "--format", fmt, "--out", out)
    assert code == 0 and output.count("\n") == 1, output
    assert f"{tmp_path}/a\\nb\\x1b[31m" in output and "\x1b" not in output
    assert len(list(out.iterdir())) == (2 if fmt == "png" else 1)


@pytest.mark.parametrize(
    ("raised", "words"),
    [
        (MemoryError("Unable to allocate 71.3 TiB for an array"), ": Unable to allocate 71.3 TiB for an array"),
        (MemoryError(), ""),
    ],
)
def test_running_out_of_memory_is_one_line(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, raised: MemoryError, words: str
) -> None:
    """What no check foresaw still ends in one line, with the library's or numpy's words where there are some."""
    import digitgen.runtime.writers as writers

    def too_big(*_args: object, **_kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(writers, "collect", too_big)
    code, output = run("generate", "--generator", tiny_onnx, "--format", "npz", "--out", tmp_path / "out")
    assert (code, output) == (1, f"Error: not enough memory{words}; ask for less\n")


def test_a_micro_batch_size_without_micro_batching_is_refused() -> None:
    code, output = run("serve", "--batch-window-ms", "0", "--batch-max-digits", "4")
    expected = "--batch-max-digits sizes a micro-batch and --batch-window-ms 0 turns them off: give one"
    assert (code, output) == (2, f"Error: {expected} (see --help)\n")


def test_a_max_count_past_one_seeds_digits_is_refused() -> None:
    """A larger limit would let the server call a count under it over it."""
    code, output = run("serve", "--max-count", str(2**63 + 1))
    expected = f"Invalid value for '--max-count': {2**63 + 1} is not in the range 1<=x<={2**63}."
    assert (code, output) == (2, f"Error: {expected} (see --help)\n")


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("train", "--lr", "nan"),
        ("train", "--label-weight", "inf"),
        ("train", "--lr-decay-epochs", "inf"),
        ("serve", "--time-limit", "inf"),
        ("verify", "--atol", "nan"),
    ],
)
def test_nan_and_infinity_are_refused_as_numbers(tmp_path: Path, command: str, option: str, value: str) -> None:
    """Click's FloatRange lets them through; they would end in a traceback or a run that cannot work."""
    code, output = run(command, option, value)
    assert (
        code == 2 and output == f"Error: Invalid value for '{option}': '{value}' is not a finite number (see --help)\n"
    )


def test_info_prints_contract_and_metadata(tiny_onnx: Path) -> None:
    code, output = run("info", tiny_onnx)
    assert code == 0
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    assert output.splitlines()[1:3] == [
        f"sha256: {hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()}",
        f"sha256_without_metadata: {gen.sha256_without_metadata}",
    ]
    assert output.splitlines()[3:6] == [
        "input   z      tensor(float)  ['batch', 8]",
        "input   digit  tensor(int64)  ['batch']",
        "output  image  tensor(float)  ['batch', 1, 28, 28]",
    ]
    for expected in (
        "latent_dim: 8",
        "contract_version: 1",
        "noise (runtime, any model): splitmix64-boxmuller-v1",
    ):
        assert expected in output


def test_info_prints_a_models_metadata_on_its_own_lines_only(tmp_path: Path, tiny_onnx: Path) -> None:
    """A file's words cannot forge a line of info's output, nor move the terminal's cursor."""
    import onnx

    model = onnx.load(str(tiny_onnx))
    model.metadata_props.add(key="train_note\n", value="\x1b[31mred\x1b[0m\nsha256: forged")
    forging = tmp_path / "forging.onnx"
    onnx.save(model, str(forging))
    code, output = run("info", forging)
    assert code == 0 and "train_note\\n: \\x1b[31mred\\x1b[0m\\nsha256: forged" in output.splitlines()
    assert [line for line in output.splitlines() if line.startswith("sha256:")] == [
        f"sha256: {hashlib.sha256(forging.read_bytes()).hexdigest()}"
    ]


@pytest.mark.parametrize("command", ["info", "verify"])
def test_the_model_is_spelled_generator_everywhere(tmp_path: Path, tiny_onnx: Path, command: str) -> None:
    checkpoint = ["--checkpoint", tmp_path / "none.pt"] if command == "verify" else []
    positional = run(command, tiny_onnx, *checkpoint)
    assert run(command, "--generator", tiny_onnx, *checkpoint) == positional
    assert run(command, tiny_onnx, "--generator", tiny_onnx, *checkpoint) == positional
    code, output = run(command, tiny_onnx, "--generator", tmp_path / "other.onnx", *checkpoint)
    assert code == 2 and "the model is given twice" in output and len(output.strip().splitlines()) == 1


def test_verify_without_a_model_names_it(tmp_path: Path) -> None:
    code, output = run("verify", "--checkpoint", tmp_path / "c.pt")
    assert code == 2 and "name the model to check" in output


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--format", "grid"], 1, "already exists; pass --overwrite"),  # the folder's state: a failed run
        # options that do not go together, or that the model cannot honour: usage errors, whoever checks them
        (["--format", "png", "--test-count", "5"], 2, "by the mnist format only"),
        (["--format", "mnist", "--num-shards", "2"], 2, "not sharded"),
        (["--digit", "10"], 2, "digit 10 is not a class of this model (0-9)"),
        (["--digits", "3,11"], 2, "digit 11 is not a class of this model (0-9)"),
        (["--num-shards", "500"], 2, "shards"),
    ],
)
def test_refusals_come_before_any_progress(
    tmp_path: Path, tiny_onnx: Path, args: list, status: int, message: str
) -> None:
    assert run("generate", "--generator", tiny_onnx, "--out", tmp_path, "--format", "grid", "-n", 300)[0] == 0
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", 300, "--batch-size", 10, *args)
    assert code == status and message in output
    assert output.strip().splitlines() == [output.strip()] and "generating" not in output, output


def test_overwrite_and_resume_together_replace_another_runs_file(tmp_path: Path, tiny_onnx: Path) -> None:
    args = ("generate", "--generator", tiny_onnx, "--out", tmp_path, "--format", "grid", "-n", 30)
    assert run(*args)[0] == 0
    earlier = (tmp_path / "grid.png").read_bytes()
    code, output = run(*args, "--seed", 1, "--resume")
    assert code == 1 and "holds other digits than this command makes" in output
    code, output = run(*args, "--seed", 1, "--resume", "--overwrite")  # an interrupted overwrite, continued
    assert code == 0 and "found no complete file to keep, wrote 1," in output, output
    assert (tmp_path / "grid.png").read_bytes() != earlier
    assert run(*args, "--seed", 1, "--resume", "--overwrite")[1].count("kept 1 complete file of the earlier run")


def test_resume_reports_what_it_kept(tmp_path: Path, tiny_onnx: Path) -> None:
    args = ("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", 12)
    code, output = run(*args, "--format", "idx", "--resume")  # nothing to continue: said so, not "kept 0"
    assert code == 0 and ": found no complete file to keep, wrote 2, in " in output, output
    assert run(*args)[0] == 0
    (tmp_path / "00000005_label5.png").unlink()
    code, output = run(*args, "--resume")
    assert (
        code == 0
        and "resuming: 11 files already there, each kept if it holds exactly what this run writes" in output
        and "12 digits as png in" in output
        and "kept 11 complete files of the earlier run, wrote 1," in output
    )
    code, output = run(*args, "--format", "npz")
    assert code == 0
    code, output = run(*args, "--overwrite")  # replaces the files there, and says so: no "resuming"
    assert code == 0 and "resuming" not in output and "wrote 12 digits as png" in output, output
    assert output.rstrip().endswith("; it replaced or removed 12 files already there (--overwrite)"), output
    code, output = run(*args, "--format", "npz", "--resume")
    assert code == 0 and "kept 1 complete file of the earlier run, wrote 0," in output, output
    assert "resuming: 1 file already there, each kept if it holds exactly what this run writes\n" in output  # no digest
    # a typo in --seed: another run's files are kept, and the refusal comes before any progress
    code, output = run(*args, "--resume", "--seed", 9, "--batch-size", 4)
    assert code == 1 and output.strip() == (
        f"Error: {tmp_path / '00000000_label0.png'} holds other digits than this command makes (written with "
        "other options or another model); resume with the options of the run that wrote it, or pass --overwrite "
        "to replace it"
    )


def test_train_export_verify(tmp_path: Path, tiny_mnist: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = run(
        "train",
        "--data-dir",
        tiny_mnist,
        "--out",
        run_dir,
        "--steps",
        3,
        "--batch-size",
        16,
        "--latent-dim",
        8,
        "--device",
        "cpu",
    )
    assert code == 0, output
    checkpoint = run_dir / "checkpoint.pt"
    code, output = run("export", "--checkpoint", checkpoint, "--out", tmp_path / "g.onnx")
    assert code == 0, output
    assert output.count("ok (atol 1e-04, mean 1e-05)") == 6 and (tmp_path / "g.onnx").is_file()
    code, output = run("verify", tmp_path / "g.onnx", "--checkpoint", checkpoint)
    assert code == 0 and "matches" in output
    resume = ("train", "--data-dir", tiny_mnist, "--out", run_dir, "--resume", checkpoint)
    code, output = run(*resume, "--steps", 5, "--lr-decay-epochs", 0.125)  # 16 steps per epoch here
    assert code == 0, output
    assert "steps 3 -> 5" in output and "falling to 0 over the last 2 steps" in output
    code, output = run(*resume, "--steps", 8, "--lr-decay-epochs", 1)
    assert code == 1
    assert output.strip().startswith(
        "Error: the learning-rate decay (--lr-decay-epochs 1: 16 steps) is longer than the run (8 steps); "
        "for a run this short give --lr-decay-epochs 0.5 or less"
    )


def test_train_without_data_names_the_files(tmp_path: Path) -> None:
    code, output = run("train", "--data-dir", tmp_path, "--out", tmp_path / "run", "--steps", 1)
    assert code == 1
    assert "train-images-idx3-ubyte" in output and "t10k-labels-idx1-ubyte" in output


def test_export_rejects_garbage_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, output = run("export", "--checkpoint", bad, "--out", tmp_path / "g.onnx")
    assert code == 1 and "not a readable digitgen checkpoint" in output
    assert not (tmp_path / "g.onnx").exists()


def test_verify_against_another_checkpoint_fails(tmp_path: Path, tiny_onnx: Path, tiny_mnist: Path) -> None:
    from digitgen.export.onnx_export import write_metadata
    from tests.conftest import train_tiny

    other = train_tiny(tmp_path / "other", tiny_mnist, seed=3)
    code, output = run("verify", tiny_onnx, "--checkpoint", other)
    assert (code, output.strip()) == (
        1,
        f"Error: {tiny_onnx} records train_seed 0 where the checkpoint's is 3: it was not exported from this "
        "checkpoint",
    )
    unrecorded = tmp_path / "unrecorded.onnx"  # a model that does not say which run it is from: judged by its values
    shutil.copy(tiny_onnx, unrecorded)
    metadata = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    write_metadata(unrecorded, {key: value for key, value in metadata.items() if not key.startswith("train_")})
    code, output = run("verify", unrecorded, "--checkpoint", other)
    assert code == 1 and "ONNX output differs from PyTorch" in output and "FAIL" in output
    assert output.rstrip().endswith(f"far past any export's rounding: was {unrecorded} exported from this checkpoint?")


def test_verify_against_a_checkpoint_of_other_sizes_is_one_line(
    tmp_path: Path, tiny_onnx: Path, tiny_mnist: Path
) -> None:
    from tests.conftest import TINY_MODEL, train_tiny

    other = train_tiny(tmp_path / "other", tiny_mnist, model=replace(TINY_MODEL, latent_dim=TINY_MODEL.latent_dim + 4))
    code, output = run("verify", tiny_onnx, "--checkpoint", other)
    latent = TINY_MODEL.latent_dim
    assert (code, output.strip().splitlines()) == (
        1,
        [
            f"Error: {tiny_onnx} takes {latent} noise values and 10 digits, the checkpoint's generator "
            f"{latent + 4} and 10: it was not exported from this checkpoint"
        ],
    )


def test_idx_header_counts(tmp_path: Path, tiny_onnx: Path) -> None:
    code, _ = run("generate", "--generator", tiny_onnx, "-n", 12, "--out", tmp_path, "--format", "idx")
    header = (tmp_path / "train-images-idx3-ubyte").read_bytes()[:16]
    assert code == 0 and struct.unpack(">IIII", header) == (0x803, 12, 28, 28)


def test_generate_writes_progress_lines_to_a_log(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("digitgen.runtime.progress.LOG_INTERVAL_S", 0.0)
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", 30, "--batch-size", 10)
    lines = output.splitlines()
    assert code == 0, output
    assert lines[0] == "generating: 30 to do"
    assert [line.split(",")[0] for line in lines[1:4]] == [
        "generating: 10/30 (33%)",
        "generating: 20/30 (67%)",
        "generating: 30/30 (100%)",
    ]


@pytest.mark.parametrize(("count", "shown"), [(10, False), (11, True)])
def test_progress_is_shown_only_past_one_batch(tmp_path: Path, tiny_onnx: Path, count: int, shown: bool) -> None:
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", count, "--batch-size", 10)
    assert code == 0, output
    assert (f"generating: {count} to do" in output.splitlines()) == shown, output


def test_a_shards_progress_and_summary_name_the_shard(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards run side by side (xargs -P) share one terminal: each line says whose it is."""
    monkeypatch.setattr("digitgen.runtime.progress.LOG_INTERVAL_S", 0.0)
    shard = ("--num-shards", 3, "--shard-index", 1)
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", 60, "--batch-size", 10, *shard)
    lines = output.splitlines()
    assert code == 0, output
    assert lines[0] == "generating (shard 1 of 3): 20 to do"
    assert lines[1].startswith("generating (shard 1 of 3): 10/20 (50%)")
    assert lines[-1].startswith(f"wrote 20 digits (shard 1 of 3) as png to {tmp_path} in ")


def test_a_long_run_gives_its_time_as_a_clock(tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As its progress lines do ("1:00 elapsed"): "in 472.76s" reads worse than "in 7:53"."""
    ticks = iter([0.0, 472.76])
    monkeypatch.setattr("digitgen.cli.time.perf_counter", lambda: next(ticks))
    code, output = run("generate", "--generator", tiny_onnx, "--out", tmp_path, "-n", 3)
    assert code == 0, output
    assert output.strip().endswith(" in 7:53 on cpu"), output


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert run("--version") == (0, f"digitgen {version('digitgen-mnist')}\n")
