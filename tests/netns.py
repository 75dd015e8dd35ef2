"""A private test network of Linux network namespaces, for tests that need several hosts.

`TestNetwork` makes one namespace per host, named `<prefix>-<host>`, and a
hub namespace holding a bridge that every host's `eth0` (one end of a veth
pair) is plugged into, all on one /24 of 10.231.x.y that exists only inside
these namespaces: nothing is added to the machine's own network, and no
packet can leave it. The hub may hold addresses of its own (the test's DNS
server, its receiving SMTP hosts, its HTTP event destination): the test
binds those in-process with `inside(hub)`, which moves only the calling
thread (setns(2)), so threads and sockets made there stay in the hub.

Engines run in a host's namespace through `nsenter --net=/run/netns/NS`
(only the network namespace: the file system, mounts included, stays the
test's, so the install root and a tmpfs `hvmail_init` mounts are the same
for the test and the engine).

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), `ip` (iproute2) and `nsenter`
(util-linux); `available()` says why not. `delete()` removes every
namespace it made; processes still inside keep theirs alive, so stop them
first.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2, util-linux)"
    probe = f"ga-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=30)
    if made.returncode != 0:  # root in a container without CAP_SYS_ADMIN, say
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the calling thread in `namespace` (threads it starts there stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class TestNetwork:
    """Namespaces `<prefix>-hub` and one per host, bridged on `<subnet>.0/24`."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str, subnet: str = "10.231.0") -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.hub = f"{prefix}-hub"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def enter(self, host: str) -> list[str]:
        """The command prefix that runs a program in `host`'s namespace."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}"]

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def _add_namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.made.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def create(self, hub_addresses: list[int]) -> None:
        """The hub and its bridge, with `subnet.N` for each N of `hub_addresses`."""
        self._add_namespace(self.hub)
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        for n in hub_addresses:
            self._ip("-n", self.hub, "addr", "add", f"{self.subnet}.{n}/24", "dev", "br0")
        self._ip("-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, host: str, n: int) -> str:
        """A namespace for `host` with address `subnet.n` on the bridge; returns the address."""
        name = self.ns(host)
        self._add_namespace(name)
        port = f"v{n}"
        self._ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", name)
        self._ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        address = f"{self.subnet}.{n}"
        self._ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip("-n", name, "link", "set", "eth0", "up")
        return address

    def delete(self) -> None:
        """Remove every namespace made (their veths go with them); safe to call twice."""
        while self.made:
            name = self.made.pop()
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
