"""How one attempt is sent: the one place that turns a recipient and its MtaID into a job.

`queue-send` asks for a plan at every attempt (Scheduler.job_for) and
`greenarrow queue explain` asks for the same plan to describe it, so the two
can never disagree on the sender, the domain's settings, the throttle key or
the worker that owns it (ARCHITECTURE section 6).

Keys: a throttle rule's key is `<sender>|<context>:<pattern>`, a relay's own
limits `<relay>|relay`; a job with connection reuse and no throttle is pinned
by `<sender>|reuse|<domain>` so its kept sessions are found again.
"""

from __future__ import annotations

from dataclasses import dataclass

from greenarrow.lib.config.conf import Block
from greenarrow.lib.routing.domain_rules import DomainRules, DomainSettings
from greenarrow.lib.routing.throttle_config import throttle_programs
from greenarrow.lib.routing.virtual_mta import Sender, VirtualMtas, Vmta


@dataclass(frozen=True)
class Plan:
    """The route of one attempt: who sends, how, under which throttle."""

    vmta: Vmta  # the VirtualMTA the message asked for (or the default)
    sender: Sender  # the IP address or relay server chosen by routing rules
    settings: DomainSettings
    throttle: dict | None  # {"key", "max_conn", "max_hour", "program"} or None
    reuse: dict | None  # {"max_messages", "idle_timeout"} or None
    worker_key: str | None  # the key that picks the worker, or None (least busy)

    def job(self, name: str, path: str, system_max: int) -> dict:
        """The job line for a remote worker (docs/formats.md section 4)."""
        job: dict = {"id": name, "path": path, "route": self.settings.smtp_route,
                     "starttls": self.settings.starttls_use, "source_ip": self.sender.source_ip,
                     "helo": self.sender.hostname, "system_max": system_max}
        if self.sender.kind == "relay":
            job["relay"], job["auth"] = self.sender.relay, self.sender.auth
        if self.throttle is not None:
            job["throttle"] = self.throttle
        if self.reuse is not None:
            job["reuse"] = self.reuse
        if self.worker_key is not None:
            job["worker_key"] = self.worker_key
        return job

    def log_fields(self) -> dict:
        """The delivery log columns that say how the attempt was sent."""
        return {"mtaid_id": self.vmta.id, "mtaid_name": self.vmta.name,
                "outmtaid": self.sender.id, "outmtaid_ip": self.sender.source_ip or "",
                "outmtaid_name": self.sender.name}


class Planner:
    """Plans attempts from one loaded greenarrow.conf."""

    def __init__(self, conf: Block) -> None:
        self.vmtas = VirtualMtas(conf)
        self.rules = DomainRules(conf)
        self.programs = throttle_programs(conf)

    def plan(self, recipient: str, mtaid: str, msguid: str, mx: str = "") -> Plan:
        """The plan for an attempt to `recipient` of message `msguid` asking for `mtaid`.

        `mx` is the MX host learned from earlier attempts to the domain, for
        `mx:` throttle patterns ("" when unknown).
        """
        domain = recipient.rpartition("@")[2].lower()
        vmta = self.vmtas.lookup(mtaid)
        sender = self.vmtas.resolve(vmta, msguid, recipient)
        settings = self.rules.settings(domain, sender.name if sender.kind == "ip" else None, mx)
        max_conn, max_hour = settings.max_concurrent_connections, settings.max_messages_per_hour
        rule = settings.throttle_rule
        if sender.kind == "relay":
            max_conn, max_hour = sender.max_concurrent_connections, sender.max_messages_per_hour
            rule = "relay" if (max_conn or max_hour) else ""
        throttle = None
        if rule:
            program = self.programs.get((settings.throttle_program or "").lower())
            throttle = {"key": f"{sender.name}|{rule}", "max_conn": max_conn,
                        "max_hour": max_hour, "program": program}
        reuse = None
        if settings.reuse_connections:
            reuse = {"max_messages": settings.reuse_connections_max_messages,
                     "idle_timeout": settings.reuse_connections_idle_timeout}
        if throttle is not None:
            worker_key = throttle["key"]
        elif reuse is not None:
            worker_key = f"{sender.name}|reuse|{domain}"
        else:
            worker_key = None
        return Plan(vmta, sender, settings, throttle, reuse, worker_key)
