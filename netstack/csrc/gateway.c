/*
 * gateway.c - the gateway loop: guest frame socket <-> classifier <-> uplink TAP.
 *
 * One pthread per gateway (never touches Python).  It polls the guest fd, the
 * uplink fd, a stop eventfd and an inject eventfd:
 *  - guest -> uplink: frames are read in batches (one large read() for the
 *    u32-BE stream framing with partial frames carried over, recvmmsg() for
 *    datagram sockets, up to 64 read()s for a TAP), classified in place and
 *      ALLOW             written to the uplink TAP;
 *      DENY_RST/TO_PROXY answered with a crafted TCP RST towards the guest;
 *      DENY_ICMP         answered with ICMP / ICMPv6 port unreachable;
 *      DENY, MALFORMED   dropped;
 *      TO_DNS            UDP: queued to the owner (NS_EV_DNS), TCP: to the uplink
 *                        (its namespace DNATs it to the forwarder's listener;
 *                        with dns_tcp_reset: a RST);
 *      NEED_MORE         segments without payload (the handshake) pass, data
 *                        segments are held (bounded) until the classifier
 *                        decides; then released in order, or dropped with a
 *                        RST to the guest and one to the server.  A pending
 *                        flow that stays undecided past hello_timeout is
 *                        re-classified from the loop's timer (which decides).
 *    A frame larger than the uplink's MTU leaves as a GSO packet (TCP on a vnet
 *    uplink), as IPv4 fragments (no DF), or not at all: ICMP "fragmentation
 *    needed" / ICMPv6 "packet too big" with the uplink's MTU goes to the guest.
 *  - uplink -> guest: only replies of allowed flows (ns_ctx_reply_lookup) and
 *    ARP pass; replies of pending flows pass only without payload.
 *  - injected frames (DNS answers) go to the guest.
 * The uplink is a TAP fd (one read/write = one frame, optionally with a virtio-net
 * header) or, with uplink_stream, a stream socket carrying u32-BE length-prefixed
 * frames (passt --fd): read in large chunks with partial frames carried over,
 * written through a buffer flushed when it fills and at the end of every round, one
 * frame (or a small run of whole frames) per send(): see flush_uplink.
 * Events to the owner: a single-producer/single-consumer ring of fixed slots;
 * when it is full the event is dropped and counted (the loop never waits).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ns_internal.h"
#include "steer.h"

#define BATCH 64
#define RX_FRAME (NS_MAX_FRAME + 64)
#define STREAM_IN_CAP (1u << 20)
#define STREAM_OUT_CAP (4u << 20)
#define STREAM_READ (256u << 10)
#define INJECT_SLOTS 256
#define MAX_PENDING 256
#define REJECT_CAP 1400
#define CO_HDR (10 + 34 + 60)  /* virtio-net header + Ethernet + IPv4 (no options) + TCP headers */
#define CO_IOV 128                 /* payload pieces of one coalesced packet */

typedef struct ev_slot {
    ns_gw_event ev;
    uint8_t data[NS_GW_EVENT_DATA];
} ev_slot;

typedef struct held_frame {
    struct held_frame *next;
    uint32_t len;
    uint8_t data[];
} held_frame;

typedef struct pending {
    uint8_t used, pad[3];
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    uint8_t proto;
    double created;
    held_frame *head, *tail;
    uint32_t nheld;
    uint8_t *first;       /* copy of the flow's first frame (for the timer) */
    uint32_t first_len;
} pending;

struct ns_gw {
    ns_ctx *ctx;
    ns_gw_config cfg;
    pthread_t thread;
    int started, stop_requested;
    int stop_efd, inject_efd, event_efd;
    /* event ring (loop produces, owner consumes) */
    ev_slot *ring;
    uint32_t ring_mask;
    uint64_t head, tail;          /* atomics */
    int events_pushed;
    /* inject queue (owner produces under the mutex, loop consumes) */
    pthread_mutex_t inject_mu;
    ev_slot *inject;
    uint32_t inj_head, inj_tail;
    /* guest side */
    int guest_alive;
    uint8_t *in;                  /* stream: carry-over buffer */
    size_t in_len;
    uint8_t *out;                 /* stream: pending output */
    size_t out_off, out_len;
    uint8_t *rx;                  /* BATCH x RX_FRAME */
    struct sockaddr_un peer;      /* dgram: the VMM's address if it sent from one */
    socklen_t peer_len;
    int vfkt_checked;
    /* pending (ClientHello) flows */
    pending pend[MAX_PENDING];
    uint32_t npending, nheld_total;
    double last_timer, last_expire;
    /* TCP coalescing towards a vnet-header uplink (one GSO packet per run of segments):
     * a copy of the first segment's headers, then the segments' payloads where they
     * are (the read buffer, not touched until co_flush), written with one writev() */
    uint8_t *co;                  /* 10-byte virtio-net header + the first frame's headers */
    struct iovec co_iov[1 + CO_IOV];
    size_t co_len;                /* frame bytes (headers + payloads); 0 = empty */
    uint32_t co_next_seq, co_mss, co_segs, co_hl;
    int co_closed;
    /* a stream uplink (uplink_stream: passt --fd): u32-BE framed both ways */
    int uplink_alive;
    uint8_t *uin;                 /* carry-over of partial frames read */
    size_t uin_len;
    uint8_t *uout;                /* framed output not yet written */
    size_t uout_off, uout_len;
    size_t uout_cut;              /* end of the frame a partial send cut (0: none) */
    /* the steering NAT (stream uplinks without a local stack: see steer.c) */
    ns_steer *steer;
    int steer_bypass;             /* the frame being sent answers a published-port flow */
    double now, last_steer_expire;
    ns_gw_stats st;               /* written by the loop; read racily by stats_get */
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void efd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r;
}

static void efd_drain(int fd) {
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));
    (void)r;
}

/* ------------------------------------------------------------ checksums / builders */

static uint32_t csum_add(uint32_t s, const uint8_t *p, size_t n) {
    while (n > 1) {
        s += (uint32_t)((p[0] << 8) | p[1]);
        p += 2;
        n -= 2;
    }
    if (n) s += (uint32_t)(p[0] << 8);
    return s;
}

/* Ethernet + IP header + the l4 bytes (already laid out at out + hdr), with
 * the L4 checksum at csum_off (within l4) computed; returns the frame length
 * or 0 if it does not fit. */
static size_t finish_ip(uint8_t *out, size_t cap, const uint8_t *dst_mac, const uint8_t *src_mac,
                        const uint8_t *src16, const uint8_t *dst16, uint8_t proto,
                        const uint8_t *l4, size_t l4len, size_t csum_off) {
    int v4 = ns_is_v4mapped(src16) && ns_is_v4mapped(dst16);
    size_t hdr = 14 + (v4 ? 20 : 40);
    if (hdr + l4len > cap || l4len > 65000) return 0;
    memmove(out + hdr, l4, l4len);
    memcpy(out, dst_mac, 6);
    memcpy(out + 6, src_mac, 6);
    uint8_t *ip = out + 14;
    uint8_t *t = out + hdr;
    t[csum_off] = t[csum_off + 1] = 0;
    uint32_t s = 0;
    if (v4) {
        ns_wr16(out + 12, 0x0800);
        memset(ip, 0, 20);
        ip[0] = 0x45;
        ns_wr16(ip + 2, (uint16_t)(20 + l4len));
        ns_wr16(ip + 6, 0x4000); /* DF */
        ip[8] = 64;
        ip[9] = proto;
        memcpy(ip + 12, src16 + 12, 4);
        memcpy(ip + 16, dst16 + 12, 4);
        ns_wr16(ip + 10, ns_csum_fold(csum_add(0, ip, 20)));
        if (proto != 1) { /* ICMPv4 has no pseudo-header */
            s = csum_add(s, ip + 12, 8);
            s += proto;
            s += (uint32_t)l4len;
        }
    } else {
        ns_wr16(out + 12, 0x86dd);
        memset(ip, 0, 8);
        ip[0] = 0x60;
        ns_wr16(ip + 4, (uint16_t)l4len);
        ip[6] = proto;
        ip[7] = 64;
        memcpy(ip + 8, src16, 16);
        memcpy(ip + 24, dst16, 16);
        s = csum_add(s, ip + 8, 32);
        s += (uint32_t)l4len;
        s += proto;
    }
    s = csum_add(s, t, l4len);
    uint16_t c = ns_csum_fold(s);
    if (proto == 17 && c == 0) c = 0xffff;
    ns_wr16(t + csum_off, c);
    return hdr + l4len;
}

