"""A shaped link for benchmarks: two network namespaces joined by one veth pair.

``NAME-reg`` holds the servers (address ``SUBNET.1/30``), ``NAME-node`` the clients
(``SUBNET.2/30``); ``tc tbf`` shapes the egress of both veth ends (or nothing, unshaped). No
address exists outside the two namespaces, and :meth:`NetnsLink.teardown` deletes them
(also those a killed run left behind, at :meth:`NetnsLink.setup`). Each benchmark uses its
own NAME and SUBNET, so two of them never share a link.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

PREFIX_LEN: Final = 30


def tbf_for_rate(rate_bps: int) -> list[str]:
    """``tc`` qdisc arguments for ``rate_bps``: a burst of at least rate/HZ (250) and a few
    jumbo frames, and 50 ms of queue."""
    burst = max(256 * 1024, rate_bps // 8 // 250)
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", "50ms"]


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetnsLink:
    """The namespaces ``NAME-reg`` and ``NAME-node``, veth ``NAME-r`` / ``NAME-n`` (NAME of
    at most 13 characters), ``qdisc`` on both ends (None: unshaped)."""

    def __init__(self, name: str, subnet: str, qdisc: Sequence[str] | None) -> None:
        if len(name) > 13:
            raise ValueError(f"link name {name!r}: at most 13 characters (veth names have 15)")
        self.ns_reg = f"{name}-reg"
        self.ns_node = f"{name}-node"
        self.veth_reg = f"{name}-r"
        self.veth_node = f"{name}-n"
        self.addr_reg = f"{subnet}.1"
        self.addr_node = f"{subnet}.2"
        self.qdisc = list(qdisc) if qdisc is not None else None

    @staticmethod
    def exists(ns: str) -> bool:
        return Path(f"/run/netns/{ns}").exists()

    def setup(self) -> dict[str, Any]:
        self.teardown()  # a killed run may have left them
        reg, node = self.ns_reg, self.ns_node
        cmds = [
            ["ip", "netns", "add", reg],
            ["ip", "netns", "add", node],
            ["ip", "-n", reg, "link", "add", self.veth_reg, "type", "veth", "peer", "name", self.veth_node,
             "netns", node],
            ["ip", "-n", reg, "addr", "add", f"{self.addr_reg}/{PREFIX_LEN}", "dev", self.veth_reg],
            ["ip", "-n", node, "addr", "add", f"{self.addr_node}/{PREFIX_LEN}", "dev", self.veth_node],
            ["ip", "-n", reg, "link", "set", "lo", "up"],
            ["ip", "-n", node, "link", "set", "lo", "up"],
            ["ip", "-n", reg, "link", "set", self.veth_reg, "up"],
            ["ip", "-n", node, "link", "set", self.veth_node, "up"],
        ]
        if self.qdisc is not None:
            cmds += [["tc", "-n", reg, "qdisc", "add", "dev", self.veth_reg, "root", *self.qdisc],
                     ["tc", "-n", node, "qdisc", "add", "dev", self.veth_node, "root", *self.qdisc]]
        for argv in cmds:
            _run(argv)
        shown = _run(["tc", "-n", reg, "qdisc", "show", "dev", self.veth_reg]).stdout.strip()
        return {"namespaces": [reg, node], "addresses": {reg: f"{self.addr_reg}/{PREFIX_LEN}",
                                                         node: f"{self.addr_node}/{PREFIX_LEN}"},
                "qdisc": shown}

    def teardown(self) -> None:
        for ns in (self.ns_reg, self.ns_node):
            if self.exists(ns):
                _run(["ip", "netns", "del", ns], check=False)

    def rx_bytes(self) -> int:
        """Bytes the node's end of the veth received so far."""
        out = _run(["ip", "-n", self.ns_node, "-j", "-s", "link", "show", "dev", self.veth_node]).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    @contextlib.contextmanager
    def up(self) -> Iterator[dict[str, Any]]:
        """Set up, yield what :meth:`setup` says, tear down."""
        try:
            yield self.setup()
        finally:
            self.teardown()


__all__ = ["PREFIX_LEN", "NetnsLink", "tbf_for_rate"]
