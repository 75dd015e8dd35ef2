"""Listening sockets bound by the supervisor and inherited by a service.

Started as root, the supervisor binds the addresses of a service's listen
files itself (ports 25 and 80 need root) and passes the sockets to the
service, which runs unprivileged and never binds: `smtpd` gets
`control/smtp.listen`, the `tracker` gets `tracker.listen` and
`tracker.tls.listen`. One environment variable per listen file
(`LISTEN_FILES`) names the inherited descriptors, comma-separated, in the
order of the file (systemd's LISTEN_FDS, but with the numbers named, as the
supervisor keeps the sockets across restarts of the service). Without it the
service binds as before.
"""

from __future__ import annotations

import os
import socket

ENV = "GREENARROW_LISTEN_FDS"
TLS_ENV = "GREENARROW_LISTEN_TLS_FDS"

# program -> (control file, environment variable) for each socket list it is passed
LISTEN_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "smtpd": (("smtp.listen", ENV),),
    "tracker": (("tracker.listen", ENV), ("tracker.tls.listen", TLS_ENV)),
}


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


def inherited(environ: dict[str, str] | os._Environ[str] | None = None,
              name: str = ENV) -> list[socket.socket] | None:
    """The sockets named by the variable `name` (removed from the environment), or None."""
    env = os.environ if environ is None else environ
    value = env.pop(name, None)
    if value is None:
        return None
    sockets = []
    for word in filter(None, value.split(",")):  # empty: the file names no address
        sock = socket.socket(fileno=int(word))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