/* A UDP datagram frame (used for DNS answers). */
size_t ns_gw_build_udp(const uint8_t *dst_mac, const uint8_t *src_mac, const uint8_t *src16,
                       uint16_t sport, const uint8_t *dst16, uint16_t dport,
                       const uint8_t *payload, size_t len, uint8_t *out, size_t cap) {
    if (len > 65000 || cap < 62 + len) return 0;
    uint8_t *l4 = out + 62; /* build past the largest header, finish_ip moves it */
    ns_wr16(l4, sport);
    ns_wr16(l4 + 2, dport);
    ns_wr16(l4 + 4, (uint16_t)(8 + len));
    l4[6] = l4[7] = 0;
    memcpy(l4 + 8, payload, len);
    return finish_ip(out, cap, dst_mac, src_mac, src16, dst16, 17, l4, 8 + len, 6);
}

/* TCP RST answering `fr` (a frame from `from` to `to`); sent from `to`'s side. */
static size_t build_rst(const uint8_t *buf, const ns_frame *fr, uint8_t *out, size_t cap) {
    uint8_t l4[20];
    const uint8_t *t = buf + fr->l4_off;
    uint8_t flags = fr->tcp_flags;
    uint32_t ack = ns_rd32(t + 8);
    memset(l4, 0, sizeof(l4));
    ns_wr16(l4, fr->dport);
    ns_wr16(l4 + 2, fr->sport);
    if (flags & 0x10) { /* ACK set: RST with seq = their ack */
        l4[4] = (uint8_t)(ack >> 24);
        l4[5] = (uint8_t)(ack >> 16);
        l4[6] = (uint8_t)(ack >> 8);
        l4[7] = (uint8_t)ack;
        l4[13] = 0x04;
    } else {
        uint32_t a = fr->seq + fr->payload_len + ((flags & 0x02) ? 1u : 0u) +
                     ((flags & 0x01) ? 1u : 0u);
        l4[8] = (uint8_t)(a >> 24);
        l4[9] = (uint8_t)(a >> 16);
        l4[10] = (uint8_t)(a >> 8);
        l4[11] = (uint8_t)a;
        l4[13] = 0x14; /* RST|ACK */
    }
    l4[12] = 5 << 4;
    return finish_ip(out, cap, buf + 6, buf, fr->dst, fr->src, 6, l4, 20, 16);
}

/* A RST from the guest's side to the server for flow `fr` at sequence `seq`. */
static size_t build_rst_upstream(const uint8_t *buf, const ns_frame *fr, uint32_t seq,
                                 uint8_t *out, size_t cap) {
    uint8_t l4[20];
    memset(l4, 0, sizeof(l4));
    ns_wr16(l4, fr->sport);
    ns_wr16(l4 + 2, fr->dport);
    l4[4] = (uint8_t)(seq >> 24);
    l4[5] = (uint8_t)(seq >> 16);
    l4[6] = (uint8_t)(seq >> 8);
    l4[7] = (uint8_t)seq;
    l4[12] = 5 << 4;
    l4[13] = 0x04;
    return finish_ip(out, cap, buf, buf + 6, fr->src, fr->dst, 6, l4, 20, 16);
}

/* ICMP(v6) port unreachable quoting `buf`'s IP packet. */
static size_t build_unreach(const uint8_t *buf, size_t len, const ns_frame *fr, uint8_t *out,
                            size_t cap) {
    uint8_t l4[8 + 1240];
    size_t l3 = fr->vlan ? 18 : 14;
    if (len <= l3) return 0;
    size_t quote = len - l3;
    int v4 = fr->family == 4;
    size_t maxq = v4 ? 548 : 1232;
    if (quote > maxq) quote = maxq;
    memset(l4, 0, 8);
    l4[0] = v4 ? 3 : 1;   /* destination unreachable */
    l4[1] = v4 ? 3 : 4;   /* port unreachable */
    memcpy(l4 + 8, buf + l3, quote);
    return finish_ip(out, cap, buf + 6, buf, fr->dst, fr->src, v4 ? 1 : 58, l4, 8 + quote, 2);
}

/* The answer to a denied guest frame: RST for TCP, ICMP unreachable for the
 * rest (UDP); 0 when the frame deserves none (not IP, a RST, ICMP). */
size_t ns_gw_build_reject(const uint8_t *frame, size_t len, uint8_t *out, size_t cap) {
    ns_frame fr;
    if (ns_parse_frame(frame, len, &fr) != NS_PARSE_OK) return 0;
    if (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6) return 0;
    if (fr.frag == 2) return 0;
    if (fr.pbit == NS_P_TCP) {
        if (fr.tcp_flags & 0x04) return 0; /* never answer a RST */
        return build_rst(frame, &fr, out, cap);
    }
    if (fr.pbit == NS_P_UDP) return build_unreach(frame, len, &fr, out, cap);
    return 0;
}

/* ------------------------------------------------------------ events */

static void push_event(ns_gw *g, uint8_t kind, uint8_t verdict, uint8_t dir, int32_t rule,
                       double now, const uint8_t *data, size_t len) {
    uint64_t head = g->head;
    uint64_t tail = __atomic_load_n(&g->tail, __ATOMIC_ACQUIRE);
    if (head - tail > g->ring_mask) {
        g->st.events_dropped++;
        return;
    }
    ev_slot *s = &g->ring[head & g->ring_mask];
    size_t n = len < NS_GW_EVENT_DATA ? len : NS_GW_EVENT_DATA;
    s->ev.kind = kind;
    s->ev.verdict = verdict;
    s->ev.direction = dir;
    s->ev.pad = 0;
    s->ev.rule = rule;
    s->ev.ts = now;
    s->ev.len = (uint32_t)n;
    s->ev.orig_len = (uint32_t)len;
    if (n) memcpy(s->data, data, n);
    __atomic_store_n(&g->head, head + 1, __ATOMIC_RELEASE);
    g->events_pushed = 1;
}

int ns_gw_next_event(ns_gw *g, ns_gw_event *ev, uint8_t *data, size_t cap) {
    uint64_t tail = g->tail;
    uint64_t head = __atomic_load_n(&g->head, __ATOMIC_ACQUIRE);
    if (tail == head) return 0;
    ev_slot *s = &g->ring[tail & g->ring_mask];
    *ev = s->ev;
    size_t n = s->ev.len < cap ? s->ev.len : cap;
    if (n) memcpy(data, s->data, n);
    ev->len = (uint32_t)n;
    __atomic_store_n(&g->tail, tail + 1, __ATOMIC_RELEASE);
    return 1;
}

/* ------------------------------------------------------------ output */

