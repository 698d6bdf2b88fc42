"""The browser version in web/: digitgen.js and its page, run by headless Chromium, must draw the digits
the Python runtime draws and report every failure on the page."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pytest
from PIL import Image

from digitgen import DigitGenerator
from digitgen.runtime.encode import contact_sheet
from digitgen.runtime.errors import DigitgenError, InvalidRequestError, ModelContractError
from digitgen.runtime.generator import (
    check_int,
    check_seed,
    check_truncation,
    parse_digit_list,
)
from digitgen.runtime.noise import MAX_SEED, standard_normal
from digitgen.runtime.text import read_integer, read_number
from tests.helpers import nan_pixels, scaled_pixels, shape_hidden_from_inference

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

WEB = Path(__file__).resolve().parents[1] / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
MAX_DIFFERING_SHARE = 0.001  # pixels allowed to be 1 off (float rounding across runtimes); none may be 2 off
COLUMNS = 10


def _missing_requirement() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing"
    if shutil.which("npm") is None:
        return "npm is missing"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing"
    return None


if (_missing := _missing_requirement()) is not None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {_missing}", pytrace=False)
    pytest.skip(f"browser tests need Chromium, npm and playwright: {_missing}", allow_module_level=True)


class _DistHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the MIME types the page needs and cross-origin isolation (for WebAssembly threads)."""

    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "application/javascript",
        ".mjs": "application/javascript",
        ".wasm": "application/wasm",
        ".onnx": "application/octet-stream",
    }

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _npm(*args: str, timeout: int) -> None:
    done = subprocess.run(["npm", *args], cwd=WEB, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def dist() -> Path:
    if not (WEB / "node_modules").exists():
        _npm("ci", timeout=300)
    _npm("run", "build", timeout=60)
    return WEB / "dist"


@pytest.fixture(scope="session")
def base_url(dist: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_DistHandler, directory=dist))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def python_gen() -> DigitGenerator:
    return DigitGenerator.from_path()


