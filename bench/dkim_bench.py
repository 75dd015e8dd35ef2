"""What DKIM signing costs per message, and what it does to a worker's event loop.

    python -m bench.dkim_bench [--n 2000] [--size 4096] [--markdown]

For RSA-2048, RSA-1024 and Ed25519 keys made on the spot, times
`DkimSigner.sign` (our signer: compiled parsing and canonicalization,
`greenarrow.pyx.dkim_canon`, dkimpy's layout, the private-key step on
OpenSSL through `cryptography`) on an ordinary message of about `--size`
bytes, and for comparison dkimpy's own `dkim.sign` (its pure-Python RSA).
Then the parse and relaxed canonicalization alone, dkimpy's against the
compiled one (CPU time, one process), and signing throughput with 1 and 2
threads (the share of signing that runs without the GIL is what a worker's
signing threads gain on a second core). Then, the remote worker's situation: `--n` signings under
way, `--concurrency` at a time (a worker's attempts in flight), on one
event loop, inline (`sign`) versus `sign_async` (the shared thread pool),
while a ticker task measures how late the loop wakes it (its lag is what
every other SMTP session of that worker waits).

Bounded: every loop is a fixed count. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.machine import describe, loadavg
from greenarrow.lib.dkim.signing import DkimKeys, DkimSigner


def make_message(size: int) -> bytes:
    head = (
        b"From: News <news@origin.test>\r\nTo: <someone@dest.test>\r\n"
        b"Subject: This week's offers\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <bench-1@origin.test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"List-Unsubscribe: <mailto:unsub@origin.test>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def per_call_ms(fn, count: int) -> tuple[float, float]:
    """Median and 95th percentile of `count` calls, in milliseconds."""
    fn()  # warm
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def canonicalization_us(message: bytes, count: int) -> tuple[float, float]:
    """CPU microseconds per message: dkimpy's parse + relaxed canonicalization, and ours."""
    from greenarrow.pyx import dkim_canon

    policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    start = time.process_time()
    for _ in range(count):
        headers, body = dkim.rfc822_parse(message)
        policy.canonicalize_headers(headers)
        policy.canonicalize_body(body)
    theirs = (time.process_time() - start) / count * 1e6
    start = time.process_time()
    for _ in range(count):
        headers, offset = dkim_canon.parse(message)
        for name, value in headers:
            dkim_canon.relaxed_header(name, value)
        dkim_canon.body(message, offset, True)
    ours = (time.process_time() - start) / count * 1e6
    return theirs, ours


def threaded_rate(signer: DkimSigner, message: bytes, count: int, threads: int) -> float:
    """Signatures per second (wall) with `threads` threads signing `count` messages each."""
    workers = [threading.Thread(target=lambda: [signer.sign(message) for _ in range(count)])
               for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return count * threads / (time.perf_counter() - start)


async def loop_lag(signer: DkimSigner, message: bytes, n: int, use_async: bool,
                   concurrency: int) -> tuple[float, float, float]:
    """Wall time per message, and the ticker's median and 99th-percentile lateness (ms),
    with `concurrency` signings under way at a time (a worker's attempts in flight)."""
    lags: list[float] = []
    done = asyncio.Event()
    gate = asyncio.Semaphore(concurrency)

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - start - 0.001) * 1000)

    async def one() -> None:
        async with gate:
            if use_async:
                await signer.sign_async(message)
            else:
                signer.sign(message)
                await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - start
    done.set()
    await tick
    lags.sort()
    return wall / n * 1000, statistics.median(lags), lags[int(len(lags) * 0.99) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="signings per measurement")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--concurrency", type=int, default=20,
                        help="signings under way at once in the event-loop test")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)

    facts = describe(Path.cwd())
    message = make_message(args.size)
    keys = {
        "RSA-2048": rsa.generate_private_key(65537, 2048),
        "RSA-1024": rsa.generate_private_key(65537, 1024),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, key in keys.items():
            folder = Path(tmp) / name / "dkim" / "origin.test"
            folder.mkdir(parents=True)
            (folder / "default.pem").write_bytes(pem(key))
            signer = DkimSigner(DkimKeys.from_control(Path(tmp) / name), "sha256")
            assert signer.sign(message).keys == [("origin.test", "default")]
            ours = per_call_ms(lambda s=signer: s.sign(message), args.n)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
                dkimpy_key, algorithm = base64.b64encode(raw), b"ed25519-sha256"
            else:
                dkimpy_key, algorithm = pem(key), b"rsa-sha256"

            def dkimpy_sign(k=dkimpy_key, a=algorithm) -> bytes:
                return dkim.sign(message, b"default", b"origin.test", k,
                                 canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=a)

            theirs = per_call_ms(dkimpy_sign, max(50, args.n // 10))
            inline = asyncio.run(loop_lag(signer, message, args.n, False, args.concurrency))
            pooled = asyncio.run(loop_lag(signer, message, args.n, True, args.concurrency))
            scaling = (threaded_rate(signer, message, args.n // 2, 1),
                       threaded_rate(signer, message, args.n // 2, 2))
            rows.append((name, ours, theirs, inline, pooled, scaling))

    canon = canonicalization_us(message, args.n)
    facts["load average at end"] = loadavg()
    if args.markdown:
        for k, v in facts.items():
            print(f"- {k}: {v}")
        print(f"- message: {len(message)} bytes; {args.n} signings per figure;"
              f" {args.concurrency} at once in the event-loop columns\n")
        print("| key | sign() median / p95 ms | dkimpy dkim.sign() median / p95 ms "
              "| inline: ms/msg, loop lag median / p99 ms "
              "| sign_async: ms/msg, loop lag median / p99 ms "
              "| signatures/s, 1 thread / 2 threads |")
        print("|---|---|---|---|---|---|")
        for name, ours, theirs, inline, pooled, scaling in rows:
            print(f"| {name} | {ours[0]:.3f} / {ours[1]:.3f} | {theirs[0]:.3f} / {theirs[1]:.3f} "
                  f"| {inline[0]:.3f}, {inline[1]:.2f} / {inline[2]:.1f} "
                  f"| {pooled[0]:.3f}, {pooled[1]:.2f} / {pooled[2]:.1f} "
                  f"| {scaling[0]:.0f} / {scaling[1]:.0f} ({scaling[1] / scaling[0]:.2f}x) |")
        print(f"\nParse + relaxed canonicalization, CPU per message: dkimpy {canon[0]:.1f} us, "
              f"compiled {canon[1]:.1f} us ({canon[0] / canon[1]:.1f}x)")
    else:
        for k, v in facts.items():
            print(f"{k}: {v}")
        print(f"message {len(message)} bytes, {args.n} signings per figure")
        for name, ours, theirs, inline, pooled, scaling in rows:
            print(f"{name}: sign {ours[0]:.3f} ms (p95 {ours[1]:.3f}); dkimpy {theirs[0]:.3f} ms; "
                  f"inline {inline[0]:.3f} ms/msg lag {inline[1]:.2f}/{inline[2]:.1f} ms; "
                  f"async {pooled[0]:.3f} ms/msg lag {pooled[1]:.2f}/{pooled[2]:.1f} ms; "
                  f"threads 1/2: {scaling[0]:.0f}/{scaling[1]:.0f} signatures/s")
        print(f"parse + relaxed canonicalization: dkimpy {canon[0]:.1f} us, ours {canon[1]:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