static void flush_guest(ns_gw *g) {
    while (g->out_len > g->out_off) {
        ssize_t w = write(g->cfg.guest_fd, g->out + g->out_off, g->out_len - g->out_off);
        if (w > 0) {
            g->out_off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        g->st.write_errors++;
        g->out_off = g->out_len = 0; /* peer gone */
        return;
    }
    g->out_off = g->out_len = 0;
}

static void to_guest(ns_gw *g, const uint8_t *frame, size_t len, double now) {
    if (g->cfg.capture) push_event(g, NS_EV_CAPTURE, NS_ALLOW, NS_DIR_INGRESS, -1, now, frame, len);
    if (!g->guest_alive) return;
    if (g->cfg.guest_mode == NS_GW_STREAM) {
        if (g->out_off > 0 && g->out_len + 4 + len > STREAM_OUT_CAP) {
            memmove(g->out, g->out + g->out_off, g->out_len - g->out_off);
            g->out_len -= g->out_off;
            g->out_off = 0;
        }
        if (g->out_len + 4 + len > STREAM_OUT_CAP) {
            g->st.guest_overflow++;
            return;
        }
        uint8_t *p = g->out + g->out_len;
        p[0] = (uint8_t)(len >> 24);
        p[1] = (uint8_t)(len >> 16);
        p[2] = (uint8_t)(len >> 8);
        p[3] = (uint8_t)len;
        memcpy(p + 4, frame, len);
        g->out_len += 4 + len;
        g->st.to_guest++;
        return;
    }
    ssize_t w;
    if (g->cfg.guest_mode == NS_GW_DGRAM && g->peer_len > sizeof(sa_family_t))
        w = sendto(g->cfg.guest_fd, frame, len, MSG_DONTWAIT, (struct sockaddr *)&g->peer,
                   g->peer_len);
    else if (g->cfg.guest_mode == NS_GW_DGRAM)
        w = send(g->cfg.guest_fd, frame, len, MSG_DONTWAIT);
    else
        w = write(g->cfg.guest_fd, frame, len);
    if (w < 0) g->st.write_errors++;
    else g->st.to_guest++;
}

static const uint8_t zero_vnet[10];

static void co_flush(ns_gw *g) {
    if (!g->co_len) return;
    uint8_t *h = g->co, *f = g->co + 10;
    memset(h, 0, 10);
    uint32_t hl = g->co_hl;
    int big = g->co_len - 14 > g->cfg.uplink_mtu; /* a large-MTU guest frame (or run) */
    if (g->co_segs > 1 || big) {
        /* segments the size the guest sent them, or (larger than the uplink allows)
         * cut to the uplink's MSS; big guest frames only exist when the peer's MSS
         * admits full uplink-sized segments (see raise_mss) */
        uint32_t gso = g->co_mss;
        if (g->co_mss + hl - 14 > g->cfg.uplink_mtu) gso = g->cfg.uplink_mtu - (hl - 14);
        uint8_t *ip = f + 14;
        size_t iplen = g->co_len - 14;
        ns_wr16(ip + 2, (uint16_t)iplen);
        ip[10] = ip[11] = 0;
        ns_wr16(ip + 10, ns_csum_fold(csum_add(0, ip, 20)));
        /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum */
        uint32_t sum = csum_add(0, ip + 12, 8) + 6u + (uint32_t)(iplen - 20);
        while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
        ns_wr16(f + 34 + 16, (uint16_t)sum);
        h[0] = 1;                             /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        h[1] = 1;                             /* VIRTIO_NET_HDR_GSO_TCPV4 */
        h[2] = (uint8_t)hl;                   /* hdr_len (little endian) */
        h[3] = (uint8_t)(hl >> 8);
        h[4] = (uint8_t)gso;                  /* gso_size */
        h[5] = (uint8_t)(gso >> 8);
        h[6] = 34;                            /* csum_start */
        h[8] = 16;                            /* csum_offset */
    }
    g->co_iov[0].iov_base = g->co;
    g->co_iov[0].iov_len = 10 + hl;
    ssize_t w = writev(g->cfg.uplink_fd, g->co_iov, (int)(1 + g->co_segs));
    if (w < 0) g->st.write_errors++;
    else g->st.to_uplink += g->co_segs;
    g->co_len = 0;
    g->co_segs = 0;
}

/* The virtio-net header for a TCP frame larger than the uplink MTU (untagged IPv4
 * or IPv6 without extension headers): GSO to the uplink's MSS with a partial
 * checksum, whose pseudo-header sum goes into the frame's checksum field.
 * Returns 0 (and leaves the frame alone) for anything else. */
static int big_tcp_vnet(const ns_gw *g, uint8_t *frame, size_t len, uint8_t *h) {
    ns_frame fr;
    if (len < 54 || len - 14 <= g->cfg.uplink_mtu || ns_parse_frame(frame, len, &fr) != NS_PARSE_OK ||
        fr.pbit != NS_P_TCP || fr.frag != 0 || fr.vlan)
        return 0;
    const uint8_t *ip = frame + 14;
    uint32_t sum, l4len, hl = fr.payload_off;
    if (fr.family == 4) {
        size_t ihl = (size_t)(ip[0] & 15) * 4;
        if (fr.l4_off != 14 + ihl) return 0;
        l4len = (uint32_t)(((ip[2] << 8) | ip[3]) - ihl);
        sum = csum_add(0, ip + 12, 8) + 6u + l4len;
    } else {
        if (fr.l4_off != 54 || ip[6] != 6) return 0;
        l4len = (uint32_t)((ip[4] << 8) | ip[5]);
        sum = csum_add(0, ip + 8, 32) + 6u + l4len;
    }
    if (hl - 14 >= g->cfg.uplink_mtu || fr.l4_off + l4len > len) return 0;
    uint32_t gso = g->cfg.uplink_mtu - (hl - 14);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    ns_wr16(frame + fr.l4_off + 16, (uint16_t)sum);
    memset(h, 0, 10);
    h[0] = 1;                                   /* NEEDS_CSUM */
    h[1] = fr.family == 4 ? 1 : 4;              /* GSO_TCPV4 / GSO_TCPV6 */
    h[2] = (uint8_t)hl;
    h[3] = (uint8_t)(hl >> 8);
    h[4] = (uint8_t)gso;
    h[5] = (uint8_t)(gso >> 8);
    h[6] = (uint8_t)fr.l4_off;
    h[8] = 16;
    return 1;
}

/* ------------------------------------------------------------ too big for the uplink */

/* Whether an oversize guest packet may be answered with an ICMP error (RFC 1122
 * 3.2.2, RFC 1812 4.3.2.7, RFC 4443 2.4): never about an ICMP error or a non-first
 * fragment; for IPv4 never about a packet from an unspecified, multicast or
 * broadcast source or to a multicast or broadcast destination (IPv6's Packet Too
 * Big is the one error also sent about multicast). */
static int too_big_answerable(const uint8_t *buf, size_t len, const ns_frame *fr) {
    if (fr->frag == 2) return 0;
    int icmp_error;
    if (fr->family == 4) {
        const uint8_t *s = fr->src + 12, *d = fr->dst + 12;
        if (s[0] == 0 || s[0] >= 224 || d[0] >= 224) return 0;
        uint8_t t = fr->l4_off < len ? buf[fr->l4_off] : 0;
        icmp_error = fr->ipproto == 1 && (t == 3 || t == 4 || t == 5 || t == 11 || t == 12);
    } else {
        static const uint8_t unspec[16];
        if (fr->src[0] == 0xff || memcmp(fr->src, unspec, 16) == 0) return 0;
        icmp_error = fr->ipproto == 58 && fr->l4_off < len && buf[fr->l4_off] < 128;
    }
    return !icmp_error;
}

/* ICMP "fragmentation needed" (type 3 code 4, next-hop MTU = mtu; quoting as much
 * of the packet as fits in 576 bytes, RFC 1812) or ICMPv6 Packet Too Big (type 2,
 * MTU = mtu; quoting as much as fits in 1280 bytes) answering the guest frame
 * `frame`, sent from `src16` (the gateway's address; all-zero or NULL, or of the
 * other family: from the packet's destination).  0 when the frame deserves none. */
size_t ns_gw_build_too_big(const uint8_t *frame, size_t len, uint32_t mtu, const uint8_t *src16,
                           uint8_t *out, size_t cap) {
    static const uint8_t zero[16];
    uint8_t l4[8 + 1232];
    ns_frame fr;
    if (ns_parse_frame(frame, len, &fr) != NS_PARSE_OK) return 0;
    if (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6) return 0;
    if (!too_big_answerable(frame, len, &fr)) return 0;
    size_t l3 = fr.vlan ? 18 : 14;
    if (len <= l3) return 0;
    int v4 = fr.family == 4;
    size_t quote = len - l3, maxq = v4 ? 548 : 1232;
    if (quote > maxq) quote = maxq;
    memset(l4, 0, 8);
    if (mtu > 0xffff) mtu = 0xffff;
    if (v4) {
        l4[0] = 3; /* destination unreachable */
        l4[1] = 4; /* fragmentation needed and DF set */
        ns_wr16(l4 + 6, (uint16_t)mtu);
    } else {
        l4[0] = 2; /* packet too big */
        ns_wr16(l4 + 6, (uint16_t)mtu);
    }
    memcpy(l4 + 8, frame + l3, quote);
    const uint8_t *src = fr.dst;
    if (src16 && memcmp(src16, zero, 16) != 0 && ns_is_v4mapped(src16) == v4) src = src16;
    return finish_ip(out, cap, frame + 6, frame, src, fr.src, v4 ? 1 : 58, l4, 8 + quote, 2);
}

/* The framed output to a stream uplink.  passt (Debian 12's, and its reader to this
 * day) loses the stream's framing when one of its reads ends inside a length prefix:
 * it only finishes a frame whose prefix it read.  A unix stream socket queues each
 * send() as skbs of its own (each queued whole, the first holding far more than 4
 * bytes), so a reader can stop at the end of any skb: every send() therefore starts
 * at a frame boundary (or continues the one frame a partial send cut, after its
 * prefix), and carries either one frame or a run of small whole frames of at most
 * UPLINK_GROUP bytes, which fits one skb (queued whole or not at all).  A single
 * large write of many frames would let passt read a prefix in halves. */
#define UPLINK_GROUP 2048

static void flush_uplink(ns_gw *g) {
    while (g->uout_len > g->uout_off) {
        size_t start = g->uout_off, end = g->uout_cut;
        if (!end) {
            end = start + 4 + ns_rd32(g->uout + start);
            while (end - start <= UPLINK_GROUP && end + 4 <= g->uout_len &&
                   end + 4 + ns_rd32(g->uout + end) - start <= UPLINK_GROUP)
                end += 4 + ns_rd32(g->uout + end);
        }
        ssize_t w = send(g->cfg.uplink_fd, g->uout + start, end - start,
                         MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0) {
            g->uout_off += (size_t)w;
            g->uout_cut = g->uout_off < end ? end : 0;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        g->st.write_errors++;
        g->uout_off = g->uout_len = g->uout_cut = 0; /* the uplink is gone */
        g->uplink_alive = 0;
        return;
    }
    g->uout_off = g->uout_len = g->uout_cut = 0;
}

/* One frame (the concatenation of iov[0..n)) to a stream uplink: framed into the
 * output buffer, written when the buffer fills or at the end of the loop's round.
 * Returns -1 (and counts a write error) when it does not fit or the uplink died. */
static ssize_t uplink_stream_put(ns_gw *g, const struct iovec *iov, int n) {
    size_t len = 0;
    for (int i = 0; i < n; i++) len += iov[i].iov_len;
    if (!g->uplink_alive) return -1;
    if (g->uout_len + 4 + len > STREAM_OUT_CAP / 2) flush_uplink(g);
    if (g->uout_off > 0 && g->uout_len + 4 + len > STREAM_OUT_CAP) {
        memmove(g->uout, g->uout + g->uout_off, g->uout_len - g->uout_off);
        g->uout_len -= g->uout_off;
        if (g->uout_cut) g->uout_cut -= g->uout_off;
        g->uout_off = 0;
    }
    if (g->uout_len + 4 + len > STREAM_OUT_CAP) return -1;
    uint8_t *p = g->uout + g->uout_len;
    p[0] = (uint8_t)(len >> 24);
    p[1] = (uint8_t)(len >> 16);
    p[2] = (uint8_t)(len >> 8);
    p[3] = (uint8_t)len;
    p += 4;
    for (int i = 0; i < n; i++) {
        memcpy(p, iov[i].iov_base, iov[i].iov_len);
        p += iov[i].iov_len;
    }
    /* the copy is ours: the steering NAT rewrites it in place, or drops it */
    if (g->steer && !g->steer_bypass && ns_steer_out(g->steer, p - len, len, g->now) < 0)
        return (ssize_t)len;
    g->uout_len += 4 + len;
    return (ssize_t)len;
}

/* A frame without virtio-net header to the uplink (TAP or stream). */
static ssize_t uplink_plain(ns_gw *g, const struct iovec *iov, int n) {
    if (g->cfg.uplink_stream) return uplink_stream_put(g, iov, n);
    return writev(g->cfg.uplink_fd, iov, n);
}

static void uplink_write(ns_gw *g, struct iovec *iov, int n) {
    /* iov[0] is the virtio-net header: skipped on a plain TAP */
    ssize_t w = g->cfg.uplink_vnet ? writev(g->cfg.uplink_fd, iov, n)
                                   : uplink_plain(g, iov + 1, n - 1);
    if (w < 0) g->st.write_errors++;
    else g->st.to_uplink++;
}

/* Cut an IPv4 packet without DF (untagged or tagged: the link header is kept) into
 * fragments that fit the uplink (RFC 791): the first keeps every option, the others
 * only those with the copy flag; a fragment's own offset and MF bit are respected.
 * Returns the number of fragments written, 0 if it cannot be fragmented (DF set,
 * malformed options or lengths). */
static int fragment_v4(ns_gw *g, const uint8_t *buf, size_t len, size_t l3) {
    const uint8_t *ip = buf + l3;
    size_t ihl = (size_t)(ip[0] & 15) * 4, tot = (size_t)((ip[2] << 8) | ip[3]);
    uint16_t fo = (uint16_t)((ip[6] << 8) | ip[7]);
    uint32_t mtu = g->cfg.uplink_mtu;
    if (ihl < 20 || tot <= ihl || l3 + tot > len || (fo & 0x4000) || mtu < 68 + 8) return 0;
    size_t base = (size_t)(fo & 0x1fff) * 8, data = tot - ihl;
    if (base + data > 65535) return 0;
    uint8_t later[60], hdr[18 + 60];
    size_t lhl = 20;
    memcpy(later, ip, 20);
    for (size_t i = 20; i < ihl;) {
        uint8_t t = ip[i];
        if (t == 0) break;        /* end of options */
        if (t == 1) {             /* NOP: not copied */
            i++;
            continue;
        }
        if (i + 1 >= ihl || ip[i + 1] < 2 || i + ip[i + 1] > ihl) return 0;
        if (t & 0x80) {
            memcpy(later + lhl, ip + i, ip[i + 1]);
            lhl += ip[i + 1];
        }
        i += ip[i + 1];
    }
    while (lhl & 3) later[lhl++] = 0;
    int n = 0;
    for (size_t off = 0; off < data;) {
        const uint8_t *h = off ? later : ip;
        size_t hl = off ? lhl : ihl;
        size_t room = (mtu - hl) & ~(size_t)7, chunk = data - off;
        int more = (fo & 0x2000) != 0;
        if (chunk > room) {
            chunk = room;
            more = 1;
        }
        memcpy(hdr, buf, l3);
        uint8_t *p = hdr + l3;
        memcpy(p, h, hl);
        p[0] = (uint8_t)(0x40 | (hl / 4));
        ns_wr16(p + 2, (uint16_t)(hl + chunk));
        ns_wr16(p + 6, (uint16_t)(((base + off) / 8) | (more ? 0x2000u : 0u)));
        p[10] = p[11] = 0;
        ns_wr16(p + 10, ns_csum_fold(csum_add(0, p, hl)));
        struct iovec iov[3] = {{(void *)zero_vnet, 10}, {hdr, l3 + hl},
                               {(void *)(ip + ihl + off), chunk}};
        uplink_write(g, iov, 3);
        off += chunk;
        n++;
    }
    return n;
}

/* A guest frame larger than the uplink's MTU that cannot leave as a GSO packet
 * (IPv4 non-TCP, TCP on a plain TAP, IPv6 with extension headers, ...): IPv4
 * without DF is fragmented; IPv4 with DF and IPv6 are answered with ICMP
 * "fragmentation needed" / ICMPv6 "packet too big" carrying the uplink's MTU, so
 * the guest lowers its path MTU (nothing vanishes: what deserves no ICMP error is
 * counted in oversize_dropped).  Returns 0 if the frame fits after all. */
static int too_big(ns_gw *g, const uint8_t *buf, size_t len, double now) {
    ns_frame fr;
    if (ns_parse_frame(buf, len, &fr) != NS_PARSE_OK ||
        (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6)) {
        g->st.oversize_dropped++;
        return 1;
    }
    size_t l3 = fr.vlan ? 18 : 14;
    if (len - l3 <= g->cfg.uplink_mtu) return 0;
    if (fr.family == 4 && !(buf[l3 + 6] & 0x40)) {
        int n = fragment_v4(g, buf, len, l3);
        if (n > 0) {
            g->st.fragmented++;
            return 1;
        }
    }
    uint8_t out[REJECT_CAP];
    size_t n = ns_gw_build_too_big(buf, len, g->cfg.uplink_mtu,
                                   fr.family == 4 ? g->cfg.gateway_ip : g->cfg.gateway_ip6, out,
                                   sizeof(out));
    if (n) {
        g->st.frag_needed++;
        to_guest(g, out, n, now);
    } else {
        g->st.oversize_dropped++;
    }
    return 1;
}

static void to_uplink(ns_gw *g, const uint8_t *frame, size_t len, double now) {
    ssize_t w;
    uint8_t h[10];
    int gso = 0;
    if (g->cfg.uplink_vnet) co_flush(g);
    if (len > 14u + g->cfg.uplink_mtu) {
        /* our own buffers (read buffer, held copies): writable */
        if (g->cfg.uplink_vnet) gso = big_tcp_vnet(g, (uint8_t *)frame, len, h);
        if (!gso && too_big(g, frame, len, now)) return;
    }
    if (g->cfg.uplink_vnet) {
        const uint8_t *vh = gso ? h : zero_vnet;
        struct iovec iov[2] = {{(void *)vh, 10}, {(void *)frame, len}};
        w = writev(g->cfg.uplink_fd, iov, 2);
    } else {
        struct iovec iov[1] = {{(void *)frame, len}};
        w = uplink_plain(g, iov, 1);
    }
    if (w < 0) g->st.write_errors++;
    else g->st.to_uplink++;
}

/* An allowed frame: coalesced with the previous ones when it continues the same
 * TCP run (IPv4 without options, ACK or ACK|PSH, contiguous, identical headers
 * but for the sequence number), else written as is. */
static void to_uplink_allowed(ns_gw *g, const uint8_t *buf, size_t len, double now) {
    ns_frame fr;
    if (!g->cfg.uplink_vnet || len < 54 || buf[12] != 0x08 || buf[13] != 0x00 || buf[14] != 0x45 ||
        buf[23] != 6 || ns_parse_frame(buf, len, &fr) != NS_PARSE_OK || fr.frag != 0 ||
        (fr.tcp_flags & ~0x08) != 0x10 || fr.payload_len == 0 || fr.l4_off != 34 ||
        fr.payload_off + fr.payload_len != len || len - 14 > g->cfg.uplink_mtu) {
        to_uplink(g, buf, len, now); /* large-MTU frames go as they are (GSO), no copy */
        return;
    }
    uint32_t hl = fr.payload_off, plen = fr.payload_len;
    uint8_t *f = g->co + 10;
    if (g->co_len && !g->co_closed && hl == g->co_hl && fr.seq == g->co_next_seq &&
        plen <= g->co_mss && g->co_len + plen <= 14 + 65535 - 64 && g->co_segs < CO_IOV &&
        memcmp(buf + 26, f + 26, 12) == 0 &&          /* addresses, ports */
        memcmp(buf + 42, f + 42, 4) == 0 &&           /* ack */
        buf[46] == f[46] &&                           /* data offset */
        memcmp(buf + 54, f + 54, hl - 54) == 0) {     /* options (timestamps ...) */
        g->co_segs++;
        g->co_iov[g->co_segs].iov_base = (void *)(buf + hl);
        g->co_iov[g->co_segs].iov_len = plen;
        g->co_len += plen;
        g->co_next_seq += plen;
        if (fr.tcp_flags & 0x08) f[47] |= 0x08;
        if (plen < g->co_mss || (fr.tcp_flags & 0x08)) g->co_closed = 1;
        return;
    }
    co_flush(g);
    if (hl + 10 > CO_HDR) { /* cannot happen (l4_off == 34 above, TCP header <= 60): be safe */
        to_uplink(g, buf, len, now);
        return;
    }
    memcpy(f, buf, hl);
    g->co_iov[1].iov_base = (void *)(buf + hl);
    g->co_iov[1].iov_len = plen;
    g->co_len = len;
    g->co_segs = 1;
    g->co_hl = hl;
    g->co_mss = plen;
    g->co_next_seq = fr.seq + plen;
    g->co_closed = (fr.tcp_flags & 0x08) != 0;
}

/* ------------------------------------------------------------ pending flows */

static pending *pend_find(ns_gw *g, const ns_frame *fr) {
    if (!g->npending) return NULL;
    for (uint32_t i = 0; i < MAX_PENDING; i++) {
        pending *p = &g->pend[i];
        if (p->used && p->sport == fr->sport && p->dport == fr->dport && p->proto == fr->ipproto &&
            memcmp(p->src, fr->src, 16) == 0 && memcmp(p->dst, fr->dst, 16) == 0)
            return p;
    }
    return NULL;
}

static pending *pend_add(ns_gw *g, const ns_frame *fr, const uint8_t *buf, size_t len,
                         double now) {
    if (g->npending >= MAX_PENDING) return NULL;
    for (uint32_t i = 0; i < MAX_PENDING; i++) {
        pending *p = &g->pend[i];
        if (p->used) continue;
        memset(p, 0, sizeof(*p));
        p->first = (uint8_t *)malloc(len);
        if (!p->first) return NULL;
        memcpy(p->first, buf, len);
        p->first_len = (uint32_t)len;
        p->used = 1;
        memcpy(p->src, fr->src, 16);
        memcpy(p->dst, fr->dst, 16);
        p->sport = fr->sport;
        p->dport = fr->dport;
        p->proto = fr->ipproto;
        p->created = now;
        g->npending++;
        return p;
    }
    return NULL;
}

static void pend_free(ns_gw *g, pending *p) {
    held_frame *h = p->head;
    while (h) {
        held_frame *n = h->next;
        free(h);
        h = n;
        g->nheld_total--;
    }
    free(p->first);
    memset(p, 0, sizeof(*p));
    g->npending--;
}

static void pend_hold(ns_gw *g, pending *p, const uint8_t *buf, size_t len) {
    if (g->nheld_total >= g->cfg.hold_frames || p->nheld >= 64) {
        g->st.hold_dropped++; /* the guest retransmits */
        return;
    }
    held_frame *h = (held_frame *)malloc(sizeof(held_frame) + len);
    if (!h) {
        g->st.hold_dropped++;
        return;
    }
    h->next = NULL;
    h->len = (uint32_t)len;
    memcpy(h->data, buf, len);
    if (p->tail) p->tail->next = h;
    else p->head = h;
    p->tail = h;
    p->nheld++;
    g->nheld_total++;
    g->st.held++;
}

/* The flow of `p` got verdict v (from frame buf/fr): release or reject. */
static void pend_resolve(ns_gw *g, pending *p, uint8_t v, const uint8_t *buf, const ns_frame *fr,
                         double now) {
    uint8_t out[REJECT_CAP];
    if (v == NS_ALLOW) {
        for (held_frame *h = p->head; h; h = h->next) {
            to_uplink(g, h->data, h->len, now);
            g->st.released++;
        }
    } else {
        /* the handshake went through: reset the server's side too, at the
         * first sequence number the guest sent data with */
        ns_frame f0;
        uint32_t seq = fr->seq;
        if (p->head && ns_parse_frame(p->head->data, p->head->len, &f0) == NS_PARSE_OK)
            seq = f0.seq;
        size_t n = build_rst_upstream(buf, fr, seq, out, sizeof(out));
        if (n) to_uplink(g, out, n, now);
    }
    pend_free(g, p);
}

static int published_proto(const ns_gw *g, uint8_t pbit, uint16_t port) {
    if (pbit == NS_P_TCP) {
        for (uint32_t i = 0; i < g->cfg.npublished && i < 16; i++)
            if (g->cfg.published[i] == port) return 1;
    } else if (pbit == NS_P_UDP) {
        for (uint32_t i = 0; i < g->cfg.npublished_udp && i < 16; i++)
            if (g->cfg.published_udp[i] == port) return 1;
    }
    return 0;
}

/* ------------------------------------------------------------ guest frames */

static void handle_egress(ns_gw *g, const uint8_t *buf, size_t len, uint8_t v, int32_t rule,
                          double now) {
    uint8_t out[REJECT_CAP];
    ns_frame fr;
    g->st.guest_frames++;
    g->st.guest_bytes += len;
    g->st.verdicts[v & 7]++;
    if (g->cfg.capture) push_event(g, NS_EV_CAPTURE, v, NS_DIR_EGRESS, rule, now, buf, len);
    int parsed = -1;
    int anypub = g->cfg.npublished || g->cfg.npublished_udp;
    if (g->npending || v == NS_NEED_MORE || v == NS_TO_DNS || (anypub && v != NS_ALLOW))
        parsed = ns_parse_frame(buf, len, &fr);
    /* a first fragment has its ports; a later one passes when its first fragment was
     * let through as such a reply (the classifier's fragment table) */
    if (anypub && v != NS_ALLOW && parsed == NS_PARSE_OK &&
        (fr.frag == 2 || published_proto(g, fr.pbit, fr.sport)) &&
        ns_ctx_ingress_reply(g->ctx, buf, len, now) == 1) {
        g->steer_bypass = 1; /* (passt's forwards come from the gateway address) */
        to_uplink(g, buf, len, now); /* the guest answering a published-port flow */
        g->steer_bypass = 0;
        return;
    }
    pending *p = NULL;
    if (parsed == NS_PARSE_OK && fr.pbit == NS_P_TCP && v != NS_NEED_MORE) p = pend_find(g, &fr);
    if (p) pend_resolve(g, p, v == NS_TO_PROXY ? NS_DENY_RST : v, buf, &fr, now);
    switch (v) {
    case NS_ALLOW:
        to_uplink_allowed(g, buf, len, now);
        return;
    case NS_NEED_MORE:
        if (parsed != NS_PARSE_OK) return;
        p = pend_find(g, &fr);
        if (!p) {
            p = pend_add(g, &fr, buf, len, now);
            if (!p) { /* too many flows waiting for a hello: drop, the guest retries */
                g->st.hold_dropped++;
                return;
            }
        }
        if (fr.payload_len == 0) to_uplink(g, buf, len, now); /* handshake segments pass */
        else pend_hold(g, p, buf, len);
        return;
    case NS_TO_DNS:
        if (parsed == NS_PARSE_OK && fr.pbit == NS_P_UDP) {
            g->st.dns_queries++;
            push_event(g, NS_EV_DNS, v, NS_DIR_EGRESS, rule, now, buf, len);
            return;
        }
        if (parsed == NS_PARSE_OK && fr.pbit == NS_P_TCP && !g->cfg.dns_tcp_reset) {
            /* DNS over TCP to any address: the uplink namespace DNATs port 53 to the
             * forwarder's listener on the gateway address, which judges every query
             * (and, for another resolver, the egress policy towards it) */
            to_uplink(g, buf, len, now);
            return;
        }
        break; /* not parseable, or TCP without the uplink's DNAT: rejected */
    case NS_DENY_RST:
    case NS_DENY_ICMP:
    case NS_TO_PROXY:
        break;
    default: /* NS_DENY, NS_MALFORMED */
        if (g->cfg.log_denied)
            push_event(g, NS_EV_DENIED, v, NS_DIR_EGRESS, rule, now, buf, len);
        return;
    }
    if (g->cfg.log_denied) push_event(g, NS_EV_DENIED, v, NS_DIR_EGRESS, rule, now, buf, len);
    size_t n = ns_gw_build_reject(buf, len, out, sizeof(out));
    if (n) {
        if (out[12] == 0x08 ? out[23] == 6 : out[20] == 6) g->st.rst_sent++;
        else g->st.icmp_sent++;
        to_guest(g, out, n, now);
    }
}

static void read_guest_stream(ns_gw *g, double now) {
    uint8_t verdicts[256];
    int32_t rules[256];
    for (int round = 0; round < 4; round++) {
        /* at most STREAM_READ per read: what was read is still in cache when written */
        size_t room = STREAM_IN_CAP - g->in_len;
        ssize_t r = read(g->cfg.guest_fd, g->in + g->in_len, room < STREAM_READ ? room : STREAM_READ);
        if (r == 0) {
            g->guest_alive = 0;
            push_event(g, NS_EV_GUEST_CLOSED, 0, NS_DIR_EGRESS, -1, now, NULL, 0);
            return;
        }
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                g->guest_alive = 0;
                push_event(g, NS_EV_GUEST_CLOSED, 0, NS_DIR_EGRESS, -1, now, NULL, 0);
            }
            return;
        }
        g->in_len += (size_t)r;
        size_t off = 0;
        for (;;) {
            size_t used = 0;
            size_t n = ns_classify_stream(g->ctx, g->in + off, g->in_len - off, NS_DIR_EGRESS, now,
                                          verdicts, rules, 256, &used);
            int broken = ns_stream_broken(g->ctx);
            size_t o = off;
            size_t good = broken ? n - 1 : n;
            for (size_t i = 0; i < good; i++) {
                uint32_t fl = ns_rd32(g->in + o);
                handle_egress(g, g->in + o + 4, fl, verdicts[i], rules[i], now);
                o += 4 + (size_t)fl;
            }
            off += used;
            if (broken) {
                g->guest_alive = 0;
                push_event(g, NS_EV_GUEST_CLOSED, NS_MALFORMED, NS_DIR_EGRESS, -1, now, NULL, 0);
                co_flush(g);
                g->in_len = 0;
                return;
            }
            if (n < 256) break;
        }
        if (off) {
            co_flush(g); /* a coalesced run points into g->in */
            memmove(g->in, g->in + off, g->in_len - off);
            g->in_len -= off;
        }
        if ((size_t)r < 65536) return; /* drained for now */
    }
}