@pytest.fixture(scope="session")
def pixel_report(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines on the worst pixel differences found, printed at the end of the session."""
    lines: list[str] = []
    yield lines
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        terminal = plugins.get_plugin("terminalreporter")
        terminal.write_line("")
        terminal.write_sep("-", "browser vs Python: pixel differences")
        for line in lines:
            terminal.write_line(line)


def open_page(browser: Browser, url: str) -> Page:
    """A new tab on ``url``, once the page has drawn its first sheet or shown an error."""
    page = browser.new_page()
    page.goto(url)
    wait_settled(page)
    return page


def wait_settled(page: Page) -> str:
    page.wait_for_function("['drawn', 'error'].includes(document.body.dataset.state)", timeout=30_000)
    return page.evaluate("document.body.dataset.state")


@pytest.fixture(scope="module")
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    page = open_page(browser, base_url + "index.html")
    assert page.evaluate("document.body.dataset.state") == "drawn", page.text_content("#error")
    yield page
    page.close()


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray, what: str, report: list[str]) -> None:
    assert actual.shape == expected.shape, what
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    differing = int(np.count_nonzero(diff))
    report.append(f"{what}: max |diff| {diff.max()}, {differing} of {diff.size} pixels differ")
    assert diff.max() <= 1, f"{what}: a pixel is {diff.max()} off"
    assert differing <= MAX_DIFFERING_SHARE * diff.size, f"{what}: {differing} pixels differ"


def browser_digits(
    page: Page, count: int, digits: list[int] | None, seed: int, truncation: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    result = page.evaluate(
        """async ([count, digits, seed, truncation]) => {
            const { images, labels } = await window.digitgen.generate({ count, digits, seed, truncation });
            return { images: Array.from(images), labels: Array.from(labels) };
        }""",
        [count, digits, str(seed), truncation],
    )
    return np.array(result["images"], dtype=np.uint8).reshape(count, 28, 28), np.array(result["labels"])


@pytest.mark.parametrize(
    ("seed", "digits", "count"),
    [(0, None, 10), (7, [4, 2], 13), (123456789, [9], 33), (MAX_SEED, [0, 3, 7], 5), (5, None, 130)],
)
def test_module_draws_the_python_digits(
    page: Page, python_gen: DigitGenerator, pixel_report: list[str], seed: int, digits: list[int] | None, count: int
) -> None:
    images, labels = browser_digits(page, count, digits, seed)
    expected = python_gen.generate(count, digits=digits, seed=seed)
    np.testing.assert_array_equal(labels, expected.labels)
    assert_same_pixels(images, expected.images, f"seed {seed}, digits {digits}, {count} digits", pixel_report)


@pytest.mark.parametrize("truncation", [0.5, 1.5])
def test_module_draws_the_python_digits_with_truncation(
    page: Page, python_gen: DigitGenerator, pixel_report: list[str], truncation: float
) -> None:
    images, _ = browser_digits(page, 30, None, 11, truncation)
    expected = python_gen.generate(30, seed=11, truncation=truncation).images
    assert_same_pixels(images, expected, f"seed 11, 30 digits, truncation {truncation}", pixel_report)


# (seed, index, the first 6 values of z): the scheme's published test vectors.
NOISE_VECTORS = [
    (0, 0, [-0.17660188674926758, 1.4621628522872925, -1.60213303565979,
            0.20066267251968384, -0.9293337464332581, 0.40957605838775635]),
    (0, 1, [-2.001168727874756, 0.6026115417480469, -0.5857755541801453,
            -2.2049670219421387, -0.4628305733203888, 1.3937655687332153]),
    (12345, 1000, [-0.29711756110191345, -0.8580911159515381, -0.33615410327911377,
                   1.225866436958313, 1.115574836730957, 1.0664565563201904]),
    (MAX_SEED, 7, [0.7745639681816101, 0.22601185739040375, 0.4236651360988617,
                   -0.22347533702850342, -0.014700106345117092, -0.8170931339263916]),
]  # fmt: skip


def browser_noise(
    page: Page, seed: int, start: int, stop: int, size: int, truncation: float | None = None
) -> np.ndarray:
    values = page.evaluate(
        """async ([seed, start, stop, size, truncation]) => {
            const { standardNormal } = await import("./digitgen.js");
            return Array.from(standardNormal(seed, start, stop, size, truncation));
        }""",
        [str(seed), start, stop, size, truncation],
    )
    return np.array(values, dtype=np.float64).astype(np.float32).reshape(stop - start, size)


@pytest.mark.parametrize(("seed", "index", "head"), NOISE_VECTORS)
def test_noise_matches_the_test_vectors(page: Page, seed: int, index: int, head: list[float]) -> None:
    expected = np.array(head, dtype=np.float32)
    np.testing.assert_array_equal(standard_normal(seed, index, index + 1, 6)[0], expected)
    np.testing.assert_array_equal(browser_noise(page, seed, index, index + 1, 6)[0], expected)


@pytest.mark.parametrize(
    ("seed", "start", "stop", "size", "truncation"),
    [(99, 0, 400, 64, None), (2**63 + 5, 10**9, 10**9 + 50, 7, None), (99, 0, 200, 64, 0.5), (4, 3, 90, 7, 1.0)],
)
def test_noise_is_bit_identical_to_python(
    page: Page, seed: int, start: int, stop: int, size: int, truncation: float | None
) -> None:
    actual = browser_noise(page, seed, start, stop, size, truncation)
    expected = standard_normal(seed, start, stop, size, truncation)
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_truncation_takes_a_bigint_and_refuses_empty_text_as_python_does(page: Page) -> None:
    accepted, refused = page.evaluate(
        """async () => {
            const { checkTruncation } = await import("./digitgen.js");
            const refusal = (value) => {
                try {
                    checkTruncation(value);
                } catch (error) {
                    return [error.name, error.message];
                }
            };
            return [checkTruncation(2n), [refusal(0n), refusal("")]];
        }"""
    )
    assert accepted == 2
    assert refused == [
        ["InvalidRequestError", "truncation must be a finite number >= 0.1, got 0"],
        ["InvalidRequestError", "truncation must be a finite number >= 0.1, got ''"],  # as Python's check_truncation
    ]


DIGIT_LISTS = ["0,3,7", " 4 , 2 ", "12", "-1", "007", "+3", "a,b", "3,,7", "", ",", "3.0", "1e1", "\u0663", "9" * 41]


CONTRACT_METADATA = [
    {"latent_dim": "\ufeff8"},  # no space to Python, JavaScript's \\s takes it
    {"latent_dim": "8\x85"},  # a space to Python, not to JavaScript's \\s
    {"latent_dim": " +08 "},
    {"latent_dim": "1" * 400},  # past what any valid value has: named by its first digits
    {"latent_dim": "0"},
    {"latent_dim": "-0"},
    {"latent_dim": "4097"},
    {"latent_dim": "9" * 30},  # more than a JavaScript number holds exactly
    {"num_classes": "100000", "image_size": "-5"},
    {"image_size": "2" + "8" * 50},
    {"contract_version": "it's"},
]


def test_the_page_checks_a_models_metadata_as_the_runtime_does(page: Page, tmp_path: Path) -> None:
    """The same model accepted by both, or refused by both in the same words."""
    from tests.test_contract import LATENT, contract_model

    def python(metadata: dict[str, str]) -> str:
        try:
            DigitGenerator.from_path(contract_model(tmp_path / "m.onnx", metadata=metadata), "cpu")
        except ModelContractError as exc:
            return str(exc).partition(": ")[2]
        return "accepted"

    browser = page.evaluate(
        """async ([cases, latent]) => {
            const { checkContract } = await import("./digitgen.js");
            const inputs = [
                { name: "z", type: "tensor(float)", shape: ["batch", latent] },
                { name: "digit", type: "tensor(int64)", shape: ["batch"] },
            ];
            const outputs = [{ name: "image", type: "tensor(float)", shape: ["batch", 1, 28, 28] }];
            const valid = { latent_dim: String(latent), num_classes: "10", image_size: "28", contract_version: "1" };
            return cases.map((metadata) => {
                try {
                    checkContract({ inputs, outputs, metadata: { ...valid, ...metadata } }, "m");
                    return "accepted";
                } catch (error) {
                    return error.message.split(": ").slice(1).join(": ");
                }
            });
        }""",
        [CONTRACT_METADATA, LATENT],
    )
    assert browser == [python(metadata) for metadata in CONTRACT_METADATA]
    assert browser[2] == "accepted" and browser[3].startswith("metadata 'latent_dim' is out of range (1111")


def _contract_cases(folder: Path) -> dict[str, bytes]:
    """Models that break the contract's names, types and shapes (tests/test_contract.py's), and what another writer
    may leave: a byte-order mark in a name or metadata, metadata that is not UTF-8, a negative dimension, a group."""
    from onnx import TensorProto

    from tests.test_contract import CASES, LATENT, contract_model

    models = {
        name: contract_model(folder / f"{name}.onnx", **kwargs).read_bytes()
        for name, (kwargs, _) in CASES.items()
        if "metadata" not in kwargs and name != "z-fixed-batch"  # onnxruntime infers image's batch from it too;
    }  # the page reads what the file declares
    models["bom-name"] = contract_model(folder / "b.onnx", z=("\ufeffz", TensorProto.FLOAT, ["b", LATENT])).read_bytes()
    models["bom-version"] = contract_model(folder / "v.onnx", metadata={"contract_version": "\ufeff1"}).read_bytes()
    models["negative-batch"] = contract_model(folder / "n.onnx", z=("z", TensorProto.FLOAT, [-1, LATENT])).read_bytes()
    plain = contract_model(folder / "p.onnx", metadata={"authXr": "x"}).read_bytes()
    models["metadata-not-utf8"] = plain.replace(b"authXr", b"auth\xffr")
    models["group"] = plain + b"\xbb\x06\x08\x05\xbc\x06"  # group 103 holding field 1 = 5
    return models


def test_the_page_judges_a_models_names_types_and_shapes_as_the_runtime_does(page: Page, tmp_path: Path) -> None:
    """The same model accepted by both, or refused by both in the same words."""
    models = _contract_cases(tmp_path)

    def python(name: str) -> str:
        (tmp_path / "case.onnx").write_bytes(models[name])
        try:
            DigitGenerator.from_path(tmp_path / "case.onnx", "cpu")
        except DigitgenError as exc:
            return f"{type(exc).__name__}: {str(exc).partition(': ')[2]}"
        return "accepted"

    browser = page.evaluate(
        """async (cases) => {
            const { checkContract, describeModel } = await import("./digitgen.js");
            return cases.map((encoded) => {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                try {
                    checkContract(describeModel(bytes, "m"), "m");
                    return "accepted";
                } catch (error) {
                    return `${error.name}: ${error.message.split(": ").slice(1).join(": ")}`;
                }
            });
        }""",
        [base64.b64encode(model).decode() for model in models.values()],
    )
    assert dict(zip(models, browser, strict=True)) == {name: python(name) for name in models}
    assert browser[list(models).index("group")] == "accepted"


def test_the_page_reads_a_digit_list_as_the_cli_does(page: Page) -> None:
    """Every text is accepted with the same numbers or refused by both (the class check comes after)."""
    read = page.evaluate(
        """async (texts) => {
            const { parseDigitList } = await import("./digitgen.js");
            return texts.map((text) => {
                try {
                    return parseDigitList(text).map(String);
                } catch (error) {
                    return error.name;
                }
            });
        }""",
        DIGIT_LISTS,
    )

    def python(text: str) -> list[str] | str:
        try:
            return [str(d) for d in parse_digit_list(text)]
        except InvalidRequestError:
            return "InvalidRequestError"

    assert read == [python(text) for text in DIGIT_LISTS]
    assert read[:2] == [["0", "3", "7"], ["4", "2"]]  # the table holds accepted lists, not only refusals


def test_an_integer_past_2_53_as_a_number_is_refused_with_the_fix(page: Page) -> None:
    """2**60 as a JavaScript number prints as 1152921504606847000 and may not be the integer the caller wrote:
    the module asks for a BigInt or a string instead of claiming the value is not an integer in range; as a
    BigInt the same seed draws."""
    refused, drawn = page.evaluate(
        """async () => {
            const { standardNormal } = await import("./digitgen.js");
            let refused;
            try {
                standardNormal(2 ** 60, 0, 1, 4);
            } catch (error) {
                refused = [error.name, error.message];
            }
            return [refused, Array.from(standardNormal(2n ** 60n, 0, 1, 4))];
        }"""
    )
    assert refused == [
        "InvalidRequestError",
        "seed 1152921504606847000 is past 2^53 - 1, where a JavaScript number no longer holds every integer; "
        "give it as a BigInt or a string",
    ]
    np.testing.assert_array_equal(np.float32(drawn), standard_normal(2**60, 0, 1, 4).ravel())


def test_to_uint8_rounds_like_numpy(page: Page) -> None:
    steps = np.arange(256, dtype=np.float32)
    ties = (steps + np.float32(0.5)) / np.float32(255)  # products near k + 0.5, many of them exact ties
    values = np.concatenate(
        [ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(1)), np.linspace(-0.5, 1.5, 2001)]
    ).astype(np.float32)
    products = np.clip(values, 0, 1) * np.float32(255)
    assert np.count_nonzero(products % 1 == 0.5) > 50  # the half-to-even rule is exercised
    actual = page.evaluate(
        """async (values) => {
            const { toUint8 } = await import("./digitgen.js");
            return Array.from(toUint8(Float32Array.from(values)));
        }""",
        values.tolist(),
    )
    np.testing.assert_array_equal(np.array(actual, dtype=np.uint8), np.rint(products).astype(np.uint8))


def python_sheet(images: np.ndarray) -> np.ndarray:
    """What `digitgen generate --format grid` draws: 10 columns, 2-pixel gray gaps, unused cells gray."""
    return contact_sheet(images, COLUMNS)


def canvas_pixels(page: Page) -> np.ndarray:
    """RGBA pixels of the sheet canvas, (height, width, 4)."""
    width, height, data = page.evaluate(
        """() => {
            const canvas = document.getElementById("sheet");
            const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            return [canvas.width, canvas.height, Array.from(rgba)];
        }"""
    )
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)


@pytest.mark.parametrize("threads", [1, 2])
def test_linked_sheet_matches_python(
    browser: Browser, base_url: str, python_gen: DigitGenerator, pixel_report: list[str], threads: int
) -> None:
    query = f"seed=3&digits=0,3,7&n=21&threads={threads}"
    page = open_page(browser, f"{base_url}index.html?{query}")
    try:
        assert page.evaluate("document.body.dataset.state") == "drawn", page.text_content("#error")
        assert page.evaluate("crossOriginIsolated")  # so that threads=2 really runs two threads
        assert [page.input_value(f"#{field}") for field in ("seed", "digits", "count")] == ["3", "0,3,7", "21"]
        rgba = canvas_pixels(page)
        assert rgba.shape == (3 * 30 + 2, 302, 4)
        assert (rgba[..., 3] == 255).all()
        assert (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all()
        expected = python_sheet(python_gen.generate(21, digits=[0, 3, 7], seed=3).images)
        assert_same_pixels(rgba[..., 0], expected, f"page ?{query}", pixel_report)
        assert "21 digits in" in page.text_content("#timing")
        assert page.evaluate("window.digitgenLoadSeconds") > 0
    finally:
        page.close()


READS = "seed, digits, digit, n, count, truncation, model, threads"


@pytest.mark.parametrize(
    ("query", "messages"),
    [
        ("count=50&digits=7&trunc=1.5", [f"the link's parameter 'trunc' is not one this page reads ({READS})"]),
        ("Seed=5&digit=3", [f"the link's parameter 'Seed' is not one this page reads ({READS})"]),
        # quoted and escaped as the fields' values are: a zero-width space, a line break in a name
        ("%E2%80%8Bn=5", [f"the link's parameter '\\u200bn' is not one this page reads ({READS})"]),
        ("a%0Ab=1", [f"the link's parameter 'a\\nb' is not one this page reads ({READS})"]),
        ("n=5&count=6", ["the link gives n and count; give it once"]),
        ("digits=1&digit=2", ["give digits or digit, not both"]),  # the HTTP API's words
        # digit is one class, as the CLI's --digit and the API's digit: read and refused in the CLI's words
        ("digit=0,3,7", ["digit '0,3,7' is not a class of this model (0-9)"]),
        ("digit=abc", ["digit 'abc' is not a class of this model (0-9)"]),
        # blank, read as the CLI and the HTTP API read them, not as a blank field's default
        ("digits=", ["'' is not a comma-separated list of digits such as 0,3,7"]),
        ("truncation=", ["truncation must be a finite number >= 0.1, got ''"]),
        # a line break, which a text field drops when it is set (seed=4%0A2 had drawn seed 42): read as the link gave it
        ("seed=4%0A2", ["seed must be an integer from 0 to 18446744073709551615, got '4\\n2'"]),
        ("truncation=1%0D.5", ["truncation must be a finite number >= 0.1, got '1\\r.5'"]),
        ("seed=1&seed=2", ["the link gives seed twice; give it once"]),
        ("model=", ["the link's model is empty, so the page loaded its own; name a file, e.g. model=generator.onnx"]),
        (  # what is wrong with the fields it fills too, at once
            "seed=abc&foo=1",
            [
                f"the link's parameter 'foo' is not one this page reads ({READS})",
                "seed must be an integer from 0 to 18446744073709551615, got 'abc'",
            ],
        ),
    ],
)
def test_a_link_the_page_cannot_read_whole_is_named_on_the_page(
    browser: Browser, base_url: str, query: str, messages: list[str]
) -> None:
    """Not silently dropped: a query copied from the HTTP API, or a typo, would lose its parameter unseen."""
    page = open_page(browser, f"{base_url}index.html?{query}")
    try:
        assert_error_shown(page, messages)
        described = page.evaluate(
            """() => [...document.querySelectorAll("input[aria-invalid=true]")].map(
                (input) => document.getElementById(input.getAttribute("aria-describedby"))?.textContent ?? null)"""
        )
        # a field's own line: those of the fields the link fills
        fields = ("seed ", "digit ", "'' is not a comma", "truncation ")
        assert described == [message for message in messages if message.startswith(fields)]
        assert page.evaluate("document.getElementById('generate').disabled") is False  # the form still works
        submit(page, count="3")  # the fields as they are now: the link's problems were said
        assert wait_settled(page) == "drawn", page.text_content("#error")
    finally:
        page.close()


@pytest.mark.parametrize(
    ("query", "shown"), [("digit=1&digits=", ["", "20"]), ("digits=1&digit=2", ["1", "20"]), ("count=5&n=6", ["", "5"])]
)
def test_a_link_giving_both_spellings_shows_the_fields_own(
    browser: Browser, base_url: str, query: str, shown: list[str]
) -> None:
    """Refused as given twice, and the field holds the value its own name gave, which the field's words quote."""
    page = open_page(browser, f"{base_url}index.html?{query}")
    try:
        assert page.evaluate("document.body.dataset.state") == "error"
        assert [page.input_value(f"#{field}") for field in ("digits", "count")] == shown
    finally:
        page.close()


