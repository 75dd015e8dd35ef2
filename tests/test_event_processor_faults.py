"""Faults: kill -9 of the recorder, the processor and PostgreSQL during a stream of
delivery log lines; every delivery_attempt reaches a real HTTP receiver at least once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pg
import psycopg
from engine import wait_until
from event_receiver import Receiver
from processes import stop

from greenarrow.lib.core.delivery_log import DeliveryLogWriter
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root

own_cluster = pg.own_cluster

BATCH = 50


class Stream(threading.Thread):
    """Writes `total` delivery log lines (msguid m00000000...) in small bursts."""

    def __init__(self, root: Root, total: int) -> None:
        super().__init__(daemon=True)
        self.writer = DeliveryLogWriter(root.delivery_log("ram"), max_bytes=50_000, keep=10_000)
        self.total = total
        self.written = 0

    def run(self) -> None:
        rng = random.Random(5)
        while self.written < self.total:
            count = min(rng.randint(1, 30), self.total - self.written)
            self.writer.write([
                {"timestamp": 1_700_000_000 + n / 1000, "channel": "remote",
                 "status": "success", "is_retry": 0, "msguid": f"m{n:08d}",
                 "email": f"user{n}@dest.test", "message": "250 ok"}
                for n in range(self.written, self.written + count)])
            self.written += count
            time.sleep(0.004)
        self.writer.close()


def start(root: Root, program: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"greenarrow.bin.{program}"],
                            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                            stdout=subprocess.DEVNULL,
                            stderr=open(root.path / f"{program}.log", "ab"))


def kill_postgresql(cluster: pg.Cluster) -> None:
    """kill -9 of the postmaster, then start it again (bounded retries while its
    orphaned backends still hold the shared memory)."""
    pid = cluster.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    for _ in range(60):
        try:
            cluster.start()
            return
        except subprocess.CalledProcessError:
            time.sleep(0.5)
    raise AssertionError("PostgreSQL did not start again after kill -9")


def msguids(receiver: Receiver) -> Counter:
    with receiver.lock:
        return Counter(e["msguid"] for batch in receiver.batches for e in batch)


def test_kill_9_of_recorder_processor_and_postgresql_loses_nothing(tmp_path: Path,
                                                                   own_cluster):
    total = 6000
    conninfo = own_cluster.new_database()
    dbname = conninfo.rsplit("dbname=", 1)[1]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # The throwaway cluster runs with synchronous_commit off; a committed
        # cursor must survive kill -9 for the one-batch duplicate bound.
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = on')
    with Receiver() as receiver:
        root = Root(tmp_path / "hvmail")
        init_root(root, me="faults.test")
        (root.control / "greenarrow.conf").write_text(
            "general {\n  server_id faults\n}\n"
            "event_delivery_destination primary {\n"
            f'  event_delivery_url "{receiver.url}"\n'
            "  event_delivery_events delivery_attempt\n"
            f"  event_delivery_max_batch_size {BATCH}\n}}\n" + pg.database_conf(conninfo))
        stream = Stream(root, total)
        procs = {"event_recorder": start(root, "event_recorder"),
                 "event_processor": start(root, "event_processor")}
        kills: Counter = Counter()
        rng = random.Random(3)
        try:
            stream.start()
            deadline = time.monotonic() + 240
            while (stream.is_alive() or min(kills.values(), default=0) < 3
                   or len(kills) < 3) and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.2, 0.8))
                victim = rng.choice(["event_recorder", "event_processor", "postgresql"])
                if victim == "postgresql":
                    kill_postgresql(own_cluster)
                else:
                    os.kill(procs[victim].pid, signal.SIGKILL)
                    procs[victim].wait(10)
                    procs[victim] = start(root, victim)
                kills[victim] += 1
            stream.join(60)
            assert stream.written == total
            wait_until(lambda: len(msguids(receiver)) >= total, 180,
                       "every delivery attempt at the receiver")
        finally:
            for proc in procs.values():
                stop(proc, 20)
        received = msguids(receiver)
    assert set(received) == {f"m{n:08d}" for n in range(total)}
    assert min(kills[v] for v in ("event_recorder", "event_processor", "postgresql")) >= 3
    duplicates = sum(received.values()) - total
    print(f"kills {dict(kills)}; {duplicates} duplicates over {total} events")
    # At least once: a kill between a POST and its commit repeats that batch only.
    assert duplicates <= (kills["event_processor"] + kills["postgresql"]) * BATCH
    # The receiver can drop duplicates by event_unique_id: one id per log line.
    with receiver.lock:
        ids = {e["event_unique_id"]: e["msguid"] for b in receiver.batches for e in b}
    assert len(ids) == total