static void classify_rx(ns_gw *g, const uint8_t *const *ptrs, const uint32_t *lens, size_t n,
                        double now) {
    uint8_t verdicts[BATCH];
    int32_t rules[BATCH];
    if (!n) return;
    ns_classify_batch(g->ctx, ptrs, lens, n, NS_DIR_EGRESS, now, verdicts, rules);
    for (size_t i = 0; i < n; i++) handle_egress(g, ptrs[i], lens[i], verdicts[i], rules[i], now);
}

static void read_guest_dgram(ns_gw *g, double now) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_un names[BATCH];
    const uint8_t *ptrs[BATCH];
    uint32_t lens[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = g->rx + (size_t)i * RX_FRAME;
        iov[i].iov_len = RX_FRAME;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
    }
    int r = recvmmsg(g->cfg.guest_fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            g->guest_alive = 0;
            push_event(g, NS_EV_GUEST_CLOSED, 0, NS_DIR_EGRESS, -1, now, NULL, 0);
        }
        return;
    }
    size_t n = 0;
    for (int i = 0; i < r; i++) {
        const uint8_t *d = g->rx + (size_t)i * RX_FRAME;
        uint32_t l = msgs[i].msg_len;
        if (msgs[i].msg_hdr.msg_namelen > sizeof(sa_family_t) &&
            msgs[i].msg_hdr.msg_namelen <= sizeof(struct sockaddr_un)) {
            memcpy(&g->peer, &names[i], msgs[i].msg_hdr.msg_namelen);
            g->peer_len = msgs[i].msg_hdr.msg_namelen;
        }
        if (!g->vfkt_checked) {
            g->vfkt_checked = 1;
            if (l == 4 && memcmp(d, "VFKT", 4) == 0) continue; /* libkrun handshake */
        }
        if (l == 0) continue;
        ptrs[n] = d;
        lens[n] = l;
        n++;
    }
    classify_rx(g, ptrs, lens, n, now);
}

