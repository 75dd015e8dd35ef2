"""Where the engine's time goes: CPU per process and py-spy samples per function.

Run as its own, unrecorded engine smtp run (`--profile`), because a sampler
on a 2-core box takes CPU from the engine and would skew a measured run.
CPU seconds per process come from /proc/PID/stat (utime + stime) before and
after the run, so they are exact whatever py-spy does. py-spy (optional,
`pip install py-spy`; skipped with a note when missing) samples each engine
process in raw (collapsed-stack) format with `--nonblocking`, so the engine
is never paused; stacks are aggregated into "self" (the frame running) and
"inclusive" (on the stack) shares, named by file and line.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import CLK_TCK, stat_fields

IDLE_FRAMES = ("EpollSelector.select", "select (selectors.py")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip() or str(pid)
    except OSError:
        return str(pid)


@dataclass
class ProcessProfile:
    """One process: CPU used during the run and its hottest frames."""

    pid: int
    name: str
    cpu_s: float = 0.0
    samples: int = 0
    self_top: list[tuple[str, float]] = field(default_factory=list)
    inclusive_top: list[tuple[str, float]] = field(default_factory=list)


def aggregate(raw: Path, top: int = 10) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(busy samples, top self frames, top inclusive project/library frames) of a raw py-spy file.

    Samples whose running frame is the event loop's select() are idle and
    left out, so the shares are of the time the process was busy.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return 0, [], []
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_FRAMES):
            continue
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "greenarrow/" in frame or "aiosmtpd/" in frame or "asyncio/" in frame:
                inclusive[frame] += count
    if not busy:
        return 0, [], []
    boring = ("run_forever", "_run_once", "Handle._run", "Runner.run", "run (asyncio", "run_until_complete", "<module>", " main (", "runner (")
    incl = [(f, 100 * c / busy) for f, c in inclusive.most_common(60) if not any(b in f for b in boring)]
    return busy, [(f, 100 * c / busy) for f, c in own.most_common(top)], incl[:top]


class Profiler:
    """py-spy on every process of a tree for the duration of a `with` block."""

    def __init__(self, pids: list[int], out: Path, rate: int = 100) -> None:
        self.pids = pids
        self.out = out
        self.rate = rate
        self.spy = shutil.which("py-spy")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.profiles = {pid: ProcessProfile(pid, process_name(pid)) for pid in pids}
        self._cpu0: dict[int, float] = {}

    def __enter__(self) -> Profiler:
        self.out.mkdir(parents=True, exist_ok=True)
        for pid in self.pids:
            self._cpu0[pid] = cpu_seconds(pid)
            if self.spy:
                argv = [self.spy, "record", "--nonblocking", "-r", str(self.rate), "-f", "raw",
                        "-o", str(self.out / f"pyspy-{pid}.txt"), "--pid", str(pid)]
                self.procs[pid] = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            self.profiles[pid].cpu_s = cpu_seconds(pid) - self._cpu0[pid]
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for pid, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            busy, own, incl = aggregate(self.out / f"pyspy-{pid}.txt")
            profile = self.profiles[pid]
            profile.samples, profile.self_top, profile.inclusive_top = busy, own, incl

    def render(self, wall: float, headline: str) -> list[str]:
        """Markdown: CPU per process, then each busy process's hottest frames."""
        rows = sorted(self.profiles.values(), key=lambda p: -p.cpu_s)
        lines = [headline, "", "| process | CPU s | % of one core over the run |", "|---|---|---|"]
        for p in rows:
            lines.append(f"| {p.name} | {p.cpu_s:.1f} | {100 * p.cpu_s / wall:.0f}% |")
        lines.append("")
        if not self.spy:
            lines += ["(py-spy is not installed: `pip install py-spy` for per-function figures.)", ""]
            return lines
        for p in rows:
            if p.cpu_s < 0.05 * wall or not p.self_top:
                continue
            lines.append(f"`{p.name}` ({p.samples} busy samples): self time")
            lines.append("")
            lines += [f"- {share:.1f}% {frame}" for frame, share in p.self_top[:8]]
            lines.append("")
            lines.append("on the stack (inclusive):")
            lines.append("")
            lines += [f"- {share:.1f}% {frame}" for frame, share in p.inclusive_top[:10]]
            lines.append("")
        return lines
