"""A C frame pump standing in for the VMM in the gateway benchmark (guest TAP <-> stream).

The test topology's fake VMM is Python (two threads, one syscall pair per frame); at
gigabit rates it, not the gateway, would be the bottleneck. This pump does the same job
as a real VMM's network backend: two pthreads moving frames between the guest
namespace's TAP and the u32-BE-framed stream socket, up to 256 KiB of frames per
socket write. Compiled on first use with cffi into ``build/bench-pump``.

A VMM takes the guest's frames out of its virtio-net ring without a syscall per frame;
a plain TAP costs one ``read()`` per frame (~510k/s at MTU 1500), which made this
stand-in, not the gateway, the largest CPU user of the benchmark. With
``vnet_hdr=True`` the guest TAP offers checksum and TSO offloads, the pump reads one TSO
packet per ``read()`` and cuts it into MSS-sized frames with full IP/TCP checksums (what
the guest kernel's own segmentation produces, and what a VMM does in software for a
backend without virtio-net headers), then writes them with one ``writev()`` per batch
straight from the read buffer. The stream still carries only frames of at most
MTU + 14 bytes.

>>> pump = CPump(sock_fd, tap_fd, vnet_hdr=True, mtu=1500); ...; pump.stop()  # doctest: +SKIP
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
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define VNET 10                 /* struct virtio_net_hdr */
#define PKT_CAP (65536 + 256)
#define OUT_CAP (1u << 22)
#define FLUSH_AT (256u << 10)   /* bytes per socket write (still in cache when written) */

typedef struct pump {
    int sock, tap, vnet, mtu, single;   /* single: one frame per socket write */
    volatile int stop;
    pthread_t t1, t2;
    uint64_t packets, frames, dropped;   /* read from the TAP, written to the stream */
} pump;

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

/* Internet checksum helpers in native byte order (RFC 1071: the folded sum of
 * native-order words, stored natively, is the right checksum). */
static uint64_t csum_acc(const uint8_t *b, size_t n, uint64_t s) {
    while (n >= 16) {
        uint32_t w[4];
        memcpy(w, b, 16);
        s += (uint64_t)w[0] + w[1] + w[2] + w[3];
        b += 16;
        n -= 16;
    }
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, b, 4);
        s += w;
        b += 4;
        n -= 4;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, b, 2);
        s += w;
        b += 2;
        n -= 2;
    }
    if (n) {
        uint8_t last[2] = {b[0], 0};
        uint16_t w;
        memcpy(&w, last, 2);
        s += w;
    }
    return s;
}

static uint16_t csum_fin(uint64_t s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static uint16_t rd16(const uint8_t *b) { return (uint16_t)((b[0] << 8) | b[1]); }
static void wr16(uint8_t *b, uint32_t v) { b[0] = (uint8_t)(v >> 8); b[1] = (uint8_t)v; }

/* The frames of one socket write: each is a u32-BE length + headers piece (hdr)
 * and a payload piece left where the TAP read put it (pkt), written with one
 * writev(), as a VMM writes frames straight out of guest memory. */
#define MAX_IOV 1024
#define HDR_CAP (MAX_IOV / 2 * (4 + 14 + 60 + 60))
typedef struct batch {
    struct iovec iov[MAX_IOV];
    int niov;
    size_t bytes, hdr_len, pkt_len;
    uint8_t *hdr, *pkt;
} batch;

static int writev_all(pump *p, struct iovec *iov, int n) {
    while (n > 0 && !p->stop) {
        int most = p->single ? 2 : 1024;   /* a frame is two iovecs (hdr, payload) */
        ssize_t w = writev(p->sock, iov, n > most ? most : n);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                struct pollfd q = {p->sock, POLLOUT, 0};
                poll(&q, 1, 100);
                continue;
            }
            return -1;
        }
        size_t done = (size_t)w;
        while (n > 0 && done >= iov->iov_len) { done -= iov->iov_len; iov++; n--; }
        if (n > 0) { iov->iov_base = (uint8_t *)iov->iov_base + done; iov->iov_len -= done; }
    }
    return 0;
}

/* make room for `frames` more frames (two iovecs each), writing out the batch so far
 * if needed (the packet bytes stay where they are); 0 if they can never fit */
static int batch_room(pump *p, batch *bt, size_t frames) {
    if (frames > MAX_IOV / 2) return 0;
    if (bt->niov + 2 * frames <= MAX_IOV) return 1;
    if (writev_all(p, bt->iov, bt->niov) < 0) p->stop = 1;
    bt->niov = 0;
    bt->bytes = bt->hdr_len = 0;
    return 1;
}

/* one more frame: its length prefix + headers piece (hl bytes, returned for the caller
 * to fill) and its payload piece (left in place) */
static uint8_t *frame_hdr(pump *p, batch *bt, size_t hl, const uint8_t *payload, size_t plen) {
    if ((int)(hl + plen) > p->mtu + 14) {
        p->dropped++;
        return NULL;
    }
    uint8_t *f = bt->hdr + bt->hdr_len;
    size_t flen = hl + plen;
    f[0] = (uint8_t)(flen >> 24); f[1] = (uint8_t)(flen >> 16);
    f[2] = (uint8_t)(flen >> 8); f[3] = (uint8_t)flen;
    bt->iov[bt->niov].iov_base = f;
    bt->iov[bt->niov].iov_len = 4 + hl;
    bt->iov[bt->niov + 1].iov_base = (void *)payload;
    bt->iov[bt->niov + 1].iov_len = plen;
    bt->niov += 2;
    bt->hdr_len += 4 + hl;
    bt->bytes += 4 + flen;
    p->frames++;
    return f + 4;
}

/* A TSO packet from the guest kernel cut into MSS-sized frames, as the guest's own
 * stack would have sent them without the offload (and as a VMM does in software for
 * a backend without virtio-net headers): IP length/id/checksum, TCP sequence,
 * flags (FIN/PSH on the last, CWR on the first) and a full TCP checksum each. */
static void segment_tcp(pump *p, batch *bt, const uint8_t *pkt, size_t n, uint32_t mss) {
    if (n < 14 + 20 + 20 || mss == 0) { p->dropped++; return; }
    uint16_t et = rd16(pkt + 12);
    size_t l4;
    int v4 = et == 0x0800;
    if (v4) {
        l4 = 14 + (size_t)(pkt[14] & 15) * 4;
        if (pkt[23] != 6) { p->dropped++; return; }
    } else if (et == 0x86dd) {
        l4 = 54;
        if (pkt[20] != 6) { p->dropped++; return; }
    } else { p->dropped++; return; }
    if (l4 + 20 > n) { p->dropped++; return; }
    size_t hl = l4 + (size_t)(pkt[l4 + 12] >> 4) * 4;
    if (hl > n || hl < l4 + 20) { p->dropped++; return; }
    size_t payload = n - hl;
    if (!batch_room(p, bt, payload ? (payload + mss - 1) / mss : 1)) { p->dropped++; return; }
    uint32_t seq = ((uint32_t)pkt[l4 + 4] << 24) | ((uint32_t)pkt[l4 + 5] << 16) |
                   ((uint32_t)pkt[l4 + 6] << 8) | pkt[l4 + 7];
    uint16_t id = v4 ? rd16(pkt + 18) : 0;
    uint8_t flags = pkt[l4 + 13];
    /* pseudo-header without the length (added per segment) */
    uint8_t ph[36];
    size_t phl;
    if (v4) { memcpy(ph, pkt + 26, 8); phl = 8; }
    else { memcpy(ph, pkt + 22, 32); phl = 32; }
    ph[phl] = 0; ph[phl + 1] = 6;
    uint64_t phsum = csum_acc(ph, phl + 2, 0);
    size_t off = 0;
    unsigned i = 0;
    do {
        size_t seg = payload - off < mss ? payload - off : mss;
        int last = off + seg >= payload;
        const uint8_t *data = pkt + hl + off;
        uint8_t *f = frame_hdr(p, bt, hl, data, seg);
        if (!f) return;
        memcpy(f, pkt, hl);
        if (v4) {
            wr16(f + 16, (uint32_t)(hl - 14 + seg));
            wr16(f + 18, (uint32_t)(id + i));
            f[24] = f[25] = 0;
            uint16_t c = csum_fin(csum_acc(f + 14, l4 - 14, 0));
            memcpy(f + 24, &c, 2);
        } else {
            wr16(f + 18, (uint32_t)(hl - 54 + seg));
        }
        uint8_t *t = f + l4;
        uint32_t s = seq + (uint32_t)off;
        t[4] = (uint8_t)(s >> 24); t[5] = (uint8_t)(s >> 16);
        t[6] = (uint8_t)(s >> 8); t[7] = (uint8_t)s;
        uint8_t fl = flags;
        if (!last) fl &= (uint8_t)~0x09;   /* FIN, PSH only on the last */
        if (i) fl &= (uint8_t)~0x80;       /* CWR only on the first */
        t[13] = fl;
        t[16] = t[17] = 0;
        uint8_t tl[2];
        wr16(tl, (uint32_t)(hl - l4 + seg));
        uint64_t sum = csum_acc(tl, 2, phsum);
        sum = csum_acc(t, hl - l4, sum);
        uint16_t c = csum_fin(csum_acc(data, seg, sum));
        memcpy(t + 16, &c, 2);
        off += seg;
        i++;
    } while (off < payload);
}

/* One packet read from a vnet-header TAP (at pkt, left there): checksum completed,
 * TSO cut into frames. */
static void emit_vnet(pump *p, batch *bt, uint8_t *b, size_t r) {
    if (r < VNET + 14) { p->dropped++; return; }
    const uint8_t *h = b;
    uint8_t *pkt = b + VNET;
    size_t n = r - VNET;
    uint8_t gso = h[1] & 0x7f;
    p->packets++;
    if (gso == 1 || gso == 4) {             /* VIRTIO_NET_HDR_GSO_TCPV4 / TCPV6 */
        segment_tcp(p, bt, pkt, n, (uint32_t)(h[4] | (h[5] << 8)));
        return;
    }
    if (gso != 0) { p->dropped++; return; }  /* no other offload was negotiated */
    if (h[0] & 1) {                          /* NEEDS_CSUM: the field holds the pseudo sum */
        size_t cs = (size_t)(h[6] | (h[7] << 8)), co = (size_t)(h[8] | (h[9] << 8));
        if (cs + co + 2 <= n) {
            uint16_t c = csum_fin(csum_acc(pkt + cs, n - cs, 0));
            if (c == 0 && co == 6) c = 0xffff;  /* UDP */
            memcpy(pkt + cs + co, &c, 2);
        }
    }
    if (batch_room(p, bt, 1)) frame_hdr(p, bt, 0, pkt, n);
}

static void *tap_to_sock(void *a) {
    pump *p = (pump *)a;
    size_t len = 0;
    uint8_t *out = (uint8_t *)malloc(OUT_CAP);   /* plain TAP: frames, length-prefixed */
    batch *bt = (batch *)calloc(1, sizeof(batch));
    bt->hdr = (uint8_t *)malloc(HDR_CAP);
    bt->pkt = (uint8_t *)malloc(FLUSH_AT + PKT_CAP);
    struct pollfd pf = {p->tap, POLLIN, 0};
    while (!p->stop) {
        if (poll(&pf, 1, 100) <= 0) continue;
        if (p->vnet) {
            /* TSO packets until the TAP is empty or FLUSH_AT bytes are ready */
            while (bt->pkt_len < FLUSH_AT) {
                ssize_t r = read(p->tap, bt->pkt + bt->pkt_len, PKT_CAP);
                if (r <= 0) break;
                uint8_t *b = bt->pkt + bt->pkt_len;
                bt->pkt_len += (size_t)r;
                emit_vnet(p, bt, b, (size_t)r);
            }
            if (bt->niov && writev_all(p, bt->iov, bt->niov) < 0) break;
            bt->niov = 0;
            bt->bytes = bt->hdr_len = bt->pkt_len = 0;
            continue;
        }
        /* up to 64 frames or FLUSH_AT bytes per socket write */
        for (int i = 0; i < (p->single ? 1 : 64) && len < FLUSH_AT; i++) {
            ssize_t r = read(p->tap, out + len + 4, 65600);
            if (r <= 0) break;
            out[len] = (uint8_t)(r >> 24); out[len + 1] = (uint8_t)(r >> 16);
            out[len + 2] = (uint8_t)(r >> 8); out[len + 3] = (uint8_t)r;
            len += 4 + (size_t)r;
            p->packets++;
            p->frames++;
        }
        if (len && write_all(p, out, len) < 0) break;
        len = 0;
    }
    free(bt->pkt);
    free(bt->hdr);
    free(bt);
    free(out);
    return NULL;
}

static void *sock_to_tap(void *a) {
    pump *p = (pump *)a;
    static const uint8_t zero[VNET];
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
            struct iovec iov[2] = {{(void *)zero, VNET}, {buf + off + 4, fl}};
            ssize_t w = p->vnet ? writev(p->tap, iov, 2) : write(p->tap, buf + off + 4, fl);
            (void)w;
            off += 4 + fl;
        }
        memmove(buf, buf + off, len - off);
        len -= off;
    }
    free(buf);
    return NULL;
}

pump *pump_start(int sock, int tap, int vnet, int mtu, int single, int *err) {
    pump *p = (pump *)calloc(1, sizeof(pump));
    p->sock = sock; p->tap = tap; p->vnet = vnet; p->mtu = mtu; p->single = single;
    *err = 0;
    if (vnet) {
        /* the guest kernel may now hand over TSO packets with partial checksums */
        unsigned long off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        if (ioctl(tap, TUNSETOFFLOAD, off) < 0) { *err = errno; free(p); return NULL; }
    }
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

void pump_stats(const pump *p, uint64_t *out) {
    out[0] = p->packets; out[1] = p->frames; out[2] = p->dropped;
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
pump *pump_start(int sock, int tap, int vnet, int mtu, int single, int *err);
void pump_stats(const pump *p, uint64_t *out);
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
    """Move frames between ``tap_fd`` and the stream socket ``sock_fd`` until :meth:`stop`.

    ``vnet_hdr=True``: ``tap_fd`` was opened with IFF_VNET_HDR; the pump turns on the
    TAP's checksum and TSO offloads (as a virtio-net device offering them to its guest
    does) and cuts each TSO packet into frames of at most ``mtu`` + 14 bytes with full
    checksums, so the stream carries exactly what a guest link of that MTU carries.
    ``frame_per_write=True``: one frame (length + frame) per socket write, as QEMU's
    ``-netdev stream`` sends them, instead of up to 256 KiB of frames per ``writev()``
    (see :data:`benchmarks.gateway.ROOTLESS_WINDOW` for why passt cares).
    """

    def __init__(self, sock_fd: int, tap_fd: int, *, vnet_hdr: bool = False,
                 mtu: int = 1500, frame_per_write: bool = False) -> None:
        self._mod = _module()
        sock, tap = os.dup(sock_fd), os.dup(tap_fd)
        err = self._mod.ffi.new("int *")
        self._p = self._mod.lib.pump_start(sock, tap, int(vnet_hdr), mtu,
                                           int(frame_per_write), err)
        if self._p == self._mod.ffi.NULL:
            os.close(sock)
            os.close(tap)
            raise OSError(err[0], f"pump: TUNSETOFFLOAD on the guest TAP: {os.strerror(err[0])}")

    def stats(self) -> dict[str, int]:
        """Packets read from the TAP, frames written to the stream, packets dropped."""
        if self._p is None:
            return {"packets": 0, "frames": 0, "dropped": 0}
        out = self._mod.ffi.new("uint64_t[3]")
        self._mod.lib.pump_stats(self._p, out)
        return {"packets": int(out[0]), "frames": int(out[1]), "dropped": int(out[2])}

    def stop(self) -> None:
        """Stop and join both threads (idempotent)."""
        if self._p is not None:
            self._mod.lib.pump_stop(self._p)
            self._p = None