def test_a_link_takes_the_apis_count_and_digit(browser: Browser, base_url: str) -> None:
    """And passes over what sharing platforms add to a link (fbclid, utm_*): not the user's parameters."""
    page = open_page(browser, f"{base_url}index.html?count=12&digit=%2B07&seed=4&utm_source=x&fbclid=abc")
    try:
        assert page.evaluate("document.body.dataset.state") == "drawn", page.text_content("#error")
        # digit=+07 is 7, as the CLI reads --digit +07: the field holds it as a list reads it
        assert [page.input_value(f"#{field}") for field in ("count", "digits", "seed")] == ["12", "7", "4"]
    finally:
        page.close()


def test_a_sheet_too_fast_to_time_shows_no_rate(browser: Browser, base_url: str) -> None:
    """Coarse or virtual browser clocks can time a small sheet at 0 ms: no "Infinity digits/s"."""
    page = browser.new_page()
    try:
        page.add_init_script("performance.now = () => 1000;")
        page.goto(f"{base_url}index.html?n=1")
        assert wait_settled(page) == "drawn", page.text_content("#error")
        assert page.text_content("#timing") == "1 digit in less than this browser's clock can time"
    finally:
        page.close()


def test_a_phone_s_narrow_screen_scrolls_no_part_of_the_page_sideways(browser: Browser, base_url: str) -> None:
    """320 CSS px (a small phone, or 400% zoom): the contract's table had widened the page by its shape column."""
    page = browser.new_page(viewport={"width": 320, "height": 640})
    try:
        page.goto(f"{base_url}index.html")
        assert wait_settled(page) == "drawn"
        assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0
    finally:
        page.close()


