"""`digitgen serve` tested as users meet it: a real uvicorn subprocess on a free loopback port, driven
by httpx. Bytes are compared with what `digitgen generate` writes; every refusal with its words."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import onnxruntime
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI

from digitgen.cli import main
from digitgen.runtime.errors import InvalidRequestError, ModelRunError
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, DigitGenerator, GeneratedDigits, default_model_path
from digitgen.runtime.noise import MAX_SEED
from digitgen.serve import ServeConfigError, ServeSettings, create_app
from digitgen.serve import run as serve_run
from digitgen.serve.app import _Service, _ServiceEntry
from digitgen.serve.batch import Batcher, _Pending, run_batch
from digitgen.serve.observe import ACCESS_LOG, Metrics
from digitgen.serve.params import (
    ENCODING_VERSION,
    MEDIA_TYPES,
    DigitsRequest,
    NotAcceptableError,
    choose_format,
    encoder_versions,
    etag,
    not_modified,
    parse_request,
)
from digitgen.serve.render import encode, generate
from digitgen.serve.run import ServerOptions, serve

# --- a real server in a subprocess -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=120, **kwargs)  # type: ignore[arg-type]

    def wait(self, path: str, status: int = 200, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.log.read_text()}"
            try:
                if self.get(path).status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{path} never answered {status}: {self.log.read_text()}")

    def metric(self, name: str) -> float:
        """The value of one sample line of /metrics (0 when absent)."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def start(log: Path, command: list[str], ready: str = "/readyz") -> Server:
    """Run ``command`` (``{port}`` filled in) and wait until ``ready`` answers 200."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [part.format(port=port) for part in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        server.wait(ready)
    except AssertionError:
        server.stop()
        raise
    return server


def serve_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "digitgen", "serve", "--port", "{port}", "--threads", "1", *options]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The defaults (access log on, micro-batching on), one onnxruntime thread."""
    running = start(tmp_path_factory.mktemp("serve") / "server.log", serve_command())
    yield running
    assert running.stop() == 0


