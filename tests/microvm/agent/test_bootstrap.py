"""core.bootstrap in host mode: files land under --sysroot, env reaches execs, bad config is named."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from microvm.agent import AgentError
from tests.microvm.agent.conftest import host_agent

PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUTESTTESTTEST\n-----END CERTIFICATE-----\n"

CONFIG: dict[str, Any] = {
    "hostname": "sandbox-1",
    "root": None,
    "network": {
        "interface": "eth0",
        "mac": "02:00:00:00:00:02",
        "mtu": 1500,
        "ipv4": {
            "address": "172.16.0.2",
            "prefix_len": 30,
            "gateway": "172.16.0.1",
            "dns": ["172.16.0.1"],
        },
        "ipv6": {"address": "fd00::2", "prefix_len": 64, "gateway": "fd00::1", "dns": ["fd00::1"]},
        "hosts": {"host.microvm.internal": "172.16.0.1"},
    },
    "ca_certs": [PEM],
    "env": {"MICROVM_TEST": "yes", "PATH": "/usr/bin:/bin"},
    "mounts": [{"tag": "share0", "path": "/mnt/share", "readonly": True}],
}


def test_bootstrap_writes_guest_files_under_sysroot(agent_bin: Path, tmp_path: Path) -> None:
    sysroot = tmp_path / "root"
    (sysroot / "etc" / "ssl" / "certs").mkdir(parents=True)
    (sysroot / "etc" / "ssl" / "certs" / "ca-certificates.crt").write_text("EXISTING\n")

    async def main() -> None:
        async with host_agent(agent_bin, "--sysroot", str(sysroot)) as (c, _):
            ack = await c.bootstrap(CONFIG)
            assert set(ack["skipped"]) == {"root", "hostname", "network", "mounts"}
            with pytest.raises(AgentError, match="one-shot"):
                await c.bootstrap({})
            r = await c.exec("sh", ["-c", 'echo "$MICROVM_TEST $PATH $SSL_CERT_FILE"'])
            assert r.stdout == b"yes /usr/bin:/bin /etc/ssl/certs/ca-certificates.crt\n"

    asyncio.run(main())
    hosts = (sysroot / "etc" / "hosts").read_text()
    assert "127.0.0.1\tlocalhost" in hosts
    assert "127.0.1.1\tsandbox-1" in hosts
    assert "172.16.0.1\thost.microvm.internal" in hosts
    assert (sysroot / "etc" / "hostname").read_text() == "sandbox-1\n"
    assert (
        sysroot / "etc" / "resolv.conf"
    ).read_text() == "nameserver 172.16.0.1\nnameserver fd00::1\n"
    bundle = (sysroot / "etc" / "ssl" / "certs" / "ca-certificates.crt").read_text()
    assert bundle.startswith("EXISTING\n") and bundle.endswith(PEM)
    assert (
        sysroot / "usr" / "local" / "share" / "ca-certificates" / "microvm.crt"
    ).read_text() == PEM


def test_bootstrap_without_sysroot_touches_nothing(agent_bin: Path) -> None:
    before = Path("/etc/hosts").read_bytes()

    async def main() -> None:
        async with host_agent(agent_bin) as (c, _):
            await c.bootstrap(CONFIG)

    asyncio.run(main())
    assert Path("/etc/hosts").read_bytes() == before


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"hostname": "bad host!"}, "bad host!"),
        (
            {"network": {"interface": "eth0", "ipv4": {"address": "300.1.1.1", "prefix_len": 24}}},
            "300.1.1.1",
        ),
        (
            {"network": {"interface": "eth0", "ipv4": {"address": "10.0.0.2", "prefix_len": 33}}},
            "prefix_len",
        ),
        ({"network": {"interface": "eth0", "mac": "zz:00"}}, "zz:00"),
        ({"network": {"interface": "eth0", "mtu": 10}}, "mtu"),
        ({"network": {"interface": "eth0", "hosts": {"x": "not-an-ip"}}}, "not-an-ip"),
        ({"ca_certs": ["not a pem"]}, "ca_certs[0]"),
        ({"env": {"A=B": "x"}}, "env"),
        (
            {
                "network": {
                    "interface": "eth0",
                    "ipv6": {"address": "fd00::2", "prefix_len": 64, "dns": ["1.2.3.4"]},
                }
            },
            "1.2.3.4",
        ),
    ],
)
def test_bootstrap_rejects_bad_config(
    agent_bin: Path, tmp_path: Path, patch: dict[str, Any], needle: str
) -> None:
    async def main() -> None:
        async with host_agent(agent_bin, "--sysroot", str(tmp_path)) as (c, _):
            with pytest.raises(AgentError) as e:
                await c.bootstrap(patch)
            assert e.value.kind == "bootstrap_failed"
            assert needle in str(e.value)
            assert await c.ping() >= 0

    asyncio.run(main())
