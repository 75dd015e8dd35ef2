"""`control/bounce_processor.conf`: the repeat-counting thresholds (docs/bounces.md).

A JSON object. Top-level keys, each holding a threshold object:

    {
      "default": {"hard": {"count": 1, "days": 0},
                  "soft": {"count": 5, "days": 7},
                  "max_gap_days": 30},
      "by_listid_prefix": {"trans": {"soft": {"count": 10, "days": 14}}},
      "by_listid": {"trans42": {"hard": {"count": 2, "days": 1}}}
    }

A threshold object may give any of `hard`, `soft` (each `count`: bounces in
the run, `days`: the run's span from its first to its latest bounce, both
must be reached) and `max_gap_days` (a bounce more than this after the
previous one starts a new run). What it leaves out comes from the next more
general level: `by_listid`, then `by_listid_prefix`, then `default`, then
DEFAULTS. ListIDs and prefixes are matched lower-cased. The prefix of a
ListID is its leading run of lower-case letters, or else of digits
(`foo100` -> `foo`, `bar99baz` -> `bar`, `99qux` -> `99`, `_foo` -> none).

No file means DEFAULTS. A file that is not valid is refused whole with an
error naming the file and the key; the processor then stops processing
until the file is fixed (nothing is lost: messages wait in their Maildirs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

FILE = "bounce_processor.conf"
TOP_KEYS = ("default", "by_listid_prefix", "by_listid")
HARD, SOFT = "hard", "soft"
_LIMIT_KEYS = ("count", "days")
_OBJECT_KEYS = (HARD, SOFT, "max_gap_days")


class ConfigError(ValueError):
    """bounce_processor.conf is not valid; the message names the file and key."""


@dataclass(frozen=True)
class Limit:
    count: int  # bounces in the run
    days: float  # days from the run's first bounce to its latest


@dataclass(frozen=True)
class Thresholds:
    hard: Limit
    soft: Limit
    max_gap_days: float

    def limit(self, kind: str) -> Limit:
        return self.hard if kind == "h" else self.soft


# Why these values: docs/bounces.md "Repeat counting". A hard bounce here is
# already a permanent "no such user" (classify never makes a 4xx hard), so one
# is enough; soft bounces (full mailbox, over quota) must persist for a week.
DEFAULTS = Thresholds(hard=Limit(1, 0.0), soft=Limit(5, 7.0), max_gap_days=30.0)


def listid_prefix(listid: str) -> str:
    """The leading run of lower-case letters, or else of digits ("" if neither)."""
    out = []
    for group in (str.isalpha, str.isdigit):
        for c in listid:
            if c.isascii() and group(c) and (c.islower() or c.isdigit()):
                out.append(c)
            else:
                break
        if out:
            return "".join(out)
    return ""


def _number(value: object, where: str, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number, not {value!r}")
    if value < 0 or value != value or value == float("inf"):
        raise ConfigError(f"{where} must be zero or more, not {value!r}")
    return value


def _check_object(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be an object, not {type(obj).__name__}")
    for key, value in obj.items():
        if key not in _OBJECT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (expected {', '.join(_OBJECT_KEYS)})")
        if key == "max_gap_days":
            _number(value, f"{where}.max_gap_days", False)
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}.{key} must be an object with count and days")
        for name, number in value.items():
            if name not in _LIMIT_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key {name!r} (expected count, days)")
            _number(number, f"{where}.{key}.{name}", name == "count")
        if value.get("count") == 0:
            raise ConfigError(f"{where}.{key}.count must be 1 or more")
    return obj


def _merge(base: Thresholds, obj: dict) -> Thresholds:
    def limit(old: Limit, new: dict | None) -> Limit:
        if not new:
            return old
        return Limit(int(new.get("count", old.count)), float(new.get("days", old.days)))

    return Thresholds(limit(base.hard, obj.get(HARD)), limit(base.soft, obj.get(SOFT)),
                      float(obj.get("max_gap_days", base.max_gap_days)))


class ProcessorConfig:
    """A parsed bounce_processor.conf: `thresholds(listid)`."""

    def __init__(self, data: dict, source: str = FILE) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: must be a JSON object, not {type(data).__name__}")
        for key in data:
            if key not in TOP_KEYS:
                raise ConfigError(f"{source}: unknown top-level key {key!r} "
                                  f"(expected {', '.join(TOP_KEYS)})")
        self.default = _merge(DEFAULTS, _check_object(data.get("default", {}),
                                                      f"{source}: default"))
        self.by_prefix: dict[str, dict] = {}
        self.by_listid: dict[str, dict] = {}
        for key, target in (("by_listid_prefix", self.by_prefix), ("by_listid", self.by_listid)):
            table = data.get(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: {key} must be an object")
            for name, obj in table.items():
                target[name.lower()] = _check_object(obj, f"{source}: {key}.{name}")

    def thresholds(self, listid: str) -> Thresholds:
        listid = listid.lower()
        result = self.default
        prefix = listid_prefix(listid)
        if prefix and prefix in self.by_prefix:
            result = _merge(result, self.by_prefix[prefix])
        if listid in self.by_listid:
            result = _merge(result, self.by_listid[listid])
        return result


def parse(text: str | bytes, source: str = FILE) -> ProcessorConfig:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return ProcessorConfig(data, source)


def load(path: str | os.PathLike[str]) -> ProcessorConfig:
    """The configuration in `path` (DEFAULTS if there is no file); ConfigError if invalid."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return ProcessorConfig({}, os.fspath(path))
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {exc}") from None
    return parse(text, os.fspath(path))


class WatchedConfig:
    """The file re-read when its identity (inode, size, mtime) changes.

    `current()` returns the configuration or raises ConfigError while the file
    is invalid; it stats the file at most every `interval` seconds.
    """

    def __init__(self, path: str | os.PathLike[str], interval: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.interval = interval
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._config: ProcessorConfig | None = None
        self._error: ConfigError | None = None

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self, now: float) -> ProcessorConfig:
        if now - self._checked >= self.interval or (self._config is None and self._error is None):
            self._checked = now
            stamp = self._identity()
            if stamp != self._stamp or (self._config is None and self._error is None):
                self._stamp = stamp
                try:
                    self._config, self._error = load(self.path), None
                except ConfigError as exc:
                    self._config, self._error = None, exc
        if self._error is not None:
            raise self._error
        assert self._config is not None
        return self._config