def cli_files(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["generate", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


# --- bytes: the same as `digitgen generate` ----------------------------------------------------

SAME_AS_CLI = [
    ("digit=7&seed=3", ["-n", "1", "--digit", "7", "--seed", "3"], "png", "00000000_label7.png"),
    ("count=25&digits=0,3,7&seed=11&truncation=1.5&format=grid", ["-n", "25", "--digits", "0,3,7", "--seed",
     "11", "--truncation", "1.5", "--format", "grid"], "grid", "grid.png"),
    ("count=300&seed=18446744073709551615&format=npz", ["-n", "300", "--seed", str(MAX_SEED), "--format", "npz"],
     "npz", "digits.npz"),
]  # fmt: skip


@pytest.mark.parametrize(("query", "cli_args", "fmt", "name"), SAME_AS_CLI, ids=[c[2] for c in SAME_AS_CLI])
def test_bytes_equal_the_cli_files(
    server: Server, tmp_path: Path, query: str, cli_args: list[str], fmt: str, name: str
) -> None:
    response = server.get(f"/generate?{query}")
    assert response.status_code == 200, response.text
    assert response.content == (cli_files(tmp_path, *cli_args) / name).read_bytes()
    disposition = "attachment" if fmt == "npz" else "inline"  # a browser shows pictures, saves data
    assert response.headers["content-disposition"] == f'{disposition}; filename="{name}"'


def test_idx_tar_holds_the_cli_files(server: Server, tmp_path: Path) -> None:
    response = server.get("/generate?count=260&digits=4,2&seed=9&format=idx")
    assert response.headers["content-type"] == "application/x-tar"
    out = cli_files(tmp_path, "-n", "260", "--digits", "4,2", "--seed", "9", "--format", "idx")
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert len(members) == 2
    assert response.headers["content-disposition"] == 'attachment; filename="digits-idx.tar"'


def test_json_holds_labels_and_the_cli_pngs(server: Server, tmp_path: Path) -> None:
    response = server.get("/generate?count=12&seed=5&format=json")
    assert response.headers["content-type"] == "application/json"
    assert "content-disposition" not in response.headers  # no file of the CLI's to name
    body = response.json()
    out = cli_files(tmp_path, "-n", "12", "--seed", "5")
    assert body["labels"] == [i % 10 for i in range(12)]
    for index, (label, png) in enumerate(zip(body["labels"], body["images"], strict=True)):
        assert base64.b64decode(png) == (out / f"{index:08d}_label{label}.png").read_bytes()


@pytest.mark.parametrize(
    ("query", "accept", "media"),
    [
        ("count=1", "application/json", "application/json"),
        ("count=5", "image/png", "image/png"),
        ("count=5", "application/x-npz;q=0.5, application/x-tar", "application/x-tar"),
        ("count=5", "text/html, */*;q=0.1", "image/png"),
        ("count=5&format=npz", "*/*", "application/x-npz"),
        ("count=5", "*", "image/png"),
        ("count=5&format=json", "application/*", "application/json"),
    ],
)
def test_accept_chooses_the_format(server: Server, query: str, accept: str, media: str) -> None:
    response = server.get(f"/generate?{query}", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    assert response.headers["vary"] == "Accept"


def test_grid_by_accept_equals_grid_by_format(server: Server) -> None:
    by_accept = server.get("/generate?count=20&seed=2", headers={"Accept": "image/png"})
    assert by_accept.content == server.get("/generate?count=20&seed=2&format=grid").content


# --- caching -----------------------------------------------------------------------------------


def test_etag_names_the_normalised_request_and_304_skips_the_model(server: Server) -> None:
    first = server.get("/generate?digit=7&seed=3")
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    tag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', tag)
    same = server.get("/generate?seed=03&digits=7&count=1&format=png")
    assert same.headers["etag"] == tag and same.content == first.content
    assert server.get("/generate?digit=7&seed=4").headers["etag"] != tag
    assert server.get("/generate?digit=7&seed=3&truncation=2").headers["etag"] != tag
    digits_before = server.metric("digitgen_digits_generated_total")
    for header in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        cached = server.get("/generate?digit=7&seed=3", headers={"If-None-Match": header})
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == tag and "immutable" in cached.headers["cache-control"]
    assert server.get("/generate?digit=7&seed=3", headers={"If-None-Match": '"other"'}).status_code == 200
    assert server.metric("digitgen_digits_generated_total") == digits_before + 1


# sha256 (first 16 hex digits) of each format's bytes for one fixed input, by ETag encoding version and zlib
# version (zlib's deflate shapes PNG, NPZ and JSON bytes): a change to any encoding's bytes must bump
# ENCODING_VERSION, which every ETag carries, or caches would mix the old bytes and the new under one tag
PINNED_BYTES = {
    ("2", "1.2.13"): {
        "png": "18d0b70a39575243",
        "grid": "69272fd1098a3333",
        "npz": "f71e0cc8c4c6250e",
        "idx": "5538671f8477847f",
        "json": "c9313947de9a288c",
    },
}


def test_the_bytes_of_every_format_are_pinned_to_the_etag_encoding_version() -> None:
    pinned_zlib = {version for encoding, version in PINNED_BYTES if encoding == ENCODING_VERSION}
    if pinned_zlib and zlib.ZLIB_RUNTIME_VERSION not in pinned_zlib:
        pytest.skip(f"bytes pinned for zlib {sorted(pinned_zlib)}; this is zlib {zlib.ZLIB_RUNTIME_VERSION}")
    images = (np.arange(3 * 28 * 28) * 7 % 251).reshape(3, 28, 28).astype(np.uint8)
    images[:, :6] = 0
    three, one = GeneratedDigits(images, np.array([4, 2, 9])), GeneratedDigits(images[:1], np.array([4]))
    encoded = {fmt: encode(one if fmt == "png" else three, fmt) for fmt in MEDIA_TYPES}
    hashes = {fmt: hashlib.sha256(body).hexdigest()[:16] for fmt, body in encoded.items()}
    assert hashes == PINNED_BYTES.get((ENCODING_VERSION, zlib.ZLIB_RUNTIME_VERSION)), (
        "an encoding's bytes changed: bump ENCODING_VERSION and pin the new bytes"
    )


def test_etag_changes_with_the_model_and_the_libraries_that_make_the_bytes(server: Server) -> None:
    request = DigitsRequest((0, 1), 2, 0, None, "grid")
    assert etag("a" * 64, request) != etag("b" * 64, request)
    assert etag("a" * 64, request) != etag("a" * 64, DigitsRequest((0, 1), 2, 0, None, "npz"))
    versions = encoder_versions("cpu")
    for library in (
        f"onnxruntime {onnxruntime.__version__} cpu",
        f"numpy {np.__version__}",
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}",
    ):
        assert library in versions
    assert encoder_versions("cuda") != versions
    model_sha256 = server.get("/readyz").json()["model_sha256"]
    served = server.get("/generate?digits=0,1&count=2&format=grid").headers["etag"]
    assert served == etag(f"{model_sha256}|{versions}", request)


# --- refusals: JSON, 4xx, the runtime's words --------------------------------------------------

BAD = [
    ("count=abc", 422, "number of digits must be an integer >= 1, got 'abc'"),
    ("count=1.5", 422, "number of digits must be an integer >= 1, got '1.5'"),
    ("count=0", 422, "number of digits must be an integer >= 1, got 0"),
    ("count=10001&format=npz", 422, "number of digits 10001 is over this server's limit of 10000 per request"),
    ("digit=10", 422, "digit 10 is not a class of this model (0-9)"),
    ("digit=x", 422, "digit 'x' is not a class of this model (0-9)"),
    ("digits=abc", 422, "'abc' is not a comma-separated list of digits such as 0,3,7"),
    ("digits=1,,2", 422, "'1,,2' is not a comma-separated list of digits such as 0,3,7"),
    ("digits=1&digit=2", 422, "give digits or digit, not both"),
    ("seed=-1", 422, "seed must be an integer from 0 to 18446744073709551615, got -1"),
    (f"seed={2**64}", 422, f"seed must be an integer from 0 to 18446744073709551615, got {2**64}"),
    ("seed=" + "9" * 5000, 422, "seed must be an integer from 0 to 18446744073709551615, got '999"),
    ("count=" + "1" * 41, 422, "number of digits must be an integer >= 1, got '111"),
    ("truncation=0", 422, "truncation must be a number >= 0.1, got 0.0"),
    ("truncation=1e-300", 422, "truncation must be a number >= 0.1, got 1e-300"),
    ("truncation=nan", 422, "truncation must be a number >= 0.1, got nan"),
    ("truncation=x", 422, "truncation must be a number >= 0.1, got 'x'"),
    ("format=gif", 422, "unknown format 'gif'; choose one of png, grid, npz, idx, json"),
    ("count=3&format=png", 422, "format png holds one digit, not 3; ask for grid, npz, idx or json"),
    ("count=3&count=4", 422, "give count once"),
    ("model=/etc/passwd", 422, "unknown parameter 'model'; parameters: digits, digit, count, seed, truncation, format"),
    ("url=http://example.com/m.onnx", 422, "unknown parameter 'url'"),
]


@pytest.mark.parametrize(("query", "status", "words"), BAD, ids=[b[0][:40] for b in BAD])
def test_bad_parameters_are_refused_in_words(server: Server, query: str, status: int, words: str) -> None:
    response = server.get(f"/generate?{query}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["error"] and body["error"].startswith(words)


@pytest.mark.parametrize("accept", ["text/html", "image/jpeg, text/*", "image/png;q=0"])
def test_unsupported_accept_is_406(server: Server, accept: str) -> None:
    response = server.get("/generate?count=2&format=npz" if accept == "image/png;q=0" else "/generate?count=2",
                          headers={"Accept": accept})  # fmt: skip
    assert response.status_code == 406
    assert response.json()["error"].startswith(f"cannot answer Accept: {accept!r}")


@pytest.mark.parametrize(
    ("fmt", "accept", "count", "chosen"),
    [
        (None, None, 1, "png"),  # no Accept header at all (curl -H 'Accept:', raw clients)
        (None, None, 5, "grid"),
        ("npz", None, 5, "npz"),
        (None, "  ", 5, "grid"),
        ("json", "  ", 5, "json"),
        (None, "application/json, image/png", 5, "json"),  # equal q: the first listed
        (None, "application/x-npz;q=1, application/json", 5, "npz"),  # no q is q=1, no more
        (None, "application/json;q=abc, image/png", 5, "grid"),  # an unreadable q drops its range
        (None, "application/json;q=0.5, application/x-tar", 5, "idx"),
    ],
)
def test_the_format_from_format_and_accept(fmt: str | None, accept: str | None, count: int, chosen: str) -> None:
    assert choose_format(fmt, accept, count) == chosen


@pytest.mark.parametrize("accept", ["application/json;q=0", "application/json;q=0, text/html", "*/*;q=0"])
def test_ranges_with_q_0_are_refused(accept: str) -> None:
    with pytest.raises(NotAcceptableError):
        choose_format(None, accept, 5)


def test_not_acceptable_names_what_the_request_can_send() -> None:
    with pytest.raises(NotAcceptableError) as refused:
        choose_format(None, "text/html", 5)
    assert str(refused.value) == (
        "cannot answer Accept: 'text/html'; this request can send "
        "application/json, application/x-npz, application/x-tar, image/png"
    )


def test_if_none_match_lists_and_weak_tags() -> None:
    assert not_modified('"a", "b"', '"a"') and not_modified('"b",W/"a"', '"a"') and not_modified("*", '"a"')
    assert not not_modified('"b", "c"', '"a"') and not not_modified("", '"a"') and not not_modified(None, '"a"')


def test_a_grid_holds_at_most_its_limit_and_other_formats_more(tiny_onnx: Path) -> None:
    generator = DigitGenerator.from_path(tiny_onnx)
    limit = 10_000

    def request(count: int, fmt: str) -> DigitsRequest:
        return parse_request([("count", str(count)), ("format", fmt)], None, generator, max_count=2 * limit)

    assert request(limit, "grid").count == limit and request(limit + 1, "npz").count == limit + 1
    with pytest.raises(InvalidRequestError) as refused:
        request(limit + 1, "grid")
    assert str(refused.value) == f"a grid holds at most {limit} digits; use npz, idx or json"


def test_requests_that_differ_only_in_their_digits_have_different_etags() -> None:
    request = DigitsRequest((1, 2), 4, 0, None, "npz")
    assert etag("model", request) != etag("model", replace(request, digits=(3,)))
    assert etag("model", request) == etag("model", replace(request))


@pytest.mark.parametrize(
    ("query", "cli_args"),
    [("digit=10", ["--digit", "10"]), ("digits=abc", ["--digits", "abc"]), ("digits=3,11", ["--digits", "3,11"])],
)
def test_refusals_use_the_cli_words(server: Server, tmp_path: Path, query: str, cli_args: list[str]) -> None:
    result = CliRunner().invoke(main, ["generate", "--out", str(tmp_path), *cli_args])
    assert result.exit_code != 0
    cli_message = result.output.strip().splitlines()[-1]
    cli_message = re.sub(r"^Error: (Invalid value for '--digits': )?", "", cli_message).removesuffix(" (see --help)")
    assert server.get(f"/generate?{query}").json()["error"] == cli_message


def test_unknown_paths_and_methods_answer_json(server: Server) -> None:
    missing = server.get("/etc/passwd")
    assert missing.status_code == 404 and missing.json() == {"error": "no endpoint /etc/passwd; see /docs"}
    post = httpx.post(server.url + "/generate", content=b"x")
    assert post.status_code == 405 and "error" in post.json()


# --- operations --------------------------------------------------------------------------------


def test_request_id_echoed_or_made(server: Server) -> None:
    assert server.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = server.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert server.get("/healthz").headers["x-request-id"] != made
    unsafe = server.get("/healthz", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)


def test_metrics_count_requests_digits_and_latency(server: Server) -> None:
    before = server.metric('digitgen_requests_total{endpoint="/generate",status="422"}')
    digits = server.metric("digitgen_digits_generated_total")
    server.get("/generate?count=0")
    server.get("/generate?count=6&seed=77&format=npz")
    assert server.metric('digitgen_requests_total{endpoint="/generate",status="422"}') == before + 1
    assert server.metric("digitgen_digits_generated_total") == digits + 6
    text = server.get("/metrics").text
    assert 'digitgen_request_seconds_bucket{endpoint="/generate",le="0.05"}' in text
    assert "digitgen_requests_refused_total" in text or "# TYPE digitgen_requests_refused counter" in text


def test_openapi_docs_describe_generate(server: Server) -> None:
    spec = server.get("/openapi.json").json()
    names = {p["name"] for p in spec["paths"]["/generate"]["get"]["parameters"]}
    assert names == {"digits", "digit", "count", "seed", "truncation", "format"}
    assert spec["info"]["title"] == "digitgen" and "GAN trained on MNIST" in spec["info"]["summary"]
    assert server.get("/docs").status_code == 200


def test_access_log_one_line_per_request(server: Server) -> None:
    server.get("/healthz", headers={"X-Request-ID": "log-line-check"})
    deadline = time.monotonic() + 5
    while "log-line-check" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log.read_text().splitlines() if "log-line-check" in line]
    assert len(lines) == 1 and '"GET /healthz" 200' in lines[0]


def test_binds_loopback_and_sends_no_cors_by_default(server: Server) -> None:
    assert f"Uvicorn running on http://127.0.0.1:{server.url.rsplit(':', 1)[1]}" in server.log.read_text()
    cross = server.get("/generate?count=1", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 200 and "access-control-allow-origin" not in cross.headers


# --- limits, page, CORS: a second server with small limits -------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    page = tmp_path_factory.mktemp("page")
    (page / "index.html").write_text("<!doctype html><title>digits</title>")
    (page / "digitgen.mjs").write_text("export const x = 1;")
    options = ["--quiet", "--max-in-flight", "1", "--queue", "1", "--max-count", "1500", "--web", str(page)]
    options += ["--batch-window-ms", "0"]  # without micro-batching
    options += ["--cors-origin", "http://app.example"]
    running = start(tmp_path_factory.mktemp("limited") / "server.log", serve_command(*options))
    yield running
    assert running.stop() == 0
    assert running.log.read_text() == "", "--quiet still logged"


def test_max_count_names_the_limit(limited: Server) -> None:
    response = limited.get("/generate?count=1501&format=npz")
    assert response.status_code == 422
    assert response.json()["error"].startswith("number of digits 1501 is over this server's limit of 1500")


def test_over_the_in_flight_bound_is_503_and_the_server_stays_healthy(limited: Server) -> None:
    slow = "/generate?count=1500&format=npz&seed={}"
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(limited.get, slow.format(seed)) for seed in (1, 2)]  # one generating, one queued
        deadline = time.monotonic() + 30
        while limited.metric("digitgen_requests_admitted") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = limited.get(slow.format(3))
        health = limited.get("/healthz")
        results = [future.result() for future in running]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "the server is busy (1 requests generating, 1 waiting); retry later"}
    assert health.status_code == 200
    assert [r.status_code for r in results] == [200, 200]
    assert limited.metric('digitgen_requests_refused_total{reason="busy"}') >= 1
    assert limited.get("/generate?count=2&format=npz").status_code == 200


def test_web_page_at_root(limited: Server) -> None:
    page = limited.get("/")
    assert page.status_code == 200 and "<title>digits</title>" in page.text
    module = limited.get("/digitgen.mjs")
    assert module.headers["content-type"].startswith("text/javascript")
    assert limited.get("/../../etc/passwd").status_code == 404
    assert limited.get("/generate?count=1").headers["content-type"] == "image/png"


def test_cors_only_for_the_given_origin(limited: Server) -> None:
    allowed = limited.get("/generate?count=1", headers={"Origin": "http://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    assert "access-control-allow-credentials" not in allowed.headers
    exposed = {name.strip().lower() for name in allowed.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"etag", "x-request-id", "content-disposition", "retry-after"}  # what a page's script reads
    other = limited.get("/generate?count=1", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    ("method", "headers", "allowed"),
    [
        ("GET", "If-None-Match, X-Request-ID, Accept", True),
        ("POST", "", False),
        ("GET", "Authorization", False),
    ],
)
def test_cors_preflight_allows_a_get_with_the_api_headers_only(
    limited: Server, method: str, headers: str, allowed: bool
) -> None:
    """A page on the allowed origin may send the headers the API reads (a conditional GET, its own request
    id, a format by Accept); nothing that writes, and no credentials."""
    asked = {"Origin": "http://app.example", "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    preflight = httpx.options(limited.url + "/generate", headers=asked, timeout=60)
    assert (preflight.status_code == 200) == allowed, preflight.text
    if allowed:
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in preflight.headers


def test_time_limit_is_503(tmp_path: Path) -> None:
    server = start(tmp_path / "server.log", serve_command("--quiet", "--time-limit", "0.05"))
    try:
        response = server.get("/generate?count=1500&format=npz")
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json() == {"error": "the request ran past this server's time limit of 0.05 s (--time-limit)"}
        assert server.metric('digitgen_requests_refused_total{reason="time_limit"}') == 1
        assert server.get("/healthz").status_code == 200
    finally:
        assert server.stop() == 0


def test_a_request_whose_client_left_stops_generating(server: Server) -> None:
    answered_499 = 'digitgen_requests_total{endpoint="/generate",status="499"}'
    abandoned, digits, logged = (
        server.metric("digitgen_requests_abandoned_total"),
        server.metric("digitgen_digits_generated_total"),
        server.metric(answered_499),
    )
    with pytest.raises(httpx.ReadTimeout):  # 10,000 digits take seconds; the client gives up after 0.3
        httpx.get(server.url + "/generate?count=10000&format=npz&seed=31", timeout=0.3)
    deadline = time.monotonic() + 10
    while server.metric("digitgen_requests_abandoned_total") == abandoned:
        assert time.monotonic() < deadline, "the generation ran on after its client had gone"
        time.sleep(0.05)
    assert server.metric("digitgen_digits_generated_total") == digits
    # nginx's "client closed request", counted once the (unsent) response has gone through the middleware
    while server.metric(answered_499) == logged and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric(answered_499) == logged + 1
    assert server.get("/generate?count=2&format=npz").status_code == 200


# --- lifecycle ---------------------------------------------------------------------------------

HELD_WARMUP = """
import sys, time
from pathlib import Path
import uvicorn
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve import ServeSettings, create_app

class Held(DigitGenerator):
    def run(self, z, labels):
        while not Path(sys.argv[2]).exists():
            time.sleep(0.01)
        return super().run(z, labels)

app = create_app(Held.from_path(threads=1), ServeSettings(access_log=False))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_ready_only_after_the_warmup_batch(tmp_path: Path) -> None:
    release = tmp_path / "release"
    server = start(tmp_path / "server.log", [sys.executable, "-c", HELD_WARMUP, "{port}", str(release)], "/healthz")
    try:
        not_ready = server.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json() == {"error": "not ready: the model's warm-up batch has not run yet"}
        assert server.get("/healthz").json() == {"status": "alive"}
        release.touch()
        server.wait("/readyz")
        shipped = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
        assert server.get("/readyz").json()["model_sha256"] == shipped
    finally:
        server.stop()


MOUNTED = """
import sys
from contextlib import asynccontextmanager
import uvicorn
from fastapi import FastAPI
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve import ServeSettings, create_app

digits = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
if sys.argv[2] == "own-lifespan":  # the parent runs the digit app's lifespan inside its own
    @asynccontextmanager
    async def lifespan(app):
        async with digits.router.lifespan_context(digits):
            yield
        print("digitgen app stopped", flush=True)  # its batcher cancelled, its generation threads joined

    parent = FastAPI(lifespan=lifespan)
else:  # a mounted app's lifespan never runs: its first request starts it
    parent = FastAPI()
parent.mount("/digits", digits)
uvicorn.run(parent, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


@pytest.mark.parametrize("parent", ["no-lifespan", "own-lifespan"])
def test_mounted_in_another_app_it_serves_and_shuts_down_cleanly(server: Server, tmp_path: Path, parent: str) -> None:
    mounted = start(tmp_path / "server.log", [sys.executable, "-c", MOUNTED, "{port}", parent], "/digits/readyz")
    try:
        for query in ("digit=7&seed=3", "count=5&digits=2,4&format=json", "count=300&format=npz"):
            response = mounted.get(f"/digits/generate?{query}")
            assert response.status_code == 200, response.text
            assert response.content == server.get(f"/generate?{query}").content
        assert mounted.get("/generate?digit=7").status_code == 404
    finally:
        mounted.stop()
    log = mounted.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log and "destroyed" not in log, log
    assert ("digitgen app stopped" in log) == (parent == "own-lifespan"), log


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path: Path) -> None:
    server = start(tmp_path / "server.log", serve_command("--graceful-timeout", "60"))
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(server.get, "/generate?count=1500&format=npz&seed=8")
        deadline = time.monotonic() + 30
        while server.metric("digitgen_requests_admitted") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        response = large.result()
    assert server.process.wait(60) == 0
    assert response.status_code == 200
    with np.load(io.BytesIO(response.content)) as npz:
        assert npz["images"].shape == (1500, 28, 28)
    with pytest.raises(httpx.ConnectError):
        server.get("/healthz")
    assert "Shutting down" in server.log.read_text()


def test_two_workers_serve_identical_bytes(server: Server, tmp_path: Path) -> None:
    workers = start(tmp_path / "server.log", serve_command("--quiet", "--workers", "2"))
    try:
        for query in ("count=30&seed=4&format=grid", "count=50&digits=1,2&format=npz", "digit=5&seed=6"):
            expected = server.get(f"/generate?{query}")
            answers = [workers.get(f"/generate?{query}") for _ in range(3)]
            assert all(a.content == expected.content and a.headers["etag"] == expected.headers["etag"] for a in answers)
        # Nagle's algorithm left on would hold each keep-alive response about 40 ms for the client's delayed ACK
        with httpx.Client(base_url=workers.url, timeout=60) as client:
            client.get("/generate?digit=1")
            seconds = []
            for seed in range(9):
                begin = time.perf_counter()
                assert client.get(f"/generate?digit=1&seed={seed}").status_code == 200
                seconds.append(time.perf_counter() - begin)
        assert sorted(seconds)[4] < 0.030, seconds
    finally:
        assert workers.stop() == 0


def test_without_the_serve_extra_one_line_names_it() -> None:
    code = "import sys; sys.modules['fastapi'] = None; from digitgen.cli import main; main(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: this needs fastapi, part of the serve extra: pip install 'digitgen-mnist[serve]'\n"
    )
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "serve" in helped.stdout


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("--web", "{page} holds no index.html; build the page first: cd web && npm ci && npm run build"),
        (
            "--cors-origin",
            "'{page}' is not an origin: scheme://host[:port] with no path, as browsers send it (e.g. https://app.example)",
        ),
    ],
)
def test_a_bad_web_dir_or_origin_is_one_line(tmp_path: Path, option: str, words: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), option, str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: " + words.format(page=tmp_path)


@pytest.mark.parametrize("with_page", [False, True])
def test_serve_says_where_to_open_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_page: bool) -> None:
    monkeypatch.setattr(serve_run, "serve", lambda options, generator=None: None)
    (tmp_path / "index.html").write_text("<!doctype html><title>digits</title>")
    port = free_port()
    result = CliRunner().invoke(main, ["serve", "--port", str(port), *(["--web", str(tmp_path)] if with_page else [])])
    url = f"http://127.0.0.1:{port}"
    where = f"the page at {url}/, API docs at {url}/docs" if with_page else f"API docs at {url}/docs"
    assert result.exit_code == 0 and result.output.strip().endswith(f"thread(s) each; {where}"), result.output


