"""microvm.ssh benchmark: one real guest (busybox), Debian's OpenSSH client against
``microvm ssh serve`` on loopback, side by side with the Sandbox API in the same run.

* ``ssh host true`` (a new OpenSSH connection each time: key exchange, auth, session)
  vs ``sb.shell("true")`` (``ssh_vs_exec_ratio`` = exec time / ssh time; 1.0 is parity);
  plus ``true`` on an established in-process connection (``ssh_session_vs_exec_ratio``);
* ``sftp put`` / ``get`` of one file vs ``sb.fs.copy_from_host`` / ``copy_to_host``
  (``sftp_vs_fs_ratio`` = SFTP put throughput / fs write throughput, target >= 0.5;
  ``sftp_get_vs_fs_ratio`` the same for reads).

    python -m benchmarks.ssh [--quick]     # last line: one JSON object
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import quick_main


def _median_ms(fn: Any, n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1000


def measure(quick: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
    os.environ["MICROVM_HOME"] = str(tmp / "home")
    import rootfs
    from microvm import Sandbox
    from tests.microvm.sandbox_fixtures import busybox_image

    n = 10 if quick else 40
    size = (32 if quick else 128) << 20
    img = busybox_image(rootfs.ImageStore(tmp / "home" / "images"), "local/bench-ssh:1")
    sb = Sandbox.create("bench-ssh", image=img, network="none", memory=512)
    serve: subprocess.Popen[bytes] | None = None
    try:
        key = tmp / "id"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
        from microvm.ssh import authorize, host_key
        from microvm.ssh._keys import known_hosts_path, write_known_hosts

        authorize(f"{key}.pub")
        write_known_hosts(host_key())
        log = tmp / "serve.log"
        with open(log, "wb") as f:
            serve = subprocess.Popen([sys.executable, "-m", "microvm", "ssh", "serve",
                                      "bench-ssh", "--listen", "127.0.0.1:0"],
                                     stdout=f, stderr=f)
        port = 0
        for _ in range(600):
            m = re.search(r"on port (\d+)", log.read_text())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.1)
        if not port:
            raise RuntimeError(f"ssh serve did not start: {log.read_text()}")
        cfg = tmp / "ssh_config"
        cfg.write_text(f"Host b\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                       f"  HostKeyAlias microvm\n  UserKnownHostsFile {known_hosts_path()}\n"
                       f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
                       f"  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                       f"  IdentityAgent none\n  LogLevel ERROR\n")

        def ssh_true() -> None:
            subprocess.run(["ssh", "-F", str(cfg), "b", "true"], check=True, timeout=60)

        def exec_true() -> None:
            assert sb.shell("true").exit_code == 0

        ssh = sb.ssh()

        def session_true() -> None:
            assert ssh.exec("true")[0] == 0

        for fn in (ssh_true, exec_true, session_true):
            fn()
        ssh_ms = _median_ms(ssh_true, n)
        exec_ms = _median_ms(exec_true, n * 3)
        session_ms = _median_ms(session_true, n * 3)

        blob = tmp / "blob"
        with open(blob, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        back = tmp / "blob.back"

        def sftp(cmd: str) -> float:
            batch = tmp / "batch"
            batch.write_text(cmd + "\n")
            t0 = time.perf_counter()
            subprocess.run(["sftp", "-F", str(cfg), "-b", str(batch), "b"], check=True,
                           capture_output=True, timeout=600)
            return time.perf_counter() - t0

        put_s = sftp(f"put {blob} /tmp/blob")
        get_s = sftp(f"get /tmp/blob {back}")
        assert back.stat().st_size == size
        t0 = time.perf_counter()
        sb.fs.copy_from_host(blob, "/tmp/blob2")
        fs_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        sb.fs.copy_to_host("/tmp/blob2", back)
        fs_r = time.perf_counter() - t0
        ssh.close()
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(20)
        sb.stop()
        Sandbox.remove("bench-ssh")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    mib = size / (1 << 20)
    return {
        "ssh_true_ms": round(ssh_ms, 2),
        "session_true_ms": round(session_ms, 2),
        "exec_true_ms": round(exec_ms, 2),
        "ssh_vs_exec_ratio": round(exec_ms / ssh_ms, 3),
        "ssh_session_vs_exec_ratio": round(exec_ms / session_ms, 3),
        "sftp_put_mib_s": round(mib / put_s, 1),
        "sftp_get_mib_s": round(mib / get_s, 1),
        "fs_write_mib_s": round(mib / fs_w, 1),
        "fs_read_mib_s": round(mib / fs_r, 1),
        "sftp_vs_fs_ratio": round(fs_w / put_s, 3),
        "sftp_get_vs_fs_ratio": round(fs_r / get_s, 3),
        "file_bytes": size,
        "samples": n,
    }


def main() -> None:
    quick_main(__doc__, measure, "fewer samples, a 32 MiB file")


if __name__ == "__main__":
    main()
