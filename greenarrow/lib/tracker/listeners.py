"""The running tracker: its settings, spool and listeners, started and reloaded from the root."""

from __future__ import annotations

import logging
import socket

from greenarrow.lib.config import control
from greenarrow.lib.core import listen_sockets
from greenarrow.lib.core.paths import Root
from greenarrow.lib.tracker import settings as tracker_settings
from greenarrow.lib.tracker import spool, tls
from greenarrow.lib.tracker.http_server import TrackerServer

log = logging.getLogger("tracker")


def _sockets(addresses: list[tuple[str, int]], variable: str) -> list[tuple[tuple[str, int], socket.socket | None]]:
    """Each address with None (bind it here), or, when a root supervisor bound them,
    each passed socket with its address (the file may have changed since: the
    supervisor keeps its sockets until it restarts)."""
    passed = listen_sockets.inherited(name=variable)
    if passed is None:
        return [(address, None) for address in addresses]
    return [(sock.getsockname()[:2], sock) for sock in passed]


def _given(sock: socket.socket | None) -> str:
    return "" if sock is None else " (socket from the supervisor)"


class Tracker:
    """`start()` listens on control/tracker.listen (HTTP) and tracker.tls.listen (HTTPS).

    `process` is this process's number among hvmail_init's tracker processes
    (None: a tracker run alone). Numbered processes that bind themselves (not
    root-started) bind with SO_REUSEPORT, so that each has its own socket on
    the same address and the kernel spreads the connections; root-started,
    they all accept on the sockets the supervisor bound once.
    """

    def __init__(self, root: Root, process: int | None = None) -> None:
        self.root = root
        self.process = process
        self.settings = tracker_settings.load(root)
        if self.settings.timeout < 1:
            raise control.ControlError(f"{root.control / 'tracker.timeout'}: must be 1 or more")
        self.server = TrackerServer(self.settings, lambda: spool.open_spool(root, process))
        self.sni: tls.SniListener | None = None

    async def start(self) -> None:
        plain = control.read(self.root.control, "tracker.listen")
        secure = control.read(self.root.control, "tracker.tls.listen")
        if secure:
            certificates = tls.load(self.root.control)
            if certificates is None:
                raise tls.TlsConfigError(
                    f"{self.root.control / 'tracker.tls.listen'} is set, but "
                    f"{self.root.control / tls.DIRECTORY} holds no *.pem certificate")
            self.sni = tls.SniListener(certificates)
        shared = self.process is not None
        for (host, port), sock in _sockets(plain, listen_sockets.ENV):
            await self.server.listen(host, port, sock=sock, reuse_port=shared)
            log.info("listening for HTTP on %s:%d%s", host, port, _given(sock))
        for (host, port), sock in _sockets(secure, listen_sockets.TLS_ENV):
            await self.server.listen(host, port, ssl=self.sni.context, sock=sock,
                                     reuse_port=shared)
            log.info("listening for HTTPS on %s:%d (%d certificates)%s", host, port,
                     len(self.sni.certificates.files), _given(sock))
        if not plain and not secure:
            log.info("control/tracker.listen and tracker.tls.listen are empty: not listening")
        log.info("server_id %s; %d Apple egress ranges from %s; spool %s",
                 self.settings.server_id, self.settings.ranges.count,
                 self.settings.ranges.source, spool.spool_dir(self.root, self.process))

    def reload(self) -> None:
        """Re-read settings, ranges and certificates (SIGHUP); a bad file keeps the old ones."""
        try:
            new = tracker_settings.load(self.root)
            certificates = tls.load(self.root.control) if self.sni is not None else None
        except Exception as e:  # any bad file: say which, keep serving with what we have
            log.error("reload failed, keeping the previous settings: %s", e)
            return
        self.settings = self.server.settings = new
        if self.sni is not None and certificates is not None:
            self.sni.certificates = certificates
        log.info("reloaded: %d Apple egress ranges from %s", new.ranges.count,
                 new.ranges.source)

    async def close(self) -> None:
        await self.server.close()
        if self.server.spool is not None:
            self.server.spool.close()