# --- the generator under concurrent calls ------------------------------------------------------


def test_concurrent_calls_equal_serial_results() -> None:
    generator = DigitGenerator.from_path(threads=1)
    requests = [(n, seed) for seed in range(6) for n in (1, 300)]
    serial = [generator.generate(n, seed=seed).images for n, seed in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: generator.generate(r[0], seed=r[1]).images, requests))
    for one, other in zip(serial, concurrent, strict=True):
        np.testing.assert_array_equal(one, other)


# --- micro-batching: the same bytes, whoever shares the model call ---------------------------------

MIXED = [
    DigitsRequest((7,), 1, 3, None, "png"),
    DigitsRequest((0, 3, 7), 5, MAX_SEED, 1.5, "grid"),
    DigitsRequest((4,), 1, 12, 0.5, "png"),
    DigitsRequest(tuple(range(10)), 16, 0, None, "npz"),
    DigitsRequest((2, 9), 3, 99, 2.0, "json"),
    DigitsRequest((1,), 2, 5, None, "idx"),
]


def test_a_mixed_batch_gives_each_request_its_own_bytes() -> None:
    generator = DigitGenerator.from_path(threads=1)
    alone = [encode(generate(generator, request), request.fmt) for request in MIXED]
    for requests, expected in ((MIXED, alone), (MIXED[::-1], alone[::-1])):
        assert [encode(d, r.fmt) for d, r in zip(run_batch(generator, requests), requests, strict=True)] == expected


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"batch_window_ms": -1}, "the batch window must be 0 ms (off) or a finite number of ms, got -1"),
        ({"batch_window_ms": float("inf")}, "the batch window must be 0 ms (off) or a finite number of ms, got inf"),
        ({"batch_max_digits": 0}, "a micro-batch must hold at least 1 digit, got 0"),
        ({"max_in_flight": 0}, "max_in_flight must be at least 1, got 0"),
        ({"max_count": 0}, "max_count must be at least 1, got 0"),
        ({"queue": -1}, "queue must be 0 or more, got -1"),
        ({"inline_digits": -1}, "inline_digits must be 0 or more, got -1"),
        ({"cache_max_age": -1}, "cache_max_age must be 0 or more, got -1"),
        ({"time_limit": 0}, "the time limit must be more than 0 s, got 0"),
        *[
            (
                {"cors_origins": ("https://app.example", origin)},
                f"{origin!r} is not an origin: scheme://host[:port] with no path, as browsers send it "
                "(e.g. https://app.example)",
            )
            for origin in ["https://app.example/", "app.example", "https://app.example/page", "not a url", ""]
        ],
    ],
)
def test_settings_that_would_refuse_every_request_are_refused(setting: dict, words: str) -> None:
    with pytest.raises(ServeConfigError) as refused:
        ServeSettings(**setting)
    assert str(refused.value) == words


