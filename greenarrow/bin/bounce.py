"""`greenarrow bounce classify FILE...`: what the classifier makes of returned mail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from greenarrow.lib.config import secret_constants
from greenarrow.lib.core.paths import root_path_from_env
from greenarrow.lib.feedback.bounce_rules import RuleError, load_rules
from greenarrow.lib.feedback.classify import classify_message


@click.group("bounce")
def bounce_command() -> None:
    """Bounce and spam-complaint classification."""


@bounce_command.command("classify")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-local", is_flag=True,
              help="Ignore control/bounce_rules.local (shipped rules only).")
def classify_command(files: tuple[Path, ...], no_local: bool) -> None:
    """Classify each FILE (one message, as received) and print one JSON line per file:

    \b
    {"file": ..., "is_bounce": true|false, "results": [{"recipient": ...,
     "bounce_type": "h"|"s"|"o", "bounce_code": N, "status": "5.1.1", "text": ...,
     "rule": "file:line"}, ...]}

    Rules: $HVMAIL_ROOT/control/bounce_rules.local first, then the shipped
    rules (docs/bounces.md). A complaint (ARF) result has "event": "scomp";
    with control/secret_constants its recipient comes from the verified
    X-Mailer-Info of the quoted original. Exit status 1 if a file could not
    be read or a rules file is bad.
    """
    root = root_path_from_env()
    try:
        rules = load_rules(None if no_local else root)
    except RuleError as e:
        raise click.ClickException(str(e)) from None
    try:
        constants = secret_constants.read(Path(root) / "control")
    except (secret_constants.SecretConstantsError, OSError):
        constants = None
    failed = False
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            click.echo(json.dumps({"file": str(path), "error": e.strerror or str(e)}))
            failed = True
            continue
        c = classify_message(data, rules, constants)
        click.echo(json.dumps({"file": str(path), "is_bounce": c.is_bounce,
                               "results": [r.as_json() for r in c.results]}, ensure_ascii=False))
    sys.exit(1 if failed else 0)
