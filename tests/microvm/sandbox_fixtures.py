"""Shared helpers and fixtures for the ``microvm.Sandbox`` end-to-end tests.

Stable names other test modules may import (keep them):

* :func:`busybox_tree` / :func:`busybox_image`: a tiny root (Debian's static busybox,
  every applet linked under ``/bin``, ``/etc/passwd`` ...) and a ``rootfs.Image`` of it;
* :func:`add_dynamic_binary`: copy a host executable and the shared libraries ``ldd``
  names into a root (e.g. ``/usr/bin/openssl``);
* fixture ``sandbox_home`` (module scope; import ``sandbox_home_fixture`` to use it): a private ``$MICROVM_HOME`` for the module,
  and on teardown every sandbox still recorded there is removed, then the module must
  have left nothing behind: no process running from that home, no network namespace,
  link or nft table of a sandbox it created (:func:`assert_nothing_left`);
* :func:`owned_processes` / :func:`leftover_kernel_objects`: the leak probes;
* :func:`microvm_cli`: the real ``microvm`` command in a subprocess (exit status and
  "no traceback" asserted).

Example::

    from tests.microvm.sandbox_fixtures import busybox_image, sandbox_home_fixture  # noqa: F401

    def test_x(sandbox_home: Path) -> None:
        img = busybox_image(rootfs.ImageStore())
        with Sandbox.create("x", image=img, network="none") as sb:
            assert sb.shell("echo hi").stdout_text == "hi\\n"
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import pytest

import rootfs

__all__ = [
    "add_dynamic_binary",
    "assert_nothing_left",
    "busybox_image",
    "busybox_tree",
    "leftover_kernel_objects",
    "microvm_cli",
    "owned_processes",
    "sandbox_home",
    "sandbox_home_fixture",
]

BUSYBOX = "/bin/busybox"


def busybox_tree(dest: Path) -> Path:
    """A minimal root at ``dest``: ``/bin/busybox`` (Debian's static build) with every applet
    linked beside it, the usual empty mount points and ``/etc/passwd``/``group``.

    Example::

        root = busybox_tree(tmp_path / "root")
    """
    if not Path(BUSYBOX).is_file():
        pytest.skip("needs Debian's busybox-static (/bin/busybox)")
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "mnt", "home", "var/www"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
    for a in applets:
        if a != "busybox" and not (dest / "bin" / a).exists():
            os.symlink("busybox", dest / "bin" / a)
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    return dest


def add_dynamic_binary(root: Path, binary: str | os.PathLike[str]) -> Path:
    """Copy host executable ``binary`` into ``root`` at the same path, with every shared
    library ``ldd`` lists for it (and the dynamic loader). Returns the copied path.

    Example::

        add_dynamic_binary(root, "/usr/bin/openssl")   # then run /usr/bin/openssl in the guest
    """
    src = Path(shutil.which(os.fspath(binary)) or binary)
    if not src.is_file():
        pytest.skip(f"needs {binary}")
    out = subprocess.run(["ldd", str(src)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    files = [src, *(Path(p) for p in re.findall(r"(/\S+)\s+\(0x", out))]
    for f in files:
        dst = root / f.relative_to("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.resolve(), dst)
    return root / src.relative_to("/")


def busybox_image(store: rootfs.ImageStore, ref: str = "local/busybox:1", *,
                  config: Mapping[str, Any] | None = None, tree: Path | None = None
                  ) -> rootfs.Image:
    """A ``rootfs.Image`` of :func:`busybox_tree` (or of ``tree``) in ``store``.

    ``config`` is the OCI image config (default: ``Cmd ["/bin/sh"]``, ``PATH=/bin``).

    Example::

        img = busybox_image(rootfs.ImageStore(), config={"Cmd": ["/bin/echo", "hi"]})
    """
    import tempfile

    cfg = dict(config) if config is not None else {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    if tree is not None:
        return rootfs.build_image(tree, ref, store, config=cfg)
    with tempfile.TemporaryDirectory(prefix="bbtree-") as tmp:
        return rootfs.build_image(busybox_tree(Path(tmp) / "root"), ref, store, config=cfg)


@overload
def microvm_cli(*argv: str, text: Literal[False] = False, check: int | None = 0,
                stdin: bytes | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess[bytes]: ...
@overload
def microvm_cli(*argv: str, text: Literal[True], check: int | None = 0,
                env: Mapping[str, str] | None = None, timeout: float = 240
                ) -> subprocess.CompletedProcess[str]: ...
def microvm_cli(*argv: str, text: bool = False, check: int | None = 0,
                stdin: bytes | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess[Any]:
    """``python -m microvm ARGV`` in a subprocess (stdin: the bytes ``stdin`` or
    /dev/null; environment: ``env`` or this process's), its output captured (``str``
    with ``text=True``, else ``bytes``). With ``check`` (not None) assert that exit
    status; always assert that stderr holds no Python traceback.

    Example::

        assert microvm_cli("ls", "-a", "-q", text=True).stdout == ""
    """
    r = subprocess.run([sys.executable, "-m", "microvm", *argv], input=stdin,
                       capture_output=True, text=text, timeout=timeout,
                       env=dict(os.environ if env is None else env),
                       stdin=None if stdin is not None else subprocess.DEVNULL)
    err = r.stderr if text else r.stderr.decode(errors="replace")
    if check is not None:
        assert r.returncode == check, (argv, r.returncode, err)
    assert "Traceback" not in err, err
    return r


# -- leak probes ------------------------------------------------------------------------------
def _run_dirs(home: Path) -> list[str]:
    """Every runtime directory the sandboxes under ``home`` may use (in-tree or $TMPDIR)."""
    from microvm.sandbox._paths import SandboxPaths

    root = home / "sandboxes"
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    out = []
    for n in names:
        d = (root / n).absolute()
        out.append(str(SandboxPaths(d).run))
        out.append("mvsb-" + hashlib.sha256(str(d).encode()).hexdigest()[:16])
    return out


def owned_processes(home: Path, extra_markers: tuple[str, ...] = ()) -> list[str]:
    """``pid cmdline`` of every live process whose command line names ``home`` (the
    supervisors and the VMMs of the sandboxes there) or one of ``extra_markers``.

    Example::

        assert owned_processes(home) == []
    """
    markers = (str(home), *_run_dirs(home), *extra_markers)
    me = os.getpid()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in markers):
            found.append(f"{p.name} {cmd.strip()}")
    return found


def leftover_kernel_objects(names: Iterable[str]) -> list[str]:
    """The network namespaces, host links and nft tables of the TAP uplinks of sandboxes
    ``names`` that still exist.

    A sandbox's uplink objects are named ``<prefix><token>`` with a token that starts
    with the first six lowercase letters/digits of the sandbox name (then a hash of a
    per-run suffix): give sandboxes distinctive names of six or more such characters.

    Example::

        assert leftover_kernel_objects({"sbweb1"}) == []
    """
    from tests.netstack_gateway.kernel_objects import snapshot

    heads = {re.sub(r"[^a-z0-9]", "", n.lower())[:6] for n in names}
    heads.discard("")
    snap = snapshot()
    left = []
    for kind, objs in (("netns", snap.netns), ("link", snap.links),
                       ("nft table", snap.nft_tables)):
        for obj in objs:
            m = re.match(r"^(microvm-|microvm_|mvt|mvp|mvh)(.*)$", obj)
            if m and any(m.group(2).startswith(h) for h in heads):
                left.append(f"{kind} {obj}")
    return sorted(left)


def assert_nothing_left(home: Path, names: set[str]) -> None:
    """No process from ``home``, no kernel object of sandboxes ``names``, no sandbox record
    or directory left (the module's final check).

    Example::

        assert_nothing_left(home, {"web"})
    """
    from microvm import Sandbox

    procs = owned_processes(home)
    assert procs == [], f"processes left behind: {procs}"
    objs = leftover_kernel_objects(names)
    assert objs == [], f"network objects left behind: {objs}"
    assert [i.name for i in Sandbox.list()] == []
    root = home / "sandboxes"
    assert not root.exists() or list(root.iterdir()) == [], list(root.iterdir())


@pytest.fixture(scope="module", name="sandbox_home")
def sandbox_home_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ``$MICROVM_HOME`` for the whole module (sandboxes there may be shared by
    its tests). Teardown removes whatever sandbox is still recorded, then asserts that
    nothing is left (:func:`assert_nothing_left`, for every sandbox name seen under
    ``$MICROVM_HOME/sandboxes``, in the state database, or created by this process)."""
    from microvm import Sandbox
    from microvm.sandbox._state import StateDB

    home = tmp_path_factory.mktemp("sbhome")
    seen: set[str] = set()
    insert = StateDB.insert

    def recording_insert(self: StateDB, name: str, **kw: Any) -> None:
        seen.add(name)           # a spy: every sandbox this process creates is checked
        insert(self, name, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROVM_HOME", str(home))
        mp.setattr(StateDB, "insert", recording_insert)
        try:
            yield home
        finally:
            root = home / "sandboxes"
            if root.is_dir():
                seen |= {p.name for p in root.iterdir()}
            for info in Sandbox.list():
                seen.add(info.name)
                with contextlib.suppress(Exception):
                    Sandbox.remove(info.name, timeout=5)
            assert_nothing_left(home, seen)


#: the fixture under its stable name; a test module imports ``sandbox_home_fixture``
#: (with a noqa F401 comment) so that its tests can take a ``sandbox_home`` argument
#: without a lint clash
sandbox_home = sandbox_home_fixture
