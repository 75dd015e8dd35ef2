"""bench/tracker_bench.py keeps working: wrk's output is read right, and a quick run completes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tracker_bench  # noqa: E402

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:40000/t/click?x
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   420.11us    1.02ms  12.63ms   94.75%
    Req/Sec    22.69k     4.12k   27.13k    75.00%
  Latency Distribution
     50%  164.00us
     75%  223.00us
     90%  463.00us
     99%    1.52ms
  45177 requests in 1.00s, 7.80MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:  45115.03
Transfer/sec:      7.79MB
"""


def test_parse_wrk_reads_rate_p99_count_and_errors() -> None:
    assert tracker_bench.parse_wrk(WRK_OUTPUT) == {
        "rps": 45115.03, "p99_ms": 1.52, "responses": 45177, "non_2xx_3xx": 3,
        "socket_errors": 3}
    assert tracker_bench.parse_wrk(WRK_OUTPUT.replace("1.52ms", "870.00us"))["p99_ms"] == 0.87
    with pytest.raises(RuntimeError, match="cannot read"):
        tracker_bench.parse_wrk("wrk: connection refused")


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("nginx") is None
                    and not Path("/usr/sbin/nginx").exists(),
                    reason="wrk and nginx are not installed (apt-get install -y nginx wrk)")
def test_quick_run_reports_every_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert tracker_bench.main(["--quick", "--loops", "uvloop", "--processes", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "| nginx (rep 1) |" in out and "| tracker uvloop (rep 1) |" in out
    assert "| tracker uvloop x2 (rep 1) |" in out
    assert out.count("yes (") == 2
