"""Queue entry names: one builder and one parser, and the parser agrees with the scanner."""

from __future__ import annotations

import os
import tempfile

from greenarrow.pyx.queue_scan import scan
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.lib.queue import entry as queue_entry

NAME_CHARS = st.sampled_from("abc019-._ ~\u00e9\u0661")


def scanned(name: str) -> tuple[int, int] | None:
    """(attempts, due) of what queue-send's scan makes of a file named `name`
    (None: skipped or a stray). The scan names files as the folder lists them; the
    entry id itself is the name's text before the last two dots either way."""
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, name), "w"):
            pass
        found = scan(folder)
        if not found.names:
            return None
        (only,) = list(found)
        return only[1], only[2]


def parsed(name: str) -> tuple[int, int] | None:
    try:
        return queue_entry.split_name(name)[1:]
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.text(NAME_CHARS, min_size=1, max_size=40).filter(lambda n: n not in (".", "..")))
def test_split_name_agrees_with_the_scanner(name: str) -> None:
    assert parsed(name) == scanned(name)


def test_names_the_scanner_refuses_are_refused() -> None:
    for name in ("a.-1.5", "a.1_0.5", ".x.1.2", "a.1." + "9" * 19, "a.1234567890.0", "a..0",
                 ".1.0", "a.1.", "a.\u0661.0"):
        assert parsed(name) is None, name


def test_new_names_round_trip() -> None:
    name = queue_entry.new_entry_name("660e18083f51e-5e4a-0", 3, attempts=2, due=1700000000)
    assert name == "660e18083f51e-5e4a-0-3.2.1700000000"
    assert queue_entry.split_name(name) == ("660e18083f51e-5e4a-0-3", 2, 1700000000)
    assert queue_entry.entry_name("660e18083f51e-5e4a-0-3", 2, 1700000000) == name
