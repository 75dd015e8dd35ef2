"""The tracker against nginx answering `return 302`, in the same run, with wrk (issue 14).

Usage (from the repository root; needs Debian's nginx and wrk:
`apt-get install -y nginx wrk`):

    python -m bench.tracker_bench [--duration 10] [--connections 64] [--reps 1]
                                  [--loops uvloop,asyncio] [--processes 1,2] [--quick]

Everything runs on loopback. Per repetition, in turn:

1. nginx (Debian's binary, its default `worker_processes auto`) with one
   server answering `return 302 https://example.com/;`, started from a
   config in a temporary folder and stopped by its pid;
2. the tracker, once per event loop in `--loops`: `uvloop` is the program
   hvmail_init runs (`python -m greenarrow.bin.tracker`), `asyncio` the same
   code on the standard event loop (`python -m bench.tracker_bench serve`),
   each in a fresh install root; and for each count in `--processes` above 1
   (default: the number of CPUs, hvmail_init's default), that many numbered
   tracker processes on the one address (SO_REUSEPORT, a spool each), as
   hvmail_init runs them.

Each gets `wrk -t2 -c<connections> -d<duration> --latency` on a click URL
(maximum rate), then a paced run at about half that rate (wrk's Lua
`delay()`: every connection waits 10 ms between requests, with rate/100
connections), and we report requests per second and p99 latency of both.
For the tracker, every click must be recorded: the events in the spools
(`log/events/tracker*/`) must number at least the responses wrk counted and
at most that plus the connections (requests answered as wrk stopped).

It prints a Markdown table (and `--json` the raw figures). No figure is
checked against a threshold here: the lead reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REDIRECT = "https://example.com/landing?utm_source=bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- wrk ---------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict:
    """Requests/sec, p99 (ms), the response count and the error counts from wrk's output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    total = re.search(r"^\s+(\d+) requests in", text, re.M)
    non_3xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    if not (rps and p99 and total):
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    return {"rps": float(rps.group(1)), "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
            "responses": int(total.group(1)),
            "non_2xx_3xx": int(non_3xx.group(1)) if non_3xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def run_wrk(url: str, connections: int, duration: int, delay_ms: int = 0,
            work: Path | None = None) -> dict:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    if delay_ms:
        assert work is not None
        script = work / f"delay{delay_ms}.lua"
        script.write_text(f"function delay()\n  return {delay_ms}\nend\n")
        args += ["-s", str(script)]
    out = subprocess.run(args + [url], capture_output=True, text=True,
                         timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr}")
    result = parse_wrk(out.stdout)
    result["connections"] = connections
    return result


def measure(url: str, connections: int, duration: int, work: Path) -> dict:
    """The maximum rate, then about half of it, paced."""
    full = run_wrk(url, connections, duration)
    half_rate = full["rps"] / 2
    paced_connections = max(2, round(half_rate / 100))  # 10 ms between requests each
    half = run_wrk(url, paced_connections, duration, delay_ms=10, work=work)
    return {"max": full, "half": half}


# -- nginx -------------------------------------------------------------------

NGINX_CONF = """\
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{ return 302 {redirect}; }}
    }}
}}
"""


def bench_nginx(work: Path, args: argparse.Namespace) -> dict:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    folder = work / "nginx"
    folder.mkdir(exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=folder, port=port, redirect=REDIRECT))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_port(port):
            raise RuntimeError(f"nginx did not listen: {(folder / 'nginx-error.log').read_text()}")
        url = f"http://127.0.0.1:{port}/t/click?x"
        return measure(url, args.connections, args.duration, work)
    finally:
        stop(proc)  # SIGTERM to the master stops its workers


# -- the tracker -------------------------------------------------------------


