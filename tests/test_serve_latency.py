"""benchmarks/serve_latency.py: each variant is `digitgen serve` changed only in how it runs: the same bytes."""

from __future__ import annotations

import os
import sys

import httpx
import pytest

from benchmarks.serve import running
from benchmarks.serve_latency import VARIANTS
from digitgen.runtime.encode import png_bytes
from digitgen.runtime.generator import DigitGenerator

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
