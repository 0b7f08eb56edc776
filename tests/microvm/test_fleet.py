"""``microvm.fleet`` on a real local Ray cluster: a head node and a second node process on
this machine, each started with ``microvm fleet node`` (its own ``microvm`` slots and its
own ``$MICROVM_HOME``), real QEMU guests (TCG here) behind the real gateway, TLS proxy
and TAP uplink, talking to the TEST-NET upstream namespace of
``tests/microvm/sandbox_upstream.py``.

One pool of 4 (256 MiB guests, a domain allowlist, one secret) serves the tests in
order: placement on both nodes, every item's output, the allowlist and the secret in
every sandbox, the actor API, then the second node's raylet is SIGKILLed mid-``map``
(every item still completes exactly once; one replacement sandbox starts in the head's
spare slot), and ``close`` leaves nothing on either node. The Ray processes of the
cluster (found by its session directory, and their children) are killed by pid at the
end, also on failure. Sandboxes on both "nodes" share this host's kernel, so the leak
checks look for each node's home in command lines and for the sandboxes' link names.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rootfs
from microvm import DnsOptions, TlsOptions
from netstack import NetworkPolicy, Rule
from tests.microvm.sandbox_fixtures import (
    add_dynamic_binary,
    busybox_image,
    busybox_tree,
    leftover_kernel_objects,
    owned_processes,
)
from tests.microvm.sandbox_upstream import UPSTREAM_DNS_IP, Upstream
from tests.support import (
    cmdline,
    kill_process_tree,
    process_tree,
    require_binaries,
    require_root,
)

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
SECRET = "fleet-S3cret-77"
WEB, OTHER = "web.upstream.test", "other.upstream.test"
IMAGE = "local/fleetbox:1"


@dataclass
class Cluster:
    port: int
    temp_dir: Path
    homes: dict[str, Path]          # "head" / "second" -> $MICROVM_HOME
    node_ids: dict[str, str]        # "head" / "second" -> Ray node id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet_node(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microvm", "fleet", "node", *args,
                           "--home", str(home)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _allowlist() -> NetworkPolicy:
    return NetworkPolicy.custom(rules=[Rule.allow(WEB, protocol="tcp")])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    require_root()
    require_binaries("ip", "nft", "qemu-system-x86_64")
    with Upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Head (3 slots: one spare) + second node (2 slots), 1 CPU each, small object stores."""
    require_root()
    base = tmp_path_factory.mktemp("fleet")
    homes = {"head": base / "home-head", "second": base / "home-second"}
    tree = busybox_tree(base / "root")
    # busybox wget runs `openssl s_client` for https when it finds one on PATH; its own
    # TLS client fails the handshake with the sandbox's TLS proxy (as in test_sandbox_net)
    add_dynamic_binary(tree, "/usr/bin/openssl")
    for home in homes.values():
        busybox_image(rootfs.ImageStore(home / "images"), IMAGE, tree=tree,
                      config={"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]})
    temp_dir = Path(tempfile.mkdtemp(prefix="mvray", dir="/tmp"))  # short: socket paths
    port = _free_port()
    common = ("--num-cpus", "1", "--node-ip-address", "127.0.0.1",
              "--object-store-memory", "80000000")
    try:
        r = _fleet_node("--slots", "3", "--port", str(port), "--temp-dir", str(temp_dir),
                        *common, home=homes["head"])
        assert r.returncode == 0, r.stdout + r.stderr
        r = _fleet_node("--slots", "2", "--address", f"127.0.0.1:{port}", *common,
                        home=homes["second"])
        assert r.returncode == 0, r.stdout + r.stderr
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        by_slots = {int(n["Resources"].get("microvm", 0)): n["NodeID"]
                    for n in ray.nodes() if n["Alive"]}
        assert sorted(by_slots) == [2, 3], ray.nodes()
        yield Cluster(port, temp_dir, homes, {"head": by_slots[3], "second": by_slots[2]})
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        kill_process_tree(temp_dir)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(cluster: Cluster, upstream: Upstream) -> Iterator[Any]:
    from microvm.fleet import RaySandboxPool

    p = RaySandboxPool(
        IMAGE, 4, name="fltest", memory=256, network=_allowlist(),
        secrets=[{"env": "TOK", "value": SECRET, "host": WEB}],
        dns=DnsOptions(nameservers=(UPSTREAM_DNS_IP,), rebind_protection=False),
        tls=TlsOptions(upstream_ca_certs=(str(upstream.ca_file),)),
        pull_policy="never", item_timeout=60, max_retries=2)
    try:
        yield p
    finally:
        p.close()


def _on_every_sandbox(pool: Any, script: str) -> list[tuple[str, str, Any]]:
    """Run ``script`` once in each of the pool's 4 sandboxes: (name, node_id, output)."""
    leased = [pool.acquire(timeout=120) for _ in range(4)]
    try:
        refs = [sb.actor.shell.remote(script, timeout=60) for sb in leased]
        return [(sb.name, sb.node_id, out) for sb, out in zip(leased, ray.get(refs),
                                                               strict=True)]
    finally:
        for sb in leased:
            pool.release(sb)


# -- errors that need no boot ----------------------------------------------------------------
def test_import_microvm_never_imports_ray() -> None:
    code = ("import sys, microvm, microvm.fleet, microvm.fleet._node, microvm.cli; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_ray_absent_is_one_clear_error() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "import microvm.fleet\n"
            "try:\n"
            "    from microvm.fleet import RaySandboxPool\n"
            "except microvm.fleet.RayUnavailable as e:\n"
            "    print(type(e).__name__, isinstance(e, ImportError), e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RayUnavailable True microvm.fleet needs Ray"), r.stdout
    assert "pip install 'microvm-sandbox[ray]'" in r.stdout and len(
        r.stdout.splitlines()) == 1, r.stdout


def test_node_that_cannot_run_sandboxes_refuses_to_join(tmp_path: Path) -> None:
    env = {**os.environ, "MICROVM_KERNEL": str(tmp_path / "no-kernel")}
    r = subprocess.run([sys.executable, "-m", "microvm", "fleet", "node", "--slots", "2",
                        "--address", "127.0.0.1:1"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1, r
    assert r.stderr.strip().splitlines() == [
        f"microvm: NodeRefused: this node cannot run sandboxes: kernel: "
        f"MICROVM_KERNEL={str(tmp_path / 'no-kernel')!r} is not a file; fix: unset "
        f"MICROVM_KERNEL or point it at a file"], r.stderr
    r = subprocess.run([sys.executable, "-m", "microvm", "fleet", "node", "--slots", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "bad --slots 0: an integer from 1 to 4096" in r.stderr, r


def test_bad_pool_arguments_are_refused_before_anything_starts() -> None:
    from microvm.errors import SandboxConfigError
    from microvm.fleet import FleetConfigError, RaySandboxPool

    with pytest.raises(FleetConfigError, match=r"bad pool size 0: an integer from 1"):
        RaySandboxPool(IMAGE, 0)
    with pytest.raises(FleetConfigError, match=r"bad max_retries -1: an integer >= 0"):
        RaySandboxPool(IMAGE, 1, max_retries=-1)
    with pytest.raises(SandboxConfigError, match=r"secrets\[0\]"):
        RaySandboxPool(IMAGE, 1, secrets=[{"env": "K", "value": "v"}])
    assert not ray.is_initialized()      # refused before joining any cluster


# -- the pool on two nodes -----------------------------------------------------------------
def test_pool_size_beyond_the_cluster_slots_is_refused(cluster: Cluster) -> None:
    from microvm.fleet import FleetConfigError, RaySandboxPool

    with pytest.raises(FleetConfigError, match=r"pool size 6 exceeds the 5 sandbox slot"):
        RaySandboxPool(IMAGE, 6, network="none")


def test_sandboxes_are_placed_on_both_nodes(pool: Any, cluster: Cluster) -> None:
    assert pool.nodes() == {cluster.node_ids["head"]: 2, cluster.node_ids["second"]: 2}
    # each actor says where it runs, from inside (Ray's runtime context on its node)
    seen = _on_every_sandbox(pool, "hostname")
    reported = [ray.get(_actor_of(pool, name).node_id.remote()) for name, _, _ in seen]
    assert sorted(reported) == sorted(node for _, node, _ in seen)
    assert set(reported) == set(cluster.node_ids.values())


def _actor_of(pool: Any, name: str) -> Any:
    return next(s.actor for s in pool._slots.values() if s.name == name)


def test_map_collects_every_items_output(pool: Any, cluster: Cluster) -> None:
    results = list(pool.map("echo item-$1 $(hostname)", range(12)))
    assert sorted(r.index for r in results) == list(range(12))
    for r in results:
        assert r.ok and r.unwrap().stdout_text.startswith(f"item-{r.item} "), r
    assert {r.node_id for r in results} == set(cluster.node_ids.values())
    ordered = [r.index for r in pool.map("echo $1", range(6), ordered=True)]
    assert ordered == list(range(6))


def test_map_runs_callables_on_the_sandboxes_node(pool: Any, cluster: Cluster) -> None:
    def sync_fn(sb: Any, x: int) -> tuple[str, str]:      # a blocking Sandbox, in a thread
        return sb.shell(f"echo $(({x} * 2))").stdout_text, ray.get_runtime_context(
        ).get_node_id()

    async def async_fn(sb: Any, x: int) -> str:           # the AsyncSandbox itself
        return (await sb.exec("/bin/echo", [f"a{x}"])).stdout_text

    def boom(sb: Any, x: int) -> None:
        raise ValueError(f"bad item {x}")

    got = sorted((r.index, r.unwrap()) for r in pool.map(sync_fn, range(4)))
    assert [v[0] for _, v in got] == ["0\n", "2\n", "4\n", "6\n"]
    assert {v[1] for _, v in got} <= set(cluster.node_ids.values())
    assert sorted(r.unwrap() for r in pool.map(async_fn, [1, 2])) == ["a1\n", "a2\n"]
    [failed] = list(pool.map(boom, [7]))
    assert not failed.ok and failed.attempts == 1          # its own exception: no retry
    assert failed.error == "ValueError: bad item 7"
    from microvm.fleet import ItemFailed

    with pytest.raises(ItemFailed, match=r"item 0 failed after 1 attempt\(s\): ValueError"):
        failed.unwrap()


def test_an_item_that_times_out_is_retried_then_reported(pool: Any) -> None:
    results = list(pool.map("[ $1 = slow ] && sleep 30; echo $1", ["slow", "fast"],
                            timeout=2, max_retries=1))
    by_item = {r.item: r for r in results}
    assert len(results) == 2 and by_item["fast"].unwrap().stdout_text == "fast\n"
    slow = by_item["slow"]
    assert not slow.ok and slow.attempts == 2 and "timed out after 2" in str(slow.error), slow


def test_allowlist_is_enforced_in_every_sandbox(pool: Any, cluster: Cluster) -> None:
    script = (f"wget -q -O - http://{WEB}/allowed; echo rc=$?; "
              f"nslookup -type=a {OTHER} 2>&1; echo rc=$?")
    got = _on_every_sandbox(pool, script)
    assert {node for _, node, _ in got} == set(cluster.node_ids.values())
    for name, _, out in got:
        text = out.stdout_text
        assert text.startswith("hello from upstream /allowed"), (name, text)
        assert "NXDOMAIN" in text and text.rstrip().endswith("rc=1"), (name, text)


def test_secret_is_substituted_on_the_node_that_serves_it(pool: Any, cluster: Cluster,
                                                          upstream: Upstream) -> None:
    n0 = len(upstream.requests())
    got = _on_every_sandbox(pool, f'echo "[$TOK]"; wget -q -O - --header '
                                  f'"Authorization: Bearer $TOK" https://{WEB}/auth')
    for name, _, out in got:
        assert out.stdout_text == f"[$MSB_TOK]\nauth=Bearer {SECRET}\n", (name, out)
    auth = [r["authorization"] for r in upstream.requests()[n0:] if r["path"] == "/auth"]
    assert auth == [f"Bearer {SECRET}"] * 4
    # never logged: not in any Ray log of the session, nor in a node's sandbox files
    leaks = []
    for root in (cluster.temp_dir, *cluster.homes.values()):
        for f in root.rglob("*"):
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_size < 50_000_000 and \
                        SECRET.encode() in f.read_bytes():
                    leaks.append(str(f))
    assert [f for f in leaks if "/plasma" not in f and "spill" not in f] == [], leaks


def test_actor_exec_stream_files_and_metrics(pool: Any, cluster: Cluster) -> None:
    sb = pool.acquire(timeout=120)
    try:
        ray.get(sb.actor.fs_write.remote("/tmp/in.txt", b"from the driver\n"))
        assert ray.get(sb.actor.fs_read.remote("/tmp/in.txt")) == b"from the driver\n"
        events = [ray.get(ref) for ref in sb.actor.exec_stream.remote(
            "/bin/sh", ["-c", "cat /tmp/in.txt; echo err >&2; exit 3"])]
        kinds = [e.kind for e in events]
        assert kinds[0] == "started" and kinds[-1] == "exited", kinds
        assert b"".join(e.data for e in events if e.kind == "stdout") == b"from the driver\n"
        assert b"".join(e.data for e in events if e.kind == "stderr") == b"err\n"
        assert events[-1].exit_code == 3
        m = ray.get(sb.actor.metrics.remote())
        assert m["node_id"] == sb.node_id and m["name"] == sb.name and "memory" in m
        assert sb.exec("/bin/echo", ["hi"]).stdout_text == "hi\n"
    finally:
        pool.release(sb)


def test_second_node_dies_mid_map_every_item_completes_once(pool: Any,
                                                            cluster: Cluster) -> None:
    second = cluster.node_ids["second"]
    raylet = [p for p in process_tree(cluster.temp_dir)
              if "raylet/raylet" in cmdline(p) and f"--node_id={second}" in cmdline(p)]
    assert len(raylet) == 1, raylet
    doomed = {s.name for s in pool._slots.values() if s.node_id == second}
    n = 16
    results = []
    killed = False
    for r in pool.map("sleep 2; echo done-$1", range(n)):
        results.append(r)
        if not killed and len(results) >= 2:
            os.kill(raylet[0], signal.SIGKILL)
            killed = True
    assert killed
    indices = [r.index for r in results]
    assert sorted(indices) == list(range(n)), indices          # each exactly once
    for r in results:
        assert r.ok and r.unwrap().stdout_text == f"done-{r.item}\n", r
    assert any(r.attempts > 1 for r in results), [r.attempts for r in results]
    # the dead sandboxes were replaced where a slot was free (the head's spare one)
    assert pool.nodes() == {cluster.node_ids["head"]: 3}
    # nothing of the dead node's sandboxes keeps running: no supervisor or QEMU from its
    # home, no namespace/link/nft table of theirs
    deadline = time.monotonic() + 60
    while owned_processes(cluster.homes["second"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert owned_processes(cluster.homes["second"]) == []
    # every pool sandbox's kernel objects share the name head "fltest"; their token
    # (the rest) is per sandbox: only the 3 live sandboxes' tokens are left
    assert doomed and _uplink_tokens({"fltest"}) == 3, leftover_kernel_objects({"fltest"})


def _uplink_tokens(heads: set[str]) -> int:
    """How many sandboxes' uplinks (distinct name tokens) exist for these name heads."""
    tokens = {re.sub(r"^(microvm-|microvm_|mvt|mvp|mvh)", "", obj.split()[-1])
              for obj in leftover_kernel_objects(heads)}
    return len(tokens)


def test_close_leaves_nothing_on_either_node(pool: Any, cluster: Cluster) -> None:
    names = {s.name for s in pool._slots.values()}
    pool.close()
    from microvm import Sandbox
    from microvm.fleet._node import sweep_home

    assert owned_processes(cluster.homes["head"]) == []
    assert owned_processes(cluster.homes["second"]) == []
    assert leftover_kernel_objects(names) == []
    old = os.environ.get("MICROVM_HOME")
    try:
        os.environ["MICROVM_HOME"] = str(cluster.homes["head"])
        assert [i.name for i in Sandbox.list()] == []            # swept by close()
        # the dead node's home keeps only stopped records until `microvm fleet node`
        # starts there again and sweeps them
        os.environ["MICROVM_HOME"] = str(cluster.homes["second"])
        assert {i.state for i in Sandbox.list()} <= {"stopped", "crashed"}
        sweep_home()
        assert [i.name for i in Sandbox.list()] == []
    finally:
        if old is None:
            os.environ.pop("MICROVM_HOME", None)
        else:
            os.environ["MICROVM_HOME"] = old
    for home in cluster.homes.values():
        root = home / "sandboxes"
        assert not root.exists() or list(root.iterdir()) == [], list(root.iterdir())
    assert not re.search(SECRET, repr(pool))
