"""Snapshots of the kernel networking objects tests create, for leak assertions."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

PREFIXES = ("microvm-", "microvm_", "mvh", "mvp", "mvt", "mvg", "mvu")


@dataclass(frozen=True)
class Snapshot:
    """Names of namespaces, host links and host nft tables (all, and ours by prefix)."""

    netns: frozenset[str]
    links: frozenset[str]
    nft_tables: frozenset[str]

    def ours(self) -> dict[str, set[str]]:
        """Only the objects whose names carry one of our prefixes."""
        return {k: {n for n in getattr(self, k) if n.startswith(PREFIXES)}
                for k in ("netns", "links", "nft_tables")}

    def counts(self) -> dict[str, int]:
        """Counts of our objects per kind."""
        return {k: len(v) for k, v in self.ours().items()}


def snapshot() -> Snapshot:
    """The current host namespace's objects."""
    with IPRoute() as ipr:
        links = frozenset(str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    tables = frozenset(str(item["table"]["name"]) for item in json.loads(out)["nftables"]
                       if "table" in item)
    return Snapshot(frozenset(netns.listnetns()), links, tables)


def netns_links(name: str) -> set[str]:
    """Link names inside network namespace ``name``."""
    out = subprocess.run(["ip", "-n", name, "-j", "link"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return {str(item["ifname"]) for item in json.loads(out)}