def test_page_shows_the_contract_and_quality(page: Page, python_gen: DigitGenerator) -> None:
    contract = page.text_content("#contract")
    for text in ("z", "tensor(float)", f"['batch', {python_gen.latent_dim}]", "digit", "tensor(int64)"):
        assert text in contract  # as `digitgen info` shows them
    assert "['batch', 1, 28, 28]" in contract
    quality = page.text_content("#quality")
    metadata = python_gen.info.metadata
    assert f"{100 * float(metadata['quality_class_accuracy']):.2f}%" in quality
    assert f"{float(metadata['quality_fid']):.2f}" in quality
    assert f"{float(metadata['quality_recall']):.3f}" in quality
    assert f"{int(metadata['train_steps']):,} steps" in quality


def _small_images_model(python_gen: DigitGenerator):
    """Within the contract as declared (the image's dimensions symbolic), but 14x14 images, four per digit,
    at run time."""
    from onnx import TensorProto, helper, numpy_helper

    latent = python_gen.latent_dim
    hidden, constants = shape_hidden_from_inference([-1, 1, 14, 14])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "w"], ["flat"]),
            *hidden,
            helper.make_node("Reshape", ["flat", "target"], ["image"]),
        ],
        "small_images",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent]),
            helper.make_tensor_value_info("digit", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", "c", "h", "w"])],
        [numpy_helper.from_array(np.zeros((latent, 784), np.float32), "w"), *constants],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    helper.set_model_props(model, python_gen.info.metadata)
    return model


@pytest.fixture(scope="module")
def bad_models(dist: Path, python_gen: DigitGenerator) -> Iterator[None]:
    """Models the page must refuse, written into dist/ under test names and removed afterwards."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["noise"], ["image"])],
        "renamed_input",
        [
            helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", python_gen.latent_dim]),
            helper.make_tensor_value_info("digit", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", python_gen.latent_dim])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {**python_gen.info.metadata, "num_classes": "100000"})
    names = ("renamed", "truncated", "small_images", "nan_pixels", "odd_metadata", "byte_pixels", "opset_27")
    names += ("external",)
    paths = [dist / f"_test_{name}.onnx" for name in names]
    onnx.save(model, paths[0])
    paths[1].write_bytes((dist / "generator.onnx").read_bytes()[:5000])
    onnx.save(_small_images_model(python_gen), paths[2])
    nan_model = onnx.load(dist / "generator.onnx")
    nan_pixels(nan_model)
    onnx.save(nan_model, paths[3])
    odd = onnx.load(dist / "generator.onnx")  # a model that runs, with quality figures that are not numbers
    odd_values = {"quality_fid": "n/a", "quality_recall": " ", "quality_real_precision": "0x1A"}  # hex: not decimal
    odd_values |= {"precision": "fp32\u202e" + "x" * 200, "train_seed": "<b>9</b>\n" + "9" * 3000}  # escaped, cut
    helper.set_model_props(odd, {**python_gen.info.metadata, **odd_values})
    onnx.save(odd, paths[4])
    byte_scale = onnx.load(dist / "generator.onnx")  # pixels 0 to 255: clipped, they were white squares
    scaled_pixels(byte_scale, 255.0)
    onnx.save(byte_scale, paths[5])
    newer = onnx.load(dist / "generator.onnx")  # as `export --opset 27` writes it: past what onnxruntime-web runs
    next(entry for entry in newer.opset_import if entry.domain in ("", "ai.onnx")).version = 27
    onnx.save(newer, paths[6])
    external = onnx.load(dist / "generator.onnx")  # its weights in a file beside it, which the Python runtime opens
    onnx.save(external, paths[7], save_as_external_data=True, location=f"{paths[7].name}.data", size_threshold=1024)
    yield
    for path in [*paths, dist / f"{paths[7].name}.data"]:
        path.unlink()


def test_a_model_that_fails_to_load_is_named_with_every_bad_field_the_link_filled(
    browser: Browser, base_url: str
) -> None:
    """The fields that need no model (count, seed, truncation, a digit list's form) are read and marked anyway."""
    page = open_page(browser, f"{base_url}index.html?model=missing.onnx&n=abc&digits=1,x&seed=7")
    try:
        assert page.locator("#error").inner_text().splitlines() == [
            "could not fetch the model missing.onnx: HTTP 404 File not found",
            "'1,x' is not a comma-separated list of digits such as 0,3,7",
            "number of digits must be an integer from 1 to 100, got 'abc'",
        ]
        invalid = page.eval_on_selector_all("input[aria-invalid=true]", "inputs => inputs.map((i) => i.id)")
        assert invalid == ["digits", "count"]
    finally:
        page.close()


@pytest.mark.parametrize("digit", ["0,3,7", "", "x"])
def test_a_model_that_fails_to_load_names_a_link_digit_that_is_no_class(
    browser: Browser, base_url: str, digit: str
) -> None:
    """digit=0,3,7 had sat in the Digits field unmarked, read as the list it is not, while the model's failure
    was named alone."""
    page = open_page(browser, f"{base_url}index.html?model=missing.onnx&digit={digit}")
    try:
        assert page.locator("#error").inner_text().splitlines() == [
            "could not fetch the model missing.onnx: HTTP 404 File not found",
            f"the link's digit '{digit}' is not one class, e.g. digit=7",
        ]
        invalid = page.eval_on_selector_all("input[aria-invalid=true]", "inputs => inputs.map((i) => i.id)")
        assert invalid == ["digits"]
    finally:
        page.close()


def test_the_pages_newest_opset_is_the_exporters_and_names_the_onnxruntime_web_it_was_set_for() -> None:
    """The page refuses what `export --opset` notes it will refuse; a new onnxruntime-web asks for both again."""
    from digitgen.export.tolerances import PAGE_OPSET

    module = (WEB / "digitgen.js").read_text()
    pinned = json.loads((WEB / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    assert re.search(r"^const PAGE_OPSET = (\d+);$", module, re.MULTILINE)[1] == str(PAGE_OPSET)
    assert f"onnxruntime-web ({pinned})" in module


@pytest.mark.usefixtures("bad_models")
@pytest.mark.parametrize(
    ("query", "messages"),
    [
        ("model=missing.onnx", ["could not fetch the model missing.onnx: HTTP 404"]),
        ("model=a%0Ab.onnx", ["could not fetch the model a\\nb.onnx: HTTP 404"]),  # on one line, escaped
        (  # a model that fails, and the link's other problems with it
            "model=missing.onnx&sed=3",
            [
                "could not fetch the model missing.onnx: HTTP 404",
                "the link's parameter 'sed' is not one this page reads",
            ],
        ),
        ("model=index.html", ["index.html is not an ONNX model"]),
        ("model=http://[x/g.onnx", ["could not fetch the model http://[x/g.onnx: "]),  # no URL: the browser says so
        (  # nothing listens there: a port of another origin, whose server may also refuse this page
            "model=http://127.0.0.1:9/g.onnx",
            [
                "could not fetch the model http://127.0.0.1:9/g.onnx: Failed to fetch (a model on another site is "
                "fetched only if its server allows this page (Access-Control-Allow-Origin) and can be reached)"
            ],
        ),
        ("model=_test_truncated.onnx", ["_test_truncated.onnx is not an ONNX model"]),
        (
            "model=_test_renamed.onnx",
            [
                "_test_renamed.onnx does not follow the digitgen model contract",
                "inputs must be 'z' and 'digit', found ['digit', 'noise']",
                "'image' must be float32 [batch, 1, 28, 28], found tensor(float) ['batch', 64]",
                "'digit' must take any batch size, found a fixed batch of 1",
                "metadata 'num_classes' must be at most 256, found 100000",
            ],
        ),
        ("threads=0", ["threads must be an integer from 1 to 64, got 0"]),  # read as the fields read numbers
        (
            "model=_test_small_images.onnx&n=20",
            ["_test_small_images.onnx: the model returned 'image' of shape (80, 1, 14, 14) (float32) for 20 digits"],
        ),
        # as the Python runtime refuses it, not drawn as a black sheet
        ("model=_test_nan_pixels.onnx", ["_test_nan_pixels.onnx: the model returned pixels that are NaN or infinite"]),
        (
            "model=_test_byte_pixels.onnx",
            ["_test_byte_pixels.onnx: the model returned pixels outside 0 to 1, not finished pixels"],
        ),
        (  # in the page's words, not onnxruntime-web's ("Module.MountedFiles is not available")
            "model=_test_external.onnx",
            [
                "_test_external.onnx keeps its weights in a file beside it ('_test_external.onnx.data'), which this "
                "page does not load: save the model as one file (onnx.save_model without save_as_external_data)"
            ],
        ),
        (  # in the page's words, not onnxruntime-web's ("Opset 27 is under development", a build machine's path)
            "model=_test_opset_27.onnx",
            [
                "_test_opset_27.onnx is written at ONNX opset 27; this page's onnxruntime-web runs opsets up to 26: "
                "export it with --opset 26 or lower"
            ],
        ),
    ],
)
def test_model_failures_show_on_the_page(browser: Browser, base_url: str, query: str, messages: list[str]) -> None:
    page = open_page(browser, f"{base_url}index.html?{query}")
    try:
        assert_error_shown(page, messages)
        described = page.evaluate(
            """() => [...document.querySelectorAll("input[aria-invalid=true]")].map(
                (input) => document.getElementById(input.getAttribute("aria-describedby"))?.textContent ?? null)"""
        )
        assert described == [message for message in messages if message.startswith("seed ")]  # its own line
    finally:
        page.close()


def test_a_link_s_unreadable_threads_is_named_as_the_link_s_with_its_other_problems(
    browser: Browser, base_url: str
) -> None:
    """Not "The model could not be loaded." with the link's other problems left out."""
    page = open_page(browser, f"{base_url}index.html?threads=abc&foo=1")
    try:
        assert_error_shown(
            page,
            [
                "threads must be an integer from 1 to 64, got 'abc'",
                "the link's parameter 'foo' is not one this page reads",
            ],
        )
        assert page.locator("#status").text_content() == "The link's threads could not be read, so no model was loaded."
    finally:
        page.close()


def test_missing_webassembly_shows_on_the_page(browser: Browser, base_url: str) -> None:
    page = browser.new_page()
    try:
        page.add_init_script("delete globalThis.WebAssembly")
        page.goto(base_url + "index.html")
        wait_settled(page)
        assert_error_shown(page, ["WebAssembly is not available"])
    finally:
        page.close()


def test_a_webassembly_runtime_that_cannot_start_is_not_blamed_on_the_model(browser: Browser, base_url: str) -> None:
    """A host that does not serve the .wasm file: the words name the runtime, not generator.onnx."""
    page = browser.new_page()
    try:
        page.route("**/*.wasm", lambda route: route.fulfill(status=404, body="not here"))
        page.goto(base_url + "index.html")
        wait_settled(page)
        assert_error_shown(page, ["the WebAssembly runtime could not start: ", "serve the whole built folder"])
        assert "could not load generator.onnx" not in page.locator("#error").text_content()
        assert page.text_content("#status") == "The page's WebAssembly runtime could not start."
    finally:
        page.close()


@pytest.mark.parametrize(
    ("missing", "status", "words"),
    [
        ("app.js", "The page could not start.", "The script app.js of this page did not load: serve the whole"),
        (
            "ort.wasm.min.mjs",
            "The page's runtime could not be loaded.",
            "(digitgen.js, or the onnxruntime-web module it imports, ort.wasm.min.mjs: serve the whole built folder",
        ),
    ],
)
def test_a_script_of_the_page_that_does_not_load_is_named_on_the_page(
    browser: Browser, base_url: str, missing: str, status: str, words: str
) -> None:
    """Not a page left at "Loading the model..." with nothing said, nor an error naming only digitgen.js."""
    page = browser.new_page()
    try:
        page.route(f"**/{missing}", lambda route: route.fulfill(status=404, body="not here"))
        page.goto(base_url + "index.html")
        assert wait_settled(page) == "error"
        assert_error_shown(page, [words])
        assert page.text_content("#status") == status
    finally:
        page.close()


def assert_error_shown(page: Page, messages: list[str]) -> None:
    assert page.evaluate("document.body.dataset.state") == "error"
    error = page.locator("#error")
    assert error.is_visible()
    assert error.get_attribute("role") == "alert"
    for message in messages:
        assert message in error.text_content()


def submit(page: Page, digits: str = "", count: str = "10", seed: str = "0", truncation: str = "") -> str:
    for field, value in (("digits", digits), ("count", count), ("seed", seed), ("truncation", truncation)):
        page.fill(f"#{field}", value)
    page.click("#generate")
    return wait_settled(page)


def cli_words(field: str, text: str) -> str:
    """What the CLI's reading and check of ``text`` say of it (count: the page's range, 1 to 100)."""
    checks = {
        "count": lambda: check_int(read_integer(text), "number of digits", 1, 100),
        "seed": lambda: check_seed(read_integer(text)),
        "truncation": lambda: check_truncation(read_number(text)),
        "digits": lambda: parse_digit_list(text),
    }
    with pytest.raises(InvalidRequestError) as refused:
        checks[field]()
    return str(refused.value)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("count", "0"),
        ("count", "101"),
        ("count", "2.5"),
        ("count", " "),
        ("count", "\u00ad7"),  # a soft hyphen, invisible: escaped in the words
        ("digits", "a,b"),
        ("digits", "+3,a"),  # as the CLI refuses it
        ("digits", "3,,7"),
        ("digits", "3,\u200b7"),
        ("seed", "abc"),
        ("seed", "-1"),
        ("seed", "-0001"),
        ("seed", str(2**64)),
        ("seed", "\u200b5"),  # a zero-width space, as pasted text carries: the CLI shows it escaped
        ("seed", "\ufeff5"),  # a byte-order mark is no space to Python (nor to the CLI)
        ("seed", "it's"),
        ("truncation", "0"),
        ("truncation", "-0"),
        ("truncation", "wide"),
        ("truncation", "0.01"),
        ("truncation", "0x10"),  # as Python's float()
        ("truncation", "1e400"),  # read as infinity
        ("truncation", "1_5"),  # as the CLI: no grouping
        ("truncation", "1.5e0000"),  # as the server
        ("truncation", "1.5\u200b"),
        # a value pasted by mistake: quoted in its first 1,024 characters, then its length, by both
        ("seed", "9" * 2000),
        ("digits", "3," * 700),
        ("truncation", "\u00e9" * 1100),
    ],
)
def test_bad_fields_are_named_in_the_cli_s_words_until_the_next_sheet(page: Page, field: str, text: str) -> None:
    assert submit(page, **{field: text}) == "error"
    assert page.locator("#error").text_content() == cli_words(field, text)
    assert submit(page) == "drawn"
    assert page.locator("#error").is_hidden()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"digits": "12"}, "digit 12 is not a class of this model (0-9)"),
        ({"digits": "12,3,15,12"}, "digits 12, 15 are not classes of this model (0-9)"),  # each bad one, once
        ({"digits": "10,11,12,13,14,15,16"}, "digits 10, 11, 12, 13, 14 and 2 more are not classes of this model"),
        (  # counted as the CLI counts them, in groups of three
            {"digits": ",".join(map(str, range(10, 1016)))},
            "digits 10, 11, 12, 13, 14 and 1,001 more are not classes of this model",
        ),
        ({"seed": "9" * 2000}, f"from 0 to 18446744073709551615, got '{'9' * 1023}... (2,000 characters)"),
        ({"count": "\U0001f600" * 1100}, f"got '{chr(0x1F600) * 1023}... (1,100 characters)"),  # no half emoji
    ],
)
def test_bad_fields_show_on_the_page_until_the_next_sheet(page: Page, fields: dict[str, str], message: str) -> None:
    assert submit(page, **fields) == "error"
    assert_error_shown(page, [message])
    assert submit(page) == "drawn"
    assert page.locator("#error").is_hidden()


