/*
 * netstack.h - public C API of the netstack fast path.
 *
 * Everything a packet loop needs lives behind an opaque `ns_ctx` that the
 * caller owns (no global mutable state anywhere in the library).  The batch
 * entry points never call back into Python and may be called with the GIL
 * released.  One context must be driven by one thread at a time (the flow
 * table and the pin cache are mutated by the batch calls); `ns_ctx_set_policy`
 * may be called from another thread concurrently with a running batch: the
 * compiled tables are swapped atomically and the old tables are freed only
 * once no batch can still be reading them.
 *
 * Stream wire format (QEMU -netdev stream, libkrun unixstream, passt):
 *     [u32 big-endian length][Ethernet frame of that length] ...
 *
 * Typical gateway loop (C):
 *     size_t used = 0;
 *     size_t n = ns_classify_stream(ctx, buf, len, NS_DIR_EGRESS, now_s,
 *                                   verdicts, rules, cap, &used);
 *     // frames 0..n-1 of buf have verdicts[i] (an ns_verdict) and rules[i]
 *     // (the first-match rule index or -1 for the default / no rule);
 *     // keep buf[used..len) (an incomplete trailing frame) for the next read.
 */
#ifndef NETSTACK_H
#define NETSTACK_H

#include <stddef.h>
#include <stdint.h>

/* Verdicts (one byte per frame). */
enum ns_verdict {
    NS_ALLOW = 0,        /* forward */
    NS_DENY = 1,         /* drop silently (ICMP, other protocols) */
    NS_DENY_RST = 2,     /* drop; answer the guest with a TCP RST */
    NS_DENY_ICMP = 3,    /* drop; answer the guest with ICMP(v6) unreachable */
    NS_NEED_MORE = 4,    /* hold: the flow waits for its TLS ClientHello */
    NS_TO_DNS = 5,       /* a DNS query (UDP/TCP port 53, any address) */
    NS_TO_PROXY = 6,     /* TLS to be intercepted by the TLS proxy */
    NS_MALFORMED = 7     /* unparseable / truncated / oversize frame */
};

enum ns_direction { NS_DIR_EGRESS = 1, NS_DIR_INGRESS = 2 };

/* Largest frame accepted: 65,535 bytes of IP + 14 bytes of Ethernet. */
#define NS_MAX_FRAME 65549u

typedef struct ns_ctx ns_ctx;
typedef struct ns_policy ns_policy;
typedef struct ns_pincache ns_pincache;

/* Per-flow and context statistics (introspection). */
typedef struct ns_flow_info {
    uint8_t found, state, verdict, pad;
    int32_t rule;
    uint64_t packets, bytes;
    double created, last_seen;
} ns_flow_info;

typedef struct ns_ctx_stats {
    uint64_t flows_created, flows_evicted, flows_expired, malformed, hello_denied;
    uint64_t live_flows, hello_bytes;
    uint64_t max_probe;   /* longest probe sequence an insert walked (slots examined) */
} ns_ctx_stats;

/* Later IP fragments (no L4 header) get the verdict recorded for their datagram's
 * first fragment, or are dropped (frag.c: keys, bounds, overlap rules). */
typedef struct ns_frag_stats {
    uint64_t recorded;    /* first fragments whose verdict was recorded */
    uint64_t followed;    /* later fragments that got their first fragment's verdict */
    uint64_t unmatched;   /* later fragments without a live record (dropped) */
    uint64_t bad;         /* later fragments overlapping their first fragment, ending past
                             65,535 bytes or with a bad header chain (dropped) */
    uint64_t evicted;     /* live records replaced in a full bucket */
    uint64_t live, capacity;
} ns_frag_stats;

/* Context lifecycle.  `pins` (may be NULL) is borrowed: keep it alive. */
ns_ctx *ns_ctx_new(uint32_t max_flows, ns_pincache *pins);
void ns_ctx_free(ns_ctx *ctx);
int ns_ctx_configure(ns_ctx *ctx, double tcp_idle, double udp_idle, uint32_t hello_cap,
                     double hello_timeout, uint64_t hello_budget);
/* Refuse the DNS side doors (off by default): egress TCP 853 (DNS over TLS) gets
 * NS_DENY_RST, UDP 853 (DNS over QUIC) NS_DENY_ICMP, UDP 5353/5355/137 (mDNS, LLMNR,
 * NetBIOS name service) NS_DENY, whatever the policy says - name lookups must go
 * through the DNS forwarder, where the policy sees them.  Returns 0. */
