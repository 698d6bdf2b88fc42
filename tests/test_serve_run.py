"""`digitgen serve`'s runner and command, with no server left running: the address checks, uvicorn's
options for one worker and for several, threads, TCP_NODELAY, start-up lines and one-line refusals."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI

from digitgen.cli import main
from digitgen.runtime import files
from digitgen.runtime.errors import ModelRunError
from digitgen.runtime.generator import DigitGenerator, default_model_path
from digitgen.serve import ServeConfigError, ServeSettings, scratch
from digitgen.serve import run as serve_run
from digitgen.serve import settings as serve_settings
from digitgen.serve.observe import ACCESS_LOG
from digitgen.serve.run import ServerOptions, serve
from digitgen.serve.settings import usable_cores
from tests.conftest import REPO
from tests.helpers import PIP, free_port
from tests.test_contract import five_digit_model


def test_without_the_serve_extra_one_line_names_it() -> None:
    code = "import sys; sys.modules['fastapi'] = None; from digitgen.cli import main; main(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"Error: this needs the serve extra (fastapi is not installed): {PIP} '{REPO}[serve]'\n")
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "serve" in helped.stdout


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (
            "--web",
            "{page} holds no index.html, so it is not the built page; build it first "
            "(cd web && npm ci && npm run build) and give web/dist",
        ),
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


@pytest.mark.parametrize("threads", [3, 2000])
def test_more_threads_than_cores_are_refused_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """1,024 threads on 2 cores had the server still starting after 8 s."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(serve_run, "serve", lambda *args: pytest.fail("the server started"))
    assert ServerOptions(threads=2).intra_op_threads == 2
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--threads", str(threads)])
    assert (result.exit_code, result.output) == (
        1,
        f"Error: threads must be from 1 to 2, the cores this process may run on, got {threads}\n",
    )


def test_paths_may_be_given_as_path_objects_and_reach_the_workers_as_text(tmp_path: Path) -> None:
    """As the runtime takes them; the options go to worker processes as JSON, so they are kept as text."""
    (tmp_path / "index.html").write_text("<!doctype html><title>digits</title>")
    (tmp_path / "generator.onnx").write_bytes(b"the page's model")
    options = ServerOptions(model=Path("g.onnx"), settings=ServeSettings(web_dir=tmp_path))
    assert (options.model, options.settings.web_dir) == ("g.onnx", str(tmp_path))
    assert json.loads(json.dumps(asdict(options)))["settings"]["web_dir"] == str(tmp_path)


ROOT_PATH_WORDS = (
    "the root path must be the path prefix a proxy strips, a / then path segments without a / at the end, such as "
    "/digits"
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 70_000}, "port must be from 0 (any free port) to 65535, got 70000"),
        ({"port": -1}, "port must be from 0 (any free port) to 65535, got -1"),
        ({"port": "8000"}, "port must be an integer, got '8000'"),
        ({"workers": True}, "workers must be an integer, got True"),
        ({"threads": -3}, f"threads must be from 1 to {usable_cores()}, the cores this process may run on, got -3"),
        ({"threads": 2.0}, "threads must be an integer or None, got 2.0"),
        ({"graceful_timeout": -1}, "the graceful timeout must be a finite 0 s or more, got -1"),
        ({"graceful_timeout": float("nan")}, "the graceful timeout must be a finite 0 s or more, got nan"),
        ({"model": b"g.onnx"}, "model must be a model file's path (a str or a Path) or None, got b'g.onnx'"),
        ({"host": None}, "host must be a str, got None"),
        ({"settings": {}}, "settings must be a ServeSettings, got {}"),
        *(
            ({"root_path": given}, f"{ROOT_PATH_WORDS}; got {given!r}")
            for given in (
                "digits",
                "/digits/",
                "/",
                "//digits",
                "/a b",
                "/digits?x=1",
                "http://proxy/digits",
                "/a'b",
                "/100%",
            )
        ),
    ],
)
def test_server_options_out_of_range_are_refused_in_words(options: dict, message: str) -> None:
    """As the CLI's option types refuse them, for an app that builds the options itself (workers=0 had divided by
    zero, port 70000 had raised OverflowError from the socket)."""
    with pytest.raises(ServeConfigError) as refused:
        ServerOptions(**options)
    assert str(refused.value) == message


