"""benchmarks/serve_latency.py: each variant is `digitgen serve` changed only in how it runs: the same bytes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serve import running
from benchmarks.serve_latency import VARIANTS, asgi_requests, model_variants, stand_ins
from digitgen.runtime.encode import png_bytes
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve import ServeSettings, create_app

SCRIPTS = {name: script for name, script in VARIANTS.items() if isinstance(script, str)}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_variant_script_survives_the_port_being_filled_in(name: str) -> None:
    script = SCRIPTS[name]
    assert script.format(port=8000) == script  # running() fills {port} into every part of the command
    compile(script, name, "exec")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one variant pins a thread to a second core")
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_variant_serves_the_bytes_of_the_library(name: str) -> None:
    expected = png_bytes(DigitGenerator.from_path(threads=1).generate(1, [7], seed=3).images[0])
    with running([sys.executable, "-c", SCRIPTS[name], "{port}"], "/readyz") as (port, _):
        response = httpx.get(f"http://127.0.0.1:{port}/generate?digit=7&seed=3", timeout=30)
    assert response.status_code == 200, response.text
    assert response.content == expected


def test_models_are_served_with_the_defaults_beside_the_shipped_one(tiny_onnx: Path) -> None:
    variants = model_variants([str(tiny_onnx)])
    [(shipped, shipped_command), (other, other_command)] = variants.items()
    assert shipped.startswith("the shipped model (generate(1) alone: ") and "--generator" not in shipped_command
    assert other.startswith(f"{tiny_onnx} (generate(1) alone: ") and other.endswith(" us)")
    assert other_command == [*shipped_command, "--generator", str(tiny_onnx)]


def test_the_stand_ins_return_pictures_of_the_contract_after_their_work() -> None:
    z, labels = np.zeros((2, 64), np.float32), np.array([7, 7])
    calls = stand_ins()
    real = calls.pop("no model call (one real digit, made before)")(z, labels)
    assert real.shape == (2, 1, 28, 28) and np.array_equal(real[0], real[1]) and len(np.unique(real)) > 2
    assert calls.pop("the model") is None  # the generator's own call, timed where it runs
    for name, call in calls.items():
        images = call(z, labels)
        assert images.shape == (2, 1, 28, 28) and np.all(images == 0.5), name


def test_the_in_process_driver_times_each_request_and_refuses_anything_but_200() -> None:
    generator = DigitGenerator.from_path(threads=1)
    seconds = asyncio.run(asgi_requests(create_app(generator, ServeSettings(access_log=False)), 3, 5))
    assert len(seconds) == 3 and all(0 < s < 5 for s in seconds)

    def broken(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        raise RuntimeError("no model here")

    generator.run = broken
    with pytest.raises(SystemExit, match=r"responses other than 200: \[500\]"):
        asyncio.run(asgi_requests(create_app(generator, ServeSettings(access_log=False)), 2, 5))
