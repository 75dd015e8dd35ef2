"""`python -m bench`: the command behind `make bench` and `make bench-quick`.

Full mode (`make bench`): installs Postfix when missing (`--install-postfix`),
runs every scenario `--reps` times alternating engine and Postfix, writes
bench/results/<stamp>.md and .json and rewrites the generated part of
bench/RESULTS.md. Quick mode (`--quick`, `make bench-quick`): one tiny run
of each scenario, Postfix only if it is already installed, results written
under the work folder only. Either way the exit status is 1 when any run
failed (a lost or duplicated message, an injector or MTA error), so a broken
engine cannot produce a quiet "result".
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from bench import machine, report
from bench.injectors import REPO
from bench.peers import EnginePeer, OpenDkim, Peer, PostfixPeer
from bench.scenarios import EXTRA, SCENARIOS, Bench, Options
from bench.sinks import smtp_sink_path

RESULTS_DIR = REPO / "bench" / "results"
RESULTS_MD = REPO / "bench" / "RESULTS.md"

QUICK = {"n": 200, "reps": 1, "cli_n": 200, "backlog_n": 200, "latency_n": 200, "settle": 0.5,
         "timeout": 120.0}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parser() -> argparse.ArgumentParser:
    d = Options()
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the engine against Postfix on loopback (see bench/README.md).",
    )
    ap.add_argument("--quick", action="store_true",
                    help="one tiny run of each scenario (200 messages, 1 rep); no Postfix install")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS + EXTRA)}")
    ap.add_argument("--profile", action="store_true",
                    help="end with an unrecorded engine smtp run under py-spy (where the time goes)")
    ap.add_argument("--n", type=int, help=f"messages per smtp/direct run (default {d.n})")
    ap.add_argument("--reps", type=int, help=f"runs per figure (default {d.reps})")
    ap.add_argument("--sessions", type=int, default=d.sessions, help="concurrent SMTP sessions")
    ap.add_argument("--reuse", action="store_true",
                    help="many messages per SMTP connection (smtp-source -d) instead of one")
    ap.add_argument("--cli-n", type=int, help=f"messages per cli run (default {d.cli_n})")
    ap.add_argument("--cli-parallel", type=_ints, default=d.cli_parallel,
                    help="parallel injecting processes, comma-separated (default 1,4)")
    ap.add_argument("--backlog-n", type=int, help=f"messages queued in backlog (default {d.backlog_n})")
    ap.add_argument("--latency-n", type=int, help=f"messages per latency run (default {d.latency_n})")
    ap.add_argument("--latency-rate", type=float,
                    help="msgs/s for latency (default: half the engine's measured smtp rate)")
    ap.add_argument("--retry-scale", type=float, default=d.retry_scale,
                    help="engine control/queue.retry.scale in backlog (default 0.001)")
    ap.add_argument("--settle", type=float, help="seconds to keep counting after N (default 2)")
    ap.add_argument("--timeout", type=float, help="bound on each run, seconds (default 900)")
    ap.add_argument("--peer", choices=("auto", "postfix", "none"), default="auto",
                    help="auto: Postfix when installed (or installable with --install-postfix)")
    ap.add_argument("--postfix-port", type=int, default=25,
                    help="Postfix's SMTP port on 127.0.0.1 (default 25; another port rewrites "
                         "master.cf's smtp service, the original kept as master.cf.bench-orig)")
    ap.add_argument("--install-postfix", action="store_true",
                    help="apt-get install postfix when missing (make bench does)")
    ap.add_argument("--tools", choices=("auto", "python"), default="auto",
                    help="auto: smtp-source/smtp-sink when installed; python: never")
    ap.add_argument("--engine-workers", type=int, help="engine control/remote.workers")
    ap.add_argument("--engine-concurrency", type=int, help="engine control/concurrencyremote")
    ap.add_argument("--engine-ramdisk", type=int, metavar="MB",
                    help="engine control/queue.ram.ramdisk.size: the ram-queue on a tmpfs, as "
                         "GreenArrow runs it (default: 1024 when run as root, else 0 = a plain folder)")
    ap.add_argument("--engine-loop", choices=("asyncio", "uvloop"),
                    help="the engine services' event loop (GREENARROW_EVENT_LOOP; default: the "
                         "engine's own choice, asyncio's loop)")
    ap.add_argument("--work", type=Path, default=d.work, help="scratch folder (default %(default)s)")
    ap.add_argument("--results-dir", type=Path,
                    help="where the dated results go (default bench/results; quick: the work folder)")
    ap.add_argument("--no-update", action="store_true", help="do not rewrite bench/RESULTS.md")
    ap.add_argument("--invoked-as", default="", help="the command a person typed (make target)")
    return ap


def options_from(args: argparse.Namespace) -> Options:
    opts = Options(work=args.work, sessions=args.sessions, reuse=args.reuse,
                   cli_parallel=args.cli_parallel, latency_rate=args.latency_rate,
                   retry_scale=args.retry_scale, tools=args.tools)
    if args.quick:
        for key, value in QUICK.items():
            setattr(opts, key, value)
    for key in ("n", "reps", "cli_n", "backlog_n", "latency_n", "settle", "timeout"):
        value = getattr(args, key)
        if value is not None:
            setattr(opts, key, value)
    return opts


def choose_peer(args: argparse.Namespace, work: Path, say: Callable[[str], None]) -> tuple[Peer | None, str]:
    """Postfix (installing it if asked) or None, and a sentence for the results."""
    if args.peer == "none":
        return None, "skipped (--peer none)"
    missing_milter = "simplemh" in args.scenarios.split(",") and not OpenDkim.installed()
    if missing_milter and PostfixPeer.installed() and args.install_postfix:
        say("installing OpenDKIM (apt-get) ...")
        problem = PostfixPeer.install(work / "postfix-install.log")
        if problem:
            say(f"simplemh peer: {problem}")
    if not PostfixPeer.installed():
        if not args.install_postfix:
            return None, "skipped: Postfix is not installed (make bench installs it)"
        say("installing Postfix (apt-get) ...")
        problem = PostfixPeer.install(work / "postfix-install.log")
        if problem:
            return None, f"skipped: {problem}"
    peer = PostfixPeer(work, args.postfix_port)
    try:
        peer.stop()  # a freshly installed package may have started it
    except Exception as e:  # noqa: BLE001
        return None, f"skipped: cannot stop the running Postfix: {e}"
    milter = (f"; in simplemh with {OpenDkim.version()} as its signing milter" if OpenDkim.installed()
              else "; OpenDKIM is not installed, so its simplemh runs fail")
    return peer, (f"{peer.describe()} (Debian package), main.cf as the shared baseline harness"
                  + milter)


def main(argv: list[str] | None = None, say: Callable[[str], None] | None = None) -> int:
    """Run the benchmark; 0 when every run counted exactly N, 1 otherwise, 2 on bad usage."""
    args = parser().parse_args(argv)
    say = say or (lambda text: print(text, flush=True))
    names = [s for s in args.scenarios.split(",") if s]
    if args.profile and "profile" not in names:
        names.append("profile")
    unknown = [s for s in names if s not in SCENARIOS + EXTRA]
    if unknown:
        say(f"unknown scenarios: {', '.join(unknown)}")
        return 2
    opts = options_from(args)
    opts.work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.invoked_as:
        command = f"{args.invoked_as}  (= {command})"
    facts = machine.describe(opts.work)
    peer, peer_text = choose_peer(args, opts.work, say)
    if args.peer == "postfix" and peer is None:
        say(f"peer: {peer_text}")
        return 1
    engine = EnginePeer(opts.work, args.engine_workers, args.engine_concurrency,
                        ramdisk_mb=args.engine_ramdisk, event_loop=args.engine_loop)
    peers: list[Peer] = [engine] + ([peer] if peer else [])
    bench = Bench(opts, peers, say)
    say(f"bench {stamp}: {command}")
    say(f"peer: {peer_text}")
    say(f"injector: {bench.smtp_tool()}; sink: {'smtp-sink' if opts.tools != 'python' and smtp_sink_path() else 'greenarrow sink'}")
    try:
        for name in names:
            bench.run_scenario(name)
    finally:
        engine.cleanup()
        if peer is not None:
            try:
                peer.stop()
            except Exception as e:  # noqa: BLE001
                say(f"postfix stop failed: {e}")
    facts["load average at end"] = machine.loadavg()
    facts["engine at end"] = machine.engine_version()  # others may commit during a long run
    facts["engine settings"] = engine.describe() + " (other control files: defaults)"
    section = report.render(stamp, command, opts, facts, peer_text, bench.runs, bench.notes,
                            peer.name if peer else None)
    if bench.profile_lines:
        section += "\n### Where the engine's time goes (profiled run)\n\n"
        section += "\n".join(bench.profile_lines) + "\n"
    results_dir = args.results_dir or (opts.work / "results" if args.quick else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{stamp}{'-quick' if args.quick else ''}.md"
    md.write_text(f"# Benchmark {stamp}\n\n{section}\n")
    report.write_json(md.with_suffix(".json"), {
        "stamp": stamp, "command": command, "machine": facts, "peer": peer_text,
        "options": {k: str(v) for k, v in vars(opts).items()}, "notes": bench.notes,
    }, bench.runs)
    if not args.quick and not args.no_update:
        rel = md.relative_to(REPO) if md.is_relative_to(REPO) else md
        report.update_results_md(RESULTS_MD, section + f"\nFull file: `{rel}` (raw runs: `.json`).\n")
    say("")
    say(section)
    say(f"results: {md}")
    if opts.work.exists() and args.quick and args.results_dir is None:
        shutil.rmtree(opts.work / "engine-root", ignore_errors=True)
    failed = [r for r in bench.runs if not r.ok]
    if failed:
        say(f"{len(failed)} run(s) FAILED (see 'Failed runs' above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