def bench_tracker(work: Path, args: argparse.Namespace, loop: str, processes: int = 1) -> dict:
    """One tracker configuration: `processes` 1 is the tracker run alone; more are
    numbered processes as hvmail_init starts them (control/tracker.processes), each
    binding the address with SO_REUSEPORT and writing its own spool."""
    from greenarrow.lib.config import control, secret_constants
    from greenarrow.lib.core.paths import Root
    from greenarrow.lib.ops.install_root import init_root
    from greenarrow.lib.simplemh import tracking_url as tu
    from greenarrow.lib.tracker import spool

    name = f"tracker-{loop}-x{processes}"
    root = Root(work / name)
    init_root(root, me="bench.test")
    port = free_port()
    control.write(root.control, "tracker.listen", [f"127.0.0.1:{port}"])
    constants = secret_constants.read(root.control)
    data = tu.encode(constants, tu.CLICK, "someone@example.com", "t100", "news20261204",
                     "news", "20261204", "42", REDIRECT, stateless=True)
    url = tu.tracking_url(f"http://127.0.0.1:{port}/t", "b", tu.CLICK, data)
    env = dict(os.environ, HVMAIL_ROOT=str(root.path))
    numbers = [None] if processes == 1 else list(range(processes))
    procs, logs = [], []
    try:
        for number in numbers:
            program = (["-m", "greenarrow.bin.tracker"] if loop == "uvloop"
                       else ["-m", "bench.tracker_bench", "serve", "--loop", loop])
            if number is not None:
                program += [str(number)] if loop == "uvloop" else ["--process", str(number)]
            log_path = work / f"{name}-{number or 0}.log"
            log = open(log_path, "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *program], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            if not wait_log(log_path, "listening for HTTP on"):
                raise RuntimeError(f"the tracker did not listen: see {log_path}")
        if not wait_port(port):
            raise RuntimeError(f"the tracker did not listen on {port}")
        check = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{redirect_url}", url],
                               capture_output=True, text=True, timeout=30)
        if check.stdout != REDIRECT:
            raise RuntimeError(f"the tracker redirected to {check.stdout!r}")
        result = measure(url, args.connections, args.duration, work)
    finally:
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
    recorded = len(spool.read_all_events(root)) - 1  # less the curl check
    answered = result["max"]["responses"] + result["half"]["responses"]
    slack = result["max"]["connections"] + result["half"]["connections"]
    result["recorded"] = recorded
    result["every_click_recorded"] = (answered <= recorded <= answered + slack
                                      and result["max"]["non_2xx_3xx"] == 0
                                      and result["half"]["non_2xx_3xx"] == 0)
    shutil.rmtree(root.path)
    return result


def wait_log(path: Path, text: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def serve(loop_name: str, process: int | None = None) -> None:
    """The tracker on a chosen event loop (the program itself always uses uvloop)."""
    from greenarrow.lib.core import service
    from greenarrow.lib.core.paths import root_from_env
    from greenarrow.lib.tracker.listeners import Tracker

    if loop_name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main(stop_event: asyncio.Event, reload: asyncio.Event) -> None:
        tracker = Tracker(root_from_env(), process)
        await tracker.start()
        await service.wait_stop_or_reload(stop_event, reload, tracker.reload)
        await tracker.close()

    service.setup(f"tracker-bench-{loop_name}")
    service.run(main)


# -- report ------------------------------------------------------------------


def table(runs: list[dict]) -> str:
    lines = ["| server | max req/s | p99 at max (ms) | ~half rate req/s | p99 at half (ms) "
             "| ratio to nginx | every click recorded |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        nginx = next((r for r in runs if r["server"] == "nginx" and r["rep"] == run["rep"]), None)
        ratio = (f"{run['max']['rps'] / nginx['max']['rps']:.0%}"
                 if nginx and run["server"] != "nginx" else "")
        recorded = ("" if run["server"] == "nginx" else
                    f"{'yes' if run['every_click_recorded'] else 'NO'} ({run['recorded']})")
        lines.append(f"| {run['server']} (rep {run['rep']}) | {run['max']['rps']:.0f} "
                     f"| {run['max']['p99_ms']:.2f} | {run['half']['rps']:.0f} "
                     f"| {run['half']['p99_ms']:.2f} | {ratio} | {recorded} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="bench", choices=("bench", "serve"))
    parser.add_argument("--loop", default="uvloop", help="serve: asyncio or uvloop")
    parser.add_argument("--loops", default="uvloop,asyncio",
                        help="tracker event loops to measure (default: uvloop,asyncio)")
    parser.add_argument("--processes", default=f"1,{os.cpu_count() or 1}",
                        help="tracker process counts to measure, comma-separated (default: "
                             "1 and the number of CPUs, hvmail_init's default)")
    parser.add_argument("--process", type=int, default=None,
                        help="serve: this process's number (SO_REUSEPORT, own spool)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1-second runs, to check it works")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.loop, args.process)
        return 0
    if args.quick:
        args.duration, args.connections, args.reps = 1, 8, 1
    for tool in ("wrk", "curl"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install -y nginx wrk curl", file=sys.stderr)
            return 2
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        print("nginx is missing: apt-get install -y nginx", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
        work = Path(tmp)
        for rep in range(1, args.reps + 1):
            runs.append({"server": "nginx", "rep": rep, **bench_nginx(work, args)})
            for processes in sorted({int(p) for p in args.processes.split(",")}):
                for loop in args.loops.split(","):
                    server = f"tracker {loop}" + (f" x{processes}" if processes > 1 else "")
                    runs.append({"server": server, "rep": rep,
                                 **bench_tracker(work, args, loop, processes)})
    load = open("/proc/loadavg").read().split()[0]
    print(f"tracker bench: wrk -t2 -c{args.connections} -d{args.duration}s, loopback, "
          f"{os.cpu_count()} cores, load average {load}\n")
    print(table(runs))
    if args.json:
        print(json.dumps(runs, indent=1))
    return 0 if all(r.get("every_click_recorded", True) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