static void read_guest_tap(ns_gw *g, double now) {
    const uint8_t *ptrs[BATCH];
    uint32_t lens[BATCH];
    size_t n = 0;
    while (n < BATCH) {
        uint8_t *d = g->rx + n * RX_FRAME;
        ssize_t r = read(g->cfg.guest_fd, d, RX_FRAME);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                g->guest_alive = 0;
                push_event(g, NS_EV_GUEST_CLOSED, 0, NS_DIR_EGRESS, -1, now, NULL, 0);
            }
            break;
        }
        ptrs[n] = d;
        lens[n] = (uint32_t)r;
        n++;
    }
    classify_rx(g, ptrs, lens, n, now);
}

/* ------------------------------------------------------------ uplink frames */

/* Recompute the TCP checksum of an untagged frame (IPv4 or IPv6 without
 * extension headers); 0 if it is not one. */
static int tcp_csum_fix(uint8_t *d, size_t len, const ns_frame *fr) {
    const uint8_t *ip = d + 14;
    uint32_t s, l4len;
    if (fr->family == 4) {
        size_t ihl = (size_t)(ip[0] & 15) * 4;
        l4len = (uint32_t)(((ip[2] << 8) | ip[3]) - ihl);
        s = csum_add(0, ip + 12, 8) + 6u + l4len;
    } else {
        l4len = (uint32_t)((ip[4] << 8) | ip[5]);
        s = csum_add(0, ip + 8, 32) + 6u + l4len;
    }
    if (fr->l4_off + l4len > len) return 0;
    uint8_t *t = d + fr->l4_off;
    t[16] = t[17] = 0;
    ns_wr16(t + 16, ns_csum_fold(csum_add(s, t, l4len)));
    return 1;
}

