"""Bounces classified per second on one core: ours against sisimai and flufl.bounce.

    python -m bench.bounce_bench [--reps 5] [--limit N] [--markdown]

The same files for all three, in the same run: every bounce and complaint
of the shared corpus (/work/shared/corpus: the sisimai set incl. its CRLF
and CR copies, bounceparser-perl, flufl-bounce, php-bounce-handler,
email-arf-perl). Each tool reads every file into memory first and then
parses from memory `--reps` times; the figure is messages / CPU seconds of
the best repetition (one process, one core; CPU time hardly moves with
other load on the box, wall time is printed too).

- ours: `greenarrow.lib.feedback.classify.classify_message` (parse, rules,
  results), in this process;
- flufl.bounce (PyPI; `pip install flufl.bounce`): `email.message_from_bytes`
  then `flufl.bounce.all_failures`, in this process (parsing the message is
  part of its job, as it is of ours);
- sisimai (Debian `libsisimai-perl`): `Sisimai->make(\\$text)` in a Perl
  process, bench/sisimai_driver.pl.

A tool that is not installed is reported as missing, not silently skipped.
Bounded: a fixed number of files and repetitions; nothing touches the network.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from greenarrow.lib.feedback.classify import classify_message

CORPUS = Path("/work/shared/corpus")
BOUNCE_DIRS = ("sisimai/maildir", "bounceparser-perl/t/corpus", "flufl-bounce/flufl/bounce/tests/data",
               "php-bounce-handler/eml", "email-arf-perl/t/messages")
HERE = Path(__file__).resolve().parent


def corpus_files(root: Path, limit: int | None) -> list[Path]:
    files = []
    for sub in BOUNCE_DIRS:
        files.extend(p for p in sorted((root / sub).rglob("*")) if p.is_file())
    return files[:limit] if limit else files


def _time(fn, messages: list[bytes], reps: int) -> dict:
    for data in messages:  # warm-up: imports, regex compilation, rules file
        fn(data)
    best_cpu = best_wall = float("inf")
    results = 0
    for _ in range(reps):
        count = 0
        c0, w0 = time.process_time(), time.perf_counter()
        for data in messages:
            count += fn(data)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
        results = count
    return {"messages": len(messages), "results": results, "cpu": best_cpu, "wall": best_wall}


def run_ours(messages: list[bytes], reps: int) -> dict:
    out = _time(lambda d: len(classify_message(d).results), messages, reps)
    out["tool"] = "greenarrow"
    return out


def run_flufl(messages: list[bytes], reps: int) -> dict:
    try:
        from flufl.bounce import all_failures
    except ImportError:
        return {"tool": "flufl.bounce", "missing": "pip install flufl.bounce"}

    def one(data: bytes) -> int:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        try:
            temporary, permanent = all_failures(msg)
        except Exception:  # flufl.bounce raises on some malformed input; count it as nothing found
            return 0
        return len(temporary) + len(permanent)

    out = _time(one, messages, reps)
    out["tool"] = "flufl.bounce"
    return out


def run_sisimai(files: list[Path], reps: int) -> dict:
    if shutil.which("perl") is None or subprocess.run(
            ["perl", "-MSisimai", "-e", "1"], capture_output=True).returncode != 0:
        return {"tool": "sisimai", "missing": "apt-get install -y libsisimai-perl"}
    done = subprocess.run(["perl", str(HERE / "sisimai_driver.pl"), str(reps)],
                          input="".join(f"{p}\n" for p in files), capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        return {"tool": "sisimai", "missing": f"driver failed: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    files = corpus_files(args.corpus, args.limit)
    if not files:
        print(f"no files under {args.corpus}", file=sys.stderr)
        return 1
    messages = [p.read_bytes() for p in files]
    rows = [run_ours(messages, args.reps), run_flufl(messages, args.reps), run_sisimai(files, args.reps)]
    ours = rows[0]["messages"] / rows[0]["cpu"]
    if args.markdown:
        print("| tool | messages | results | msg/s (CPU) | msg/s (wall) | ours / tool |")
        print("|---|---|---|---|---|---|")
    for row in rows:
        if "missing" in row:
            print(f"{row['tool']}: not run ({row['missing']})")
            continue
        rate = row["messages"] / row["cpu"] if row["cpu"] else float("inf")
        wall = row["messages"] / row["wall"] if row["wall"] else float("inf")
        ratio = ours / rate if rate else float("inf")
        if args.markdown:
            print(f"| {row['tool']} | {row['messages']} | {row['results']} | {rate:,.0f} | {wall:,.0f} "
                  f"| {ratio:.2f}x |")
        else:
            print(f"{row['tool']:>22}: {row['messages']} messages, {row['results']} results, "
                  f"{rate:,.0f} msg/s CPU, {wall:,.0f} msg/s wall, ours/tool {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