int ns_ctx_set_block_dns_bypass(ns_ctx *ctx, int on);
/* Install compiled tables (ownership passes to ctx); atomic w.r.t. batches. */
void ns_ctx_set_policy(ns_ctx *ctx, ns_policy *p);
void ns_ctx_expire(ns_ctx *ctx, double now);
void ns_ctx_stats_get(ns_ctx *ctx, ns_ctx_stats *out);
uint32_t ns_ctx_flow_count(const ns_ctx *ctx);
/* Flow-table entry of the flow `buf` (a frame) belongs to; 1 found, 0 not, -1 bad frame. */
int ns_ctx_flow_info(ns_ctx *ctx, const uint8_t *buf, size_t len, int dir, ns_flow_info *out);
/* Pin cache: the longest hash chain a lookup or insert has walked (entries examined). */
uint32_t ns_pin_max_chain(ns_pincache *pc);
/* At most max_records fragment records (16 .. 1 << 20), each living `lifetime` seconds
 * (0 .. 3600) after its first fragment; drops the current records (call it before a
 * loop drives the context, like ns_ctx_configure).  0, or -1 if invalid. */
int ns_ctx_set_frag_limits(ns_ctx *ctx, uint32_t max_records, double lifetime);
void ns_ctx_frag_stats(ns_ctx *ctx, ns_frag_stats *out);

/*
 * Classify `count` frames given as pointer/length pairs.  Writes verdicts[i]
 * and (if `rules` is not NULL) rules[i].  `now` is a monotonic time in seconds
 * (the caller's clock; used for idle expiry, pin TTLs and the hello time cap).
 */
void ns_classify_batch(ns_ctx *ctx, const uint8_t *const *frames, const uint32_t *lens,
                       size_t count, int direction, double now,
                       uint8_t *verdicts, int32_t *rules);

/*
 * Classify the length-prefixed frames of one contiguous buffer, in place (no
 * copies).  Stops at the first incomplete frame, or after `max_frames`
 * frames.  Returns the number of frames classified and stores in *consumed
 * the number of bytes they occupy (prefixes included).  A prefix announcing
 * a frame longer than NS_MAX_FRAME (or of length 0) yields NS_MALFORMED for
 * that frame and *consumed stops before it with the return value including
 * it: the stream is unrecoverable and the caller must drop the connection
 * (as QEMU does for an oversized packet).  Check with ns_stream_broken().
 */
size_t ns_classify_stream(ns_ctx *ctx, const uint8_t *buf, size_t len, int direction,
                          double now, uint8_t *verdicts, int32_t *rules,
                          size_t max_frames, size_t *consumed);

/* 1 if the last ns_classify_stream call hit an invalid length prefix. */
int ns_stream_broken(const ns_ctx *ctx);

/* Reply check for frames arriving from an uplink (reversed 5-tuple lookup among
 * egress flows): 1 allowed flow, 2 flow pending its ClientHello, 3 ARP, 0 no
 * such flow / denied, -1 unparseable.  A later IP fragment gets 1 when its first
 * fragment got 1 (or was admitted as ingress), else 0.  Called by the packet-loop
 * thread only. */
int ns_ctx_reply_lookup(ns_ctx *ctx, const uint8_t *buf, size_t len, double now);
/* 1 if a frame from the guest answers an allowed ingress flow (published port). */
int ns_ctx_ingress_reply(ns_ctx *ctx, const uint8_t *buf, size_t len, double now);

/*
 * The gateway loop (gateway.c): one pthread that moves frames between the
 * guest side (a VMM's frame socket or a TAP fd) and an uplink TAP fd,
 * classifying guest frames with `ctx`, passing back only replies of allowed
 * flows, answering denied TCP with RST and denied UDP with ICMP(v6) port
 * unreachable, holding the data of flows that wait for their ClientHello.
 * Slow-path work (DNS queries, log/capture records) is queued to the owner
 * through a bounded single-consumer ring signalled by an eventfd; the loop
 * never waits for the owner.  The owner may inject frames towards the guest
 * from any thread.  No global state: everything lives in the ns_gw object.
 *
 *     ns_gw *gw = ns_gw_new(ctx, &cfg);  ns_gw_start(gw);
 *     ... read(ns_gw_event_fd(gw)) then ns_gw_next_event(gw, ...) until 0 ...
 *     ns_gw_stop(gw); ns_gw_free(gw);
 */
enum ns_gw_mode { NS_GW_STREAM = 0, NS_GW_DGRAM = 1, NS_GW_TAP = 2 };
enum ns_gw_event_kind {
    NS_EV_DNS = 1,          /* a UDP DNS query frame from the guest: answer it */
    NS_EV_DENIED = 2,       /* a guest frame that was denied (log record) */
    NS_EV_CAPTURE = 3,      /* a copy of a frame that crossed (pcap), with its verdict */
    NS_EV_GUEST_CLOSED = 4, /* the guest side hung up (or its stream broke: verdict 7) */
    NS_EV_NOT_REPLY = 5     /* a frame from the uplink that was no reply: dropped */
};
#define NS_GW_EVENT_DATA 2048u