/* A SYN towards a large-MTU guest: when the peer's MSS admits full segments of the
 * uplink's MTU, advertise the guest link's MSS instead, so that the guest sends
 * large frames, which the loop cuts back to the uplink's MSS with GSO (passt
 * terminates TCP and gets the same effect).  A smaller MSS is left alone: the
 * guest then sends segments the peer accepts. */
static void raise_mss(ns_gw *g, uint8_t *d, size_t len) {
    ns_frame fr;
    if (g->cfg.guest_mtu <= g->cfg.uplink_mtu || len < 54 ||
        ns_parse_frame(d, len, &fr) != NS_PARSE_OK || fr.pbit != NS_P_TCP ||
        !(fr.tcp_flags & 0x02) || fr.frag != 0 || fr.vlan)
        return;
    if (fr.family == 6 && (fr.l4_off != 54 || d[20] != 6)) return;
    uint32_t iph = (uint32_t)fr.l4_off - 14;
    uint8_t *t = d + fr.l4_off;
    size_t thl = (size_t)(t[12] >> 4) * 4;
    if (thl < 20 || fr.l4_off + thl > len) return;
    for (size_t i = 20; i < thl;) {
        uint8_t kind = t[i];
        if (kind == 0) return;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= thl || t[i + 1] < 2 || i + t[i + 1] > thl) return;
        if (kind == 2 && t[i + 1] == 4) {
            uint32_t mss = (uint32_t)((t[i + 2] << 8) | t[i + 3]);
            uint32_t want = g->cfg.guest_mtu - iph - 20;
            if (want > 65535) want = 65535;
            if (mss + iph + 20 < g->cfg.uplink_mtu || mss >= want) return;
            uint8_t old[2] = {t[i + 2], t[i + 3]};
            ns_wr16(t + i + 2, (uint16_t)want);
            if (!tcp_csum_fix(d, len, &fr)) {
                t[i + 2] = old[0];
                t[i + 3] = old[1];
                return;
            }
            g->st.mss_raised++;
            return;
        }
        i += t[i + 1];
    }
}

static void uplink_frame(ns_gw *g, uint8_t *d, size_t len, double now);

static void read_uplink(ns_gw *g, double now) {
    uint8_t *d = g->rx; /* the guest reader is done with rx by now */
    for (int i = 0; i < BATCH; i++) {
        ssize_t r = read(g->cfg.uplink_fd, d, RX_FRAME);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            g->uplink_alive = 0; /* a TAP does not hang up; a socket did */
            return;
        }
        if (r < 0) return;
        uplink_frame(g, d, (size_t)r, now);
    }
}