def test_the_smallest_settings_and_any_origin_a_browser_sends_are_accepted() -> None:
    origins = ("*", "https://app.example", "http://localhost:5173", "https://[::1]:8443", "tauri://localhost")
    settings = ServeSettings(
        max_count=1,
        max_in_flight=1,
        queue=0,
        inline_digits=0,
        cache_max_age=0,
        batch_max_digits=1,
        cors_origins=origins,
    )
    assert (settings.queue, settings.inline_digits, settings.cache_max_age, settings.batch_max_digits) == (0, 0, 0, 1)
    assert ServeSettings(batch_window_ms=0).batch_window_ms == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_an_address_in_use_is_one_line_before_the_model_loads(workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        words = f"cannot listen on 127.0.0.1:{port}: address already in use (--port and --host choose another)"
        options = ServerOptions(port=port, workers=workers)
        with pytest.raises(ServeConfigError, match=re.escape(words)):
            serve(options, DigitGenerator.from_path(threads=1))
        # the CLI refuses it before loading the model: a missing one is not the error
        result = CliRunner().invoke(
            main, ["serve", "--port", str(port), "--workers", str(workers), "--generator", "missing.onnx"]
        )
    assert result.exit_code == 1 and result.output == f"Error: {words}\n", result.output


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_not_taken_for_every_interface(host: str) -> None:
    """``--host "$HOST"`` with HOST unset must not open the server to the network."""
    words = "the host is empty; give an address: 127.0.0.1 (the default), or 0.0.0.0 to listen on every interface"
    with pytest.raises(ServeConfigError) as refused:
        ServerOptions(host=host, port=free_port()).check_address()
    assert str(refused.value) == words


def test_an_ipv6_address_is_checked_as_one() -> None:
    with socket.socket(socket.AF_INET6) as taken:
        try:
            taken.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        taken.listen()
        port = taken.getsockname()[1]
        words = f"cannot listen on ::1:{port}: address already in use (--port and --host choose another)"
        with pytest.raises(ServeConfigError, match=re.escape(words)):
            ServerOptions(host="::1", port=port).check_address()


async def _lifespan_responses(app: FastAPI, paths: list[str]) -> list[httpx.Response]:
    """Run ``app``'s lifespan, wait for ``/readyz`` to stop saying that the warm-up has not run, then GET
    ``paths``; the ``/readyz`` response first."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://digitgen.test") as client:
            deadline = time.monotonic() + 30
            while "has not run" in (ready := await client.get("/readyz")).text and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return [ready, *[await client.get(path) for path in paths]]


def before_each_model_call(generator: DigitGenerator, hook: Callable[[np.ndarray], None]) -> None:
    """Call ``hook(z)`` before each of ``generator``'s model calls, to count, hold or fail them."""
    model_call = generator.run

    def run(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        hook(z)
        return model_call(z, labels)

    generator.run = run  # type: ignore[method-assign]


@pytest.mark.parametrize("window_ms", [2, 0])
def test_one_app_serves_through_lifespans_in_turn(window_ms: float) -> None:
    """A test suite (or a host app) may start and stop the same app more than once, with micro-batching
    on or off."""
    generator = DigitGenerator.from_path(threads=1)
    app = create_app(generator, ServeSettings(access_log=False, time_limit=10, batch_window_ms=window_ms))
    expected = encode(generate(generator, DigitsRequest((3,), 1, 9, None, "png")), "png")
    batch_sizes: list[int] = []
    before_each_model_call(generator, lambda z: batch_sizes.append(len(z)))
    threads_before = set(threading.enumerate())
    for _ in range(2):
        # one digit through the batcher (or on the event loop), 100 on a generation thread
        ready, one, many = asyncio.run(_lifespan_responses(app, ["/generate?digit=3&seed=9", "/generate?count=100"]))
        assert (ready.status_code, one.status_code, many.status_code) == (200, 200, 200)
        assert one.content == expected
        assert set(threading.enumerate()) <= threads_before  # its generation threads were joined
    assert batch_sizes.count(DEFAULT_BATCH_SIZE) == 1  # warmed up once: a ready app is not warmed up again


def test_stop_returns_once_the_batcher_has_ended() -> None:
    """No batch runs after stop(), and the loop may close at once without a pending task left behind."""

    async def stopped() -> bool:
        service = _Service(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False), Metrics())
        service.start()
        async with asyncio.timeout(30):  # the warm-up done, stop() has nothing else to wait for
            while not service.ready:
                await asyncio.sleep(0.01)
        batching = service._batching
        assert batching is not None and not batching.done()
        await service.stop()
        return batching.cancelled()  # here, before asyncio.run's own clean-up cancels what is left

    assert asyncio.run(stopped())


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (RuntimeError("onnxruntime could not run the model"), "RuntimeError: onnxruntime could not run the model"),
        (ModelRunError("the model's output is not (N, 1, 28, 28)"), "the model's output is not (N, 1, 28, 28)"),
    ],
)
def test_a_failed_warmup_is_named_by_readyz_and_the_log(
    caplog: pytest.LogCaptureFixture, error: Exception, words: str
) -> None:
    """In digitgen's own words where it has them, with the exception's type where it does not."""
    generator = DigitGenerator.from_path(threads=1)

    def broken(z: np.ndarray) -> None:
        raise error

    before_each_model_call(generator, broken)
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        (ready,) = asyncio.run(_lifespan_responses(create_app(generator, ServeSettings(access_log=False)), []))
    assert ready.json() == {"error": f"not ready: {words}"}
    # one line a warm-up: /readyz may have started a second one (it tries again after a failure)
    assert {(r.name, r.getMessage()) for r in caplog.records} == {("digitgen.serve", f"warm-up batch failed: {words}")}


