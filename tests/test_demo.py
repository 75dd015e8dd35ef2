"""The README's first command ends in `greenarrow demo`: it must deliver and record every message."""

from __future__ import annotations

import subprocess
import sys

from engine import reachable_tmp


def test_demo_delivers_reports_and_records_events(tmp_path) -> None:
    root = reachable_tmp(tmp_path, "demo") / "demo-root"
    result = subprocess.run(
        [sys.executable, "-m", "greenarrow.bin.greenarrow", "demo", "--root", str(root),
         "--messages", "20"],
        capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "sink counted 20 of 20 messages" in out
    assert "events: 20 of 20 delivery attempts recorded as delivery_attempt events" in out
    assert "demo: OK" in out