/* A stream uplink: one large read, then every complete u32-BE framed frame (handled
 * in place: the buffer is ours), partial frames carried over.  A frame length out of
 * range means the stream is broken: the uplink is dropped (nothing more is read). */
static void read_uplink_stream(ns_gw *g, double now) {
    for (int round = 0; round < 4; round++) {
        size_t room = STREAM_IN_CAP - g->uin_len;
        ssize_t r = read(g->cfg.uplink_fd, g->uin + g->uin_len, room < STREAM_READ ? room : STREAM_READ);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            g->uplink_alive = 0;
            return;
        }
        if (r < 0) return;
        g->uin_len += (size_t)r;
        size_t off = 0;
        while (g->uin_len - off >= 4) {
            uint32_t fl = ns_rd32(g->uin + off);
            if (fl < 14 || fl > NS_MAX_FRAME) {
                g->uplink_alive = 0;
                g->uin_len = 0;
                return;
            }
            if (g->uin_len - off < 4 + (size_t)fl) break;
            uplink_frame(g, g->uin + off + 4, fl, now);
            off += 4 + (size_t)fl;
        }
        if (off) {
            memmove(g->uin, g->uin + off, g->uin_len - off);
            g->uin_len -= off;
        }
        if ((size_t)r < 65536) return; /* drained for now */
    }
}

static void uplink_frame(ns_gw *g, uint8_t *d, size_t len, double now) {
    {
        if (g->cfg.uplink_vnet) {
            /* no offloads are negotiated (TUNSETOFFLOAD), so the kernel segments and
             * checksums before the TAP; a header that still asks for a checksum
             * gets one, a GSO packet too large for the guest is dropped below */
            if (len < 10 + 14) return;
            uint8_t vh[10];
            memcpy(vh, d, 10);
            memmove(d, d + 10, len - 10);
            len -= 10;
            if (vh[0] & 1) {
                size_t cs = (size_t)(vh[6] | (vh[7] << 8)), co = (size_t)(vh[8] | (vh[9] << 8));
                if (cs + co + 2 > len) return;
                uint16_t c = ns_csum_fold(csum_add(0, d + cs, len - cs));
                /* the field held the pseudo-header sum: fold it in */
                ns_wr16(d + cs + co, c);
            }
        }
        if (g->cfg.guest_mtu && len > 14u + g->cfg.guest_mtu +
                                          ((d[12] == 0x81 && d[13] == 0x00) ? 4u : 0u)) {
            g->st.too_big++; /* never truncated: larger than the guest link carries */
            return;
        }
        g->st.uplink_frames++;
        g->st.uplink_bytes += len;
        int steered = g->steer ? ns_steer_in(g->steer, d, len, now) : 0;
        /* a steered DNS flow's answers (the forwarder's, back to the address the guest
         * asked) pass; a steered TLS flow's are the flow's replies, looked up as such;
         * from a listener port, of no steered flow (steered < 0): nothing the guest asked
         * for, -1 like an unparseable frame, which no branch below lets through */
        int k = steered < 0 ? -1 : steered == 2 ? 1 : ns_ctx_reply_lookup(g->ctx, d, len, now);
        int pass = k == 1 || k == 3;
        ns_frame fr;
        if (k == 2) { /* flow still waiting for its hello: handshake only */
            pass = ns_parse_frame(d, len, &fr) == NS_PARSE_OK && fr.payload_len == 0;
        } else if (k == 0 && !g->cfg.dns_tcp_reset && !g->steer &&
                   ns_parse_frame(d, len, &fr) == NS_PARSE_OK &&
                   fr.pbit == NS_P_TCP && fr.sport == 53 && fr.frag == 0) {
            /* the forwarder's DNS-over-TCP answers: guest TCP/53 never leaves the
             * uplink namespace (DNATed to the forwarder), so the namespace's conntrack
             * un-NATs only these towards the guest, with the address it asked */
            pass = 1;
        } else if (k == 0 && (g->cfg.npublished || g->cfg.npublished_udp) &&
                   ns_parse_frame(d, len, &fr) == NS_PARSE_OK && fr.frag != 2 &&
                   published_proto(g, fr.pbit, fr.dport)) {
            /* a connection to a published guest port (opened by the port publisher
             * inside the uplink namespace): ingress-classified; a first fragment too
             * (a large datagram to a published UDP port, cut by the uplink's MTU): the
             * classifier records its verdict, and its later fragments pass as replies
             * (k == 1 above) when it was allowed */
            const uint8_t *fp = d;
            uint32_t fl = (uint32_t)len;
            uint8_t v;
            int32_t rule;
            ns_classify_batch(g->ctx, &fp, &fl, 1, NS_DIR_INGRESS, now, &v, &rule);
            pass = v == NS_ALLOW;
        }
        if (pass) {
            raise_mss(g, d, len);
            to_guest(g, d, len, now);
        } else {
            g->st.not_reply++;
            if (g->cfg.log_denied || g->cfg.capture)
                push_event(g, NS_EV_NOT_REPLY, NS_DENY, NS_DIR_INGRESS, -1, now, d, len);
        }
    }
}

/* ------------------------------------------------------------ injection */

static void drain_inject(ns_gw *g, double now) {
    ev_slot tmp;
    for (;;) {
        pthread_mutex_lock(&g->inject_mu);
        if (g->inj_tail == g->inj_head) {
            pthread_mutex_unlock(&g->inject_mu);
            return;
        }
        ev_slot *s = &g->inject[g->inj_tail % INJECT_SLOTS];
        tmp.ev = s->ev;
        memcpy(tmp.data, s->data, s->ev.len);
        g->inj_tail++;
        pthread_mutex_unlock(&g->inject_mu);
        to_guest(g, tmp.data, tmp.ev.len, now);
        g->st.injected++;
    }
}

int ns_gw_inject(ns_gw *g, const uint8_t *frame, size_t len) {
    if (len < 14 || len > NS_GW_EVENT_DATA) return -1;
    pthread_mutex_lock(&g->inject_mu);
    if (g->inj_head - g->inj_tail >= INJECT_SLOTS) {
        pthread_mutex_unlock(&g->inject_mu);
        return -2;
    }
    ev_slot *s = &g->inject[g->inj_head % INJECT_SLOTS];
    s->ev.len = (uint32_t)len;
    memcpy(s->data, frame, len);
    g->inj_head++;
    pthread_mutex_unlock(&g->inject_mu);
    efd_signal(g->inject_efd);
    return 0;
}

int ns_gw_inject_udp(ns_gw *g, const uint8_t *src16, uint16_t sport, const uint8_t *dst16,
                     uint16_t dport, const uint8_t *payload, size_t len) {
    uint8_t frame[NS_GW_EVENT_DATA];
    size_t n = ns_gw_build_udp(g->cfg.guest_mac, g->cfg.gateway_mac, src16, sport, dst16, dport,
                               payload, len, frame, sizeof(frame));
    if (!n) return -1;
    return ns_gw_inject(g, frame, n);
}

/* ------------------------------------------------------------ timer */

static void timer(ns_gw *g, double now) {
    if (g->npending) {
        for (uint32_t i = 0; i < MAX_PENDING; i++) {
            pending *p = &g->pend[i];
            if (!p->used || now - p->created <= g->cfg.hello_timeout) continue;
            /* re-classify: the classifier decides a flow past its hello timeout */
            const uint8_t *f = p->head ? p->head->data : p->first;
            uint32_t fl = p->head ? p->head->len : p->first_len;
            uint8_t v;
            int32_t rule;
            ns_classify_batch(g->ctx, &f, &fl, 1, NS_DIR_EGRESS, now, &v, &rule);
            ns_frame fr;
            if (v == NS_NEED_MORE || ns_parse_frame(f, fl, &fr) != NS_PARSE_OK) {
                if (now - p->created > 4 * g->cfg.hello_timeout + 5) pend_free(g, p);
                continue;
            }
            uint8_t *copy = (uint8_t *)malloc(fl);
            size_t cl = copy ? fl : 0;
            if (cl) memcpy(copy, f, cl);
            int had_data = p->head != NULL;
            pend_resolve(g, p, v == NS_TO_PROXY ? NS_DENY_RST : v, f, &fr, now);
            if (v != NS_ALLOW && cl) {
                uint8_t out[REJECT_CAP];
                size_t n = ns_gw_build_reject(copy, cl, out, sizeof(out));
                if (n) {
                    g->st.rst_sent++;
                    to_guest(g, out, n, now);
                }
            }
            free(copy);
            (void)had_data;
        }
    }
    if (g->steer && now - g->last_steer_expire > 1.0) {
        ns_steer_expire(g->steer, now);
        g->last_steer_expire = now;
    }
    if (now - g->last_expire > 5.0) {
        ns_ctx_expire(g->ctx, now);
        g->last_expire = now;
    }
}