def test_a_failed_warmup_is_tried_again_until_ready() -> None:
    generator = DigitGenerator.from_path(threads=1)
    calls = []

    def fails_once(z: np.ndarray) -> None:
        calls.append(len(z))
        if len(calls) == 1:
            raise RuntimeError("the GPU is busy")

    before_each_model_call(generator, fails_once)
    app = create_app(generator, ServeSettings(access_log=False))

    async def probes() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://digitgen.test") as client:
                answers = [await client.get("/readyz")]
                deadline = time.monotonic() + 30
                while answers[-1].status_code != 200 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    answers.append(await client.get("/readyz"))
                return answers

    answers = asyncio.run(probes())
    assert answers[-1].status_code == 200, answers[-1].text
    assert any(a.json() == {"error": "not ready: RuntimeError: the GPU is busy"} for a in answers)
    assert len(calls) == 2  # one failed warm-up, one that worked: no more


def _in_process(app: FastAPI, requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://digitgen.test") as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(run())


def test_one_access_log_line_even_where_the_host_app_logs_everything(caplog: pytest.LogCaptureFixture) -> None:
    """The access log has its own handler and does not pass its lines on to the root logger, where an app
    that mounts the server (or logging.basicConfig) would print each one a second time."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings())  # the access log on
    seen: list[logging.LogRecord] = []
    counter = logging.Handler()
    counter.emit = seen.append  # type: ignore[method-assign]
    ACCESS_LOG.addHandler(counter)
    try:
        with caplog.at_level("INFO"):  # a handler on the root logger, as basicConfig puts there
            (alive,) = _in_process(app, [("/healthz", {})])
    finally:
        ACCESS_LOG.removeHandler(counter)
    assert alive.status_code == 200 and len(seen) == 1 and "/healthz" in seen[0].getMessage()
    assert [record for record in caplog.records if record.name == ACCESS_LOG.name] == []


def test_an_unexpected_error_is_a_500_in_json_with_the_request_id_and_cors(caplog: pytest.LogCaptureFixture) -> None:
    generator = DigitGenerator.from_path(threads=1)

    def fails_for_seven_digits(z: np.ndarray) -> None:
        if len(z) == 7:
            raise RuntimeError("a bug")

    before_each_model_call(generator, fails_for_seven_digits)
    origin = "https://digits.example"
    app = create_app(generator, ServeSettings(access_log=False, cors_origins=(origin,), batch_window_ms=0))
    headers = {"X-Request-ID": "req-7", "Origin": origin}
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        failed, fine = _in_process(
            app, [("/generate?count=7&format=npz", headers), ("/generate?count=6&format=npz", headers)]
        )
    assert failed.status_code == 500 and fine.status_code == 200
    error = "internal error (RuntimeError); the server log has the details (id=req-7)"
    assert failed.json() == {"error": error}
    assert failed.headers["x-request-id"] == "req-7" and failed.headers["access-control-allow-origin"] == origin
    assert [r.getMessage() for r in caplog.records] == ["unexpected error in /generate (id=req-7)"]


@pytest.mark.parametrize(
    ("query", "error", "reason"),
    [
        ("count=20&format=npz", "the server stayed busy past this request's time limit; retry later", "busy"),
        ("count=1", "the request ran past this server's time limit of 0.5 s (--time-limit)", "time_limit"),
    ],
    ids=["queued-for-a-slot", "micro-batched"],
)
def test_waiting_for_a_generation_slot_ends_at_the_time_limit(query: str, error: str, reason: str) -> None:
    """With one generation running, a request waiting for it is refused once its time limit passes: a
    queued one in the words for a busy server (the slot is waited for with the deadline, not the thread
    pool behind it), a micro-batched one, whose batch waits for the slot, as past the time limit."""
    generator = DigitGenerator.from_path(threads=1)
    running, release = threading.Event(), threading.Event()

    def held(z: np.ndarray) -> None:
        if len(z) == 20:
            running.set()
            release.wait(30)

    before_each_model_call(generator, held)
    app = create_app(generator, ServeSettings(access_log=False, max_in_flight=1, time_limit=0.5))

    async def requests() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://digitgen.test") as client:
            async with asyncio.timeout(30):
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
            first = asyncio.create_task(client.get("/generate?count=20&format=npz&seed=1"))
            await asyncio.to_thread(running.wait, 30)
            try:
                queued = await asyncio.wait_for(client.get(f"/generate?{query}&seed=2"), 10)
            finally:
                release.set()
                await first
            return queued, await client.get("/metrics")

    queued, metrics = asyncio.run(requests())
    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
    assert queued.json() == {"error": error}
    refused = 2 if reason == "time_limit" else 1  # the held request ran past the time limit too
    assert f'digitgen_requests_refused_total{{reason="{reason}"}} {refused}.0' in metrics.text


def test_the_app_passes_the_lifespan_protocol_through_its_middleware() -> None:
    """An ASGI server's lifespan messages reach the app's own lifespan (warm-up, batcher) and come back."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_an_error_after_the_response_started_is_raised_not_answered_twice(caplog: pytest.LogCaptureFixture) -> None:
    """Once the status line is sent, a 500 of its own cannot follow: the error is logged and goes to the
    ASGI server, which closes the connection. (A bare scope: no request id, no root path.)"""
    service = _Service(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False), Metrics())

    async def fails_midway(scope: dict, receive: object, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the body failed")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def request() -> None:
        try:
            await _ServiceEntry(fails_midway, service)({"type": "http", "method": "GET", "path": "/"}, None, send)
        finally:
            await service.stop()

    with pytest.raises(RuntimeError, match="the body failed"), caplog.at_level("ERROR", logger="digitgen.serve"):
        asyncio.run(request())
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("digitgen.serve", "unexpected error in / (id=-)")]


