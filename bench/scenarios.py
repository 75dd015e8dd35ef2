"""The scenarios: one function per measured run, and the loop that alternates the MTAs.

Every run starts from a clean state (fresh sink and count, MTA restarted
with an empty queue), starts the clock right before the first injection,
stops it when the sink has counted all N, keeps counting for `settle`
seconds and fails unless the count is exactly N (a loss or a duplicate),
the injector succeeded and the MTA's queue is empty afterwards. A failed
run is recorded with its reason, never silently dropped.

Metrics (all times in seconds unless the name says ms):
  smtp, direct   msgs_per_s = N / total_s; total_s (first injection -> sink
                 counted N); inject_s (injector exited)
  cli            msgs_per_s end to end, inject_msgs_per_s, per_msg_ms (median
                 wall time of one injecting process), total_s
  backlog        drain_s (sink started -> all N counted), deliver_s (first ->
                 last arrival), drain_msgs_per_s, peak_rss_mb (sum over the
                 MTA's process tree, sampled every 0.1 s), inject_s
  latency        p50_ms, p90_ms, p99_ms, max_ms from the 250 to DATA until the
                 sink read the final dot; rate_sent (msgs/s actually sent)
  events         the smtp metrics of the engine with its events store and a
                 destination, and of the same engine without events; with
                 events: events_received (delivery_attempt events at the HTTP
                 receiver), events_after_s (last event after the sink's last
                 message)
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import genmsg
from bench.events_processor_bench import receiver_state, start_receiver
from bench.injectors import SmtpInjector, cli_inject
from bench.peers import EnginePeer, Peer, PostfixPeer
from bench.procs import RssSampler, descendants, free_port, loadavg1, tree_cpu_seconds
from bench.profile import Profiler
from bench.sinks import Sink, StampingSink, counting_sink, smtp_source_path, wait_count

NO_EVENTS = "engine without events"  # the events scenario's reference run (bench.report)
SCENARIOS = ("smtp", "direct", "cli", "backlog", "latency", "simplemh", "events")
# Not measured figures: asked for by name or --profile. profile-simplemh: where the
# engine's time goes in the simplemh scenario (DKIM signing, SimpleMH rewriting).
EXTRA = ("profile", "profile-simplemh")
SIMPLEMH_NOTE = ("the smtp load with SimpleMH mail (X-GreenArrow-MailClass, 10 links in the "
                 "HTML part): the engine tracks clicks and opens, encodes the bounce address, adds "
                 "List-Unsubscribe and signs with DKIM (RSA 2048); Postfix relays the same message "
                 "unchanged apart from the DKIM signature its OpenDKIM milter adds (the same key, "
                 "relaxed/relaxed, the same header list); the CPU per message of Postfix counts "
                 "OpenDKIM's process too")


@dataclass
class Options:
    """Every knob of a benchmark invocation (see bench/README.md)."""

    n: int = 20000
    reps: int = 3
    sessions: int = 10
    reuse: bool = False
    cli_n: int = 3000
    cli_parallel: tuple[int, ...] = (1, 4)
    backlog_n: int = 20000
    latency_n: int = 2000
    latency_rate: float | None = None
    latency_sessions: int = 10
    retry_scale: float = 0.001
    settle: float = 2.0
    timeout: float = 900.0
    msg_size: int = 5120
    tools: str = "auto"  # auto: smtp-source / smtp-sink when installed; python: never
    work: Path = Path("/tmp/greenarrow-bench")


@dataclass
class Run:
    """One measured run of one scenario on one MTA."""

    scenario: str
    variant: str
    mta: str
    rep: int
    n: int
    ok: bool = False
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    tools: str = ""


class CpuMeter:
    """CPU used by the MTA's process tree between `start` and `stop`, per message.

    On a shared 2-core box, throughput moves with other people's load; the
    CPU the MTA spends per message hardly does, so it is recorded next to
    every rate (with the 1-minute load average at the start of the run).
    """

    def __init__(self, peer: Peer | None) -> None:
        self.peer = peer
        self.load = loadavg1()
        self.cpu0 = self.cpu1 = 0.0
        self.children0 = self.children1 = 0.0

    def start(self) -> CpuMeter:
        self.load = loadavg1()
        self.cpu0 = self._cpu()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children0 = usage.ru_utime + usage.ru_stime
        return self

    def stop(self) -> None:
        self.cpu1 = self._cpu()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children1 = usage.ru_utime + usage.ru_stime

    def _cpu(self) -> float:
        """CPU seconds of every tree the peer counts as its own (Postfix: and OpenDKIM)."""
        if self.peer is None:
            return 0.0
        return sum(tree_cpu_seconds(pid) for pid in self.peer.cpu_roots())

    def apply(self, run: Run, n: int, with_injectors: bool = False) -> None:
        """Record cpu_ms_per_msg (MTA tree; plus the injecting processes for cli) and load."""
        cpu = self.cpu1 - self.cpu0
        if with_injectors:
            cpu += self.children1 - self.children0
        if self.peer is not None and cpu > 0:
            run.metrics["cpu_ms_per_msg"] = cpu * 1000 / n
        run.metrics["load1"] = self.load


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Bench:
    """Runs scenarios against a list of peers (the engine first), collecting `Run`s."""

    def __init__(
        self, opts: Options, peers: list[Peer], say: Callable[[str], None] = print
    ) -> None:
        self.opts = opts
        self.peers = peers
        self.say = say
        self.runs: list[Run] = []
        self.notes: list[str] = []
        opts.work.mkdir(parents=True, exist_ok=True)
        self.sink_port = free_port()
        self.message = genmsg.single(opts.work / f"msg-{opts.msg_size}.eml", opts.msg_size)
        self.log = opts.work / "injectors.log"
        self.profile_lines: list[str] = []

    def note(self, text: str) -> None:
        """Add a note to the results once."""
        if text not in self.notes:
            self.notes.append(text)

    # -- tools -------------------------------------------------------------

    def smtp_tool(self) -> str:
        """The SMTP injector for throughput runs: smtp-source when installed."""
        if self.opts.tools != "python" and smtp_source_path():
            return "smtp-source"
        return "python"

    def sink(self) -> Sink:
        return counting_sink(self.sink_port, self.opts.work, self.opts.tools)

    def _record(self, run: Run, problems: list[str]) -> Run:
        """A finished run: ok when nothing went wrong, else the problems as its note."""
        run.ok = not problems
        run.note = "; ".join(problems)
        self.runs.append(run)
        status = "ok" if run.ok else f"FAILED: {run.note}"
        shown = ", ".join(f"{k}={v:.4g}" for k, v in run.metrics.items())
        self.say(f"  {run.scenario}/{run.variant} {run.mta} rep {run.rep}: {shown} [{status}]")
        return run

    def _finish_peer(self, peer: Peer, run: Run, n: int, problems: list[str]) -> None:
        """After the count: the queue must drain to 0 and the MTA's own records must agree."""
        deadline = time.monotonic() + 10
        left = peer.queue_count()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = peer.queue_count()
        if left:
            problems.append(f"{left} entries still queued after the sink counted everything")
        problem = peer.check_delivered(n)
        if problem:
            problems.append(problem)

    def _restart(self, peer: Peer, sink_port: int, retry_scale: float | None = None,
                 simplemh: bool = False, events_url: str | None = None) -> None:
        peer.stop()
        if isinstance(peer, PostfixPeer) and peer.queue_count():
            self.note(f"postfix queue held {peer.queue_count()} files before a run: cleared")
            peer.clear_queue()
        peer.configure(sink_port, retry_scale, simplemh, events_url)
        peer.start()

    # -- smtp / direct -------------------------------------------------------

    def smtp_run(
        self, peer: Peer | None, rep: int, n: int | None = None, profile: Path | None = None,
        simplemh: bool = False, events: int | None = None,
    ) -> Run:
        """N messages over `sessions` SMTP sessions into the MTA (or, peer None, the sink).

        With `profile` (a folder), the MTA's processes are profiled during the
        run (bench.profile) and the findings kept in `self.profile_lines`.
        `simplemh`: SimpleMH mail and the engine's Mail Class and DKIM key
        (the simplemh scenario). `events`: the events scenario, the port of its
        HTTP receiver (bench.events_processor_bench), or 0 for its reference run
        without events; with a port, the run also waits (bounded) until every
        delivery attempt has reached the receiver, and its CPU counts the
        engine's event services until then.
        """
        opts = self.opts
        n = n or opts.n
        tool = self.smtp_tool()
        scenario = "smtp" if peer is not None else "direct"
        message = self.message
        if simplemh:
            scenario = "simplemh"
            message = genmsg.single_simplemh(opts.work / f"msg-simplemh-{opts.msg_size}.eml",
                                             opts.msg_size)
        variant = f"{opts.sessions} sessions, {'reuse' if opts.reuse else '1 msg/conn'}"
        mta = peer.name if peer else "sink"
        events_url = None
        if events is not None:
            scenario = "events"
            if events:
                events_url = f"http://127.0.0.1:{events}/events"
                before = receiver_state(events)["events"]
            else:
                mta = NO_EVENTS
        run = Run(scenario, variant, mta, rep, n)
        sink = self.sink()
        run.tools = f"{tool} -> {'MTA -> ' if peer else ''}{sink.kind}"
        problems: list[str] = []
        try:
            if peer is not None:
                self._restart(peer, sink.port, simplemh=simplemh, events_url=events_url)
            sink.start()
            target = peer.smtp_port if peer is not None else sink.port
            inj = SmtpInjector(
                tool, target, n, message, opts.sessions, opts.reuse,
                token=f"{scenario}{rep}", timeout=opts.timeout, log=self.log,
            )
            inj.prepare()
            profiler = None
            if profile is not None and peer is not None and peer.root_pid():
                profiler = Profiler(descendants(peer.root_pid() or 0), profile).__enter__()
            meter = CpuMeter(peer).start()
            t0 = inj.go()
            arrival = wait_count(sink, n, opts.timeout, 0.0, stop_early=inj.failed)
            if events and arrival.reached is not None:
                received = self._wait_events(events, before + n, t0 + opts.timeout)
                run.metrics["events_received"] = received[0] - before
                run.metrics["events_after_s"] = received[1] - arrival.reached
                if received[0] - before < n:
                    problems.append(f"the receiver got {received[0] - before} of {n} events")
            meter.stop()
            meter.apply(run, n)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                wall = (arrival.reached or time.monotonic()) - t0
                self.profile_lines += profiler.render(
                    wall,
                    f"Profiled run: {peer.describe() if peer else ''}, {scenario}, N={n}, "
                    f"{n / wall:.0f} msgs/s while profiled, {wall:.1f} s.",
                )
            if arrival.reached is not None:
                time.sleep(opts.settle)
                arrival.final = sink.count()
            rc = inj.wait()
            if rc != 0:
                problems.append(inj.problem())
            if arrival.reached is not None:
                total = arrival.reached - t0
                run.metrics["msgs_per_s"] = n / total
                run.metrics["total_s"] = total
            if inj.ended is not None:
                run.metrics["inject_s"] = inj.ended - t0
            if not arrival.ok(n):
                problems.append(f"sink counted {arrival.final} of {n}")
            if peer is not None:
                self._finish_peer(peer, run, n, problems)
        except Exception as e:  # noqa: BLE001 - a broken run is recorded, not fatal
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            if peer is not None:
                self._stop_quietly(peer, problems)
            sink.stop()
        return self._record(run, problems)

    @staticmethod
    def _wait_events(port: int, count: int, deadline: float) -> tuple[int, float]:
        """Poll the receiver until it has counted `count` events or `deadline` (monotonic)
        passes: (its count, when it was last seen to grow)."""
        seen, when = receiver_state(port)["events"], time.monotonic()
        while seen < count and time.monotonic() < deadline:
            time.sleep(0.05)
            now = receiver_state(port)["events"]
            if now != seen:
                seen, when = now, time.monotonic()
        return seen, when

    def _stop_quietly(self, peer: Peer, problems: list[str]) -> None:
        try:
            peer.stop()
        except Exception as e:  # noqa: BLE001
            problems.append(f"stop: {e}")

    # -- cli -------------------------------------------------------------------

    def cli_run(self, peer: Peer, rep: int, parallel: int) -> Run:
        """One process per message (distinct messages), `parallel` at a time."""
        opts = self.opts
        n = opts.cli_n
        files = genmsg.many(opts.work / f"msgs-{opts.msg_size}-{n}", n, opts.msg_size)
        variant = "sequential" if parallel == 1 else f"{parallel} parallel"
        run = Run("cli", variant, peer.name, rep, n)
        sink = self.sink()
        run.tools = f"one `sendmail -i -f S -- R` process per message -> MTA -> {sink.kind}"
        problems: list[str] = []
        try:
            self._restart(peer, sink.port)
            sink.start()
            argv = peer.cli_argv(genmsg.SENDER, genmsg.RCPT)
            meter = CpuMeter(peer).start()
            t0 = time.monotonic()
            result = cli_inject(argv, files, parallel, opts.timeout)
            injected = time.monotonic()
            if result.failed:
                problems.append(f"{result.failed} injections failed: {result.errors[:2]}")
            remaining = max(1.0, opts.timeout - (injected - t0))
            # Failed injections never arrive: wait for the accepted ones only (the run
            # fails anyway), so one failure does not cost a whole timeout.
            expected = n - result.failed
            arrival = wait_count(sink, expected, remaining if not result.failed else 60.0, 0.0)
            meter.stop()
            meter.apply(run, n, with_injectors=True)
            if arrival.reached is not None:
                time.sleep(opts.settle)
                arrival.final = sink.count()
            run.metrics["inject_s"] = injected - t0
            run.metrics["per_msg_ms"] = result.median_ms
            run.metrics["inject_msgs_per_s"] = n / (injected - t0)
            if arrival.reached is not None:
                run.metrics["msgs_per_s"] = n / (arrival.reached - t0)
                run.metrics["total_s"] = arrival.reached - t0
            if not arrival.ok(expected):
                problems.append(f"sink counted {arrival.final} of {expected}")
            self._finish_peer(peer, run, expected, problems)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            self._stop_quietly(peer, problems)
            sink.stop()
        return self._record(run, problems)

    # -- backlog -----------------------------------------------------------------

    def backlog_run(self, peer: Peer, rep: int) -> Run:
        """Queue N with the sink down, then start the sink and time the drain."""
        opts = self.opts
        n = opts.backlog_n
        tool = self.smtp_tool()
        run = Run("backlog", "queued while the sink is down", peer.name, rep, n)
        if isinstance(peer, EnginePeer):
            self.note(f"backlog: engine queue.retry.scale={opts.retry_scale:g} (retries come quickly)")
        elif isinstance(peer, PostfixPeer):
            self.note("backlog: postfix is flushed (postqueue -f) right after the sink starts")
        sink = self.sink()
        run.tools = f"{tool} -> MTA (sink down), then -> {sink.kind}"
        problems: list[str] = []
        try:
            self._restart(peer, sink.port, opts.retry_scale)
            with RssSampler(peer.root_pid, 0.2) as rss:
                inj = SmtpInjector(
                    tool, peer.smtp_port, n, self.message, opts.sessions, opts.reuse,
                    token=f"backlog{rep}", timeout=opts.timeout, log=self.log,
                )
                inj.prepare()
                meter = CpuMeter(peer).start()
                t0 = inj.go()
                rc = inj.wait()
                if rc != 0:
                    problems.append(inj.problem())
                injected = inj.ended or time.monotonic()
                run.metrics["inject_s"] = injected - t0
                run.metrics["queued_at_sink_start"] = peer.queue_count()
                t_sink = time.monotonic()
                sink.start()
                peer.flush()
                # After an injector failure the run fails anyway: do not wait a whole timeout.
                arrival = wait_count(sink, n, 60.0 if problems else opts.timeout, 0.0)
                meter.stop()
            meter.apply(run, n)
            if arrival.reached is not None:
                time.sleep(opts.settle)
                arrival.final = sink.count()
            run.metrics["peak_rss_mb"] = rss.peak / 2**20
            run.metrics["peak_pss_mb"] = rss.peak_pss / 2**20
            run.metrics["processes"] = rss.max_processes
            if arrival.reached is not None:
                run.metrics["drain_s"] = arrival.reached - t_sink
                run.metrics["drain_msgs_per_s"] = n / (arrival.reached - t_sink)
                if arrival.first is not None:
                    run.metrics["deliver_s"] = arrival.reached - arrival.first
                run.metrics["total_s"] = arrival.reached - t0
            if not arrival.ok(n):
                problems.append(f"sink counted {arrival.final} of {n}")
            self._finish_peer(peer, run, n, problems)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            self._stop_quietly(peer, problems)
            sink.stop()
        return self._record(run, problems)

    # -- latency -----------------------------------------------------------------

    def latency_run(self, peer: Peer, rep: int, rate: float) -> Run:
        """Paced load at `rate`; latency = sink arrival - 250 to DATA, per Message-ID."""
        opts = self.opts
        n = opts.latency_n
        run = Run("latency", f"{rate:.0f} msgs/s paced", peer.name, rep, n)
        sink = StampingSink(self.sink_port, opts.work)
        run.tools = "python loadgen -> MTA -> stampsink"
        acks_file = opts.work / f"acks.{peer.name}.{rep}.txt"
        token = f"lat{rep}{peer.name}"
        problems: list[str] = []
        try:
            self._restart(peer, sink.port)
            sink.start()
            inj = SmtpInjector(
                "python", peer.smtp_port, n, self.message, opts.latency_sessions,
                rate=rate, acks=acks_file, token=token, timeout=opts.timeout, log=self.log,
            )
            inj.prepare()
            meter = CpuMeter(peer).start()
            t0 = inj.go()
            arrival = wait_count(sink, n, opts.timeout, 0.0, stop_early=inj.failed)
            meter.stop()
            meter.apply(run, n)
            if arrival.reached is not None:
                time.sleep(opts.settle)
                arrival.final = sink.count()
            if inj.wait() != 0:
                problems.append(inj.problem())
            if inj.ended is not None:
                run.metrics["rate_sent"] = n / (inj.ended - t0)
            if not arrival.ok(n):
                problems.append(f"sink counted {arrival.final} of {n}")
            self._finish_peer(peer, run, n, problems)
            sink.stop()
            latencies, problem = match_latencies(acks_file, sink.stamps(), token, n)
            if problem:
                problems.append(problem)
            if latencies:
                run.metrics["p50_ms"] = _percentile(latencies, 50)
                run.metrics["p90_ms"] = _percentile(latencies, 90)
                run.metrics["p99_ms"] = _percentile(latencies, 99)
                run.metrics["max_ms"] = max(latencies)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            self._stop_quietly(peer, problems)
            sink.stop()
        return self._record(run, problems)

    # -- the loops -----------------------------------------------------------------

    def run_scenario(self, name: str) -> None:
        """Every rep: each peer in turn (engine, then its peer), so both see the same box."""
        opts = self.opts
        self.say(f"== {name}")
        if name == "simplemh":
            self.note(f"simplemh: {SIMPLEMH_NOTE}")
            for peer in self.peers:
                self.dkim_probe(peer)
        if name in EXTRA:
            engine = next(p for p in self.peers if p.name == "engine")
            n = min(opts.n, 5000)
            run = self.smtp_run(engine, 0, n, profile=opts.work / name,
                                simplemh=name == "profile-simplemh")
            self.runs.remove(run)  # a profiled run is slowed by the sampler: not a figure
            if not run.ok:
                self.note(f"profile run failed: {run.note}")
            return
        if name == "events":
            self.events_runs()
            return
        if name == "latency":
            rate = self.latency_rate()
            self.say(f"  latency rate: {rate:.1f} msgs/s")
        for rep in range(1, opts.reps + 1):
            if name == "direct":
                self.smtp_run(None, rep)
                continue
            for peer in self.peers:
                if name == "smtp":
                    self.smtp_run(peer, rep)
                elif name == "simplemh":
                    self.smtp_run(peer, rep, simplemh=True)
                elif name == "cli":
                    for parallel in opts.cli_parallel:
                        self.cli_run(peer, rep, parallel)
                elif name == "backlog":
                    self.backlog_run(peer, rep)
                elif name == "latency":
                    self.latency_run(peer, rep, rate)
                else:
                    raise ValueError(f"unknown scenario {name!r}")

    def events_runs(self) -> None:
        """Each rep: the engine's smtp run without events, then with its events store and
        a destination on a local HTTP receiver (one receiver for the whole scenario)."""
        engine = next(p for p in self.peers if p.name == "engine")
        self.note("events: the engine with its bundled PostgreSQL, the event recorder and "
                  "processor, and one destination (delivery_attempt) on a local aiohttp "
                  f"receiver, against the same engine with `events_database_url none` ({NO_EVENTS})")
        receiver, port = start_receiver("count")
        try:
            for rep in range(1, self.opts.reps + 1):
                self.smtp_run(engine, rep, events=0)
                self.smtp_run(engine, rep, events=port)
        finally:
            receiver.kill()
            receiver.wait(10)

    def dkim_probe(self, peer: Peer) -> None:
        """Before the simplemh runs: one SimpleMH message through `peer` (configured as
        for the runs) to a capturing SMTP server; its DKIM signature must verify with
        dkimpy against the bench key. The signature's tags go into the notes; a failure
        is a failed run (an MTA that does not sign would not be a fair figure)."""
        from bench.dkim_probe import probe

        message = genmsg.single_simplemh(self.opts.work / f"msg-simplemh-{self.opts.msg_size}.eml",
                                         self.opts.msg_size)
        problem = ""
        try:
            result = probe(peer, lambda port: self._restart(peer, port, simplemh=True),
                           message.read_bytes(), self.opts.work)
            problem = result.problem
            if not problem:
                self.note(f"simplemh: {peer.describe()} signed a probe message, dkimpy verified "
                          f"it: {result.tags}")
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        finally:
            self._stop_quietly(peer, [])
        if problem:
            run = Run("simplemh", "DKIM probe", peer.name, 0, 1)
            self._record(run, [f"DKIM probe: {problem}"])

    def latency_rate(self) -> float:
        """Half the engine's measured SMTP rate (median of this invocation's smtp runs).

        Without smtp runs, one calibration run of min(N, 2000) messages is made
        (recorded as scenario smtp, variant "calibration").
        """
        if self.opts.latency_rate:
            return self.opts.latency_rate
        rates = [
            r.metrics["msgs_per_s"]
            for r in self.runs
            if r.scenario == "smtp" and r.mta == "engine" and r.ok and "msgs_per_s" in r.metrics
        ]
        if not rates:
            engine = next(p for p in self.peers if p.name == "engine")
            self.say("  calibrating: one engine smtp run to find its max rate")
            run = self.smtp_run(engine, 0, min(self.opts.n, 2000))
            run.variant = "calibration"
            if "msgs_per_s" in run.metrics:
                rates = [run.metrics["msgs_per_s"]]
        rate = statistics.median(rates) / 2 if rates else 50.0
        self.note(
            f"latency: paced at {rate:.1f} msgs/s = half the engine's median smtp rate"
            if rates
            else "latency: no engine smtp rate measured; paced at 50 msgs/s"
        )
        return rate


