"""The per-request middleware in-process, around a stub app: request ids, metrics by endpoint and
status, and the access-log line, word for word. (tests/test_serve.py checks them on a real server.)"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from digitgen.runtime.text import printable
from digitgen.serve import observe
from digitgen.serve.observe import (
    ACCESS_LOG,
    SHARED_FILE_BYTES,
    SHARED_FILES,
    SHARED_METRICS,
    ASGIApp,
    Message,
    Metrics,
    Receive,
    RequestMiddleware,
    Scope,
    Send,
    logged_target,
    origin_form,
)

ENDPOINTS = frozenset({"/generate", "/healthz"})


async def stub(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 201 with one header of its own after 10 ms; ``/fail`` raises before it answers."""
    if scope["path"].endswith("/fail"):
        raise RuntimeError("a bug")
    await asyncio.sleep(0.01)
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-own", b"1")]})
    await send({"type": "http.response.body", "body": b"ok"})


def get(
    middleware: RequestMiddleware, path: str, headers: dict[str, str] | httpx.Headers | None = None, root_path: str = ""
) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=middleware, root_path=root_path, client=("10.1.2.3", 4567))
        async with httpx.AsyncClient(transport=transport, base_url="http://digitgen.test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(run())


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_a_plain_request_id_is_echoed_and_others_replaced(metrics: Metrics) -> None:
    middleware = RequestMiddleware(stub, metrics, ENDPOINTS, access_log=False)
    echoed = get(middleware, "/healthz", {"X-Request-ID": "job-7.a:b_c"})
    assert echoed.status_code == 201 and echoed.headers["x-request-id"] == "job-7.a:b_c"
    assert echoed.headers["x-own"] == "1"  # the app's own headers kept
    made = [get(middleware, "/healthz", {"X-Request-ID": bad}).headers["x-request-id"] for bad in ("a b", "x" * 129)]
    made.append(get(middleware, "/healthz").headers["x-request-id"])
    twice = httpx.Headers([("X-Request-ID", "first"), ("X-Request-ID", "second")])  # neither is the request's
    made.append(get(middleware, "/healthz", twice).headers["x-request-id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made), made
    assert len({rid[:16] for rid in made}) == 1  # one random half per process
    counts = [int(rid[16:], 16) for rid in made]
    assert counts == list(range(counts[0], counts[0] + 4))  # and a count


def test_a_forked_process_draws_its_own_request_ids() -> None:
    parent = observe.new_request_id()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's report goes through the pipe
        os.write(write, observe.new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    forked = os.read(read, 64).decode()
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{32}", forked) and forked[:16] != parent[:16]
    assert observe.new_request_id()[:16] == parent[:16]


def test_requests_are_counted_and_timed_by_endpoint_and_status(metrics: Metrics) -> None:
    middleware = RequestMiddleware(stub, metrics, ENDPOINTS, access_log=False)
    for path in ("/generate?count=2", "/generate", "/elsewhere", "/mounted/healthz"):
        get(middleware, path)
    get(middleware, "/mounted/healthz", root_path="/mounted")  # a mounted app counts its own endpoints
    with pytest.raises(RuntimeError):
        get(middleware, "/fail")
    assert sample(metrics, "digitgen_requests_total", endpoint="/generate", status="201") == 2
    assert sample(metrics, "digitgen_requests_total", endpoint="/healthz", status="201") == 1
    assert sample(metrics, "digitgen_requests_total", endpoint="other", status="201") == 2
    assert sample(metrics, "digitgen_requests_total", endpoint="other", status="500") == 1  # no answer: 500
    assert sample(metrics, "digitgen_request_seconds_count", endpoint="/generate") == 2
    seconds = sample(metrics, "digitgen_request_seconds_sum", endpoint="/generate")
    assert seconds is not None and 0.02 <= seconds < 5


def test_one_access_log_line_per_request_in_its_own_words(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="digitgen.serve.access"):
        get(RequestMiddleware(stub, metrics, ENDPOINTS, access_log=True), "/generate?digit=7", {"X-Request-ID": "r1"})
        get(RequestMiddleware(stub, metrics, ENDPOINTS, access_log=True), "/healthz", {"X-Request-ID": "r2"})
        get(RequestMiddleware(stub, metrics, ENDPOINTS, access_log=False), "/healthz", {"X-Request-ID": "r3"})
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert re.fullmatch(r'10\.1\.2\.3:4567 "GET /generate\?digit=7" 201 \d+\.\dms id=r1', lines[0]), lines[0]
    assert re.fullmatch(r'10\.1\.2\.3:4567 "GET /healthz" 201 \d+\.\dms id=r2', lines[1]), lines[1]
    milliseconds = float(lines[0].split()[-2].removesuffix("ms"))
    assert 10 <= milliseconds < 5000


def test_a_request_cannot_write_a_log_line_of_its_own(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    """The server decodes %0A in the path to a newline, %22 to a quote and %E2%80%A8 to U+2028 (a line end to
    str.splitlines and many log readers); the log escapes them, so a forged line stays in the request's own, and its
    quoted field ends where the server's quote does (a reader of the first quoted field and the status after it
    would have read a forged 200)."""
    middleware = RequestMiddleware(stub, metrics, ENDPOINTS, access_log=True)
    with caplog.at_level("INFO", logger=ACCESS_LOG.name):
        for forged in ('\n10.0.0.1:1 "GET /admin" 200 1.0ms id=x', '" 200 0.1ms id=x', "\u2028\u202e"):
            get(middleware, "/x" + quote(forged), {"X-Request-ID": "r1"})
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" 201 ")[0] for line in lines] == [
        '10.1.2.3:4567 "GET /x\\n10.0.0.1:1 %22GET /admin%22 200 1.0ms id=x"',
        '10.1.2.3:4567 "GET /x%22 200 0.1ms id=x"',
        '10.1.2.3:4567 "GET /x\\u2028\\u202e"',
    ]
    assert all(re.fullmatch(r'[^"]*"[^"]*" 201 \S+ id=r1', line) and len(line.splitlines()) == 1 for line in lines)
    assert printable("a\x00b\x7fc\u0085d\te\u00e9") == "a\\x00b\\x7fc\\x85d\\te\u00e9"


def test_a_forwarded_client_address_cannot_forge_the_log_line(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a trusted proxy the client is what X-Forwarded-For said: terminal escapes, a quote and spaces that
    would forge the line's fields are %-escaped, and a long one is cut."""
    middleware = RequestMiddleware(stub, metrics, ENDPOINTS, access_log=True)

    def from_client(host: str) -> ASGIApp:
        async def forwarded(scope: Scope, receive: Receive, send: Send) -> None:
            await middleware({**scope, "client": (host, 0)}, receive, send)

        return forwarded

    with caplog.at_level("INFO", logger=ACCESS_LOG.name):
        for host in ('6.6.6.6\x1b[2J\x1b[31mFAKE" 200 id=zz', "A" * 20_000, "2001:db8::1", "caf\u00e9"):
            get(from_client(host), "/healthz", {"X-Request-ID": "r1"})  # type: ignore[arg-type]
    clients = [record.getMessage().split(' "GET /healthz" ')[0] for record in caplog.records]
    assert clients == [
        "6.6.6.6%1B[2J%1B[31mFAKE%22%20200%20id%3Dzz:0",
        "A" * 64 + "... (20,000 characters):0",
        "2001:db8::1:0",
        "caf%C3%A9:0",
    ]


def test_other_traffic_passes_through_untouched(metrics: Metrics) -> None:
    seen: list[str] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        message: Message = await receive()
        await send({"type": message["type"] + ".complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = RequestMiddleware(lifespan_app, metrics, ENDPOINTS, access_log=True)
    asyncio.run(middleware({"type": "lifespan"}, receive, send))
    assert seen == ["lifespan"] and sent == [{"type": "lifespan.startup.complete"}]
    assert sample(metrics, "digitgen_requests_total", endpoint="other", status="500") is None


def test_metrics_are_named_typed_labelled_and_described_in_their_own_registry() -> None:
    metrics = Metrics()
    described = {
        family.name: (family.type, family.documentation)
        for family in metrics.registry.collect()
        if family.name.startswith("digitgen_")
    }
    assert described == {
        "digitgen_requests": (
            "counter",
            "Requests answered, by endpoint and status (endpoint unparsed: refused before the app could read them)",
        ),
        "digitgen_request_seconds": ("histogram", "Time from request to the end of the response, by endpoint"),
        "digitgen_digits_generated": ("counter", "Digits generated"),
        "digitgen_requests_refused": ("counter", "Requests refused with 503, by reason"),
        "digitgen_requests_abandoned": (
            "counter",
            (
                "Requests whose client left before the whole response (a generation run on a thread stops at its "
                "next batch of 256 digits), or was cut off for leaving it unread"
            ),
        ),
        "digitgen_batch_requests": ("histogram", "Requests per micro-batched model call"),
        "digitgen_requests_admitted": ("gauge", "Requests generating or waiting"),
    }
    assert [sample(metrics, "digitgen_requests_refused_total", reason=r) for r in ("busy", "time_limit")] == [0, 0]
    metrics.requests.labels(endpoint="/generate", status="200").inc()
    metrics.latency.labels(endpoint="/generate").observe(0.003)
    metrics.refused.labels(reason="busy").inc(2)
    metrics.digits.inc(5)
    metrics.abandoned.inc()
    metrics.batch_requests.observe(3)
    metrics.admitted.set(4)
    assert sample(metrics, "digitgen_requests_total", endpoint="/generate", status="200") == 1
    assert sample(metrics, "digitgen_request_seconds_bucket", endpoint="/generate", le="0.005") == 1
    assert sample(metrics, "digitgen_request_seconds_bucket", endpoint="/generate", le="0.0025") == 0
    assert sample(metrics, "digitgen_requests_refused_total", reason="busy") == 2
    assert sample(metrics, "digitgen_digits_generated_total") == 5
    assert sample(metrics, "digitgen_requests_abandoned_total") == 1
    assert sample(metrics, "digitgen_batch_requests_bucket", le="4.0") == 1
    assert sample(metrics, "digitgen_batch_requests_bucket", le="2.0") == 0
    assert sample(metrics, "digitgen_requests_admitted") == 4


@pytest.mark.skipif(sys.platform != "linux", reason="prometheus-client reads the process figures from /proc")
def test_metrics_carry_the_process_memory_gc_and_python_version() -> None:
    """Memory that grows under load is what operators of such servers watch for: RSS is on /metrics."""
    metrics = Metrics()
    resident = sample(metrics, "process_resident_memory_bytes")
    assert resident is not None and 10 * 2**20 < resident < 100 * 2**30
    assert sample(metrics, "python_gc_objects_collected_total", generation="0") is not None
    versions = {s.labels["version"] for f in metrics.registry.collect() if f.name == "python_info" for s in f.samples}
    assert versions == {platform.python_version()}


@pytest.mark.parametrize(
    ("path", "raw_path", "read_as"),
    [
        ("http://127.0.0.1:8000/generate", b"http://127.0.0.1:8000/generate", ("/generate", b"/generate")),
        ("HTTPS://user@host/a%20b", b"HTTPS://user@host/a%2520b", ("/a%20b", b"/a%2520b")),
        ("http://hé/x", b"http://h%C3%A9/x", ("/x", b"/x")),  # the authority as sent differs from as read
        ("http://host", b"http://host", ("/", b"/")),  # no path: the root
        ("/generate", b"/generate", ("/generate", b"/generate")),  # origin form: as it is
        ("healthz", b"healthz", ("healthz", b"healthz")),  # neither: left for the 404 to name
    ],
)
def test_a_target_in_absolute_form_is_read_as_its_path(path: str, raw_path: bytes, read_as: tuple[str, bytes]) -> None:
    scope = origin_form({"type": "http", "path": path, "raw_path": raw_path, "query_string": b"digit=3"})
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == (*read_as, b"digit=3")
    without_raw = origin_form({"type": "http", "path": path, "query_string": b""})  # raw_path is optional in ASGI
    made = read_as[0].encode() if read_as[0] != path else None  # a raw_path only for a target read anew
    assert (without_raw["path"], without_raw.get("raw_path")) == (read_as[0], made)


@pytest.mark.parametrize("raw", [True, False])
def test_a_target_in_absolute_form_is_read_after_the_root_path(raw: bool) -> None:
    """uvicorn puts its --root-path before the whole URL (it had been a 404, "no endpoint /digitshttp://...")."""
    given = {"type": "http", "path": "/digitshttp://h/generate", "root_path": "/digits", "query_string": b""}
    if raw:
        given["raw_path"] = b"/digitshttp://h/gen%65rate"
    scope = origin_form(given)
    assert (scope["path"], scope["root_path"]) == ("/digits/generate", "/digits")
    assert scope["raw_path"] == (b"/digits/gen%65rate" if raw else b"/digits/generate")
    usual = {**given, "path": "/digits/generate"}
    assert origin_form(usual) is usual


@pytest.mark.parametrize(
    ("path", "raw_path", "read_as"),
    [
        ("http://h/healthz", b"http%3A//h/healthz", ("http://h/healthz", b"http%3A//h/healthz")),  # no scheme as sent
        ("a://h/healthz", b"a%3A//h/healthz", ("a://h/healthz", b"a%3A//h/healthz")),
        ("http://h/x/generate", b"http://h%2Fx/generate", ("/generate", b"/generate")),  # a slash in the authority
    ],
)
def test_a_target_is_read_in_the_form_it_was_sent(path: str, raw_path: bytes, read_as: tuple[str, bytes]) -> None:
    """A %-escape in the scheme or the authority is not absolute form: the path decoded from it would be."""
    scope = origin_form({"type": "http", "path": path, "raw_path": raw_path, "query_string": b""})
    assert (scope["path"], scope["raw_path"]) == read_as


def test_a_logged_target_is_escaped_then_cut() -> None:
    assert logged_target("/generate", "") == "/generate"
    assert logged_target("/generate", "digit=3") == "/generate?digit=3"
    assert logged_target("/a\nb", "") == "/a\\nb"
    assert logged_target("/" + "x" * 1023, "") == "/" + "x" * 1023  # 1,024 characters: whole
    assert logged_target("/" + "x" * 1024, "") == "/" + "x" * 1023 + "... (1,025 characters)"
    assert logged_target("/", "\x01" * 300) == "/?" + "\\x01" * 255 + "\\x... (1,202 characters)"


SHARED_PROCESS = """
import sys
from digitgen.serve.observe import Metrics
metrics = Metrics(shared=True)
metrics.requests.labels("/generate", "200").inc(int(sys.argv[1]))
metrics.admitted.set(int(sys.argv[2]))
sys.stdout.buffer.write(metrics.latest())
if sys.argv[3] == "close":
    metrics.close()
"""


def test_shared_metrics_count_every_process_and_forget_the_gauges_of_stopped_ones(tmp_path: Path) -> None:
    """What each worker of ``serve --workers`` answers: every process's counts, and the admitted requests of the
    processes still running (a worker killed without closing its metrics had left its count in for good)."""

    def process(answered: int, admitted: int, end: str) -> dict[str, float]:
        env = {**os.environ, SHARED_METRICS: str(tmp_path)}
        command = [sys.executable, "-c", SHARED_PROCESS, str(answered), str(admitted), end]
        exposition = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        wanted = ('digitgen_requests_total{endpoint="/generate",status="200"}', "digitgen_requests_admitted")
        return {line.split()[0]: float(line.split()[1]) for line in exposition.splitlines() if line.startswith(wanted)}

    answered, admitted = 'digitgen_requests_total{endpoint="/generate",status="200"}', "digitgen_requests_admitted"
    assert process(3, 1, "killed") == {answered: 3, admitted: 1}  # ends without close(), as a killed worker does
    assert process(4, 2, "close") == {answered: 7, admitted: 2}  # the first one's admitted requests are gone
    assert process(0, 0, "close") == {answered: 7, admitted: 0}
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith("gauge_live")]
    with pytest.raises(RuntimeError, match=f"shared metrics need {SHARED_METRICS} set before prometheus_client"):
        Metrics(shared=True)  # this process counts in memory


def test_each_process_counts_in_files_whose_room_is_reserved(tmp_path: Path) -> None:
    """prometheus-client writes them through mmap: a page a full filesystem cannot supply had killed the worker
    with SIGBUS (a crash loop); reserved, every count lands in room the filesystem has already given."""
    env = {**os.environ, SHARED_METRICS: str(tmp_path)}
    counted = SHARED_PROCESS + "import os; print(os.getpid(), file=sys.stderr)\n"
    done = subprocess.run([sys.executable, "-c", counted, "5", "1", "close"], env=env, capture_output=True, text=True)
    pid = done.stderr.strip()
    files = {path.name: path.stat() for path in tmp_path.iterdir()}
    assert set(files) == {f"{kind}_{pid}.db" for kind in SHARED_FILES if kind != "gauge_livesum"}  # closed: gone
    for name, found in files.items():
        assert found.st_size == SHARED_FILE_BYTES and found.st_blocks * 512 >= SHARED_FILE_BYTES, name


def test_a_reservation_that_does_not_fit_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reserved: list[int] = []

    def fallocate(fd: int, offset: int, length: int) -> None:
        if reserved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserved.append(length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    (tmp_path / "counter_7.db").write_bytes(b"the counts of an earlier process of the same number")
    with pytest.raises(OSError, match="No space left on device"):
        observe.reserve(str(tmp_path), ["a.db", "counter_7.db", "b.db"])
    assert reserved == [SHARED_FILE_BYTES]
    assert [path.name for path in tmp_path.iterdir()] == ["counter_7.db"]  # kept, with its counts
    assert (tmp_path / "counter_7.db").read_bytes() == b"the counts of an earlier process of the same number"


def test_a_process_is_alive_unless_the_system_has_no_process_of_its_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's process (the signal refused) is alive: its share of a gauge stays."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert observe._alive(os.getpid()) and not observe._alive(int(finished.stdout))

    def refused(_pid: int, _signal: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert observe._alive(int(finished.stdout))


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, None])
def test_without_fallocate_the_room_is_written_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: int | None
) -> None:
    if error is None:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)  # macOS
    else:

        def unsupported(fd: int, offset: int, length: int) -> None:
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    (tmp_path / "counter_7.db").write_bytes(b"counts")
    observe.reserve(str(tmp_path), ["counter_7.db", "histogram_7.db"])
    assert (tmp_path / "counter_7.db").read_bytes() == b"counts" + bytes(SHARED_FILE_BYTES - 6)
    assert (tmp_path / "histogram_7.db").read_bytes() == bytes(SHARED_FILE_BYTES)


def test_a_scope_whose_path_lacks_its_root_path_is_read_whole() -> None:
    scope = origin_form({"type": "http", "path": "http://h/generate", "root_path": "/digits", "query_string": b""})
    assert scope["path"] == "/generate"