@pytest.mark.parametrize(("window_ms", "batched"), [(0, 0), (0.5, 1), (2, 1)])
def test_a_batch_window_of_0_turns_micro_batching_off(window_ms: float, batched: int) -> None:
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, batch_window_ms=window_ms))
    lone, metrics = _in_process(app, [("/generate?digit=3", {}), ("/metrics", {})])
    assert lone.status_code == 200
    assert f"digitgen_batch_requests_count {batched:.1f}" in metrics.text


def test_a_mounted_app_counts_requests_by_its_own_endpoints() -> None:
    digits = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    parent = FastAPI()
    parent.mount("/digits", digits)
    answers = _in_process(parent, [("/digits/healthz", {}), ("/digits/generate?digit=3", {}), ("/digits/metrics", {})])
    assert [a.status_code for a in answers] == [200, 200, 200]
    metrics = answers[-1].text
    assert 'digitgen_requests_total{endpoint="/healthz",status="200"} 1.0' in metrics
    assert 'digitgen_requests_total{endpoint="/generate",status="200"} 1.0' in metrics
    assert 'endpoint="other"' not in metrics


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # 3 + 3 + 2 fill 8 digits exactly; a request over the limit gets a call of its own
        ([3, 3, 2, 3, 9, 1], [[3, 3, 2], [3], [9], [1]]),
        # the count is of every request taken, each its own size: 1 + 1 + 2 + 4 = 8 leaves out the 3
        ([1, 1, 2, 4, 3], [[1, 1, 2, 4], [3]]),
    ],
)
def test_a_micro_batch_takes_waiting_requests_in_order_up_to_its_digit_limit(
    counts: list[int], expected: list[list[int]]
) -> None:
    async def batches() -> list[list[int]]:
        batcher = Batcher(None, 0.001, 8, None, None, None)  # type: ignore[arg-type]
        for count in counts:
            request = DigitsRequest((7,), count, 0, None, "grid")
            batcher._waiting.append(_Pending(request, asyncio.get_running_loop().create_future()))
        taken = []
        while batcher._waiting:
            taken.append([p.request.count for p in await batcher._collect()])
        return taken

    assert asyncio.run(batches()) == expected


