"""The deployment files, checked as far as a machine without Docker can: the compose file runs
real components with real settings and logins, the configs parse, every service is scraped."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import yaml
from prometheus_client import REGISTRY

from libra.contracts import CONSUMERS, TurnAccepted, derive
from libra.ops.components import BACKGROUND, COMPONENTS
from libra.ops.embedded import (
    POSTGRES_ROLES,
    _nats_server_binary,
    free_port,
    nats_conf_path,
    nats_users,
    postgres_grants_sql,
)
from libra.ops.eval.prices import PriceTable
from libra.runtime.config import Settings
from libra.runtime.metrics import refresh_consumer_lag

from .factories import text
from .helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "ops" / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LIBRA = {name: s for name, s in SERVICES.items() if s.get("image") == "libra:latest"}
SETTINGS = {field.upper() for field in Settings.__struct_fields__}
# Each service's NATS login: nats://USER:${PASSWORD_VARIABLE}@host,...
_LOGIN = re.compile(r"^nats://([\w-]+):\$\{(\w+)\}@nats-1:4222(,nats://nats-[23]:4222){2}$")
# A PostgreSQL login: postgresql://ROLE:${PASSWORD_VARIABLE:?...}@postgres:5432/libra
_DATABASE_LOGIN = re.compile(r"^postgresql://(\w+):\$\{(\w+):\?[^}]+\}@postgres:5432/libra$")


def test_every_component_is_a_service_of_its_own() -> None:
    commands = {name: s["command"] for name, s in LIBRA.items()}
    assert commands.pop("migrate") == ["migrate"]
    assert all(c[0] == "run" and len(c) == 2 for c in commands.values())
    assert {c[1] for c in commands.values()} == set(COMPONENTS)
    assert all(name == c[1] for name, c in commands.items())  # the service is named for it
    for processor in ("turns", "llm", "memory", "asr", "tts"):
        assert LIBRA[processor]["deploy"]["replicas"] >= 2
    # read models yield the host's CPU to what a turn waits on (nice weighs only in a container)
    weights = {name: s.get("cpu_shares", 1024) for name, s in LIBRA.items() if name != "migrate"}
    assert {name for name, w in weights.items() if w < 1024} == BACKGROUND


def test_libra_services_set_only_real_settings_and_log_in_as_themselves() -> None:
    users = nats_users()
    for name, service in LIBRA.items():
        env = service["environment"]
        assert set(env) <= SETTINGS, f"{name}: {set(env) - SETTINGS} are not settings"
        user, password, _ = _LOGIN.match(env["NATS_URL"]).groups()
        assert user == ("admin" if name == "migrate" else name)
        assert users[user] == password
        assert env["LIBRA_STREAM_REPLICAS"] == "3" and env["LIBRA_METRICS_PORT"] == "9100"
    assert LIBRA["http"]["environment"]["HTTP_HOST"] == "0.0.0.0"
    assert LIBRA["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert all(
        s["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        for name, s in LIBRA.items()
        if name != "migrate"
    )


def test_every_variable_the_compose_file_reads_is_in_its_env_example() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    listed = set(re.findall(r"^(\w+)=", (DEPLOY / "compose.env.example").read_text(), re.M))
    assert used == listed
    assert set(nats_users().values()) <= listed


def test_the_nats_cluster_nodes_have_every_password_and_a_config_that_parses(
    tmp_path: Path,
) -> None:
    nodes = {name: s for name, s in SERVICES.items() if name.startswith("nats-")}
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    for name, node in nodes.items():
        env = node["environment"]
        assert env["LIBRA_NATS_NAME"] == name
        assert set(nats_users().values()) <= set(env)
        assert all(f"nats-route://{other}:6222" in env["LIBRA_NATS_ROUTES"] for other in nodes)
        mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
        # The very file `libra up` uses (installed as package data, so compare what it says).
        mounted = (DEPLOY / mounts["/etc/nats/nats.conf"]).read_text()
        assert mounted == nats_conf_path().read_text()
        assert (DEPLOY / mounts["/etc/nats/cluster.conf"]).exists()
    env = {k: "p1" if "PASSWORD" in k else v for k, v in nodes["nats-1"]["environment"].items()}
    env["LIBRA_NATS_STORE"] = str(tmp_path / "store")
    shutil.copy(nats_conf_path(), tmp_path / "nats.conf")
    shutil.copy(DEPLOY / "nats" / "cluster.conf", tmp_path / "cluster.conf")
    checked = subprocess.run(
        [_nats_server_binary(), "-c", str(tmp_path / "cluster.conf"), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


def test_prometheus_scrapes_every_component_where_it_serves_metrics() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    assert set(discovery["names"]) == set(COMPONENTS)
    assert discovery["port"] == 9100
    mount = SERVICES["prometheus"]["volumes"][0].split(":")
    assert (DEPLOY / mount[0]).resolve() == (DEPLOY / "prometheus.yml").resolve()


def test_grafana_gets_its_provisioning_and_dashboards() -> None:
    mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/libra.yml").read_text())
    assert all((DEPLOY / source).is_dir() for source in mounts)
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert SERVICES["postgres"]["image"].startswith("pgvector/pgvector:")
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/libra.yml").read_text())
    [source] = [s for s in sources["datasources"] if s["type"] == "grafana-postgresql-datasource"]
    assert source["user"] == "libra_reader"
    assert source["secureJsonData"]["password"] == "$LIBRA_DB_PASSWORD_READER"
    assert "LIBRA_DB_PASSWORD_READER" in SERVICES["grafana"]["environment"]


def test_each_component_logs_in_to_postgres_with_least_privilege() -> None:
    """The roles of `libra up`'s embedded server: the owner migrates, the HTTP edge only reads,
    every other component reads and writes rows; no service logs in as the superuser."""
    for name, service in LIBRA.items():
        role, password = _DATABASE_LOGIN.match(service["environment"]["DATABASE_URL"]).groups()
        wanted = {"migrate": "libra_owner", "http": "libra_reader"}.get(name, "libra_app")
        assert role == wanted, name
        assert password == f"LIBRA_DB_PASSWORD_{role.removeprefix('libra_').upper()}"
    postgres = SERVICES["postgres"]
    assert postgres["environment"]["POSTGRES_USER"] == "postgres"
    init = dict(v.split(":")[:2] for v in postgres["volumes"] if v.startswith("."))
    roles = (DEPLOY / "postgres/roles.sh").read_text()
    assert init["./postgres/roles.sh"] == "/docker-entrypoint-initdb.d/10-roles.sh"
    assert re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD :'\w+';", roles) == list(POSTGRES_ROLES)
    assert all(f'"${password}"' in roles for password in _role_passwords(postgres))
    # What each role may do: the very file the embedded server runs, run after the roles.
    grants = init["../conf/postgres-grants.sql"]
    assert grants == "/docker-entrypoint-initdb.d/20-grants.sql"
    assert (DEPLOY / "../conf/postgres-grants.sql").read_text() == postgres_grants_sql()


def _role_passwords(postgres: dict) -> list[str]:
    return [v for v in postgres["environment"] if v.startswith("LIBRA_DB_PASSWORD_")]


def test_redis_asks_for_a_password_and_the_nats_monitor_stays_inside() -> None:
    redis = SERVICES["redis"]
    assert redis["command"][-2:] == ["--requirepass", "${REDIS_PASSWORD:?set in .env}"]
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?set in .env}"
    for name, service in LIBRA.items():
        url = service["environment"]["REDIS_URL"]
        assert url == "redis://:${REDIS_PASSWORD:?set in .env}@redis:6379/0", name
    for name in ("nats-1", "nats-2", "nats-3"):
        env = SERVICES[name]["environment"]
        assert env["LIBRA_NATS_MONITOR"].startswith("127.0.0.1:")
        assert env["LIBRA_NATS_ANONYMOUS"] == "nobody"


def test_the_image_holds_every_package_and_runs_libra() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    packages = re.findall(r"TOP_LEVEL = \((.+?)\)", (ROOT / "setup.py").read_text())[0]
    for package in re.findall(r'"(\w+)"', packages):
        assert f"COPY {package} {package}" in dockerfile
    assert 'ENTRYPOINT ["libra"]' in dockerfile and "USER libra" in dockerfile
    assert LIBRA["migrate"]["build"]["dockerfile"] == "ops/deploy/Dockerfile"


async def test_a_component_run_as_in_production_serves_its_metrics(
    settings: Settings, eventlog, nats_server, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | {
        "NATS_URL": nats_server.url_for("sessions"),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LIBRA_METRICS_PORT": str(port),
        "LIBRA_DATA_DIR": str(tmp_path),
        "LOG_FORMAT": "console",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libra.ops",
        "run",
        "sessions",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await eventually(
            lambda: _serves(port, 'libra_consumer_pending{consumer="sessions"} 0.0'), timeout=30
        )
        metrics = await _metrics(port)
        nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"violation" not in err.lower(), err.decode()[-2000:]
    # a read model alone in its process runs below a turn's components
    assert nice == max(10, os.getpriority(os.PRIO_PROCESS, 0))
    # No message was delivered: the lag comes from the server, asked by the supervisor.
    for name in ("voice_processing_duration_seconds", "libra_consumer_dead_letters_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in metrics


async def _metrics(port: int) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)).text


async def _serves(port: int, line: str) -> bool:
    try:
        return line in await _metrics(port)
    except httpx.HTTPError:
        return False


async def test_consumer_lag_follows_the_server_without_deliveries(eventlog) -> None:
    turns = [
        derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
        for said in (text(conversation="http-lag") for _ in range(7))
    ]
    await eventlog.publish_many(turns[:4])
    watcher = asyncio.create_task(
        refresh_consumer_lag(eventlog.js, [("LIBRA", "llm")], every_s=0.1)
    )
    try:
        await eventually(lambda: _pending("llm", 4))
        await eventlog.publish_many(turns[4:])  # nobody consumes: only the server knows
        await eventually(lambda: _pending("llm", 7))
    finally:
        watcher.cancel()


async def _pending(consumer: str, n: int) -> bool:
    return REGISTRY.get_sample_value("libra_consumer_pending", {"consumer": consumer}) == n


async def test_migrate_provisions_the_log_and_loads_the_prices(
    nats_server, database_url: str, pool, tmp_path: Path
) -> None:
    env = os.environ | {
        "NATS_URL": nats_server.url,
        "DATABASE_URL": database_url,
        "LIBRA_DATA_DIR": str(tmp_path),
        "LOG_FORMAT": "console",
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "libra.ops", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    assert (await js.stream_info("LIBRA")).config.num_replicas == 1
    assert {c.name for c in await js.consumers_info("LIBRA")} == {
        s.name for s in CONSUMERS.values() if s.stream == "LIBRA" and s.provisioned
    }
    await nc.close()
    prices = await pool.fetchval("SELECT count(*) FROM llm_prices WHERE as_of = '2025-10-01'")
    assert prices == len(PriceTable.load().rows()) > 10