def test_the_page_shows_generating_before_the_model_holds_its_thread(page: Page) -> None:
    """The model runs on the page's thread: without a frame first, "Generating…" never reached the screen."""
    assert submit(page) == "drawn"
    frames, text = page.evaluate(
        """() => new Promise((resolve) => {
            let frames = 0;
            const tick = () => { frames++; requestAnimationFrame(tick); };
            requestAnimationFrame(tick);
            const gen = window.digitgen, real = gen.generate.bind(gen);
            gen.generate = (options) => {
                delete gen.generate;
                resolve([frames - clicked, document.getElementById("status").textContent]);
                return real(options);
            };
            const clicked = frames;
            document.getElementById("generate").click();
        })"""
    )
    assert frames >= 1 and text == "Generating…"
    assert wait_settled(page) == "drawn"


def test_a_browser_that_cannot_write_the_png_says_so_on_the_page(page: Page) -> None:
    assert submit(page) == "drawn"
    page.evaluate("() => { window.keptCompressionStream = window.CompressionStream; delete window.CompressionStream; }")
    try:
        page.click("#download")
        page.wait_for_function("document.getElementById('error').textContent.includes('could not write the PNG')")
        assert "a screenshot keeps the sheet" in page.locator("#error").text_content()
    finally:
        page.evaluate("() => { window.CompressionStream = window.keptCompressionStream; }")


