"""`greenarrow queue explain DOMAIN`: why is mail to this domain held?

Puts together, for one recipient domain, what an operator would otherwise
dig out of four places: how it is routed and from which VirtualMTA
(greenarrow.conf), which throttle rule applies and its limits, what the
remote worker that owns that rule is doing now (connections, messages in the
last hour, backoff mode and why), what is queued for the domain, and the
last attempts in the delivery logs.
"""

from __future__ import annotations

import json
import time

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control
from greenarrow.lib.core.delivery_log import iter_records
from greenarrow.lib.core.paths import QUEUES, THROTTLE_STATE_GLOB, Root
from greenarrow.lib.ops.queue_tools import Filter, Queues
from greenarrow.lib.routing.plan import Planner


def throttle_states(root: Root) -> dict[str, dict]:
    """The throttle keys the remote workers published, merged."""
    states: dict[str, dict] = {}
    for path in sorted(root.var.glob(THROTTLE_STATE_GLOB)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        states.update(data.get("keys", {}))
    return states


def explain(root: Root, domain: str, mtaid: str = "", recent: int = 5) -> list[str]:
    """Lines of text answering "why is mail to `domain` held?"."""
    domain = domain.lower().strip()
    conf = conflib.load_root(root)
    plan = Planner(conf).plan(f"someone@{domain}", mtaid, "explain")
    vmta, sender, settings = plan.vmta, plan.sender, plan.settings
    lines = [f"domain {domain}"]
    via = f"VirtualMTA {vmta.name}" + (f" -> {sender.name}" if sender.name != vmta.name else "")
    source = sender.source_ip or "the default source address"
    lines.append(f"  sent through {via} from {source}, HELO "
                 f"{sender.hostname or control.read_text(root.control, 'me')}")
    if sender.kind == "relay":
        lines.append(f"  relayed to {sender.relay[0]}:{sender.relay[1]}")
    elif settings.smtp_route:
        lines.append(f"  routed to {settings.smtp_route[0]}:{settings.smtp_route[1]} (smtp_route)")
    else:
        lines.append("  delivered to the domain's MX hosts")
    lines.append(f"  STARTTLS {settings.starttls_use}; connection reuse "
                 f"{'on' if settings.reuse_connections else 'off'}")
    key = plan.throttle["key"] if plan.throttle else None
    if sender.kind == "relay" and plan.throttle:
        lines.append(f"  throttle: relay limits, {sender.max_concurrent_connections or 'no limit on'} "
                     f"connections, {sender.max_messages_per_hour or 'no limit on'} messages/hour")
    elif plan.throttle:
        lines.append(f"  throttle rule {settings.throttle_rule}: "
                     f"{settings.max_concurrent_connections or 'no limit on'} connections, "
                     f"{settings.max_messages_per_hour or 'no limit on'} messages/hour"
                     + (f", program {settings.throttle_program}" if settings.throttle_program else ""))
        program = plan.throttle["program"]
        if program:
            lines.append(f"    backoff when {program['deferral_rate'] or '-'}% deferred or "
                         f"{program['failure_rate'] or '-'}% failed of at least "
                         f"{program['min_attempts']} attempts in {program['window']:.0f}s, for "
                         f"{program['return_after']:.0f}s")
    else:
        lines.append("  no throttle rule applies")
    state = throttle_states(root).get(key) if key else None
    if state:
        lines.append(f"  now: {state['active']} connections, {state['last_hour']} messages in the "
                     f"last hour, {state['connmaxouts']} attempts throttled (connmaxout)")
        if state.get("backoff_until"):
            left = state["backoff_until"] - time.time()
            lines.append(f"  BACKOFF for {max(0, left):.0f}s more: {state['backoff_reason']}; "
                         f"limits now {state['effective_max_concurrent_connections']} connections, "
                         f"{state['effective_max_messages_per_hour']} messages/hour")
    elif key:
        lines.append("  now: no attempt through this rule since the workers started")
    queued = Queues(root).select(list(QUEUES), Filter(domains=[domain]))
    now = time.time()
    by_queue: dict[str, list] = {}
    for entry, _ in queued:
        by_queue.setdefault(entry.queue, []).append(entry)
    if not queued:
        lines.append("  nothing queued for this domain")
    for queue, entries in by_queue.items():
        held = sum(1 for e in entries if e.held)
        due = sum(1 for e in entries if not e.held and e.due <= now)
        waiting = sorted(e.due for e in entries if not e.held and e.due > now)
        nxt = f", next attempt in {waiting[0] - now:.0f}s" if waiting else ""
        lines.append(f"  {queue}-queue: {len(entries)} queued, {due} due now, {held} held{nxt}")
    last = []
    for queue in QUEUES:
        for record in iter_records(root.delivery_log(queue), start=now - 86400):
            if record["email"].lower().endswith("@" + domain):
                last.append(record)
                last = last[-recent:]
    last.sort(key=lambda r: float(r["timestamp"]))
    if last:
        lines.append("  last attempts:")
        for r in last[-recent:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(r["timestamp"])))
            lines.append(f"    {stamp} {r['status']}: {r['message'][:160]}")
    return lines
