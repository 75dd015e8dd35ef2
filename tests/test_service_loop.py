"""service.run's event loop: asyncio's own, uvloop when GREENARROW_EVENT_LOOP=uvloop asks
for it and the package is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

PROGRAM = """
import asyncio
from greenarrow.lib.core import service

async def main(stop, reload):
    print(type(asyncio.get_running_loop()).__module__)

service.run(main)
"""
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
DEFAULT = "asyncio.unix_events"


def loop_module(value: str | None, hide_uvloop: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GREENARROW_EVENT_LOOP"}
    if value is not None:
        env["GREENARROW_EVENT_LOOP"] = value
    program = PROGRAM
    if hide_uvloop:  # as on a machine without the package
        program = "import sys; sys.modules['uvloop'] = None\n" + PROGRAM
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.skipif(not HAVE_UVLOOP, reason="the uvloop package is not installed")
@pytest.mark.parametrize("value", ["uvloop", " UVLoop "])
def test_uvloop_when_asked(value: str) -> None:
    result = loop_module(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["uvloop"]
    assert result.stderr == ""


@pytest.mark.parametrize("value", [None, "", "asyncio", " AsyncIO "])
def test_stock_loop_by_default(value: str | None) -> None:
    result = loop_module(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["asyncio.unix_events"]
    assert result.stderr == ""


def test_unknown_value_warns_and_uses_the_default() -> None:
    result = loop_module("tokio")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [DEFAULT]
    assert "GREENARROW_EVENT_LOOP='tokio' is not one of asyncio, uvloop" in result.stderr


def test_fallback_without_uvloop() -> None:
    quiet = loop_module(None, hide_uvloop=True)
    assert quiet.stdout.split() == ["asyncio.unix_events"] and quiet.stderr == ""
    asked = loop_module("uvloop", hide_uvloop=True)
    assert asked.stdout.split() == ["asyncio.unix_events"]
    assert "uvloop package is not installed" in asked.stderr
