"""Two network namespaces joined by a veth pair: two "nodes" on one machine that reach each other
only over their two addresses (needs root and iproute2)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def veth_pair(prefix: str, iface: str, addrs: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """Namespaces ``pt{prefix}a/b<pid>`` with ``iface`` on ``addrs`` (a /24), named after this
    process so parallel sessions do not collide; deleted afterwards (each takes its veth end along)."""
    tag = f"{os.getpid() % 100000}"
    names = (f"pt{prefix}a{tag}", f"pt{prefix}b{tag}")
    ends = (f"v{prefix}a{tag}", f"v{prefix}b{tag}")
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for ns, end, addr in zip(names, ends, addrs):
            sh("ip", "link", "set", end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", end, "name", iface)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            sh("ip", "-n", ns, "link", "set", iface, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
