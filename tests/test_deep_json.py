"""JSON nested deeper than Python's parser goes (json.loads raises RecursionError) read from files a user or a
damaged disk may leave: each reader answers as for any other damaged JSON, never with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitgen.export.quality import QualityFileError, read_evaluation
from digitgen.runtime.run_record import is_whole_record
from digitgen.runtime.text import read_json
from digitgen.training.cas import _read_accuracy
from digitgen.training.errors import CheckpointError
from digitgen.training.loop import _trim_metrics

DEEP = "[" * 100_000 + "]" * 100_000


def test_read_json_says_value_error_for_json_too_deep() -> None:
    with pytest.raises(ValueError, match=r"^JSON nested too deep to read$"):
        read_json(DEEP)
    assert read_json('{"a": [1]}') == {"a": [1]}


def test_a_run_record_too_deep_is_damaged() -> None:
    assert not is_whole_record(DEEP.encode())


def test_a_metrics_line_too_deep_is_dropped_as_a_cut_one(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(f'{{"step": 1}}\n{DEEP}\n{{"step": 2}}\n{{"step": 3}}\n')
    _trim_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_metrics_lines_that_are_not_records_of_a_step_are_dropped(tmp_path: Path) -> None:
    """Not a UnicodeDecodeError or a TypeError (a step in quotes) when a run resumes."""
    metrics = tmp_path / "metrics.jsonl"
    lines = [b'{"step": 1}', b'{"step": 1\xff', b'{"step": 1, "x": "\xff"}', b'{"step": "1"}', b'{"step": true}']
    metrics.write_bytes(b"\n".join([*lines, b'{"loss": 1}', b'{"step": 2}', b""]))
    _trim_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_an_accuracy_state_too_deep_is_a_damaged_state(tmp_path: Path) -> None:
    state = tmp_path / "accuracy.json"
    state.write_text(DEEP)
    with pytest.raises(CheckpointError, match="not an accuracy kept by evaluate --cas"):
        _read_accuracy(state)


def test_a_quality_file_too_deep_holds_no_json_object(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(QualityFileError, match=r"deep\.json holds no JSON object$"):
        read_evaluation(str(tmp_path / "deep.json"))