def test_the_module_refuses_a_batch_larger_than_the_runtime_runs(page: Page) -> None:
    """A batch of 100,000 froze the tab, then failed with std::bad_alloc; the Python runtime stops at 8,192."""
    error = page.evaluate("window.digitgen.generate({ count: 2, batchSize: 8193 }).catch((e) => [e.name, e.message])")
    assert error == ["InvalidRequestError", "batch size must be an integer from 1 to 8192, got 8193"]


def test_what_python_takes_for_whitespace_the_page_takes_too(page: Page) -> None:
    """U+0085 and U+001C are spaces to Python's int() and the CLI; JavaScript's trim() keeps them."""
    assert submit(page, seed="5") == "drawn"
    five = page.locator("#sheet").screenshot()
    for seed in ("\x855", "\x1c5\x1c", " 5\u3000"):
        assert submit(page, seed=seed) == "drawn", seed
        assert page.locator("#sheet").screenshot() == five


def test_generate_asked_while_a_sheet_is_under_way_draws_the_newest_fields_after_it(
    browser: Browser, base_url: str
) -> None:
    """Enter in a field, or a click, during a sheet: answered once that sheet is done, never dropped or run twice
    at once, and the sheet that stays is the one of the fields as they are."""
    page = open_page(browser, base_url + "index.html")
    try:
        page.evaluate(
            """() => {
                const gen = window.digitgen, generate = gen.generate.bind(gen);
                window.calls = [];
                gen.generate = async (options) => {
                    window.calls.push(String(options.seed));
                    await new Promise((done) => setTimeout(done, 700));
                    return generate(options);
                };
            }"""
        )
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_function("document.body.dataset.state === 'busy'")
        # said above the sheet (a long sheet's timing line may be off-screen), the last sheet dimmed
        assert page.get_attribute("#sheet", "aria-busy") == "true" and page.text_content("#status") == "Generating…"
        assert page.evaluate("getComputedStyle(document.getElementById('sheet')).opacity") == "0.4"
        assert page.text_content("#timing") == ""
        page.fill("#seed", "2")
        page.press("#seed", "Enter")
        page.fill("#seed", "3")
        page.press("#seed", "Enter")
        assert wait_settled(page) == "drawn"
        assert page.evaluate("window.calls") == ["1", "3"]  # one sheet after the one under way, of the last fields
        assert page.get_attribute("#sheet", "aria-label").endswith("seed 3")
        assert page.get_attribute("#sheet", "aria-busy") is None
        assert page.text_content("#status") == ""  # not "Model ... loaded." again: the timing line says how it went
        assert page.evaluate("getComputedStyle(document.getElementById('sheet')).opacity") == "1"
    finally:
        page.close()


