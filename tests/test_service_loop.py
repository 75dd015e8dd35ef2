"""service.run's event loop: asyncio's own, or uvloop when GREENARROW_EVENT_LOOP asks for it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

PROGRAM = """
import asyncio
from greenarrow.lib import service

async def main(stop, reload):
    print(type(asyncio.get_running_loop()).__module__)

service.run(main)
"""


def loop_module(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GREENARROW_EVENT_LOOP"}
    if value is not None:
        env["GREENARROW_EVENT_LOOP"] = value
    return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("value", [None, "", "asyncio", "AsyncIO"])
def test_stock_loop_by_default(value: str | None) -> None:
    result = loop_module(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["asyncio.unix_events"]
    assert result.stderr == ""


def test_unknown_value_warns_and_uses_the_stock_loop() -> None:
    result = loop_module("tokio")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["asyncio.unix_events"]
    assert "GREENARROW_EVENT_LOOP='tokio' is not one of asyncio, uvloop" in result.stderr


def test_uvloop_when_asked() -> None:
    if importlib.util.find_spec("uvloop") is None:
        result = loop_module("uvloop")
        assert result.stdout.split() == ["asyncio.unix_events"]
        assert "uvloop package is not installed" in result.stderr
        pytest.skip("uvloop is not installed: checked the fallback only")
    result = loop_module("uvloop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["uvloop"]
