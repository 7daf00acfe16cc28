"""A throwaway PostgreSQL server for the tests: Debian's server binaries, a temporary folder.

:func:`start_server` runs ``initdb`` and ``pg_ctl start`` in a fresh folder under
``/tmp`` — as the user ``nobody`` (through ``runuser``) when the tests run as root, since
PostgreSQL refuses to run as root — listening on a Unix socket in that folder only (no
TCP port, nothing another host could reach), with durability switched off (``fsync``,
``full_page_writes``, ``synchronous_commit``: the data is thrown away). Clients connect
as the superuser ``calcnode`` without a password (``trust``: only local processes reach
the socket).

Each test gets its own database, made by ``CREATE DATABASE … TEMPLATE`` from an empty
template (:meth:`PostgresServer.create_database`) and dropped after it.

Under pytest-xdist one server serves every worker of the run: the first worker starts it
under a file lock in the workers' shared temporary folder and writes
:data:`INFO_FILE` there; the others read it. The controlling process stops it at the end
of the run (``tests/conftest.py``, ``pytest_sessionfinish``).

:func:`unavailable_reason` says why no server can be started here (no binaries, no
driver, no unprivileged user); the fixtures then skip the PostgreSQL tests with it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "INFO_FILE",
    "PostgresServer",
    "find_binaries",
    "start_server",
    "unavailable_reason",
]

#: The file in the shared temporary folder that tells the xdist workers where the server is.
INFO_FILE = "postgres-server.json"
#: The superuser ``initdb`` makes.
SUPERUSER = "calcnode"
#: The (empty) template every test database is copied from.
TEMPLATE = "calcnode_template"
#: The unprivileged account the server runs as when the tests run as root.
SERVER_USER = "nobody"

#: The server's settings: throwaway data (no fsync), enough connections for two
#: ``calcnode serve`` with workers, a small footprint.
SERVER_OPTIONS = (
    "-c listen_addresses='' -c fsync=off -c full_page_writes=off -c synchronous_commit=off "
    "-c max_connections=300 -c shared_buffers=32MB -c max_wal_size=256MB "
    "-c log_min_messages=warning -c log_connections=off"
)


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (the newest Debian
    version under ``/usr/lib/postgresql``, else ``pg_config --bindir``, else ``$PATH``)."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if versions:
        return Path(versions[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found and (Path(found) / "initdb").is_file():
            return Path(found)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _server_user() -> str | None:
    """Who runs the server: ``None`` for the current user, ``nobody`` when that is root."""
    return SERVER_USER if os.geteuid() == 0 else None


def unavailable_reason() -> str | None:
    """Why no throwaway server can run here, or ``None`` when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'calcnode[postgres]')"
    if find_binaries() is None:
        return "the PostgreSQL server binaries are not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: cannot start PostgreSQL unprivileged"
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no user {SERVER_USER!r} to run PostgreSQL as"
    return None


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server: where its socket is, and how to reach a database."""

    folder: Path
    socket_dir: Path
    port: int
    bindir: Path
    user: str | None

    # ------------------------------------------------------------------ urls

    def url(self, database: str, *, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL of ``database`` (``postgresql://``: calcnode's psycopg 3)."""
        return f"{driver}://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def connect(self, database: str = "postgres") -> Any:
        """An autocommit psycopg connection (CREATE/DROP DATABASE cannot run in a
        transaction)."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; the rows it returned (if any)."""
        with self.connect(database) as conn:
            cursor = conn.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []

    # ------------------------------------------------------------------ databases

    def create_database(self, *, prefix: str = "t") -> str:
        """A new empty database (a copy of the template); returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connection still uses it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def suspend(self, name: str) -> None:
        """Make ``name`` unreachable as a server outage does: new connections refused,
        the open ones terminated (their next statement fails)."""
        self.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )

    def resume(self, name: str) -> None:
        """Undo :meth:`suspend`."""
        self.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database's URL for the block; dropped after it."""
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    # ------------------------------------------------------------------ life

    def alive(self) -> bool:
        try:
            self.execute("SELECT 1")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        """Stop the server (immediate: nothing to keep) and remove its folder."""
        _as_server_user(
            self.user,
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.folder / "data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            check=False,
        )
        shutil.rmtree(self.folder, ignore_errors=True)

    def to_json(self) -> str:
        return json.dumps(
            {
                "folder": str(self.folder),
                "socket_dir": str(self.socket_dir),
                "port": self.port,
                "bindir": str(self.bindir),
                "user": self.user,
                "pid": os.getpid(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PostgresServer:
        data = json.loads(text)
        return cls(
            folder=Path(data["folder"]),
            socket_dir=Path(data["socket_dir"]),
            port=int(data["port"]),
            bindir=Path(data["bindir"]),
            user=data["user"],
        )


def _as_server_user(
    user: str | None, argv: list[str], *, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = ["runuser", "-u", user, "--", *argv] if user else argv
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
        cwd="/",
    )


def start_server(*, port: int = 5432) -> PostgresServer:
    """Initialise and start a throwaway server (see the module notes).

    Its folder is a new ``/tmp/calcnode-pg-*`` owned by the server's user (pytest's own
    temporary folders are private to root, which ``nobody`` cannot enter); the Unix
    socket is in it, so ``port`` only names the socket file.

    Raises
    ------
    RuntimeError
        ``initdb`` or ``pg_ctl start`` failed (the message has their output).
    """
    bindir = find_binaries()
    if bindir is None:
        raise RuntimeError("the PostgreSQL server binaries are not installed")
    user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="calcnode-pg-", dir="/tmp"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data = folder / "data"
    server = PostgresServer(folder=folder, socket_dir=folder, port=port, bindir=bindir, user=user)
    try:
        _as_server_user(
            user,
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )
        _as_server_user(
            user,
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"{SERVER_OPTIONS} -c unix_socket_directories='{folder}' -p {port}",
                "start",
            ],
        )
        server.execute(f"CREATE DATABASE {TEMPLATE} TEMPLATE template0")
        server.execute(f"ALTER DATABASE {TEMPLATE} WITH IS_TEMPLATE true")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        output = getattr(exc, "stderr", "") or ""
        log = folder / "server.log"
        if log.is_file():
            output += log.read_text(errors="replace")[-2000:]
        server.stop()
        raise RuntimeError(f"cannot start a throwaway PostgreSQL: {exc}\n{output}") from exc
    return server
