"""A `remote` worker: SMTP delivery attempts for the queue-sends, many at once.

A long-lived process, not one per message: it listens on its Unix socket
(greenarrow.lib.core.remote_link), takes jobs from every queue-send connected to
it, and runs each attempt as an asyncio task: read the entry, find the hosts
(the domain's `smtp_route`, else its MX), deliver, answer with the result.
Concurrency is bounded by the queue-sends, which never send more jobs than
their `concurrencyremote`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from greenarrow.lib.config import control
from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.remote_link import CONNMAXOUT
from greenarrow.lib.core.wire_encoding import seven_bit, shorten_long_lines
from greenarrow.lib.deliver.session_pool import SessionPool
from greenarrow.lib.deliver.throttle import Program, Throttles
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.smtp.client import Attempt, Timeouts, deliver
from greenarrow.lib.smtp.mx import MxError, MxHost, MxResolver

if TYPE_CHECKING:
    from greenarrow.lib.dkim.signing import DkimSigner

log = logging.getLogger("remote")

RESULT_DELAY = 0.005  # seconds a result may wait for others to share its write


def _parse_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return (host or text, int(port) if port else 53)


class WorkerSettings:
    """Control files the worker uses; re-read on SIGHUP."""

    def __init__(self, root: Root) -> None:
        c = root.control
        self.helo = control.read_text(c, "me")
        self.port = control.read_int(c, "remote.port")
        cap = control.read_int(c, "timeoutremote")
        self.timeouts = Timeouts(
            connect=control.read_float(c, "timeoutconnect"), cap=float(cap) if cap else None
        )
        servers = control.read(c, "dns.servers")
        self.nameservers = [_parse_server(s) for s in servers] if servers else None
        # Keys loaded here, so reload() reloads them. Without any key file the
        # signer (dkimpy and OpenSSL's bindings: 7 MB per worker) is not loaded:
        # a signer with no keys sends every message unchanged anyway.
        self.dkim: DkimSigner | None = None
        if _has_dkim_keys(c):
            from greenarrow.lib.dkim.signing import DkimSigner

            self.dkim = DkimSigner.from_control(c)


def _has_dkim_keys(control_dir: Path) -> bool:
    """Whether `control/dkim/<domain>/` holds any `.pem` file (dkim_signing's layout)."""
    try:
        return any(name.endswith(".pem") for folder in (control_dir / "dkim").iterdir()
                   if folder.is_dir() for name in os.listdir(folder))
    except OSError:
        return False


class RemoteWorker:
    """Serves jobs on `var/remote.<number>.sock`."""

    def __init__(self, root: Root, number: int) -> None:
        self.root = root
        self.number = number
        self.settings = WorkerSettings(root)
        self.resolver = MxResolver(self.settings.nameservers)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.batches: set[remote_link.LineBatch] = set()  # the result lines of each link
        self.throttles = Throttles()
        self.pool = SessionPool()
        self.connections = 0  # attempts under way (for system_max_smtp_connections)

    async def start(self) -> None:
        path = self.root.remote_socket(self.number)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(
            self._serve, path=str(path), limit=1024 * 1024
        )
        log.info("listening on %s", path)
        self.housekeeping = asyncio.create_task(self._housekeeping())

    async def _housekeeping(self) -> None:
        """Close idle pooled sessions and publish the throttle state, every second."""
        path = self.root.throttle_state(self.number)
        while True:
            await asyncio.sleep(1.0)
            await self.pool.expire()
            snapshot = self.throttles.snapshot()
            if snapshot or path.exists():
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps({"time": time.time(), "keys": snapshot}))
                os.replace(tmp, path)

    def reload(self) -> None:
        try:
            settings = WorkerSettings(self.root)
        except control.ControlError as e:
            log.error("reload failed, keeping the previous settings: %s", e)
            return
        if settings.nameservers != self.settings.nameservers:
            self.resolver = MxResolver(settings.nameservers)
        self.settings = settings
        log.info("reloaded control files")

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking jobs; let attempts under way finish for up to `grace` seconds."""
        if self.server is not None:
            self.server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for batch in self.batches:  # results still waiting for company: out now, or
            batch.flush()           # queue-send would try those messages again
        if getattr(self, "housekeeping", None) is not None:
            self.housekeeping.cancel()
        await self.pool.close_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await remote_link.serve_jobs(reader, writer, self._attempt, self.batches, self.tasks,
                                     RESULT_DELAY, log)

    async def _attempt(self, job: dict, results: remote_link.LineBatch) -> None:
        try:
            result = await self.attempt(job)
        except Exception as e:  # never lose the answer: a crash here is a deferral
            log.exception("attempt %s crashed", job.get("id"))
            result = {"status": remote_link.DEFERRAL, "text": f"internal error in remote: {e}"}
        result["id"] = job["id"]
        results.write(remote_link.encode(result))

    async def attempt(self, job: dict) -> dict:
        """One delivery attempt for a job; returns the result fields.

        A throttled job (one whose key is over its limits here) is not
        attempted: it comes back as `connmaxout`.
        """
        try:
            envelope, message = queue_entry.read_entry(job["path"])
        except FileNotFoundError:
            return {"status": remote_link.MISSING, "text": "queue entry is gone"}
        except queue_entry.BadEntry as e:
            return {"status": remote_link.BAD, "text": str(e)}
        throttle = job.get("throttle")
        key = throttle["key"] if throttle else None
        if key is not None:
            why = self.throttles.acquire(key, throttle["max_conn"], throttle["max_hour"],
                                         Program.from_job(throttle.get("program")))
            if why is not None:
                return {"status": CONNMAXOUT, "text": f"Throttled: {why}."}
        system_max = int(job.get("system_max") or 0)
        if system_max and self.connections >= system_max:
            if key is not None:
                self.throttles.release(key, CONNMAXOUT)
            return {"status": CONNMAXOUT,
                    "text": f"Throttled: system_max_smtp_connections ({system_max} here) reached."}
        self.connections += 1
        status = remote_link.DEFERRAL
        try:
            result = await self._deliver(job, envelope, message)
            status = result["status"]
            return result
        finally:
            self.connections -= 1
            if key is not None:
                self.throttles.release(key, status)

    async def _deliver(self, job: dict, envelope: dict, message: bytes) -> dict:
        settings = self.settings
        recipient = envelope["recipient"]
        route = job.get("relay") or job.get("route")
        helo = job.get("helo") or settings.helo
        try:
            hosts = await self.hosts(recipient.rpartition("@")[2], route)
        except MxError as e:
            status = remote_link.FAILURE if e.permanent else remote_link.DEFERRAL
            return {"status": status, "text": e.text}
        port = settings.port
        if route and route[1]:
            port = int(route[1])
        # Before signing: the signature must cover the bytes that go out, whichever
        # receiver takes them (one without 8BITMIME gets 7-bit: core.wire_encoding).
        if settings.dkim is not None:
            message = seven_bit(message)
            message = (await settings.dkim.sign_async(message, envelope.get("dkim", ""))).message
        else:
            message = shorten_long_lines(message)
        attempt = Attempt(
            sender=envelope["sender"],
            recipient=recipient,
            message=message,
            helo=helo,
            source_ip=job.get("source_ip"),
            starttls=job.get("starttls", "opportunistic"),
        )
        auth = tuple(job["auth"]) if job.get("auth") else None
        reuse = job.get("reuse")
        if reuse:
            pool_key = (tuple(route) if route else recipient.rpartition("@")[2].lower(),
                        attempt.source_ip, helo, attempt.starttls, port)
            result = await self.pool.send(pool_key, attempt)
            if result is None:  # no kept session: open one, and keep it if it may serve again
                result = await deliver(attempt, hosts, port=port, timeouts=settings.timeouts,
                                       auth=auth, keep=self.pool.keeper(pool_key, reuse))
        else:
            result = await deliver(attempt, hosts, port=port, timeouts=settings.timeouts,
                                   auth=auth)
        return {
            "status": result.status,
            "text": result.text,
            "mx_hostname": result.mx_hostname,
            "mx_ip": result.mx_ip,
            "smtp_code": result.smtp_code,
            "outmtaid_hostname": helo,
        }

    async def hosts(self, domain: str, route: list | None) -> list[MxHost]:
        """The hosts to try: the `smtp_route` host when one is set, else the domain's MX."""
        if route:
            host = route[0]
            try:
                ip = str(ipaddress.ip_address(host.strip("[]")))
            except ValueError:
                return await self.resolver.route_hosts(host)
            return [MxHost(host, 0, [ip])]
        return await self.resolver.hosts(domain)
