"""docker-compose.yml names only what exists: conchdb commands and flags, settings, ports, paths.

No Docker engine runs here; `docker-compose config` (Debian's docker-compose) still checks
the file against the Compose schema and resolves its variables.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from qdrant_client import QdrantClient
from redis import Redis
from typer.testing import CliRunner

from conchdb.cli import app
from conchdb.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
VARIABLES = {"REDIS_PASSWORD": "pw", "QDRANT_API_KEY": "key", "SLIDES_DIR": "/tmp", "WEIGHTS_DIR": "/tmp"}
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


def test_every_conchdb_variable_is_a_setting(services):
    fields = {f"CONCHDB_{name.upper()}" for name in Settings.model_fields}
    named = {key for s in services.values() for key in s.get("environment", {}) if key.startswith("CONCHDB_")}
    assert named and named <= fields, named - fields


def test_every_command_and_flag_exists(services):
    commands = [s["command"] for s in services.values() if s.get("command", [None])[0] == "conchdb"]
    assert len(commands) >= 2
    for command in commands:
        words = command[1:]
        sub = [w for w in words if not w.startswith("-") and not w.startswith("/")][:1]
        result = runner.invoke(app, [*sub, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output)
        for flag in (w for w in words if w.startswith("--")):
            assert flag in result.output, (command, flag)


def test_urls_point_at_the_services_and_their_ports(services):
    redis, qdrant = services["redis"], services["qdrant"]
    redis_port = redis["command"][redis["command"].index("--port") + 1]
    qdrant_port = qdrant["environment"]["QDRANT__SERVICE__HTTP_PORT"]
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert workers and all("deploy" in w for w in workers)
    for service in (*workers, services["ingest"]):
        env = service["environment"]
        broker, server = urlsplit(env["CONCHDB_BROKER_URL"]), urlsplit(env["CONCHDB_QDRANT_URL"])
        assert (broker.hostname, str(broker.port)) == ("redis", redis_port)
        assert (server.hostname, str(server.port)) == ("qdrant", qdrant_port)
        mounts = {v.split(":")[1]: v for v in service["volumes"]}
        assert Path(env["CONCHDB_CHECKPOINT"]).parent.as_posix() in mounts
        assert all(v.endswith(":ro") for v in mounts.values())  # slides and weights read-only
    # The ports are also the clients' defaults, so a URL without a port reaches the same service.
    assert int(redis_port) == inspect.signature(Redis).parameters["port"].default
    assert int(qdrant_port) == inspect.signature(QdrantClient).parameters["port"].default


def test_redis_keeps_tasks_and_the_stores_are_not_published(services):
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert "ports" not in services["redis"] and "ports" not in services["qdrant"]
    devices = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_the_readme_names_every_variable_the_file_needs():
    needed = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    readme = (ROOT / "README.md").read_text()
    assert needed and all(name in readme for name in needed), [n for n in needed if n not in readme]


def test_docker_compose_accepts_the_file(monkeypatch):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose; .ci/run installs it)")
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)
    done = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
