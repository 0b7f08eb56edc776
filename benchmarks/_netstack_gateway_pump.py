"""A C frame pump standing in for the VMM in the gateway benchmark (guest TAP <-> stream).

The test topology's fake VMM is Python (two threads, one syscall pair per frame); at
gigabit rates it, not the gateway, would be the bottleneck. This pump does the same job
as a real VMM's network backend: two pthreads moving frames between the guest
namespace's TAP and the u32-BE-framed stream socket, batching up to 64 frames per
socket write. Compiled on first use with cffi into ``build/bench-pump``.

>>> pump = CPump(sock_fd, tap_fd); ...; pump.stop()      # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

_SRC = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct pump { int sock, tap; volatile int stop; pthread_t t1, t2; } pump;

static int write_all(pump *p, const uint8_t *b, size_t n) {
    size_t off = 0;
    while (off < n && !p->stop) {
        ssize_t w = write(p->sock, b + off, n - off);
        if (w > 0) { off += (size_t)w; continue; }
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd q = {p->sock, POLLOUT, 0};
            poll(&q, 1, 100);
            continue;
        }
        return -1;
    }
    return 0;
}

static void *tap_to_sock(void *a) {
    pump *p = (pump *)a;
    size_t cap = 1u << 22, len = 0;
    uint8_t *buf = (uint8_t *)malloc(cap);
    struct pollfd pf = {p->tap, POLLIN, 0};
    while (!p->stop) {
        if (poll(&pf, 1, 100) <= 0) continue;
        /* up to 64 frames or 256 KiB per socket write (still in cache when written) */
        for (int i = 0; i < 64 && len < (256u << 10); i++) {
            ssize_t r = read(p->tap, buf + len + 4, 65600);
            if (r <= 0) break;
            buf[len] = (uint8_t)(r >> 24); buf[len + 1] = (uint8_t)(r >> 16);
            buf[len + 2] = (uint8_t)(r >> 8); buf[len + 3] = (uint8_t)r;
            len += 4 + (size_t)r;
        }
        if (len && write_all(p, buf, len) < 0) break;
        len = 0;
    }
    free(buf);
    return NULL;
}

static void *sock_to_tap(void *a) {
    pump *p = (pump *)a;
    size_t cap = 1u << 22, len = 0;
    uint8_t *buf = (uint8_t *)malloc(cap);
    struct pollfd pf = {p->sock, POLLIN, 0};
    while (!p->stop) {
        if (poll(&pf, 1, 100) <= 0) continue;
        ssize_t r = read(p->sock, buf + len, cap - len);
        if (r == 0) break;
        if (r < 0) continue;
        len += (size_t)r;
        size_t off = 0;
        while (len - off >= 4) {
            uint32_t fl = ((uint32_t)buf[off] << 24) | ((uint32_t)buf[off + 1] << 16) |
                          ((uint32_t)buf[off + 2] << 8) | buf[off + 3];
            if (fl == 0 || fl > 65549) { p->stop = 1; break; }
            if (len - off - 4 < fl) break;
            ssize_t w = write(p->tap, buf + off + 4, fl);
            (void)w;
            off += 4 + fl;
        }
        memmove(buf, buf + off, len - off);
        len -= off;
    }
    free(buf);
    return NULL;
}

pump *pump_start(int sock, int tap) {
    pump *p = (pump *)calloc(1, sizeof(pump));
    p->sock = sock; p->tap = tap;
    /* room for dozens of 64 KiB frames in flight (capped by net.core.wmem_max) */
    int big = 4 << 20;
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
    fcntl(tap, F_SETFL, fcntl(tap, F_GETFL) | O_NONBLOCK);
    pthread_create(&p->t1, NULL, tap_to_sock, p);
    pthread_create(&p->t2, NULL, sock_to_tap, p);
    return p;
}

void pump_stop(pump *p) {
    p->stop = 1;
    pthread_join(p->t1, NULL);
    pthread_join(p->t2, NULL);
    close(p->sock);
    close(p->tap);
    free(p);
}
"""

_CDEF = """
typedef struct pump pump;
pump *pump_start(int sock, int tap);
void pump_stop(pump *p);
"""

_ROOT = Path(__file__).resolve().parents[1]


def _module() -> Any:
    name = "_nsgw_bench_pump"
    if name in sys.modules:
        return sys.modules[name]
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(_CDEF)
    ffi.set_source(name, _SRC, extra_compile_args=["-O2"], libraries=["pthread"])
    out = _ROOT / "build" / "bench-pump"
    out.mkdir(parents=True, exist_ok=True)
    path = ffi.compile(tmpdir=str(out), verbose=False)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


class CPump:
    """Move frames between ``tap_fd`` and the stream socket ``sock_fd`` until :meth:`stop`."""

    def __init__(self, sock_fd: int, tap_fd: int) -> None:
        self._mod = _module()
        self._p = self._mod.lib.pump_start(os.dup(sock_fd), os.dup(tap_fd))

    def stop(self) -> None:
        """Stop and join both threads (idempotent)."""
        if self._p is not None:
            self._mod.lib.pump_stop(self._p)
            self._p = None
