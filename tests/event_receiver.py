"""A real HTTP receiver of event POSTs for the event processor's tests (aiohttp server).

`Receiver` runs in its own thread with its own event loop, on a loopback port,
so both in-process processors and processor subprocesses can post to it. Its
`mode` decides each answer: "ok" (200), "fail" (500), "slow" (answers after
`slow_seconds`), "cut" (closes the connection without an answer).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

from aiohttp import web


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.mode = "ok"
        self.slow_seconds = 5.0
        self.batches: list[list[dict]] = []  # batches answered 2xx
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/events"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self.lock:
            self.requests += 1
            mode = self.mode
        if mode == "fail":
            return web.Response(status=500, text="down for maintenance")
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
            return web.Response(status=200)
        if mode == "cut":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        assert request.content_type == "application/json"
        events = json.loads(body)
        with self.lock:
            self.batches.append(events)
            self.headers.append(dict(request.headers))
            self.bodies.append(body)
        return web.Response(status=204)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> Receiver:
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("receiver did not start")
        return self

    def stop(self) -> None:
        """Stop listening (the port is kept for a later start: a receiver down for a while)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def unique_ids(self) -> Counter:
        with self.lock:
            return Counter(e["event_unique_id"] for batch in self.batches for e in batch)

    def received(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.batches)
