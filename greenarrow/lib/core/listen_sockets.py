"""Listening sockets bound by the supervisor and inherited by a service.

Started as root, the supervisor binds `control/smtp.listen` itself (port 25
needs root) and passes the sockets to `smtpd`, which runs unprivileged and
never binds: the environment variable `GREENARROW_LISTEN_FDS` names the
inherited descriptors, comma-separated, in the order of `smtp.listen`
(systemd's LISTEN_FDS, but with the numbers named, as the supervisor keeps
the sockets across restarts of the service). Without it the service binds
as before.
"""

from __future__ import annotations

import os
import socket

ENV = "GREENARROW_LISTEN_FDS"


def bind(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """Listening TCP sockets for (host, port) pairs, as asyncio's create_server makes
    them (SO_REUSEADDR, IPv6 only on an IPv6 address); OSError names the address."""
    sockets: list[socket.socket] = []
    try:
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.create_server((host, port), family=family, backlog=100)
            except OSError as e:
                reason = os.strerror(e.errno) if e.errno else str(e)
                raise OSError(e.errno, f"cannot listen on {host}:{port}: {reason}") from None
            sock.set_inheritable(True)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def env_value(sockets: list[socket.socket]) -> str:
    return ",".join(str(s.fileno()) for s in sockets)


def inherited(environ: dict[str, str] | os._Environ[str] | None = None) -> list[socket.socket] | None:
    """The sockets named by GREENARROW_LISTEN_FDS (removed from the environment), or None."""
    env = os.environ if environ is None else environ
    value = env.pop(ENV, None)
    if value is None:
        return None
    sockets = []
    for word in filter(None, value.split(",")):  # empty: smtp.listen names no address
        sock = socket.socket(fileno=int(word))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
