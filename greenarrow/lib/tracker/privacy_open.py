"""Apple Mail Privacy Protection (MPP) opens: `is_privacy_open` of engine_open.

MPP fetches every remote image of a message through Apple's proxies when
the message arrives, read or not. Such a fetch is recognised by two signals
together (shared/spec EVENTS.md section 4):

- the address is in Apple's published iCloud Private Relay egress ranges
  (`https://mask-api.icloud.com/egress-ip-ranges.csv`, rows
  `CIDR,country,region,city`), which the proxies share; and
- the User-Agent is the bare Apple WebKit string the proxies send, with no
  browser or client token after `(KHTML, like Gecko)` (a person's Safari
  says `Version/... Safari/...`, Gmail's proxy says `GoogleImageProxy`).

The ranges ship with the package (`apple_egress_ranges.txt.gz`, collapsed
CIDRs, one a line) and an operator refreshes them with
`greenarrow tracker refresh-mpp-ranges FILE`, which installs a newer copy
under `var/` (this machine has no network: the operator downloads the CSV).
Such opens are recorded and flagged, never dropped.
"""

from __future__ import annotations

import gzip
import ipaddress
import os
import re
from bisect import bisect_right
from pathlib import Path

SHIPPED = Path(__file__).with_name("apple_egress_ranges.txt.gz")
INSTALLED_NAME = "tracker.mpp-ranges.txt.gz"  # under the install root's var/

# The agent of an MPP proxy fetch: nothing after "(KHTML, like Gecko)".
MPP_AGENT = re.compile(r"^Mozilla/5\.0 \([^()]*\) AppleWebKit/[0-9.]+ \(KHTML, like Gecko\)$")


class RangesError(ValueError):
    """A ranges file that cannot be read (names the file and the line)."""


class EgressRanges:
    """A set of address ranges, searched with bisect over sorted, disjoint (start, end) ints."""

    __slots__ = ("_starts4", "_ends4", "_starts6", "_ends6", "source", "count")

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 source: str = "") -> None:
        v4 = [n for n in networks if n.version == 4]
        v6 = [n for n in networks if n.version == 6]
        self._starts4, self._ends4 = _spans(v4)
        self._starts6, self._ends6 = _spans(v6)
        self.source = source
        self.count = len(self._starts4) + len(self._starts6)

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        starts, ends = ((self._starts4, self._ends4) if ip.version == 4
                        else (self._starts6, self._ends6))
        value = int(ip)
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]


def _spans(networks: list) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for net in ipaddress.collapse_addresses(networks):
        first, last = int(net.network_address), int(net.broadcast_address)
        if ends and first == ends[-1] + 1:  # adjacent blocks of different sizes: one span
            ends[-1] = last
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


def parse_ranges(text: str, name: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDRs from Apple's CSV (`CIDR,country,region,city`) or from a plain list, one a line.

    Blank lines and `#` comments are skipped; anything else that is not a
    CIDR is a RangesError naming the file and line.
    """
    networks = []
    for number, line in enumerate(text.splitlines(), 1):
        cidr = line.split(",", 1)[0].strip()
        if not cidr or cidr.startswith("#"):
            continue
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise RangesError(f"{name}:{number}: not an address range: {cidr[:60]!r}") from None
    return networks


def read_ranges(path: Path) -> EgressRanges:
    """The ranges of a gzip file written by `write_ranges` (or shipped)."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise RangesError(f"{path}: not a gzip file of address ranges ({e})") from None
    return EgressRanges(parse_ranges(text, str(path)), str(path))


def write_ranges(networks: list, path: Path, comment: str) -> int:
    """Write the collapsed ranges as gzip text, atomically (tmp + rename); the count written."""
    v4 = list(ipaddress.collapse_addresses(n for n in networks if n.version == 4))
    v6 = list(ipaddress.collapse_addresses(n for n in networks if n.version == 6))
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [str(n) for n in v4 + v6]
    data = gzip.compress(("\n".join(lines) + "\n").encode("ascii"), compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(v4) + len(v6)


def installed_path(var_dir: Path) -> Path:
    return Path(var_dir) / INSTALLED_NAME


def load(var_dir: Path) -> EgressRanges:
    """The operator's refreshed ranges when installed, else the shipped ones."""
    path = installed_path(var_dir)
    return read_ranges(path if path.exists() else SHIPPED)


def is_privacy_open(ranges: EgressRanges, address: str, user_agent: str) -> bool:
    """True when an open comes from an Apple proxy address with the proxies' agent."""
    return bool(MPP_AGENT.match(user_agent)) and address in ranges


def install(var_dir: Path, source: Path) -> tuple[int, Path]:
    """Install Apple's CSV (or a plain CIDR list) at `source` as the ranges the tracker uses.

    RangesError naming the file for a line that is no range, or for a file
    without any (an empty download must not switch detection off).
    """
    try:
        text = Path(source).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise RangesError(f"{source}: cannot read ({e})") from None
    networks = parse_ranges(text, str(source))
    if not networks:
        raise RangesError(f"{source}: no address ranges in it")
    target = installed_path(var_dir)
    count = write_ranges(networks, target, f"installed from {source}")
    return count, target