def test_a_long_error_stays_on_the_page_and_a_bad_field_keeps_its_focus_ring(page: Page) -> None:
    assert submit(page, count="0", seed="9" * 300) == "error"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    page.focus("#seed")
    outline = "(id) => [getComputedStyle(document.getElementById(id))].map((s) => [s.outlineStyle, s.borderColor])[0]"
    focused, unfocused = page.evaluate(outline, "seed"), page.evaluate(outline, "count")
    assert focused[0] != unfocused[0]  # which bad field has the focus shows
    assert focused[1] == unfocused[1] == "rgb(176, 0, 32)"  # both still marked bad
    assert submit(page) == "drawn"


def test_the_sheet_names_the_digits_it_shows_not_a_whole_long_list(page: Page) -> None:
    assert submit(page, digits=",".join(["1", "2"] * 500), count="3") == "drawn"
    label = page.get_attribute("#sheet", "aria-label")
    assert label == "3 generated handwritten digits, digits 1, 2 (the first 3 of 1000) in turn, seed 0"  # 1, 2, 1
    assert submit(page, digits="7", count="1") == "drawn"
    assert page.get_attribute("#sheet", "aria-label") == "1 generated handwritten digit, digit 7, seed 0"
    assert submit(page, count="12") == "drawn"  # all the model's classes, as many as it has
    assert (
        page.get_attribute("#sheet", "aria-label") == "12 generated handwritten digits, digits 0 to 9 in turn, seed 0"
    )


def test_every_bad_field_is_named_and_marked(page: Page) -> None:
    assert submit(page, digits="12", count="0", seed="abc", truncation="wide") == "error"
    messages = [
        "digit 12 is not a class of this model (0-9)",
        "number of digits must be an integer from 1 to 100, got 0",
        "seed must be an integer from 0 to 18446744073709551615, got 'abc'",
        "truncation must be a finite number >= 0.1, got 'wide'",
    ]
    assert_error_shown(page, messages)
    assert page.locator("#error").inner_text().splitlines() == messages  # one per line, in the page's order
    # the last sheet no longer matches the fields: it goes, with its timing and download
    assert page.evaluate("document.getElementById('sheet').height") == 0
    assert page.is_disabled("#download") and page.text_content("#timing") == ""
    invalid = page.eval_on_selector_all("input[aria-invalid=true]", "inputs => inputs.map((i) => i.id)")
    assert invalid == ["digits", "count", "seed", "truncation"]
    # each bad field is described by its own line of the error, not by all of them
    described = page.evaluate(
        """() => [...document.querySelectorAll("input[aria-invalid=true]")].map(
            (input) => document.getElementById(input.getAttribute("aria-describedby")).textContent)"""
    )
    assert described == messages and page.evaluate("document.activeElement.id") == "digits"
    # no sheet, no unnamed picture for a screen reader: not drawn at all (a box of no height is still an image to it)
    assert page.evaluate("getComputedStyle(document.getElementById('sheet')).display") == "none"
    assert submit(page, count="0", truncation="1.5") == "error"
    assert page.evaluate("document.activeElement.id") == "count"
    assert page.locator("#error").inner_text().splitlines() == [messages[1]]
    assert page.eval_on_selector_all("input[aria-invalid=true]", "inputs => inputs.map((i) => i.id)") == ["count"]
    assert submit(page) == "drawn"
    assert page.locator("#error").is_hidden() and page.locator("#sheet").is_visible()
    marked = page.eval_on_selector_all("input[aria-invalid=true], input[aria-describedby]", "inputs => inputs.length")
    assert marked == 0


def _readme_page_fields() -> list[tuple[str, str]]:
    """(name, description) of each field in the README's sentence on the page."""
    readme = (WEB.parent / "README.md").read_text()
    bullet = readme.split("- **The page**", 1)[1].split("\n- ", 1)[0]
    return re.findall(r"\*(\w+)\* \(([^)]*)\)", " ".join(bullet.split()))


def test_readme_describes_the_page_fields(browser: Browser, base_url: str) -> None:
    page = open_page(browser, base_url + "index.html")
    try:
        fields = page.eval_on_selector_all(
            "#controls label",
            """labels => labels.map((label) => {
                const input = label.querySelector("input");
                return [label.firstChild.textContent.trim(), input.value, input.placeholder, input.title];
            })""",
        )
        described = _readme_page_fields()
        assert [name for name, _ in described] == [name for name, *_ in fields]
        for (name, text), (_, value, placeholder, title) in zip(described, fields, strict=True):
            assert title in text, f"README's {name} field lacks the page's range or example {title!r}"
            assert (f"default {value}" if value else f"empty: {placeholder}") in text, f"README's {name} default"
        count = next(value for name, value, *_ in fields if name == "Count")
        assert f"{count} digits in" in page.text_content("#timing")  # the default the page draws
    finally:
        page.close()