def _query(request: DigitsRequest) -> str:
    digits = ",".join(map(str, request.digits))
    truncation = "" if request.truncation is None else f"&truncation={request.truncation}"
    return f"/generate?count={request.count}&digits={digits}&seed={request.seed}&format={request.fmt}{truncation}"


async def _get_all(url: str, paths: list[str]) -> list[bytes]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        responses = await asyncio.gather(*(client.get(path) for path in paths))
    assert [r.status_code for r in responses] == [200] * len(paths)
    return [r.content for r in responses]


def test_concurrent_requests_share_model_calls_and_keep_their_bytes(server: Server) -> None:
    requests = MIXED + [DigitsRequest((s % 10,), 1, s, None, "png") for s in range(30)]
    requests += [DigitsRequest((3,), 1, s, 1.25, "png") for s in range(20)]
    generator = DigitGenerator.from_path(threads=1)
    unbatched = [encode(generate(generator, request), request.fmt) for request in requests]
    calls, batched = server.metric("digitgen_batch_requests_count"), server.metric("digitgen_batch_requests_sum")
    assert asyncio.run(_get_all(server.url, [_query(r) for r in requests])) == unbatched
    assert server.metric("digitgen_batch_requests_sum") - batched == len(requests)
    calls = server.metric("digitgen_batch_requests_count") - calls
    assert calls < len(requests) / 2, f"{len(requests)} concurrent requests took {calls:.0f} model calls"


# --- soak: many requests, no failures, bounded memory -------------------------------------------

SOAK_REQUESTS = 2_500
SOAK_RSS_GROWTH = 8 * 2**20


async def _hammer(url: str, count: int, concurrency: int, first_seed: int) -> list[int]:
    statuses: list[int] = []
    seeds = iter(range(first_seed, first_seed + count))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            for seed in seeds:
                statuses.append((await client.get(f"/generate?seed={seed}&digit={seed % 10}")).status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_soak_no_failures_and_memory_stays_flat(server: Server) -> None:
    asyncio.run(_hammer(server.url, 500, 16, 10**9))  # warm: allocator pools, caches, metric series
    before = rss_bytes(server.process.pid)
    statuses = asyncio.run(_hammer(server.url, SOAK_REQUESTS, 16, 2 * 10**9))
    after = rss_bytes(server.process.pid)
    assert statuses == [200] * SOAK_REQUESTS
    assert after - before < SOAK_RSS_GROWTH, f"RSS grew {(after - before) / 2**20:.1f} MB"


def test_one_worker_runs_uvicorn_here_with_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ACCESS_LOG, "handlers", [])  # the app's access-log handler stays in this test
    monkeypatch.setattr(ACCESS_LOG, "propagate", ACCESS_LOG.propagate)
    monkeypatch.setattr(ACCESS_LOG, "level", ACCESS_LOG.level)
    configs: list[uvicorn.Config] = []
    monkeypatch.setattr(serve_run.uvicorn, "Server", lambda config: SimpleNamespace(run=lambda: configs.append(config)))
    options = ServerOptions("missing.onnx", port=free_port(), graceful_timeout=3.5)  # the given generator serves
    serve(replace(options, settings=ServeSettings(access_log=False)), DigitGenerator.from_path(threads=1))
    assert ACCESS_LOG.handlers == []  # the app got the quiet settings
    serve(options, DigitGenerator.from_path(threads=1))
    assert len(ACCESS_LOG.handlers) == 1
    assert [(c.host, c.port, c.log_level, c.access_log) for c in configs] == [
        ("127.0.0.1", options.port, "warning", False),
        ("127.0.0.1", options.port, "info", False),  # digitgen's own access log, not uvicorn's
    ]
    assert [(c.timeout_graceful_shutdown, c.http) for c in configs] == [(3.5, serve_run.NoDelayHTTP)] * 2
    assert isinstance(configs[0].app, FastAPI)


