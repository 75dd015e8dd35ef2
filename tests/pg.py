"""Throwaway PostgreSQL clusters for tests: initdb + pg_ctl in a temp folder.

The server listens only on a Unix socket inside that folder. `shared_cluster()`
is one cluster for the whole test run (started on first use, stopped by PID
when the run ends); tests that stop and start PostgreSQL make their own
`Cluster`. Each test gets a fresh database from the `pg_conninfo` fixture.
As root, the server runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# psycopg (pure Python) loads libpq: without it, skip the database tests.
psycopg = pytest.importorskip("psycopg", reason="psycopg cannot load libpq (Debian libpq5)")

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _binary(name: str) -> str:
    path = PG_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found


class Cluster:
    """One PostgreSQL server in its own temporary folder."""

    def __init__(self) -> None:
        # The test process id in the name: whose cluster it is, at a glance.
        self.base = Path(tempfile.mkdtemp(prefix=f"greenarrow-pg-{os.getpid()}-"))
        self.data = self.base / "data"
        self.socket_dir = self.base
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.base, 0o755)
        subprocess.run(
            [*self._as, _binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._names = itertools.count(1)

    def start(self) -> None:
        options = (f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run(
            [*self._as, _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"),
             "-o", options, "-w", "-t", "60", "start"],
            check=True, stdout=subprocess.DEVNULL,
        )

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """Fast shutdown of the server by its PID; waits (bounded) for it to exit."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise AssertionError(f"PostgreSQL {pid} did not stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} user=postgres dbname={dbname}"

    def new_database(self) -> str:
        """A fresh empty database; its conninfo."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.conninfo(name)


_shared: Cluster | None = None


def shared_cluster() -> Cluster:
    global _shared
    if _shared is None:
        cluster = Cluster()
        atexit.register(cluster.destroy)
        cluster.start()
        _shared = cluster
    return _shared


@pytest.fixture
def pg_conninfo() -> str:
    """The conninfo of a fresh database in the shared cluster."""
    return shared_cluster().new_database()


@pytest.fixture
def own_cluster():
    """A cluster of this test's own (to stop and start); destroyed after it."""
    cluster = Cluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def database_url(conninfo: str) -> str:
    """The `events_database_url` (a postgresql:// URL) of one of this module's conninfos."""
    fields = dict(part.split("=", 1) for part in conninfo.split())
    return f"postgresql://{fields['user']}@/{fields['dbname']}?host={fields['host']}"


def database_conf(conninfo: str) -> str:
    """greenarrow.conf text naming that database (a second `general` block merges)."""
    return f'\ngeneral {{\n  events_database_url "{database_url(conninfo)}"\n}}\n'
