"""Bounce classification rules: data, not code.

The shipped rules are `bounce_rules.txt` next to this module (package data).
An operator's own rules live in `control/bounce_rules.local` (same format)
and are loaded first, so a local rule wins over a shipped one: a
misclassification is fixed without a release.

Format (docs/bounces.md): one rule a line, `#` starts a comment line,
fields separated by white space, the pattern is the rest of the line:

    CODE[/TYPE]  WHERE  PATTERN

- CODE: a number in the bounce code table (bounce_codes); TYPE (h, s or o)
  overrides the code's default type.
- WHERE: `text` (PATTERN is a regular expression, case-insensitive, searched
  in the diagnostic text; write `\\S`, not `[^\\s]`-style tricks that rely on
  case: letters are matched lower-cased), `status` (PATTERN is an enhanced status code; a
  part may be `*`, e.g. `5.7.*`), `reply` (SMTP reply code, `*` allowed,
  e.g. `55*`), `subject` (regular expression searched in the bounce's
  Subject, used when neither status nor text matched anything).

Rules are tried in file order, local file first, and the first rule that
matches wins (whatever it looks at). A bounce no rule matches gets a generic
code by its status class (5 -> 40 generic, 4 -> 20 soft, none -> 1
undetermined): never hard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from greenarrow.lib.feedback import bounce_codes

LOCAL_RULES = "control/bounce_rules.local"
WHERE = ("text", "status", "reply", "subject")


class RuleError(ValueError):
    """A bad line in a rules file (the message names file and line)."""


@dataclass(frozen=True)
class Rule:
    code: int
    type: str
    where: str
    pattern: str
    source: str  # "file:line", for operators asking why
    regex: re.Pattern[str]
    explicit_type: bool = False  # CODE/TYPE written out: no stage-based softening

    def matches(self, value: str) -> re.Match[str] | None:
        if self.where in ("status", "reply"):
            return self.regex.fullmatch(value)
        return self.regex.search(value)


def lower_pattern(pattern: str) -> str:
    """The pattern with its literal letters lower-cased (escapes such as \\S kept).

    Text rules run on lower-cased text without re.IGNORECASE: the same
    matches, but Python's re can then skip ahead on the first characters of
    an alternation, which makes the rules several times faster.
    """
    out = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(pattern[i:i + 2])
            i += 2
            continue
        out.append(pattern[i].lower())
        i += 1
    return "".join(out)


def _glob_regex(pattern: str) -> str:
    return ".*".join(re.escape(piece) for piece in pattern.split("*"))


def parse_rules(text: str, source: str) -> list[Rule]:
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split(None, 2)
        where_at = f"{source}:{number}"
        if len(fields) < 3:
            raise RuleError(f"{where_at}: expected CODE[/TYPE] WHERE PATTERN, got {stripped!r}")
        code_field, where, pattern = fields
        code_text, _, type_text = code_field.partition("/")
        if not code_text.isdigit() or int(code_text) not in bounce_codes.CODES:
            raise RuleError(f"{where_at}: unknown bounce code {code_text!r} "
                            f"(known: {', '.join(map(str, bounce_codes.CODES))})")
        code = int(code_text)
        bounce_type = type_text or bounce_codes.code_type(code)
        if bounce_type not in bounce_codes.TYPES:
            raise RuleError(f"{where_at}: bounce type {type_text!r} is not h, s or o")
        if where not in WHERE:
            raise RuleError(f"{where_at}: WHERE must be one of {', '.join(WHERE)}, got {where!r}")
        try:
            if where in ("status", "reply"):
                regex = re.compile(_glob_regex(pattern))
            elif where == "text":
                regex = re.compile(lower_pattern(pattern))
            else:
                regex = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise RuleError(f"{where_at}: bad regular expression {pattern!r}: {e}") from None
        rules.append(Rule(code, bounce_type, where, pattern, where_at, regex, bool(type_text)))
    return rules


def shipped_rules_text() -> str:
    return resources.files("greenarrow.lib.feedback").joinpath("bounce_rules.txt").read_text("utf-8")


_SHIPPED: list[Rule] | None = None


def shipped_rules() -> list[Rule]:
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = parse_rules(shipped_rules_text(), "bounce_rules.txt")
    return _SHIPPED


def load_rules(root: Path | str | None = None) -> list[Rule]:
    """Local rules (control/bounce_rules.local under `root`, if any) then the shipped ones."""
    local: list[Rule] = []
    if root is not None:
        path = Path(root) / LOCAL_RULES
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            text = ""
        except UnicodeDecodeError as e:
            raise RuleError(f"{path}: not UTF-8 ({e})") from None
        local = parse_rules(text, str(path))
    return local + shipped_rules()