def test_screenshot_and_download(
    page: Page, python_gen: DigitGenerator, pixel_report: list[str], tmp_path: Path
) -> None:
    assert submit(page, digits="1,2", count="30", seed="42") == "drawn"
    screenshot = page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(screenshot) > 10_000
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "digits-seed42-n30-d1_2.png"  # named by what it shows
    assert submit(page, digits="1,2,3,4", count="2", seed="42") == "drawn"  # the sheet of digits=1,2&n=2
    with page.expect_download() as same_sheet:
        page.click("#download")
    assert same_sheet.value.suggested_filename == "digits-seed42-n2-d1_2.png"
    assert submit(page, digits="1,2", count="30", seed="42") == "drawn"
    described = page.get_attribute("#sheet", "aria-label")
    assert submit(page, digits="1,2,1,2", count="30", seed="42") == "drawn"  # the same sheet: named and told alike
    with page.expect_download() as repeated:
        page.click("#download")
    assert repeated.value.suggested_filename == "digits-seed42-n30-d1_2.png"
    assert (
        page.get_attribute("#sheet", "aria-label")
        == described
        == ("30 generated handwritten digits, digits 1, 2 in turn, seed 42")
    )
    download.value.save_as(tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as sheet:
        sheet.verify()  # every chunk's CRC
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.mode == "L"  # grey levels, as the CLI's grid: numpy reads (H, W)
        pixels = np.asarray(sheet)
    expected = python_sheet(python_gen.generate(30, digits=[1, 2], seed=42).images)
    assert_same_pixels(pixels, expected, "downloaded PNG, seed 42, digits [1, 2]", pixel_report)


def test_a_download_as_another_sheet_is_drawn_keeps_its_own_name(
    page: Page, python_gen: DigitGenerator, pixel_report: list[str], tmp_path: Path
) -> None:
    """Download read the sheet's pixels, then its name after writing the PNG: a sheet drawn meanwhile gave the old
    pixels the new sheet's name."""
    assert submit(page, count="3", seed="7") == "drawn"
    page.fill("#seed", "500")
    slow_png = """() => {
        const arrayBuffer = Response.prototype.arrayBuffer;
        Response.prototype.arrayBuffer = async function () {
            await new Promise((resolve) => setTimeout(resolve, 1500));
            Response.prototype.arrayBuffer = arrayBuffer;
            return arrayBuffer.call(this);
        };
    }"""
    page.evaluate(slow_png)  # the PNG is written after the next sheet is drawn
    with page.expect_download() as download:
        page.evaluate("() => { for (const id of ['generate', 'download']) document.getElementById(id).click(); }")
    assert wait_settled(page) == "drawn"
    assert download.value.suggested_filename == "digits-seed7-n3.png"
    download.value.save_as(tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as sheet:
        pixels = np.asarray(sheet)
    expected = python_sheet(python_gen.generate(3, seed=7).images)
    assert_same_pixels(pixels, expected, "a sheet downloaded as the next is drawn", pixel_report)


@pytest.mark.usefixtures("bad_models")
def test_quality_figures_that_are_not_numbers_are_left_out_not_shown_as_nan(browser: Browser, base_url: str) -> None:
    page = open_page(browser, f"{base_url}index.html?model=_test_odd_metadata.onnx")
    try:
        assert page.evaluate("document.body.dataset.state") == "drawn", page.text_content("#error")
        quality = page.text_content("#quality")
        summary = page.text_content("#summary")
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    finally:
        page.close()
    assert "Class accuracy" in quality and "Training" in quality
    assert "FID" not in quality and "Recall" not in quality and "Precision" not in quality and "NaN" not in quality
    # the model's own text, as `digitgen info` shows it: escaped, on one line, and cut short on the page
    assert "fp32\\u202e" + "x" * 35 + "... (205 characters) weights" in summary
    assert "seed <b>9</b>\\n" + "9" * 31 + "... (3,009 characters)" in quality
    assert overflow <= 0, "the page grew wider than its window"


def test_a_released_generator_and_a_failed_run_are_typed_errors(browser: Browser, base_url: str) -> None:
    page = open_page(browser, base_url + "index.html")
    try:
        failed_run, in_flight, released = page.evaluate(
            """async () => {
                const gen = window.digitgen;
                const named = (error) => [error.name, error.message, error instanceof Error];
                const run = await gen.run(new Float32Array(3), [1]).catch(named);  // z of the wrong size
                // released while a call runs: the call finishes first (its memory is not freed under it)
                const call = gen.run(new Float32Array(64 * gen.latentDim), new Array(64).fill(7));
                await gen.release();
                const pixels = await call.then((data) => data.length, named);
                return [run, pixels, await gen.generate({ count: 1 }).catch(named)];
            }"""
        )
    finally:
        page.close()
    assert failed_run[0] == "ModelRunError" and failed_run[1].startswith("generator.onnx: the model failed to run: ")
    assert in_flight == 64 * 28 * 28
    assert released == ["InvalidRequestError", "the generator of generator.onnx was released", True]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{ num: 16 }", "generate has no option 'num'; its options are count, digits, seed, batchSize, truncation"),
        ("{ count: 1, sead: 5, batch_size: 2 }", "generate has no option 'sead', 'batch_size'; its options are"),
        ("null", "generate takes an object of options, e.g. { count: 16 }, got null"),
        ("[3]", "generate takes an object of options, e.g. { count: 16 }, got 3"),
    ],
)
def test_the_module_refuses_options_it_does_not_take(page: Page, options: str, message: str) -> None:
    """A misspelt or Python-named option would otherwise draw its default in silence."""
    error = page.evaluate(f"window.digitgen.generate({options}).catch((e) => [e.name, e.message])")
    assert error[0] == "InvalidRequestError" and error[1].startswith(message), error


@pytest.mark.parametrize(("digits", "shown"), [('"37"', "'37'"), ('"3,7"', "'3,7'"), ("5", "5")])
def test_digits_that_are_no_list_are_refused_as_python_refuses_them(page: Page, digits: str, shown: str) -> None:
    """A string is not read letter by letter, nor a number as an empty list."""
    error = page.evaluate(f"window.digitgen.generate({{ digits: {digits} }}).catch((e) => [e.name, e.message])")
    assert error == ["InvalidRequestError", f"digits must be a list of classes, e.g. [3, 7], got {shown}"]


def test_page_from_digitgen_serve_draws_what_the_api_sends(
    browser: Browser, dist: Path, tmp_path: Path, python_gen: DigitGenerator, pixel_report: list[str]
) -> None:
    """`digitgen serve --web web/dist`: one server gives a person the page and an app the API, same digits."""
    from tests.test_serve import serve_command, start

    server = start(tmp_path / "server.log", serve_command("--quiet", "--web", str(dist)))
    try:
        page = open_page(browser, f"{server.url}/?seed=4&digits=2,9&n=12")
        try:
            assert page.evaluate("document.body.dataset.state") == "drawn", page.text_content("#error")
            sheet = canvas_pixels(page)[..., 0]
        finally:
            page.close()
        expected = python_gen.generate(12, digits=[2, 9], seed=4).images
        assert_same_pixels(sheet, python_sheet(expected), "page served by digitgen serve", pixel_report)
        # this server sends no COOP/COEP headers, so two threads cannot run: refused, not quietly one
        page = open_page(browser, f"{server.url}/?threads=2")
        try:
            assert page.evaluate("[document.body.dataset.state, crossOriginIsolated]") == ["error", False]
            assert page.text_content("#error").startswith("2 threads need a cross-origin isolated page")
        finally:
            page.close()
        api = np.load(io.BytesIO(server.get("/generate?count=12&digits=2,9&seed=4&format=npz").content))
        np.testing.assert_array_equal(api["images"], expected)
    finally:
        assert server.stop() == 0