def test_a_root_path_is_named_in_the_start_up_line(monkeypatch: pytest.MonkeyPatch) -> None:
    served = []
    monkeypatch.setattr(serve_run, "serve", lambda options, generator=None, listening=None: served.append(options))
    port = free_port()
    result = CliRunner().invoke(main, ["serve", "--port", str(port), "--root-path", "/api/digits"])
    assert result.exit_code == 0, result.output
    assert served[0].root_path == "/api/digits"
    assert result.output.strip().endswith(
        f"API docs at /api/digits/docs through the proxy that strips /api/digits (listening on http://127.0.0.1:{port})"
    )
    refused = CliRunner().invoke(main, ["serve", "--port", str(port), "--root-path", "digits/"])
    assert (refused.exit_code, refused.output) == (1, f"Error: {ROOT_PATH_WORDS}; got 'digits/'\n")


@pytest.mark.parametrize("workers", [0, 3, 10**23])
def test_workers_are_at_most_the_usable_cores(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """Each worker is a process with the model: more than the cores only compete for them, and a huge count had
    forked until the machine ran out of memory."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert ServerOptions(workers=2).workers == 2
    with pytest.raises(ServeConfigError) as refused:
        ServerOptions(workers=workers)
    assert str(refused.value) == (
        "workers must be from 1 to 2, the cores this process may run on (each worker is a process with its own "
        f"copy of the model), got {workers}"
    )


def test_serve_refuses_more_workers_than_cores_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(serve_run, "serve", lambda *args: pytest.fail("the server started"))
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--workers", "99999999999999999999999"])
    assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
    assert result.output.startswith("Error: workers must be from 1 to 2, the cores this process may run on")


def test_the_web_source_folder_is_not_taken_for_the_built_page(tmp_path: Path) -> None:
    """``--web web`` (the source: the page without its model) instead of ``--web web/dist``."""
    (tmp_path / "index.html").write_text("<!doctype html><title>digits</title>")
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--web", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path} holds no generator.onnx, so it is not the built page; build it first "
        "(cd web && npm ci && npm run build) and give web/dist"
    )


@pytest.mark.parametrize("with_page", [False, True])
@pytest.mark.parametrize("any_port", [False, True], ids=["port", "port-0"])
def test_serve_says_where_to_open_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_page: bool, any_port: bool
) -> None:
    """With ``--port 0`` (any free port), the port the server will listen on, not 0."""
    served = []

    def serve(options: ServerOptions, generator: object, listening: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", options.port), timeout=5):  # listening before the server runs
            served.append(options)

    monkeypatch.setattr(serve_run, "serve", serve)
    (tmp_path / "index.html").write_text("<!doctype html><title>digits</title>")
    (tmp_path / "generator.onnx").write_bytes(b"the page's model")
    port = 0 if any_port else free_port()
    result = CliRunner().invoke(main, ["serve", "--port", str(port), *(["--web", str(tmp_path)] if with_page else [])])
    assert result.exit_code == 0, result.output
    (options,) = served
    assert options.port == port or (any_port and options.port > 0)
    url = f"http://127.0.0.1:{options.port}"
    where = f"the page at {url}/, API docs at {url}/docs" if with_page else f"API docs at {url}/docs"
    assert result.output.strip().endswith(f"thread(s) each; {where}"), result.output


def test_quiet_with_any_port_still_names_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    served = []
    monkeypatch.setattr(serve_run, "serve", lambda options, generator=None, listening=None: served.append(options))
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    (options,) = served
    assert options.port > 0 and result.output == f"digitgen serve: http://127.0.0.1:{options.port}\n"
    assert CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--quiet"]).output == ""


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
        ServerOptions(host=host, port=free_port()).listen()
    assert str(refused.value) == words


@pytest.mark.parametrize("host", ["127.0.0.1:9000", "localhost:80"])
def test_a_host_with_a_port_is_refused_naming_both_options(host: str) -> None:
    name, port = host.split(":")
    with pytest.raises(ServeConfigError) as refused:
        ServerOptions(host=host, port=free_port()).listen()
    assert str(refused.value) == f"the host {host!r} holds a port; give them apart: --host {name} --port {port}"


@pytest.mark.parametrize(
    ("host", "fix"), [("[::1]", "--host ::1"), ("[::1]:9000", "--host ::1 --port 9000"), ("[::", "--host ::")]
)
def test_an_ipv6_address_in_brackets_is_refused_naming_the_options(host: str, fix: str) -> None:
    """The server's own start-up line writes ::1 as a URL does, [::1]; the socket takes the address alone."""
    with pytest.raises(ServeConfigError) as refused:
        ServerOptions(host=host, port=free_port()).listen()
    assert str(refused.value) == f"give the host {host!r} as the address alone, without brackets: {fix}"


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
            ServerOptions(host="::1", port=port).listen()


def test_one_worker_runs_uvicorn_here_with_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ACCESS_LOG, "handlers", [])  # the app's access-log handler stays in this test
    monkeypatch.setattr(ACCESS_LOG, "propagate", ACCESS_LOG.propagate)
    monkeypatch.setattr(ACCESS_LOG, "level", ACCESS_LOG.level)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in the command's process: no logging set up
    configs: list[uvicorn.Config] = []
    served_on: list[tuple[socket.socket, tuple]] = []

    def server(config: uvicorn.Config) -> SimpleNamespace:
        configs.append(config)
        return SimpleNamespace(run=lambda sockets: served_on.extend((sock, sock.getsockname()) for sock in sockets))

    monkeypatch.setattr(serve_run.uvicorn, "Server", server)
    options = ServerOptions("missing.onnx", port=free_port(), graceful_timeout=3.5)  # the given generator serves
    serve(replace(options, settings=ServeSettings(access_log=False)), DigitGenerator.from_path(threads=1))
    assert ACCESS_LOG.handlers == []  # the app got the quiet settings
    serve(options, DigitGenerator.from_path(threads=1))
    assert len(ACCESS_LOG.handlers) == 1
    assert [(c.host, c.port, c.log_level, c.access_log) for c in configs] == [
        ("127.0.0.1", options.port, "warning", False),
        ("127.0.0.1", options.port, "info", False),  # digitgen's own access log, not uvicorn's
    ]
    assert [(c.timeout_graceful_shutdown, c.http) for c in configs] == [(3.5, serve_run.ServerHTTP)] * 2
    assert [c.ws for c in configs] == ["none"] * 2  # an Upgrade request is served as HTTP, not as a WebSocket
    assert isinstance(configs[0].app, FastAPI)
    assert [name for _sock, name in served_on] == [("127.0.0.1", options.port)] * 2  # the socket it bound
    assert all(sock.fileno() == -1 for sock, _name in served_on)  # and closed once the server stopped


