"""The embedded default database: a PostgreSQL cluster of the project's own, in `.embedded-pg/`.

Used by `rehearse` and `bench` when DATABASE_URL is not set. It runs the PostgreSQL server
binaries already on the machine (Debian's `postgresql` package, found through `pg_config` or
/usr/lib/postgresql/*/bin, or PG_BINDIR), listens on a Unix socket inside the data folder only (no
TCP port, so it never collides with another server), and trusts local connections.

Why not the `pgserver` wheel: run as root it creates a permanent OS user and adds read/execute
permissions to every parent directory up to `/`. Here nothing outside the project folder changes:
PostgreSQL refuses to run as root, so when started by root the cluster runs as the existing
`postgres` OS user (created by Debian's package), and the only change is that `.embedded-pg/` is
owned by that user.
"""

import glob
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = BASE_DIR / ".embedded-pg"
DATA_DIR = EMBEDDED_DIR / "data"
SOCKET_DIR = EMBEDDED_DIR / "run"
LOG_FILE = EMBEDDED_DIR / "server.log"
DB_NAME = "ledger"
SUPERUSER = "postgres"
SERVICE_USER = "postgres"


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL could not be found, initialised or started."""


def database_url() -> str:
    return f"postgres://{SUPERUSER}@/{DB_NAME}?host={SOCKET_DIR}"


def server_bindir() -> Path:
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise EmbeddedDatabaseError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install Debian's `postgresql` "
        "package, set PG_BINDIR, or set DATABASE_URL to a server of yours"
    )


def _as_service_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", SERVICE_USER, "--", *argv]


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_as_service_user(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise EmbeddedDatabaseError(
            f"{what} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout}"
        )
    return result


def _prepare_folder() -> None:
    EMBEDDED_DIR.mkdir(exist_ok=True)
    SOCKET_DIR.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return
    try:
        service = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise EmbeddedDatabaseError(
            f"running as root, the embedded PostgreSQL needs the OS user {SERVICE_USER!r} "
            "(created by Debian's `postgresql` package); install it or set DATABASE_URL"
        ) from None
    for path in [EMBEDDED_DIR, SOCKET_DIR, *EMBEDDED_DIR.rglob("*")]:
        os.chown(path, service.pw_uid, service.pw_gid, follow_symlinks=False)
    reach = subprocess.run(_as_service_user(["test", "-w", str(EMBEDDED_DIR)]))
    if reach.returncode != 0:
        raise EmbeddedDatabaseError(
            f"running as root, the embedded PostgreSQL runs as the OS user {SERVICE_USER!r}, "
            f"which cannot reach {EMBEDDED_DIR} (a parent folder is closed to it); move the "
            "project to a folder it can reach, or set DATABASE_URL"
        )


def _is_running(bindir: Path) -> bool:
    if not (DATA_DIR / "postmaster.pid").exists():
        return False
    status = subprocess.run(
        _as_service_user([str(bindir / "pg_ctl"), "-D", str(DATA_DIR), "status"]),
        capture_output=True,
    )
    return status.returncode == 0


def _create_database() -> None:
    import psycopg

    deadline = time.monotonic() + 10
    while True:
        try:
            conn = psycopg.connect(
                host=str(SOCKET_DIR), user=SUPERUSER, dbname="postgres", autocommit=True
            )
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB_NAME]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


@contextmanager
def running() -> Iterator[str]:
    """Start the embedded cluster (initialising it on first use) and stop it afterwards.

    A cluster that was already running (another command using it) is left running.
    Yields the database URL.
    """
    bindir = server_bindir()
    _prepare_folder()
    if not (DATA_DIR / "PG_VERSION").exists():
        if DATA_DIR.exists():
            shutil.rmtree(DATA_DIR)  # a half-initialised folder from an interrupted first run
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(DATA_DIR),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            "initdb",
        )
    started_here = False
    if not _is_running(bindir):
        options = (
            f"-k {SOCKET_DIR} -c listen_addresses='' -c max_connections=200 -c shared_buffers=256MB"
        )
        _run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(DATA_DIR),
                "-l",
                str(LOG_FILE),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            "starting the embedded PostgreSQL",
        )
        started_here = True
    try:
        _create_database()
        yield database_url()
    finally:
        if started_here:
            subprocess.run(
                _as_service_user(
                    [str(bindir / "pg_ctl"), "-D", str(DATA_DIR), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
            )
