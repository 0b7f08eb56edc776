"""Pulling: manifests, configs and layers from a registry into the blob store.

Every blob is verified against its digest before it is published; a file lock per
reference makes concurrent pulls of one image share the work, and a lock per blob
fetches each layer once. The HTTP side is :class:`rootfs._registry.RegistryClient`.

Example::

    img = pull_image(store, parse_reference("127.0.0.1:5000/busybox:latest"),
                     client=RegistryClient("127.0.0.1:5000", insecure=True),
                     policy="if-missing", platform="linux/amd64", progress=None,
                     max_workers=4)
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

from rootfs._blobs import BlobDir
from rootfs._fs import atomic_replace, lock
from rootfs._image import (
    INDEX_TYPES,
    Descriptor,
    Image,
    choose_platform,
    parse_config,
    parse_json,
    parse_manifest,
)
from rootfs._reference import Reference
from rootfs._registry import ProgressFn, RegistryClient
from rootfs.errors import AuthError, DigestError, ImageNotFoundError, RegistryError

PullPolicy = Literal["always", "if-missing", "never"]
POLICIES: tuple[str, ...] = get_args(PullPolicy)


def pull_image(store: BlobDir, r: Reference, *, client: RegistryClient, policy: PullPolicy,
               platform: str, progress: ProgressFn | None, max_workers: int) -> Image:
    """Fetch ``r`` through ``client`` into ``store`` and tag it (see ``ImageStore.pull``).

    The caller has checked ``policy`` and looked the image up already (``policy`` is
    ``always`` or ``if-missing``).

    Example::

        pull_image(store, r, client=client, policy="always", platform=host_platform(),
                   progress=None, max_workers=4)
    """
    with lock(store.home / "locks", "ref-" + hashlib.sha256(str(r).encode()).hexdigest()):
        if policy == "if-missing":
            found = store.lookup(r)
            if found is not None:
                return found
        body, mt, digest = client.get_manifest(r.repository, r.selector)
        obj = parse_json(body, f"manifest of {r}")
        if mt in INDEX_TYPES or "manifests" in obj:
            store.put_blob(body, digest)
            chosen = choose_platform(obj, platform, str(r))
            body, mt, digest = client.get_manifest(r.repository, chosen.digest)
        config_desc, layers = parse_manifest(body, f"manifest of {r}")
        if not store.has_blob(config_desc.digest):
            fetch_blob(store, client, r, config_desc, None)
        parse_config(store.read_blob(config_desc.digest), len(layers), f"config of {r}")
        missing = [ly for ly in layers if not store.has_blob(ly.digest)]
        for ly in layers:
            if ly not in missing:
                os.utime(store.blob_path(ly.digest))  # fresh again: prune keeps it
        if missing:
            workers = max(1, min(max_workers, len(missing)))
            with ThreadPoolExecutor(workers) as pool:
                futs = [pool.submit(fetch_blob, store, client, r, ly, progress)
                        for ly in missing]
                for fut in futs:
                    fut.result()
        store.put_blob(body, digest)
        return store.tag(r, digest)


def fetch_blob(store: BlobDir, client: RegistryClient, r: Reference, desc: Descriptor,
               progress: ProgressFn | None) -> None:
    """Download blob ``desc`` of ``r`` into ``store`` (once, whoever else wants it).

    A connection dropped mid-stream restarts the blob, up to ``client.retries`` times.

    Example::

        fetch_blob(store, client, r, img.layers[0], None)
    """
    with lock(store.home / "locks", "blob-" + desc.digest.partition(":")[2]):
        if store.has_blob(desc.digest):
            if progress is not None:
                progress(desc.digest, desc.size, desc.size)
            return
        with atomic_replace(store.blob_path(desc.digest), 0o444, tmp_dir=store.home / "tmp",
                            prefix="blob-") as tmp, open(tmp, "wb") as f:
            attempt = 0
            while True:
                try:
                    client.fetch_blob(r.repository, desc.digest, f, size=desc.size,
                                      progress=progress)
                    break
                except (AuthError, DigestError, ImageNotFoundError):
                    raise
                except RegistryError:
                    # A connection dropped mid-stream: start the blob again.
                    if attempt >= client.retries:
                        raise
                    time.sleep(client.backoff * (2 ** attempt))
                    attempt += 1
                    f.seek(0)
                    f.truncate()