typedef struct ns_gw ns_gw;

typedef struct ns_gw_config {
    int guest_fd, guest_mode, uplink_fd;
    uint8_t guest_mac[6], gateway_mac[6];
    uint32_t event_slots;      /* ring capacity (rounded up to a power of two) */
    uint32_t hold_frames;      /* max frames held across all pending flows */
    double hello_timeout;      /* seconds a pending flow may wait */
    uint8_t capture;           /* 1: queue NS_EV_CAPTURE records */
    uint8_t log_denied;        /* 1: queue NS_EV_DENIED records */
    uint8_t npublished;        /* published guest TCP ports (ingress from the uplink) */
    uint8_t uplink_vnet;       /* 1: the uplink TAP has IFF_VNET_HDR; TCP is coalesced (GSO) */
    uint16_t published[16];
    uint8_t gateway_ip[16];    /* v4-mapped: DNS over TCP to it goes to the uplink's listener */
    uint16_t guest_mtu;        /* the guest link's MTU (0: unchecked, no MSS raising) */
    uint16_t uplink_mtu;       /* the uplink TAP's MTU (0: 1500); GSO segments to fit it */
    uint8_t npublished_udp;    /* published guest UDP ports (ingress from the uplink) */
    uint16_t published_udp[16];
    uint8_t gateway_ip6[16];   /* the gateway's IPv6 address (all-zero: none); ICMPv6 errors it sends */
    uint8_t dns_tcp_reset;     /* 1: guest DNS over TCP is answered with a RST (an uplink
                                  without a DNAT to the forwarder's listener) */
    uint8_t uplink_stream;     /* 1: the uplink fd is a stream socket with u32-BE length
                                  framing (passt --fd, QEMU -netdev stream), not a TAP */
} ns_gw_config;

typedef struct ns_gw_event {
    uint8_t kind, verdict, direction, pad;
    int32_t rule;
    double ts;                 /* monotonic seconds */
    uint32_t len, orig_len;    /* bytes copied (<= NS_GW_EVENT_DATA), frame length */
} ns_gw_event;

typedef struct ns_gw_stats {
    uint64_t guest_frames, guest_bytes, uplink_frames, uplink_bytes;
    uint64_t to_uplink, to_guest, not_reply, rst_sent, icmp_sent, dns_queries;
    uint64_t events_dropped, injected, held, released, hold_dropped, guest_overflow;
    uint64_t write_errors, loops;
    uint64_t verdicts[8];
    uint64_t too_big;          /* uplink frames larger than the guest MTU (dropped) */
    uint64_t mss_raised;       /* SYNs towards the guest whose MSS option was raised */
    uint64_t frag_needed;      /* guest packets too big for the uplink answered with ICMP
                                  frag-needed / ICMPv6 packet-too-big */
    uint64_t fragmented;       /* guest IPv4 packets without DF cut into fragments */
    uint64_t oversize_dropped; /* too big for the uplink and deserving no ICMP error */
} ns_gw_stats;

ns_gw *ns_gw_new(ns_ctx *ctx, const ns_gw_config *cfg);
int ns_gw_start(ns_gw *gw);
void ns_gw_stop(ns_gw *gw);            /* idempotent; joins the thread */
void ns_gw_free(ns_gw *gw);            /* stops first; closes only its own eventfds */
int ns_gw_event_fd(const ns_gw *gw);   /* readable (8-byte counter) when events wait */
int ns_gw_next_event(ns_gw *gw, ns_gw_event *ev, uint8_t *data, size_t cap);
int ns_gw_inject(ns_gw *gw, const uint8_t *frame, size_t len);
int ns_gw_inject_udp(ns_gw *gw, const uint8_t *src16, uint16_t sport, const uint8_t *dst16,
                     uint16_t dport, const uint8_t *payload, size_t len);
size_t ns_gw_build_udp(const uint8_t *dst_mac, const uint8_t *src_mac, const uint8_t *src16,
                       uint16_t sport, const uint8_t *dst16, uint16_t dport,
                       const uint8_t *payload, size_t len, uint8_t *out, size_t cap);
size_t ns_gw_build_reject(const uint8_t *frame, size_t len, uint8_t *out, size_t cap);
size_t ns_gw_build_too_big(const uint8_t *frame, size_t len, uint32_t mtu, const uint8_t *src16,
                           uint8_t *out, size_t cap);
void ns_gw_stats_get(ns_gw *gw, ns_gw_stats *out);
uint32_t ns_gw_pending(ns_gw *gw);

#endif /* NETSTACK_H */
