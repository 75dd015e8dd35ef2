"""`greenarrow queue status|list|hold|release|bounce|delete|retry-now`: the queue tools."""

from __future__ import annotations

import json
import time

import click

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.ops.queue_tools import Filter, Queues, queue_names

QUEUE_CHOICE = click.Choice(["ram", "bounce", "disk", "all"])


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return conflib.parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {e} (e.g. 90s, 15m, 4h15m, 2d)") from None


def filters(function):
    """The filter options shared by list and every action."""
    options = [
        click.option("-q", "--queue", default="all", type=QUEUE_CHOICE, show_default=True),
        click.option("--domain", "domains", multiple=True,
                     help="Recipient domain (wildcards * and ?); repeat to OR."),
        click.option("--sendid", "sendids", multiple=True, help="SendID (case-insensitive)."),
        click.option("--listid", "listids", multiple=True, help="ListID (case-insensitive)."),
        click.option("-r", "--recipient", "recipients", multiple=True,
                     help="Recipient address, wildcards allowed."),
        click.option("--older-than", callback=_duration, help="Queued for longer than, e.g. 2h."),
        click.option("--newer-than", callback=_duration, help="Queued for less than, e.g. 10m."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _select(queue, domains, sendids, listids, recipients, older_than, newer_than, held=None):
    flt = Filter(list(domains), list(sendids), list(listids), list(recipients),
                 older_than, newer_than)
    queues = Queues(root_from_env())
    return queues, queues.select(queue_names(queue), flt, held)


@click.group("queue")
def queue_command() -> None:
    """Look into the ram-, bounce- and disk-queues and act on entries, while the engine runs.

    Filters: different options AND together, repeats of one option OR together.
    """


@queue_command.command("status")
@click.option("-q", "--queue", default="all", type=QUEUE_CHOICE, show_default=True)
@click.option("--top", default=10, show_default=True, help="Top recipient domains (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_command(queue: str, top: int, as_json: bool) -> None:
    """Messages, oldest age, due now, in flight and deferred per queue, with top domains."""
    report = Queues(root_from_env()).status(queue_names(queue), top)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for name, q in report.items():
        age = "-" if q["oldest_age"] is None else f"{q['oldest_age']:.0f}s"
        flight = "?" if q["in_flight"] is None else q["in_flight"]
        click.echo(f"{name}-queue: {q['messages']} messages, oldest {age}, {q['due_now']} due now, "
                   f"{flight} in flight, {q['deferred']} deferred, {q['held']} held, "
                   f"{q['bad']} bad")
        for domain, count in q["top_domains"]:
            click.echo(f"    {count:>8}  {domain}")
    from greenarrow.lib.ops.explain import throttle_states

    for key, state in sorted(throttle_states(root_from_env()).items()):
        if state.get("backoff_until"):
            click.echo(f"backoff: {key}: {state['backoff_reason']}")


@queue_command.command("list")
@filters
@click.option("--held", is_flag=True, help="List held entries only.")
@click.option("--bad", is_flag=True,
              help="List the entries queue-send set aside in bad/ (their envelope is not "
                   "valid): queue, file, size, what is wrong. Only --queue applies.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(held: bool, bad: bool, as_json: bool, **opts) -> None:
    """List matching entries: queue, id, age, attempts, next attempt, sender, recipient, ids."""
    if bad:
        _list_bad(opts, held, as_json)
        return
    queues, selected = _select(**opts, held=True if held else None)
    now = time.time()
    for entry, path in selected:
        if entry.envelope is None:
            from greenarrow.lib.queue.entry import BadEntry, read_envelope

            try:
                entry.envelope = read_envelope(path)
            except (OSError, BadEntry):
                continue
        env = entry.envelope
        row = {"queue": entry.queue, "entry": entry.name, "held": entry.held,
               "age": round(entry.age(now)), "attempts": entry.attempts,
               "next_attempt_in": max(0, round(entry.due - now)), "sender": env.get("sender", ""),
               "recipient": env.get("recipient", ""), "sendid": env.get("sendid", ""),
               "listid": env.get("listid", "")}
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo("\t".join(str(row[k]) for k in row))


def _list_bad(opts: dict, held: bool, as_json: bool) -> None:
    if held or any(opts[k] for k in ("domains", "sendids", "listids", "recipients",
                                     "older_than", "newer_than")):
        raise click.UsageError("--bad takes no filter but --queue (bad entries have no "
                               "valid envelope to filter on)")
    for bad in Queues(root_from_env()).bad_entries(queue_names(opts["queue"])):
        row = {"queue": bad.queue, "entry": bad.name, "bad": True, "size": bad.size,
               "problem": bad.problem}
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo("\t".join(str(row[k]) for k in ("queue", "entry", "size", "problem")))


def _action(name: str, help_text: str):
    @queue_command.command(name, help=help_text)
    @filters
    @click.option("--all", "everything", is_flag=True,
                  help="Required when no filter is given: act on every entry.")
    def command(everything: bool, **opts) -> None:
        given = any(opts[k] for k in ("domains", "sendids", "listids", "recipients",
                                      "older_than", "newer_than"))
        if not given and not everything:
            raise click.UsageError("give a filter, or --all to act on every entry")
        held = {"release": True, "hold": False, "retry-now": False}.get(name)
        queues, selected = _select(**opts, held=held)
        if name == "bounce":
            c = queues.root.control
            done = queues.bounce(selected, control.read_text(c, "me"),
                                 control.read_int(c, "bouncemaxbytes"),
                                 control.read_text(c, "doublebounceto"))
        else:
            done = getattr(queues, name.replace("-", "_"))(selected)
        click.echo(f"{name}: {done} entries")

    return command


@queue_command.command("explain")
@click.argument("domain")
@click.option("--mtaid", default="", help="As sent through this VirtualMTA (default: the default one).")
def explain_command(domain: str, mtaid: str) -> None:
    """Why is mail to DOMAIN held? Routing, throttle rule and its state, backoff, queued
    entries and the last attempts."""
    from greenarrow.lib.ops.explain import explain

    try:
        for line in explain(root_from_env(), domain, mtaid):
            click.echo(line)
    except conflib.ConfError as e:
        raise click.ClickException(str(e)) from None


_action("hold", "Hold matching entries: no attempt is made until they are released.")
_action("release", "Release held entries; they are due at once.")
_action("retry-now", "Make matching entries due at once.")
_action("delete", "Delete matching entries (no bounce).")
_action("bounce", "Bounce matching entries to their senders now and remove them.")
