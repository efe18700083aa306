"""docker-compose.yml names only what exists (conchdb commands and flags, settings, ports,
paths), publishes nothing beyond the host's loopback by default, and its healthchecks work.

No Docker engine runs here; `docker-compose config` (Debian's docker-compose) still checks
the file against the Compose schema and resolves its variables, and each healthcheck command
runs here against a stand-in for its service on a free port. The worker container's command,
docker/gpu-workers.sh, runs here too, with stand-ins for `conchdb` and PyTorch's GPU count.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from qdrant_client import QdrantClient
from redis import Redis
from typer.testing import CliRunner

from conchdb.api.routes.system import open_router
from conchdb.cli import app
from conchdb.config import Settings
from tests.conftest import need_tool
from tests.workers.conftest import REDIS_SERVER, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_WORKERS = ROOT / "docker" / "gpu-workers.sh"
# The variables the file requires (`${NAME:?...}`), as .ci/run sets them; every other one keeps its default.
VARIABLES = {"REDIS_PASSWORD": "pw", "QDRANT_API_KEY": "key", "API_KEY": "apikey", "SLIDES_DIR": "/tmp",
             "WEIGHTS_DIR": "/tmp"}
runner = CliRunner()


def _interpolate(text: str) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}`, with VARIABLES as the environment."""

    def value(match: re.Match) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        if name in VARIABLES:
            return VARIABLES[name]
        assert kind == ":-", f"{name} must be set"
        return rest

    return re.sub(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", value, text)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))["services"]


def _docker_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker-compose -f docker-compose.yml ARGS` with VARIABLES (and `env`) and nothing else of the
    caller's: no compose variable from the shell and no `.env` file, so the file's defaults apply."""
    binary = shutil.which("docker-compose")
    need_tool(binary is not None, "docker-compose is not installed (Debian: apt-get install docker-compose)")
    names = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    clean = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / ".env"
        empty.write_text("")
        return subprocess.run([binary, "--env-file", str(empty), "-f", str(COMPOSE), *args], capture_output=True,
                              text=True, timeout=60, env={**clean, **VARIABLES, **(env or {})})


def _resolved(**env: str) -> dict:
    """The services as docker-compose resolves them (its `config` output)."""
    done = _docker_compose("config", env=env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def _host_ip(port: str | dict) -> str:
    """The host address a published port binds: docker-compose v1 prints `IP:HOST:CONTAINER/PROTO`
    (no IP: every interface), v2 the long form with `host_ip`."""
    if isinstance(port, dict):
        return port.get("host_ip", "")
    parts = port.split("/")[0].rsplit(":", 2)
    return parts[0] if len(parts) == 3 else ""


def test_every_conchdb_variable_is_a_setting(services):
    fields = {f"CONCHDB_{name.upper()}" for name in Settings.model_fields}
    named = {key for s in services.values() for key in s.get("environment", {}) if key.startswith("CONCHDB_")}
    assert named and named <= fields, named - fields


def _worker_command() -> list[str]:
    """The `conchdb worker ...` line that docker/gpu-workers.sh runs once per GPU."""
    line = next(line for line in GPU_WORKERS.read_text().splitlines() if line.strip().startswith("conchdb worker"))
    return line.split("&")[0].split()


def test_every_command_and_flag_exists(services):
    commands = [s["command"] for s in services.values() if s.get("command", [None])[0] == "conchdb"]
    assert services["worker"]["command"] == ["conchdb-gpu-workers"]
    commands.append(_worker_command())
    assert {c[1] for c in commands} == {"serve", "ingest", "worker"}
    for command in commands:
        words = command[1:]
        sub = [w for w in words if not w.startswith("-") and not w.startswith("/")][:1]
        result = runner.invoke(app, [*sub, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output)
        for flag in (w for w in words if w.startswith("--")):
            assert flag in result.output, (command, flag)


def test_the_image_holds_the_worker_command():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY docker/gpu-workers.sh /usr/local/bin/conchdb-gpu-workers" in dockerfile
    assert os.access(GPU_WORKERS, os.X_OK)  # COPY keeps the mode
    assert "docker" not in (ROOT / ".dockerignore").read_text().split()


def test_urls_point_at_the_services_and_their_ports(services):
    redis, qdrant = services["redis"], services["qdrant"]
    redis_port = redis["command"][redis["command"].index("--port") + 1]
    qdrant_port = qdrant["environment"]["QDRANT__SERVICE__HTTP_PORT"]
    for name in ("worker", "ingest", "api"):
        env = services[name]["environment"]
        server = urlsplit(env["CONCHDB_QDRANT_URL"])
        assert (server.hostname, str(server.port)) == ("qdrant", qdrant_port)
        if name == "api":  # the API needs no broker, so it is not given Redis' password
            assert "CONCHDB_BROKER_URL" not in env
        else:
            broker = urlsplit(env["CONCHDB_BROKER_URL"])
            assert (broker.hostname, str(broker.port)) == ("redis", redis_port)
        mounts = {v.split(":")[1]: v for v in services[name]["volumes"]}
        assert Path(env["CONCHDB_CHECKPOINT"]).parent.as_posix() in mounts
        assert "/slides" in mounts  # the API cuts tiles from the slides
        assert all(v.endswith(":ro") for v in mounts.values())  # slides and weights read-only
    # The ports are also the clients' defaults, so a URL without a port reaches the same service.
    assert int(redis_port) == inspect.signature(Redis).parameters["port"].default
    assert int(qdrant_port) == inspect.signature(QdrantClient).parameters["port"].default


def test_redis_keeps_tasks_and_the_stores_are_not_published(services):
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert "ports" not in services["redis"] and "ports" not in services["qdrant"]


def test_one_worker_on_one_gpu_by_default_and_gpus_chooses_more(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["environment"]["GPUS"] == "1"
    assert not any(name.startswith("worker-gpu") for name in services)  # no service for a GPU that may not exist


def test_the_api_serves_the_qdrant_server_with_a_key_and_workers(services):
    api = services["api"]
    command = api["command"]
    assert command[:2] == ["conchdb", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # inside the container; the port decides who reaches it
    assert command[command.index("--workers") + 1] == "2"
    assert api["ports"][0].rsplit(":", 1)[1] == command[command.index("--port") + 1]  # published: the port it serves
    assert api["environment"]["CONCHDB_API_KEY"] == VARIABLES["API_KEY"]
    assert "${API_KEY:?" in COMPOSE.read_text()  # required: no default key
    assert api["depends_on"] == {"qdrant": {"condition": "service_healthy"}}
    for name in ("worker", "ingest"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                "qdrant": {"condition": "service_healthy"}}


def test_the_readme_names_every_variable_the_file_needs():
    needed = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    readme = (ROOT / "README.md").read_text()
    assert needed and all(name in readme for name in needed), [n for n in needed if n not in readme]


def test_docker_compose_accepts_the_file_and_lists_the_api():
    done = _docker_compose("config", "-q")
    assert done.returncode == 0, done.stderr
    done = _docker_compose("config", "--services")
    assert done.returncode == 0, done.stderr
    assert {"qdrant", "redis", "worker", "api"} <= set(done.stdout.split())


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The services as docker-compose resolves them with only the required variables set."""
    return _resolved()


def test_no_port_is_published_beyond_loopback_unless_asked(resolved):
    published = {name: [_host_ip(p) for p in s.get("ports", [])] for name, s in resolved.items()}
    assert published["api"], "the API publishes its port"
    assert all(ip == "127.0.0.1" for ips in published.values() for ip in ips), published
    # On purpose: API_BIND is the one way beyond, and it does change the binding.
    assert [_host_ip(p) for p in _resolved(API_BIND="0.0.0.0")["api"]["ports"]] == ["0.0.0.0"]


def test_every_long_running_service_has_a_healthcheck_that_others_wait_for(resolved):
    for name in ("qdrant", "redis", "api"):
        check = resolved[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 3, (name, check)
    waited = {dep for s in resolved.values() for dep, how in s.get("depends_on", {}).items()
              if how == {"condition": "service_healthy"}}
    assert waited == {"qdrant", "redis"}


# -- the healthchecks as docker-compose resolves them, run here against stand-ins --------------


def _healthcheck(service: dict, container_address: str, here: str) -> list[str]:
    """The service's healthcheck as an argv to run here: `$$` unescaped as the engine receives it
    (`config` prints it escaped), and the address it reaches inside the container replaced by a
    stand-in's on this machine."""
    test = service["healthcheck"]["test"]
    argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    assert test[0] in ("CMD", "CMD-SHELL") and any(container_address in a for a in argv), (test, container_address)
    return [a.replace("$$", "$").replace(container_address, here) for a in argv]


class _StandIn(BaseHTTPRequestHandler):
    """Answers every GET with `status`, recording the path asked for."""

    status = 200
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[type[_StandIn], int]]:
    handler = type("Handler", (_StandIn,), {"status": 200, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield handler, server.server_address[1]
    server.shutdown()
    server.server_close()


def _run(argv: list[str], env: dict[str, str] | None = None) -> int:
    return subprocess.run(argv, capture_output=True, timeout=60, env={**os.environ, **(env or {})}).returncode


def test_qdrant_healthcheck_asks_readyz_and_needs_a_200(resolved, stand_in):
    handler, port = stand_in
    port_inside = resolved["qdrant"]["environment"]["QDRANT__SERVICE__HTTP_PORT"]
    argv = _healthcheck(resolved["qdrant"], f"/dev/tcp/127.0.0.1/{port_inside}", f"/dev/tcp/127.0.0.1/{port}")
    assert argv[0] == "bash"  # the image has bash, no curl or wget
    assert _run(argv) == 0
    handler.status = 503  # Qdrant still loading its collections
    assert _run(argv) != 0
    assert handler.paths == ["/readyz", "/readyz"]  # open without the API key
    handler.status = 200
    assert _run(_healthcheck(resolved["qdrant"], f"/dev/tcp/127.0.0.1/{port_inside}",
                             f"/dev/tcp/127.0.0.1/{free_port()}")) != 0  # nothing listening


def test_api_healthcheck_asks_the_open_health_route(resolved, stand_in):
    handler, port = stand_in
    command = resolved["api"]["command"]
    address = f"127.0.0.1:{command[command.index('--port') + 1]}"
    argv = _healthcheck(resolved["api"], address, f"127.0.0.1:{port}")
    assert argv[0] == "python3"  # the conchdb image's
    assert _run(argv) == 0
    handler.status = 503
    assert _run(argv) != 0
    assert handler.paths == ["/v1/health", "/v1/health"]
    assert any(r.path == "/v1/health" and "GET" in r.methods for r in open_router.routes)  # needs no key


def test_redis_healthcheck_needs_the_password(resolved, tmp_path):
    need_tool(REDIS_SERVER is not None, "redis-server is not installed (Debian: apt-get install redis-server)")
    redis = resolved["redis"]
    password = redis["command"][redis["command"].index("--requirepass") + 1]
    assert redis["environment"]["REDISCLI_AUTH"] == password  # redis-cli reads it: not on a command line
    port = free_port()
    argv = _healthcheck(redis, f"-p {redis['command'][redis['command'].index('--port') + 1]}", f"-p {port}")
    server = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--requirepass", password, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        client = Redis(port=port, password=password)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert _run(argv, {"REDISCLI_AUTH": password}) == 0
        assert _run(argv, {"REDISCLI_AUTH": "wrong"}) != 0
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- docker/gpu-workers.sh: one worker per GPU, stopped together ------------------------------

FAKE_CONCHDB = """#!/usr/bin/env bash
# Stand-in for `conchdb worker`: records its arguments, runs until SIGTERM and records that; given
# $FAIL_DEVICE, it exits with $FAIL_STATUS instead, once every worker has started.
device=$3
trap 'echo "stopped $device" >> "$LOG"; exit 0' TERM
echo "started $*" >> "$LOG"
if [[ $device == "${FAIL_DEVICE:-}" ]]; then
    until (( $(grep -c ^started "$LOG") >= GPUS )); do sleep 0.02; done
    exit "$FAIL_STATUS"
fi
while :; do sleep 0.05 & wait $!; done
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# What torch.cuda.device_count() would print in the container; given $HOLD, only once $HOLD exists.
if [[ -n ${HOLD:-} ]]; then
    echo counting >> "$LOG"
    until [[ -e $HOLD ]]; do sleep 0.02; done
fi
echo "$VISIBLE_GPUS"
"""


@pytest.fixture
def fake_bin(tmp_path) -> dict[str, str]:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("conchdb", FAKE_CONCHDB), ("python3", FAKE_PYTHON)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "LOG": str(tmp_path / "log")}


def _start_workers(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(GPU_WORKERS), *args], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _log(env: dict[str, str], count: int, word: str) -> list[str]:
    """The fake workers' log once it holds `count` lines starting with `word` (waits up to 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        path = Path(env["LOG"])
        lines = path.read_text().splitlines() if path.exists() else []
        if sum(line.startswith(word) for line in lines) >= count:
            return lines
        assert time.monotonic() < deadline, lines
        time.sleep(0.02)


@pytest.mark.parametrize(("gpus", "visible", "devices"), [("1", "1", ["cuda:0"]), ("2", "3", ["cuda:0", "cuda:1"]),
                                                          ("all", "3", ["cuda:0", "cuda:1", "cuda:2"])])
def test_gpu_workers_one_per_gpu_and_sigterm_stops_them_all(fake_bin, gpus, visible, devices):
    env = {**fake_bin, "GPUS": gpus, "VISIBLE_GPUS": visible}
    process = _start_workers(env, "--batch-size", "64")
    started = _log(env, len(devices), "started")
    assert sorted(started) == sorted(f"started worker --device {d} --concurrency 1 --batch-size 64" for d in devices)
    process.send_signal(signal.SIGTERM)  # docker compose stop
    process.wait(timeout=60)
    lines = _log(env, len(devices), "stopped")
    assert sorted(line for line in lines if line.startswith("stopped")) == sorted(f"stopped {d}" for d in devices)


def test_gpu_workers_a_worker_that_exits_stops_the_others_with_its_status(fake_bin):
    env = {**fake_bin, "GPUS": "2", "VISIBLE_GPUS": "2", "FAIL_DEVICE": "cuda:1", "FAIL_STATUS": "3"}
    process = _start_workers(env)
    assert process.wait(timeout=60) == 3  # the restart policy starts the container again
    assert "stopped cuda:0" in _log(env, 1, "stopped")


@pytest.mark.parametrize(("gpus", "visible", "says"), [
    ("0", "2", "GPUS='0' is not a number of GPUs"), ("two", "2", "GPUS='two' is not a number of GPUs"),
    ("3", "2", "GPUS=3 but this container sees 2 GPU(s): set GPUS to 2 or fewer"),
    ("1", "0", "no GPU is visible in this container"),
])
def test_gpu_workers_refuse_what_cannot_run_with_the_reason(fake_bin, gpus, visible, says):
    process = _start_workers({**fake_bin, "GPUS": gpus, "VISIBLE_GPUS": visible})
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and says in stderr, stderr
    assert not Path(fake_bin["LOG"]).exists()  # no worker started


def test_gpu_workers_stopped_before_they_start_start_none(fake_bin, tmp_path):
    """A SIGTERM while the GPUs are counted is not lost (as PID 1, bash ignores unhandled ones)."""
    env = {**fake_bin, "GPUS": "2", "VISIBLE_GPUS": "2", "HOLD": str(tmp_path / "go")}
    process = _start_workers(env)
    _log(env, 1, "counting")
    process.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    assert process.wait(timeout=60) == 143
    assert Path(env["LOG"]).read_text().splitlines() == ["counting"]  # no worker started
