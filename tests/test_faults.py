"""Faults in real processes: signals during training and generation, fuzzed model files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest
import torch

from digitgen.runtime import default_model_path
from tests.conftest import REPO
from tests.helpers import default_sigint, endless_loop

CLI = [sys.executable, str(REPO / "cli.py")]


@contextmanager
def running(args: list[str]) -> Iterator[subprocess.Popen]:
    """A child process that is killed if the test fails before it ends."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_checkpoints_and_resume_continues(tmp_path: Path, tiny_mnist: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    args = [
        *CLI,
        "train",
        "--data-dir",
        str(tiny_mnist),
        "--out",
        str(run_dir),
        "--batch-size",
        "16",
        "--device",
        "cpu",
    ]
    with running([*args, "--steps", "100000"]) as proc:
        _wait_for(proc, lambda: (run_dir / "metrics.jsonl").is_file())
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    hint = f"continue with --resume {run_dir / 'checkpoint.pt'} --data-dir {tiny_mnist} --device cpu"
    assert f"Error: interrupted; stopped at step {step};" in stderr and stderr.rstrip().endswith(hint) and step >= 50
    resumed = subprocess.run(
        [*args, "--steps", str(step + 3), "--resume", str(run_dir / "checkpoint.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {step} -> {step + 3}" in resumed.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == step + 3


def test_ctrl_c_during_generation_leaves_no_partial_file(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "out"
    args = [*CLI, "generate", "--generator", str(tiny_onnx), "-n", "5000000", "--format", "idx", "--out", str(out)]
    with running(args) as proc:
        _wait_for(proc, lambda: out.is_dir() and any(out.iterdir()))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()  # nor the folder the run made for them


# A stop signal delivered while torch's C++ dispatcher has called back into Python to trace the model (the first
# such call): a KeyboardInterrupt raised there cannot pass back through C++, and the process had aborted.
SIGNAL_INSIDE_THE_TRACE = """
import os, signal, sys
import torch._library.simple_registry as registry
from digitgen.cli import main
called_from_cpp = registry.find_torch_dispatch_rule
def signalled(*args, **kwargs):
    registry.find_torch_dispatch_rule = called_from_cpp
    os.kill(os.getpid(), int(sys.argv[1]))
    return called_from_cpp(*args, **kwargs)
registry.find_torch_dispatch_rule = signalled
main(sys.argv[2:])
"""


@pytest.mark.parametrize(("command", "signum"), [("export", signal.SIGHUP), ("export-classifier", signal.SIGTERM)])
def test_a_stop_signal_inside_the_exporters_trace_ends_the_command_as_interrupted(
    tmp_path: Path, tiny_checkpoint: Path, command: str, signum: int
) -> None:
    """Not SIGABRT with a C++ trace and a hidden .part file: the signal waits for the trace, then stops the command
    (130, one line), and no file is left."""
    out = tmp_path / "out"
    out.mkdir()
    source = (
        ["--checkpoint", str(tiny_checkpoint)]
        if command == "export"
        else ["--weights", str(REPO / "artifacts" / "classifier_weights.pt")]
    )
    args = [
        sys.executable,
        "-c",
        SIGNAL_INSIDE_THE_TRACE,
        str(int(signum)),
        command,
        *source,
        "--out",
        str(out / "m.onnx"),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=default_sigint)
    assert (done.returncode, done.stderr) == (130, "Error: interrupted; no file was left half-written\n")
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def endless_onnx(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = onnx.load(str(tiny_onnx))
    endless_loop(model)
    path = tmp_path_factory.mktemp("endless") / "endless.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_ends_a_model_call_that_never_returns(tmp_path: Path, endless_onnx: Path, signum: int) -> None:
    """Python runs signal handlers between bytecodes only, never inside onnxruntime's call: the signal must reach
    the call itself (its terminate flag), or the command runs on for good."""
    out = tmp_path / "out"
    args = [*CLI, "generate", "--generator", str(endless_onnx), "-n", "3", "--format", "npz", "--out", str(out)]
    with running(args) as proc:
        _wait_for(proc, lambda: (out / ".digits.npz.part").exists())  # made just before the first model call
        time.sleep(0.5)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and stderr.splitlines()[-1] == (
        "Error: interrupted; any file it wrote is complete, none is partial; the same command with --resume continues"
    )
    assert not out.exists()


def test_serve_stops_while_its_model_check_never_returns(endless_onnx: Path) -> None:
    """The start-up check draws a digit of each class in the main thread, before the server listens."""
    args = [*CLI, "serve", "--generator", str(endless_onnx), "--port", "0", "--quiet"]
    with running(args) as proc:
        time.sleep(3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and stderr.splitlines()[-1] == "Error: interrupted; no file was left half-written"


FUZZ_SCRIPT = """
import json, sys
import numpy as np
from digitgen.runtime import DigitGenerator, DigitgenError
data = open(sys.argv[1], 'rb').read()
rng = np.random.default_rng(0)
outcomes = {}
for i in range(int(sys.argv[3])):
    buf = bytearray(data)
    kind = i % 3
    if kind == 0:
        for pos in rng.integers(0, len(buf), 20):
            buf[pos] = int(rng.integers(0, 256))
    elif kind == 1:
        buf = buf[: int(rng.integers(0, len(buf)))]
    else:
        pos = int(rng.integers(0, 4096))
        buf[pos:pos] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path = sys.argv[2]
    open(path, 'wb').write(bytes(buf))
    try:
        DigitGenerator.from_path(path, 'cpu').generate(2)
        name = 'loaded'
    except DigitgenError as exc:
        name = type(exc).__name__
    outcomes[name] = outcomes.get(name, 0) + 1
print(json.dumps(outcomes))
"""


def test_mutated_model_bytes_give_only_typed_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, str(default_model_path()), str(tmp_path / "m.onnx"), "90"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]  # an uncaught error or a crash fails here
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == 90
    assert outcomes.get("InvalidModelError", 0) > 0