@pytest.mark.parametrize("before", [None, "a parent's value"])
def test_workers_get_the_options_through_the_environment(monkeypatch: pytest.MonkeyPatch, before: str | None) -> None:
    """Each worker process rebuilds the parent's options, its model a copy the parent made; the parent's
    environment is left as it was, and the copy is gone once the server stops."""
    for variable in (serve_run.WORKER_CONFIG, serve_run.SHARED_METRICS):
        if before is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, before)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)  # two workers on two cores
    calls: list[tuple[str, dict, str]] = []
    shared_metrics: list[Path] = []

    def supervisor(config: uvicorn.Config, sockets: list[socket.socket]) -> SimpleNamespace:
        def run() -> None:
            calls.append((config, sockets, os.environ[serve_run.WORKER_CONFIG]))
            shared_metrics.append(Path(os.environ[serve_run.SHARED_METRICS]))
            assert os.environ[serve_run.SUPERVISOR] == str(os.getpid())  # whose going stops the workers
            assert shared_metrics[0].is_dir() and not any(shared_metrics[0].iterdir())  # a new folder for this server
            assert [sock.getsockname()[1] for sock in sockets] == [config.port]  # listening already, for the workers
            assert all(sock.get_inheritable() for sock in sockets)

        return SimpleNamespace(run=run)

    monkeypatch.setattr(serve_run, "Multiprocess", supervisor)
    settings = ServeSettings(max_count=50, cors_origins=("http://app.example",), access_log=False)
    options = ServerOptions(None, "cpu", port=free_port(), workers=2, threads=1, settings=settings)
    serve(options, DigitGenerator.from_path(threads=1))
    assert os.environ.get(serve_run.WORKER_CONFIG) == os.environ.get(serve_run.SHARED_METRICS) == before
    assert not shared_metrics[0].exists()  # the shared counts go with the server
    [(uvicorn_config, _sockets, config)] = calls
    assert uvicorn_config.app == "digitgen.serve.run:app_from_environment" and uvicorn_config.factory is True
    wanted = {"workers": 2, "port": options.port, "log_level": "warning", "http": serve_run.ServerHTTP}
    assert {key: getattr(uvicorn_config, key) for key in wanted} == wanted
    monkeypatch.setenv(serve_run.WORKER_CONFIG, config)
    monkeypatch.setenv(serve_run.SUPERVISOR, "12345")
    watched: list[int] = []
    monkeypatch.setattr(serve_run, "_stop_when_orphaned", watched.append)  # not this test's process
    monkeypatch.setattr(serve_run.ServerOptions, "load", lambda self: self)
    monkeypatch.setattr(serve_run, "Metrics", lambda shared: f"metrics, shared={shared}")
    monkeypatch.setattr(serve_run, "create_app", lambda loaded, app_settings, metrics: (loaded, app_settings, metrics))
    worker_options, worker_settings, worker_metrics = serve_run.app_from_environment()
    assert worker_metrics == "metrics, shared=True"  # a worker counts in the shared folder
    assert watched == [12345]  # and stops once its supervisor has gone
    copy = Path(worker_options.model)
    assert (replace(worker_options, model=None), worker_settings) == (options, settings)
    assert copy.name == "generator.onnx" and copy != default_model_path() and not copy.parent.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_that_fails_to_make_a_digit_is_refused_before_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: int
) -> None:
    """Not a server that is never ready and answers 500: the runtime's one-line error, before uvicorn starts."""
    model = five_digit_model(tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)  # two workers on two cores
    monkeypatch.setattr(serve_run, "Multiprocess", lambda config, sockets: pytest.fail("workers started"))
    monkeypatch.setattr(serve_run.uvicorn, "Server", lambda config: pytest.fail("server started"))
    options = ServerOptions(str(model), "cpu", port=free_port(), workers=workers, threads=1)
    with pytest.raises(ModelRunError, match=f"^{re.escape(str(model))}: the model failed to run: "):
        serve(options)
    result = CliRunner().invoke(main, ["serve", "--generator", str(model), "--port", "0", "--quiet"])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {model}: the model failed to run: ")
    assert len(result.output.strip().splitlines()) == 1, result.output