def match_latencies(
    acks_file: Path, stamps: list[tuple[int, str]], token: str, n: int
) -> tuple[list[float], str]:
    """Latencies in ms (sink stamp - 250 stamp) by Message-ID; and a problem ('' if none).

    Every message 0..n-1 must have been acknowledged once and must have
    arrived once; arrivals of Message-IDs not from this run are a problem too.
    """
    acks: dict[int, int] = {}
    for line in acks_file.read_text().splitlines():
        index, _, ns = line.partition(" ")
        acks[int(index)] = int(ns)
    prefix = f"<{token}."
    arrived: dict[int, int] = {}
    duplicates = foreign = 0
    for ns, mid in stamps:
        if not (mid.startswith(prefix) and mid.endswith("@bench.test>")):
            foreign += 1
            continue
        try:
            index = int(mid[len(prefix) : -len("@bench.test>")])
        except ValueError:
            foreign += 1
            continue
        if index in arrived:
            duplicates += 1
            continue
        arrived[index] = ns
    latencies = [(arrived[i] - acks[i]) / 1e6 for i in acks if i in arrived]
    problems = []
    if len(acks) != n:
        problems.append(f"{len(acks)} of {n} messages acknowledged")
    missing = sum(1 for i in acks if i not in arrived)
    if missing:
        problems.append(f"{missing} acknowledged messages never arrived")
    if duplicates:
        problems.append(f"{duplicates} duplicate arrivals")
    if foreign:
        problems.append(f"{foreign} arrivals not from this run")
    return latencies, "; ".join(problems)