/* ------------------------------------------------------------ the loop */

static void *gw_main(void *arg) {
    ns_gw *g = (ns_gw *)arg;
    struct pollfd pfd[4];
    while (!__atomic_load_n(&g->stop_requested, __ATOMIC_ACQUIRE)) {
        int guest_events = 0;
        if (g->guest_alive) guest_events |= POLLIN;
        if (g->out_len > g->out_off) guest_events |= POLLOUT;
        pfd[0].fd = g->stop_efd;
        pfd[0].events = POLLIN;
        pfd[1].fd = g->inject_efd;
        pfd[1].events = POLLIN;
        pfd[2].fd = guest_events ? g->cfg.guest_fd : -1;
        pfd[2].events = (short)guest_events;
        pfd[3].fd = g->uplink_alive ? g->cfg.uplink_fd : -1;
        pfd[3].events = (short)(POLLIN | (g->uout_len > g->uout_off ? POLLOUT : 0));
        for (int i = 0; i < 4; i++) pfd[i].revents = 0;
        int timeout = g->npending ? 100 : 1000;
        int r = poll(pfd, 4, timeout);
        if (r < 0 && errno != EINTR) break;
        double now = mono();
        g->now = now;
        g->st.loops++;
        if (pfd[0].revents) break;
        if (pfd[1].revents & POLLIN) {
            efd_drain(g->inject_efd);
            drain_inject(g, now);
        }
        if (pfd[2].revents & POLLIN) {
            if (g->cfg.guest_mode == NS_GW_STREAM) read_guest_stream(g, now);
            else if (g->cfg.guest_mode == NS_GW_DGRAM) read_guest_dgram(g, now);
            else read_guest_tap(g, now);
        } else if (pfd[2].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            if (!(pfd[2].revents & POLLOUT) || (pfd[2].revents & (POLLERR | POLLNVAL))) {
                g->guest_alive = 0;
                push_event(g, NS_EV_GUEST_CLOSED, 0, NS_DIR_EGRESS, -1, now, NULL, 0);
            }
        }
        co_flush(g);
        if (pfd[3].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (g->cfg.uplink_stream) read_uplink_stream(g, now);
            else read_uplink(g, now);
        }
        if (g->cfg.uplink_stream && g->uout_len > g->uout_off) flush_uplink(g);
        if (g->cfg.guest_mode == NS_GW_STREAM && g->out_len > g->out_off) flush_guest(g);
        if (now - g->last_timer > 0.05) {
            timer(g, now);
            g->last_timer = now;
        }
        if (g->events_pushed) {
            g->events_pushed = 0;
            efd_signal(g->event_efd);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------ lifecycle */

/* Close the eventfds that were opened and free the buffers and `g` itself. */
static void gw_release(ns_gw *g) {
    if (g->stop_efd >= 0) close(g->stop_efd);
    if (g->inject_efd >= 0) close(g->inject_efd);
    if (g->event_efd >= 0) close(g->event_efd);
    free(g->ring);
    free(g->inject);
    free(g->rx);
    free(g->co);
    free(g->in);
    free(g->out);
    free(g->uin);
    free(g->uout);
    ns_steer_free(g->steer);
    free(g);
}

ns_gw *ns_gw_new(ns_ctx *ctx, const ns_gw_config *cfg) {
    if (!ctx || !cfg || cfg->guest_fd < 0 || cfg->uplink_fd < 0 || cfg->guest_mode < 0 ||
        cfg->guest_mode > NS_GW_TAP)
        return NULL;
    ns_gw *g = (ns_gw *)calloc(1, sizeof(*g));
    if (!g) return NULL;
    g->ctx = ctx;
    g->cfg = *cfg;
    if (g->cfg.hold_frames == 0) g->cfg.hold_frames = 1024;
    if (!(g->cfg.hello_timeout > 0)) g->cfg.hello_timeout = 5.0;
    if (g->cfg.uplink_mtu == 0) g->cfg.uplink_mtu = 1500;
    if (g->cfg.uplink_mtu < 576) g->cfg.uplink_mtu = 576;
    uint32_t slots = 16;
    uint32_t want = cfg->event_slots ? cfg->event_slots : 1024;
    if (want > (1u << 16)) want = 1u << 16;
    while (slots < want) slots <<= 1;
    g->ring_mask = slots - 1;
    g->stop_efd = g->inject_efd = g->event_efd = -1;
    g->ring = (ev_slot *)calloc(slots, sizeof(ev_slot));
    g->inject = (ev_slot *)calloc(INJECT_SLOTS, sizeof(ev_slot));
    g->rx = (uint8_t *)malloc((size_t)BATCH * RX_FRAME);
    g->co = (uint8_t *)malloc(CO_HDR);
    if (cfg->guest_mode == NS_GW_STREAM) {
        g->in = (uint8_t *)malloc(STREAM_IN_CAP);
        g->out = (uint8_t *)malloc(STREAM_OUT_CAP);
    }
    if (cfg->uplink_stream) {
        g->uin = (uint8_t *)malloc(STREAM_IN_CAP);
        g->uout = (uint8_t *)malloc(STREAM_OUT_CAP);
    }
    g->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    g->inject_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    g->event_efd = eventfd(0, EFD_CLOEXEC);
    if (!g->ring || !g->inject || !g->rx || !g->co || (cfg->guest_mode == NS_GW_STREAM && (!g->in || !g->out)) ||
        (cfg->uplink_stream && (!g->uin || !g->uout)) || (cfg->uplink_stream && cfg->uplink_vnet) ||
        g->stop_efd < 0 || g->inject_efd < 0 || g->event_efd < 0 ||
        pthread_mutex_init(&g->inject_mu, NULL) != 0) {
        gw_release(g);
        return NULL;
    }
    g->guest_alive = 1;
    g->uplink_alive = 1;
    return g;
}

int ns_gw_start(ns_gw *g) {
    if (g->started) return -1;
    set_nonblock(g->cfg.guest_fd);
    set_nonblock(g->cfg.uplink_fd);
    g->last_timer = g->last_expire = g->last_steer_expire = g->now = mono();
    if (pthread_create(&g->thread, NULL, gw_main, g) != 0) return -1;
    pthread_setname_np(g->thread, "ns-gateway");
    g->started = 1;
    return 0;
}

void ns_gw_stop(ns_gw *g) {
    if (!g) return;
    __atomic_store_n(&g->stop_requested, 1, __ATOMIC_RELEASE);
    efd_signal(g->stop_efd);
    if (g->started == 1) {
        pthread_join(g->thread, NULL);
        g->started = 2;
    }
    efd_signal(g->event_efd); /* wake the owner's reader */
}

void ns_gw_free(ns_gw *g) {
    if (!g) return;
    ns_gw_stop(g);
    for (uint32_t i = 0; i < MAX_PENDING; i++)
        if (g->pend[i].used) pend_free(g, &g->pend[i]);
    pthread_mutex_destroy(&g->inject_mu);
    gw_release(g);
}

int ns_gw_event_fd(const ns_gw *g) { return g->event_efd; }

void ns_gw_stats_get(ns_gw *g, ns_gw_stats *out) { memcpy(out, &g->st, sizeof(*out)); }

uint32_t ns_gw_pending(ns_gw *g) { return __atomic_load_n(&g->npending, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------ the steering NAT */

/* Turn the steering NAT on (before ns_gw_start; a stream uplink only): see steer.c. */
int ns_gw_steer_enable(ns_gw *g, const ns_gw_steer_config *cfg) {
    if (!g || !cfg || g->started || g->steer || !g->cfg.uplink_stream) return -1;
    g->steer = ns_steer_new(cfg);
    return g->steer ? 0 : -1;
}

/* Steer guest TCP to `ports` (any address) to the listener ports `pool` (any thread). */
int ns_gw_steer_tls(ns_gw *g, const uint16_t *ports, size_t nports, const uint16_t *pool,
                    size_t npool, int block_udp) {
    if (!g || !g->steer) return -1;
    return ns_steer_set_tls(g->steer, ports, nports, pool, npool, block_udp);
}

/* The original destination of the flow waiting on listener port `port` (any thread). */
int ns_gw_steer_claim(ns_gw *g, uint16_t port, uint8_t *dst16, uint16_t *dport) {
    if (!g || !g->steer) return -1;
    return ns_steer_claim(g->steer, port, mono(), dst16, dport);
}

void ns_gw_steer_stats_get(ns_gw *g, ns_gw_steer_stats *out) {
    if (!g || !g->steer) {
        memset(out, 0, sizeof(*out));
        return;
    }
    ns_steer_stats(g->steer, out);
}
