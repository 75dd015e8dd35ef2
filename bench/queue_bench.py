#!/usr/bin/env python3
"""Queue benchmarks: schedule rebuild from a directory scan, and durable commits.

  python bench/queue_bench.py [--entries 200000 1000000] [--commits 2000] [--dir /var/tmp]

1. Rebuild: fills a queue folder with N entry files (names only matter: the
   scan never opens them; files are empty to keep the set-up fast), then
   times `queue_scan.scan` (the Cython path queue-send runs at start) and the
   scheduler's rebuild from it (adding every entry to its schedule), with a
   cold and a warm directory cache. Also times os.scandir + Python parsing
   of the same names, the obvious alternative.
2. Commits: entries per second committed into a durable queue with
   `queue_entry.commit(..., durable=True)` (write under tmp/, fsync, rename,
   fsync the folder), one at a time and in batches of 10 (one folder fsync
   per batch), beside the machine's raw rate of fsync'd small-file creates
   (create, write 5 KB, fsync, close) measured in the same run on the same
   folder.

Prints a markdown table; `--json` prints the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from greenarrow.pyx.queue_scan import scan  # noqa: E402

from greenarrow.lib.queue import entry as queue_entry  # noqa: E402

MESSAGE = (b"Subject: bench\r\n\r\n" + b"x" * 72 + b"\r\n") * 64  # about 5 KB


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}"


def fill(folder: str, n: int) -> None:
    os.makedirs(folder, exist_ok=True)
    base = int(time.time() * 1_000_000)
    for i in range(n):
        name = f"{base + i:x}-{i % 65536:x}-{i:x}-0.{i % 7}.{1_700_000_000 + i % 86400}"
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_WRONLY, 0o600))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        return True
    except OSError:
        return False


def python_scan(folder: str) -> int:
    count = 0
    for entry in os.scandir(folder):
        try:
            queue_entry.split_name(entry.name)
            count += 1
        except ValueError:
            pass
    return count


def rebuild(folder: str) -> tuple[float, float, int]:
    """(scan seconds, scan + schedule seconds, entries)."""
    import heapq

    t0 = time.perf_counter()
    result = scan(folder)
    t1 = time.perf_counter()
    known: set[str] = set()
    waiting: list[tuple[int, str]] = []
    now = time.time()
    ready = []
    for name, _attempts, due in result:
        known.add(name)
        if due <= now:
            ready.append(name)
        else:
            waiting.append((due, name))
    heapq.heapify(waiting)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, len(result)


def bench_rebuild(base: str, n: int) -> dict:
    folder = os.path.join(base, f"entries-{n}")
    t = time.perf_counter()
    fill(folder, n)
    filled = time.perf_counter() - t
    cold = drop_caches()
    scan_cold, total_cold, count = rebuild(folder)
    scan_warm, total_warm, _ = rebuild(folder)
    t = time.perf_counter()
    py_count = python_scan(folder)
    py_scan = time.perf_counter() - t
    shutil.rmtree(folder)
    assert count == n == py_count, (count, n, py_count)
    return {"entries": n, "fill_seconds": filled, "cold_cache": cold,
            "scan_cold": scan_cold, "rebuild_cold": total_cold,
            "scan_warm": scan_warm, "rebuild_warm": total_warm, "python_scandir": py_scan}


def bench_commits(base: str, count: int, batch: int) -> float:
    queue = os.path.join(base, f"q-{batch}")
    queue_entry.ensure_queue_dirs(queue)
    envelope = {"sender": "s@example.test", "recipient": "r@example.test", "msguid": "",
                "sendid": "bench", "listid": "", "mtaid": "", "mailclass": "",
                "instanceid": "", "click_tracking_id": "", "injected_time": 0, "source_ip": ""}
    t = time.perf_counter()
    for _ in range(0, count, batch):
        envs = []
        for _ in range(batch):
            e = dict(envelope, msguid=queue_entry.new_msguid())
            envs.append(e)
        files = [(queue_entry.entry_name(f"{e['msguid']}-0", 0, 0),
                  [queue_entry.envelope_line(e), b"\n", MESSAGE]) for e in envs]
        queue_entry.place(queue, files, durable=True)
    rate = count / (time.perf_counter() - t)
    shutil.rmtree(queue)
    return rate


def bench_raw_fsync(base: str, count: int) -> float:
    folder = os.path.join(base, "raw")
    os.makedirs(folder, exist_ok=True)
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(os.path.join(folder, f"f{i}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.write(fd, MESSAGE)
        os.fsync(fd)
        os.close(fd)
    rate = count / (time.perf_counter() - t)
    shutil.rmtree(folder)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="queue-bench-", dir=args.dir)
    try:
        results = {"machine": machine(), "dir": args.dir,
                   "command": " ".join(["python", *sys.argv]),
                   "rebuild": [bench_rebuild(base, n) for n in args.entries],
                   "raw_fsync_creates_per_s": bench_raw_fsync(base, args.commits),
                   "commits_per_s": bench_commits(base, args.commits, 1),
                   "commits_per_s_batch10": bench_commits(base, args.commits, 10)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; folder: {args.dir}; command: {results['command']}\n")
    print("| entries | scan (cold) | rebuild (cold) | scan (warm) | rebuild (warm) | os.scandir+Python (warm) |")
    print("|---|---|---|---|---|---|")
    for r in results["rebuild"]:
        cold = "" if r["cold_cache"] else " (cache not dropped)"
        print(f"| {r['entries']:,} | {r['scan_cold']:.2f} s{cold} | {r['rebuild_cold']:.2f} s | "
              f"{r['scan_warm']:.2f} s | {r['rebuild_warm']:.2f} s | {r['python_scandir']:.2f} s |")
    print()
    print("| durable commits (5 KB entries) | per second |")
    print("|---|---|")
    print(f"| raw fsync'd file creates (create, write, fsync, close) | {results['raw_fsync_creates_per_s']:,.0f} |")
    print(f"| queue_entry.commit, one entry per commit (fsync file + folder) | {results['commits_per_s']:,.0f} |")
    print(f"| queue_entry.place, 10 entries per commit (one folder fsync) | {results['commits_per_s_batch10']:,.0f} |")


if __name__ == "__main__":
    main()