def _split_model(folder: Path) -> Path:
    """The shipped model with its weights in weights.bin beside it."""
    folder.mkdir()
    onnx.save_model(
        onnx.load(default_model_path()), folder / "split.onnx", save_as_external_data=True, location="weights.bin"
    )
    return folder / "split.onnx"


def test_every_worker_loads_the_model_the_server_started_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Replacing the file, or its external data, while the server runs changes nothing: workers load (also when
    SIGHUP replaces them) a copy made at start-up."""
    model = _split_model(tmp_path / "model")
    started = DigitGenerator.from_path(model, threads=1)
    loaded: list[str] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)  # two workers on two cores

    def run_workers() -> None:
        model.write_bytes(b"not a model")
        (model.parent / "weights.bin").write_bytes(b"")
        copy = json.loads(os.environ[serve_run.WORKER_CONFIG])["model"]
        loaded.append(DigitGenerator.from_path(copy, threads=1).sha256)

    monkeypatch.setattr(serve_run, "Multiprocess", lambda config, sockets: SimpleNamespace(run=run_workers))
    serve(ServerOptions(str(model), "cpu", port=free_port(), workers=2, threads=1), started)
    assert loaded == [started.sha256]


@pytest.mark.parametrize("change", ["model", "external data", "removed", "external data gone while copied"])
def test_a_model_file_changed_while_the_server_starts_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: str
) -> None:
    model = _split_model(tmp_path / "model")
    started = DigitGenerator.from_path(model, threads=1)
    if change == "model":
        shutil.copyfile(default_model_path(), model)
    elif change == "external data":
        (model.parent / "weights.bin").write_bytes(b"\0" * 16)
    elif change == "removed":
        model.unlink()
    else:  # the source's error, not the copy's: the model changed, whatever the temporary folder holds

        def vanished(source: Path, target: Path) -> None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(source))

        monkeypatch.setattr(shutil, "copyfile", vanished)
    assert (
        _refused_two_workers(monkeypatch, model, started) == f"{model} changed while the server started; start it again"
    )


def _refused_two_workers(monkeypatch: pytest.MonkeyPatch, model: Path, started: DigitGenerator) -> str:
    """What `serve` of ``model`` with two workers says as it refuses to start them."""
    monkeypatch.setattr(serve_run, "Multiprocess", lambda config, sockets: pytest.fail("workers started"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)  # two workers on two cores
    with pytest.raises(ServeConfigError) as refused:
        serve(ServerOptions(str(model), "cpu", port=free_port(), workers=2, threads=1), started)
    return str(refused.value)


@pytest.mark.parametrize("failing", ["folder", "copy", "external data copy"])
def test_a_temporary_folder_that_cannot_take_the_models_copy_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failing: str
) -> None:
    """Not "the model changed" (start again, and fail again): what failed, where, and what to do."""
    model = _split_model(tmp_path / "model")
    started = DigitGenerator.from_path(model, threads=1)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    if failing == "folder":
        monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: (_ for _ in ()).throw(full))
    elif failing == "copy":
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(full))
    else:
        monkeypatch.setattr(shutil, "copyfile", lambda source, target: (_ for _ in ()).throw(full))
    refusal = _refused_two_workers(monkeypatch, model, started)
    assert re.fullmatch(
        f"cannot copy {re.escape(str(model))} for the workers into {re.escape(str(temporary))}"
        r"(/digitgen-serve-\w+/model)? \(No space left on device\); set TMPDIR to a writable folder with room for it",
        refusal,
    ), refusal
    assert list(temporary.iterdir()) == []  # the folder made for the copy is gone with it


def test_a_temporary_folder_without_room_for_the_workers_metrics_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The workers count in files written through mmap: without room, each had died of SIGBUS, again and again."""
    started = DigitGenerator.from_path(threads=1)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    real_fallocate = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        if "/metrics/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    refusal = _refused_two_workers(monkeypatch, started.path, started)
    assert re.fullmatch(
        f"cannot keep the workers' metrics in {re.escape(str(temporary))}"
        r"/digitgen-serve-\w+/metrics \(No space left on device; they take 1.5 MiB\); "
        "set TMPDIR to a writable folder with room for them",
        refusal,
    ), refusal
    assert list(temporary.iterdir()) == []  # the model's copy and the metrics folder are gone with the refusal


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")
def test_a_killed_servers_scratch_folder_is_removed_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """kill -9 of a server with workers had left its model's copy and metrics files in TMPDIR for good: the next
    server removes them, and only them, by the lock their server no longer holds."""
    holder = "from digitgen.serve import scratch\nwith scratch.scratch_folder() as f: print(f, flush=True); input()"
    killed = subprocess.Popen(
        [sys.executable, "-c", holder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        abandoned = Path(killed.stdout.readline().strip())
        assert abandoned.parent == tmp_path
    except BaseException:
        killed.kill()
        raise
    (abandoned / "model").mkdir()
    (abandoned / "model" / "generator.onnx").write_bytes(b"model")
    (tmp_path / "digitgen-serve-being-made").mkdir()  # no lock file yet: a server is making it
    elsewhere = tmp_path / "elsewhere"  # another's folder, with an unlocked lock file
    elsewhere.mkdir()
    (elsewhere / ".lock").touch()
    (tmp_path / "digitgen-serve-link").symlink_to(elsewhere)
    (tmp_path / "digitgen-serve-file").touch()
    (tmp_path / "digitgen-serve-pipe").mkdir()  # a lock file that is no file: opening it for reading would block
    os.mkfifo(tmp_path / "digitgen-serve-pipe" / ".lock")
    (tmp_path / "digitgen-serve-linked").mkdir()  # a lock file that is a link, to an unlocked file
    (tmp_path / "digitgen-serve-linked" / ".lock").symlink_to(elsewhere / ".lock")
    others = set(tmp_path.iterdir()) - {abandoned}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch.scratch_folder() as running:
        try:
            assert scratch.remove_abandoned(tmp_path) == []  # both servers hold their folders
        finally:
            killed.kill()
            killed.wait(10)
        assert scratch.remove_abandoned(tmp_path) == [abandoned]
        assert set(tmp_path.iterdir()) == others | {running}
        assert [path.name for path in running.iterdir()] == [".lock"]
    assert set(tmp_path.iterdir()) == others


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() != 0, reason="needs flock, and root to give a folder away")
def test_another_users_scratch_folder_is_left_alone(tmp_path: Path) -> None:
    """A shared /tmp holds other users' servers' folders: never this user's to remove, locked or not."""
    theirs = tmp_path / "digitgen-serve-theirs"
    theirs.mkdir()
    (theirs / ".lock").touch()
    os.chown(theirs, 12345, 12345)
    assert scratch.remove_abandoned(tmp_path) == []
    assert theirs.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")
def test_a_scratch_folder_is_removed_under_its_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Removed with its lock file first, a server killed meanwhile had left the rest for good, unlocked then
    but without the lock file that marks it as a server's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_remove = scratch._remove
    removed = []

    def remove(path: Path) -> None:
        fd = os.open(path.parent / scratch.LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                files.fcntl.flock(fd, files.fcntl.LOCK_EX | files.fcntl.LOCK_NB)
        finally:
            os.close(fd)
        real_remove(path)
        assert not path.exists()
        removed.append(path.name)

    monkeypatch.setattr(scratch, "_remove", remove)
    with scratch.scratch_folder() as folder:
        (folder / "model").mkdir()
        (folder / "model" / "generator.onnx").write_bytes(b"model")
        (folder / "metrics").mkdir()
        (folder / "stray").write_bytes(b"")
    assert sorted(removed) == ["metrics", "model", "stray"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")
def test_a_temporary_folder_without_locks_or_at_all_still_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A filesystem without flock (some network ones) had refused --workers as a folder without room; no usable
    temporary folder at all had refused even one worker, which needs none."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(files.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    with scratch.scratch_folder() as folder:
        assert not (folder / scratch.LOCK_FILE).exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_get_default_tempdir", lambda: (_ for _ in ()).throw(FileNotFoundError("none")))
    assert scratch.remove_abandoned() == []


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")
def test_a_scratch_folder_that_cannot_be_removed_leaves_the_others_to_go(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    abandoned = []
    for name in ("a", "b", "c"):
        folder = tmp_path / f"digitgen-serve-{name}"
        folder.mkdir()
        (folder / ".lock").touch()
        abandoned.append(folder)
    real_rmtree = shutil.rmtree

    def rmtree(path: Path) -> None:
        if Path(path).name == "digitgen-serve-b":
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        real_rmtree(path)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert sorted(scratch.remove_abandoned(tmp_path)) == [abandoned[0], abandoned[2]]
    assert list(tmp_path.iterdir()) == [abandoned[1]]
    assert scratch.remove_abandoned(tmp_path / "missing") == []


def test_every_tcp_connection_turns_nagle_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """What --workers needs (its shared listener's connections arrive with Nagle's algorithm on): TCP_NODELAY
    on each TCP connection; a Unix socket, or a transport without one, is passed on untouched."""
    passed_on: list[object] = []
    monkeypatch.setattr(
        serve_run.AutoHTTPProtocol, "connection_made", lambda self, transport: passed_on.append(transport)
    )
    protocol = object.__new__(serve_run.ServerHTTP)  # only connection_made runs: uvicorn's own part is stubbed
    protocol.loop = asyncio.new_event_loop()  # where the request head's deadline is set (never run here)
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
    protocol.loop.close()
    assert passed_on == [tcp, local, without_socket]


def test_default_threads_count_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-CPU container on a 64-core host: one onnxruntime thread, not 63."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert serve_settings.default_threads(1) == 1 and serve_settings.default_threads(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert [serve_settings.default_threads(workers) for workers in (1, 2, 4, 8)] == [7, 3, 1, 1]


def test_without_cpu_affinity_the_cores_are_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no CPU affinity to read (macOS, Windows), every core, or one when even that is unknown."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert serve_settings.usable_cores() == 6 and serve_settings.default_threads(1) == 5
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert serve_settings.usable_cores() == 1 and serve_settings.default_threads(1) == 1


def test_the_model_loads_with_the_threads_asked_for_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    class Opened(tuple):
        num_classes = 10

        def generate(self, count: int) -> None:
            assert count == 10

    monkeypatch.setattr(serve_run.DigitGenerator, "from_path", lambda *args: Opened(args))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert ServerOptions("model.onnx", "cpu", threads=3).load() == ("model.onnx", "cpu", 3)
    assert ServerOptions("model.onnx", "cuda", workers=2).load() == ("model.onnx", "cuda", 3)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_serve_says_when_auto_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without a usable GPU: serve names the fallback, as generate does, even with --quiet."""
    served = []
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        serve_run, "serve", lambda options, generator=None, listening=None: served.append(generator.provider)
    )
    result = CliRunner().invoke(main, ["serve", "--quiet", "--port", str(free_port())])
    assert (result.exit_code, served) == (0, ["cpu"]), result.output
    assert result.output == "note: CUDA failed to start in onnxruntime; running on the CPU\n"
