"""``microvm fleet ...``: set up a machine as a node of a Ray fleet (no Ray import here).

``microvm fleet node --slots N [--address HEAD]`` checks that this machine can run
sandboxes (QEMU, a guest kernel, ``/dev/net/tun`` and root for networked sandboxes,
Ray installed), refusing to join with one line naming the first problem (exit 1);
sweeps stopped fleet leftovers from ``$MICROVM_HOME``; then runs ``ray start`` with
``--resources '{"microvm": N}'`` (a head node without ``--address``). ``microvm fleet
check`` runs the checks alone.

Example::

    microvm fleet node --slots 4                          # the head
    microvm fleet node --slots 4 --address 10.0.0.1:6379  # another machine joins
"""

from __future__ import annotations

import click

__all__ = ["fleet"]


@click.group()
def fleet() -> None:
    """Sandboxes across a Ray cluster: node set-up (see `microvm fleet node --help`).

    Example::

        microvm fleet node --slots 4
    """


@fleet.command("check")
@click.option("--no-network", is_flag=True,
              help="the node will run only network='none' sandboxes (no TAP uplink)")
def check(no_network: bool) -> None:
    """Say whether this machine can run fleet sandboxes (exit 1 with the first reason).

    Example::

        microvm fleet check
    """
    from microvm.fleet._node import check_node

    check_node(network=not no_network)
    click.echo("ok: this node can run sandboxes")


@fleet.command("node", context_settings={"ignore_unknown_options": True})
@click.option("--slots", type=int, required=True, metavar="N",
              help="sandboxes this node may run (Ray custom resource 'microvm')")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="the head node to join (default: start a head node)")
@click.option("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here")
@click.option("--port", type=int, default=None, help="the head's GCS port (head only)")
@click.option("--node-ip-address", default=None, help="the address this node advertises")
@click.option("--object-store-memory", "object_store", type=int, default=None,
              metavar="BYTES", help="Ray object store size")
@click.option("--temp-dir", default=None, help="Ray's session directory root (head only)")
@click.option("--home", default=None, type=click.Path(file_okay=False),
              help="$MICROVM_HOME for this node's sandboxes")
@click.option("--no-network", is_flag=True,
              help="the node will run only network='none' sandboxes (no TAP uplink)")
@click.argument("ray_args", nargs=-1, type=click.UNPROCESSED)
def node(slots: int, address: str | None, num_cpus: int | None, port: int | None,
         node_ip_address: str | None, object_store: int | None, temp_dir: str | None,
         home: str | None, no_network: bool, ray_args: tuple[str, ...]) -> int:
    """Check this machine, then `ray start` it with N 'microvm' slots (extra arguments
    after `--` go to `ray start`).

    Example::

        microvm fleet node --slots 2 --address 10.0.0.1:6379 -- --block
    """
    from microvm.fleet._node import join

    return join(slots, address=address, network=not no_network, num_cpus=num_cpus,
                port=port, node_ip_address=node_ip_address, object_store_bytes=object_store,
                temp_dir=temp_dir, home=home, extra=ray_args)
