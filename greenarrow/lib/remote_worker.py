"""A `remote` worker: SMTP delivery attempts for the queue-sends, many at once.

A long-lived process, not one per message: it listens on its Unix socket
(greenarrow.lib.remote_link), takes jobs from every queue-send connected to
it, and runs each attempt as an asyncio task: read the entry, find the hosts
(the domain's `smtp_route`, else its MX), deliver, answer with the result.
Concurrency is bounded by the queue-sends, which never send more jobs than
their `concurrencyremote`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from greenarrow.lib import control, queue_entry, remote_link
from greenarrow.lib.mx import MxError, MxHost, MxResolver
from greenarrow.lib.paths import Root
from greenarrow.lib.smtp_client import Attempt, Result, Timeouts, deliver

log = logging.getLogger("remote")


def _parse_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return (host or text, int(port) if port else 53)


class WorkerSettings:
    """Control files the worker uses; re-read on SIGHUP."""

    def __init__(self, root: Root) -> None:
        c = root.control
        self.helo = str(control.read(c, "me"))
        self.port = int(control.read(c, "remote.port"))
        cap = int(control.read(c, "timeoutremote"))
        self.timeouts = Timeouts(
            connect=float(control.read(c, "timeoutconnect")), cap=float(cap) if cap else None
        )
        servers = control.read(c, "dns.servers")
        self.nameservers = [_parse_server(s) for s in servers] if servers else None


class RemoteWorker:
    """Serves jobs on `var/remote.<number>.sock`."""

    def __init__(self, root: Root, number: int) -> None:
        self.root = root
        self.number = number
        self.settings = WorkerSettings(root)
        self.resolver = MxResolver(self.settings.nameservers)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                job = remote_link.decode(line)
                task = asyncio.create_task(self._attempt(job, writer))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (ConnectionError, ValueError) as e:
            log.warning("queue-send link closed: %s", e)

    async def _attempt(self, job: dict, writer: asyncio.StreamWriter) -> None:
        try:
            result = await self.attempt(job)
        except Exception as e:  # never lose the answer: a crash here is a deferral
            log.exception("attempt %s crashed", job.get("id"))
            result = {"status": remote_link.DEFERRAL, "text": f"internal error in remote: {e}"}
        result["id"] = job["id"]
        if not writer.is_closing():
            writer.write(remote_link.encode(result))

    async def attempt(self, job: dict) -> dict:
        """One delivery attempt for a job; returns the result fields."""
        try:
            envelope, message = queue_entry.read_entry(job["path"])
        except FileNotFoundError:
            return {"status": remote_link.MISSING, "text": "queue entry is gone"}
        settings = self.settings
        recipient = envelope["recipient"]
        try:
            hosts = await self.hosts(recipient.rpartition("@")[2], job.get("route"))
        except MxError as e:
            status = remote_link.FAILURE if e.permanent else remote_link.DEFERRAL
            return {"status": status, "text": e.text}
        port = settings.port
        if job.get("route") and job["route"][1]:
            port = int(job["route"][1])
        attempt = Attempt(
            sender=envelope["sender"],
            recipient=recipient,
            message=message,
            helo=settings.helo,
            starttls=job.get("starttls", "opportunistic"),
        )
        result: Result = await deliver(attempt, hosts, port=port, timeouts=settings.timeouts)
        return {
            "status": result.status,
            "text": result.text,
            "mx_hostname": result.mx_hostname,
            "mx_ip": result.mx_ip,
            "smtp_code": result.smtp_code,
            "outmtaid_hostname": settings.helo,
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
