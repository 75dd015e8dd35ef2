"""The queue-send <-> remote worker link: lines batched into writes, none left behind."""

from __future__ import annotations

import asyncio
import socket

from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.deliver import remote_worker
from greenarrow.lib.deliver.remote_worker import RemoteWorker
from greenarrow.lib.ops.install_root import init_root

WAIT = 10.0  # upper bound on any wait; never reached when things work


def test_lines_of_one_round_go_out_in_one_write() -> None:
    async def go() -> tuple[bytes, bytes]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        _, writer = await asyncio.open_connection(sock=ours)
        batch = remote_link.LineBatch(writer)
        batch.write(b"one\n")
        batch.write(b"two\n")
        try:
            before = theirs.recv(100)
        except BlockingIOError:
            before = b""  # nothing written until the round ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after = theirs.recv(100)
        writer.close()
        theirs.close()
        return before, after

    before, after = asyncio.run(go())
    assert before == b""
    assert after == b"one\ntwo\n"


def test_worker_close_sends_results_still_waiting_for_company(tmp_path, monkeypatch) -> None:
    """A result held back to share a write is sent when the worker stops: otherwise
    queue-send would never hear of that attempt and would make it again."""
    monkeypatch.setattr(remote_worker, "RESULT_DELAY", 3600.0)  # only close() can send it
    root = Root(tmp_path / "root")
    init_root(root)

    async def go() -> dict:
        worker = RemoteWorker(root, 0)
        await worker.start()
        reader, writer = await asyncio.open_unix_connection(str(root.remote_socket(0)))
        writer.write(remote_link.encode({"id": "e1", "path": str(tmp_path / "gone")}))
        await writer.drain()
        async with asyncio.timeout(WAIT):
            while not any(batch.lines for batch in worker.batches):
                await asyncio.sleep(0.01)
        await worker.close()
        async with asyncio.timeout(WAIT):
            line = await reader.readline()
        writer.close()
        return remote_link.decode(line)

    result = asyncio.run(go())
    assert result["id"] == "e1"
    assert result["status"] == remote_link.MISSING
