"""Fixtures shared by the smtpd test modules (each module brings its own `root`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from test_smtpd import ServerThread

from greenarrow.lib.core.paths import Root


@pytest.fixture
def start(root: Root) -> Iterator[Callable[[], ServerThread]]:
    """Start smtpd servers on the module's `root` (its smtp.listen); all stopped at the end."""
    started: list[ServerThread] = []

    def run() -> ServerThread:
        server = ServerThread(root).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()