@pytest.mark.parametrize("before", [None, "a parent's value"])
def test_workers_get_the_options_through_the_environment(monkeypatch: pytest.MonkeyPatch, before: str | None) -> None:
    """Each worker process rebuilds the parent's options; the parent's environment is left as it was."""
    if before is None:
        monkeypatch.delenv(serve_run.WORKER_CONFIG, raising=False)
    else:
        monkeypatch.setenv(serve_run.WORKER_CONFIG, before)
    calls: list[tuple[str, dict, str]] = []

    def uvicorn_run(app: str, **kwargs: object) -> None:
        calls.append((app, kwargs, os.environ[serve_run.WORKER_CONFIG]))

    monkeypatch.setattr(serve_run.uvicorn, "run", uvicorn_run)
    settings = ServeSettings(max_count=50, cors_origins=("http://app.example",), access_log=False)
    options = ServerOptions("model.onnx", "cpu", port=free_port(), workers=2, threads=1, settings=settings)
    serve(options)
    assert os.environ.get(serve_run.WORKER_CONFIG) == before
    [(app, kwargs, config)] = calls
    assert app == "digitgen.serve.run:app_from_environment" and kwargs["factory"] is True
    wanted = {"workers": 2, "port": options.port, "log_level": "warning", "http": serve_run.NoDelayHTTP}
    assert {key: kwargs[key] for key in wanted} == wanted
    monkeypatch.setenv(serve_run.WORKER_CONFIG, config)
    monkeypatch.setattr(serve_run.ServerOptions, "load", lambda self: self)
    monkeypatch.setattr(serve_run, "create_app", lambda loaded, app_settings: (loaded, app_settings))
    assert serve_run.app_from_environment() == (options, settings)


def test_every_tcp_connection_turns_nagle_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """What --workers needs (its shared listener's connections arrive with Nagle's algorithm on): TCP_NODELAY
    on each TCP connection; a Unix socket, or a transport without one, is passed on untouched."""
    passed_on: list[object] = []
    monkeypatch.setattr(
        serve_run.AutoHTTPProtocol, "connection_made", lambda self, transport: passed_on.append(transport)
    )
    protocol = object.__new__(serve_run.NoDelayHTTP)  # only connection_made runs: uvicorn's own part is stubbed
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(*nodelay) == 0  # as a listener that reports protocol 0 hands it over
            tcp = SimpleNamespace(get_extra_info={"socket": accepted}.get)
            protocol.connection_made(tcp)
            assert accepted.getsockopt(*nodelay) != 0
    unix, peer = socket.socketpair(socket.AF_UNIX)
    with unix, peer:
        local = SimpleNamespace(get_extra_info={"socket": unix}.get)
        protocol.connection_made(local)
        without_socket = SimpleNamespace(get_extra_info={}.get)
        protocol.connection_made(without_socket)
    assert passed_on == [tcp, local, without_socket]


def test_default_threads_count_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-CPU container on a 64-core host: one onnxruntime thread, not 63."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert serve_run.default_threads(1) == 1 and serve_run.default_threads(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert [serve_run.default_threads(workers) for workers in (1, 2, 4, 8)] == [7, 3, 1, 1]


def test_without_cpu_affinity_the_cores_are_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no CPU affinity to read (macOS, Windows), every core, or one when even that is unknown."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert serve_run.usable_cores() == 6 and serve_run.default_threads(1) == 5
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert serve_run.usable_cores() == 1 and serve_run.default_threads(1) == 1


def test_the_model_loads_with_the_threads_asked_for_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_run.DigitGenerator, "from_path", lambda *args: args)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert ServerOptions("model.onnx", "cpu", threads=3).load() == ("model.onnx", "cpu", 3)
    assert ServerOptions("model.onnx", "cuda", workers=2).load() == ("model.onnx", "cuda", 3)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (RuntimeError("a bug in the batcher"), "RuntimeError: a bug in the batcher"),
        (None, "RuntimeError: the micro-batcher returned"),
    ],
    ids=["raises", "returns"],
)
def test_a_batcher_that_ends_fails_its_request_and_leaves_the_rest_served_one_by_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception | None, words: str
) -> None:
    """A bug that ends the batcher's task answers the request it held with a 500 (that bug in the log) and
    must not leave later small requests waiting for their time limit."""

    async def ends_with_a_request_waiting(self: Batcher) -> None:
        async with asyncio.timeout(30):
            while not self._waiting:
                await asyncio.sleep(0.001)
        if error is not None:
            raise error

    monkeypatch.setattr(Batcher, "run", ends_with_a_request_waiting)
    generator = DigitGenerator.from_path(threads=1)
    app = create_app(generator, ServeSettings(access_log=False, time_limit=30))
    expected = encode(generate(generator, DigitsRequest((3,), 1, 9, None, "png")), "png")
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        ready, held, later = asyncio.run(
            _lifespan_responses(app, ["/generate?digit=3&seed=8", "/generate?digit=3&seed=9"])
        )
    assert (ready.status_code, held.status_code) == (200, 500)
    assert (later.status_code, later.content) == (200, expected)
    assert time.monotonic() - started < 15
    stopped, unexpected = caplog.records
    assert (stopped.name, stopped.getMessage()) == (
        "digitgen.serve",
        f"micro-batching stopped ({words}); small requests now run one by one",
    )
    assert unexpected.getMessage().startswith("unexpected error in /generate")
    assert (
        unexpected.exc_info is not None
        and f"{type(unexpected.exc_info[1]).__name__}: {unexpected.exc_info[1]}" == words
    )


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_serve_says_when_auto_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without a usable GPU: serve names the fallback, as generate does, even with --quiet."""
    served = []
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(serve_run, "serve", lambda options, generator=None: served.append(generator.provider))
    result = CliRunner().invoke(main, ["serve", "--quiet", "--port", str(free_port())])
    assert (result.exit_code, served) == (0, ["cpu"]), result.output
    assert result.output == "note: CUDA failed to start in onnxruntime; running on the CPU\n"
