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
} ns_ctx_stats;

/* Context lifecycle.  `pins` (may be NULL) is borrowed: keep it alive. */
ns_ctx *ns_ctx_new(uint32_t max_flows, ns_pincache *pins);
void ns_ctx_free(ns_ctx *ctx);
int ns_ctx_configure(ns_ctx *ctx, double tcp_idle, double udp_idle, uint32_t hello_cap,
                     double hello_timeout, uint64_t hello_budget);
/* Install compiled tables (ownership passes to ctx); atomic w.r.t. batches. */
void ns_ctx_set_policy(ns_ctx *ctx, ns_policy *p);
void ns_ctx_expire(ns_ctx *ctx, double now);
void ns_ctx_stats_get(ns_ctx *ctx, ns_ctx_stats *out);
uint32_t ns_ctx_flow_count(const ns_ctx *ctx);
/* Flow-table entry of the flow `buf` (a frame) belongs to; 1 found, 0 not, -1 bad frame. */
int ns_ctx_flow_info(ns_ctx *ctx, const uint8_t *buf, size_t len, int dir, ns_flow_info *out);

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

#endif /* NETSTACK_H */
