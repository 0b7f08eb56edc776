/*
 * classify.c - the classifier context: flow table + batch loop.
 *
 * Flow table: open addressing (linear probing, backward-shift deletion),
 * capacity 2 x max_flows so the load factor stays <= 0.5.  Key = direction,
 * IP protocol, source/destination address and ports as seen in the frame,
 * hashed with SipHash-1-3 under a secret drawn per context (guests choose
 * those keys: with a fixed hash they could pile them into one probe chain).
 *  - idle expiry: a flow not seen for tcp_idle (TCP) / udp_idle (UDP, ICMP)
 *    seconds is treated as new on its next frame (re-evaluated, counters
 *    reset) and removed by ns_ctx_expire();
 *  - eviction: inserting into a full table (max_flows live entries) examines
 *    the next 16 occupied slots from a rotating cursor and evicts the first
 *    idle-expired one, else the least recently seen of the 16;
 *  - a policy swap bumps the generation: each flow is re-evaluated on its next
 *    frame with the SNI it had (or none), under the new tables.
 * Pending TLS flows (verdict NEED_MORE) reassemble in-order guest payload
 * into a per-flow buffer of at most hello_cap bytes; the total of those
 * buffers is bounded by hello_budget bytes, and a flow that would exceed it
 * is denied (fail closed, rule -1).
 * IP fragments: a first fragment is classified like any packet (it has the L4
 * header; one too short for it does not parse: malformed); a later fragment gets
 * the verdict recorded for its first fragment in the context's fragment table
 * (frag.c), or NS_DENY.  Reply lookups do the same for fragments from the uplink.
 */
#define _DEFAULT_SOURCE /* posix_memalign, madvise */
#include <stdlib.h>
#include <sys/mman.h>

#include "frag.h"
#include "ns_internal.h"
#include "siphash.h"

#define EVICT_SAMPLE 16

typedef struct flow_key {
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    uint8_t proto, dir, kind, pad;
} flow_key; /* 40 bytes */
_Static_assert(sizeof(flow_key) == 40 && offsetof(flow_key, sport) == 32, "flow_key layout");

/* The flow key of a parsed frame in direction `dir`; `reply`: of the flow the frame
 * answers (addresses and ports swapped). */
static inline void flow_key_of(const ns_frame *fr, int dir, int reply, flow_key *k) {
    memcpy(k->src, reply ? fr->dst : fr->src, 16);
    memcpy(k->dst, reply ? fr->src : fr->dst, 16);
    uint16_t sport = fr->has_ports ? fr->sport : 0, dport = fr->has_ports ? fr->dport : 0;
    uint16_t ks = reply ? dport : sport, kd = reply ? sport : dport;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* the last 8 bytes (ports, protocol, direction, kind 0, pad 0) in one store:
     * key_eq() loads them as one word, and a load spanning several narrow stores is
     * not forwarded from them - a store-forwarding stall per frame (~15% of an
     * established frame), which the compiler's store merging avoids only sometimes */
    uint64_t tail = (uint64_t)ks | (uint64_t)kd << 16 | (uint64_t)fr->ipproto << 32 |
                    (uint64_t)(uint8_t)dir << 40;
    memcpy(&k->sport, &tail, 8);
#else
    k->sport = ks;
    k->dport = kd;
    k->proto = fr->ipproto;
    k->dir = (uint8_t)dir;
    k->kind = 0;
    k->pad = 0;
#endif
}

enum { ST_DECIDED = 0, ST_PENDING = 1 };

typedef struct flow {
    flow_key k;
    uint32_t hash;
    uint8_t used, state, verdict, pbit;
    int32_t rule;
    uint32_t gen;
    double created, last_seen;
    uint64_t packets, bytes;
    uint8_t *hbuf;
    uint32_t hlen, next_seq;
    uint8_t seq_known, has_sni;
    uint16_t sni_len;
    uint8_t *sni;
} flow;

struct ns_ctx {
    ns_policy *pol;             /* atomic */
    int active;                 /* atomic: batches in flight */
    uint32_t gen_counter;
    ns_policy *retired;
    ns_pincache *pins;          /* borrowed; the owner keeps it alive */
    flow *tab;
    uint64_t hkey[2];           /* this table's SipHash secret (getrandom, at creation) */
    uint32_t mask, max_flows, count, cursor;
    double tcp_idle, udp_idle, hello_timeout;
    uint32_t hello_cap;
    uint64_t hello_budget, hello_bytes;
    ns_fragtab *frags;          /* later fragments' verdicts (frag.c) */
    int stream_broken;
    int block_dns_bypass;
    ns_ctx_stats st;
};

/* ------------------------------------------------------------ lifecycle */

/* Zeroed, committed memory for a large table.  Tables of 2 MiB or more are
 * 2 MiB-aligned and advised as transparent huge pages (random flow lookups
 * then miss the TLB far less); every page is touched up front so the packet
 * loop never takes a page fault on the table. */
void *ns_table_alloc(size_t bytes) {
    const size_t huge = 2u << 20;
    void *p = NULL;
    if (bytes >= huge) {
        size_t rounded = (bytes + huge - 1) & ~(huge - 1);
        if (posix_memalign(&p, huge, rounded) != 0) return NULL;
#ifdef MADV_HUGEPAGE
        madvise(p, rounded, MADV_HUGEPAGE);
#endif
        memset(p, 0, rounded);
        return p;
    }
    p = calloc(1, bytes ? bytes : 1);
    if (p)
        for (size_t off = 0; off < bytes; off += 4096) ((volatile uint8_t *)p)[off] = 0;
    return p;
}

#define table_alloc ns_table_alloc

ns_ctx *ns_ctx_new(uint32_t max_flows, ns_pincache *pins) {
    if (max_flows < 16) max_flows = 16;
    if (max_flows > (1u << 24)) max_flows = 1u << 24;
    ns_ctx *c = (ns_ctx *)calloc(1, sizeof(*c));
    if (!c) return NULL;
    if (ns_random_key(c->hkey) != 0) {
        free(c);
        return NULL;
    }
    uint32_t cap = 32;
    while (cap < 2 * max_flows) cap <<= 1;
    c->tab = (flow *)table_alloc((size_t)cap * sizeof(flow));
    c->frags = ns_frag_new();
    if (!c->tab || !c->frags) {
        free(c->tab);
        ns_frag_free(c->frags);
        free(c);
        return NULL;
    }
    c->mask = cap - 1;
    c->max_flows = max_flows;
    c->pins = pins;
    c->tcp_idle = 300.0;
    c->udp_idle = 60.0;
    c->hello_timeout = 5.0;
    c->hello_cap = 16384;
    c->hello_budget = 64u << 20;
    return c;
}

static void flow_release(ns_ctx *c, flow *f) {
    if (f->hbuf) {
        free(f->hbuf);
        c->hello_bytes -= c->hello_cap;
        f->hbuf = NULL;
    }
    free(f->sni);
    f->sni = NULL;
    f->has_sni = 0;
    f->hlen = 0;
}

void ns_ctx_free(ns_ctx *c) {
    if (!c) return;
    for (uint32_t i = 0; i <= c->mask; i++)
        if (c->tab[i].used) flow_release(c, &c->tab[i]);
    free(c->tab);
    ns_frag_free(c->frags);
    ns_policy_free(c->pol);
    while (c->retired) {
        ns_policy *n = c->retired->next_retired;
        ns_policy_free(c->retired);
        c->retired = n;
    }
    free(c);
}

int ns_ctx_configure(ns_ctx *c, double tcp_idle, double udp_idle, uint32_t hello_cap,
                     double hello_timeout, uint64_t hello_budget) {
    if (!(tcp_idle > 0) || !(udp_idle > 0) || !(hello_timeout > 0)) return -1;
    if (hello_cap < 64 || hello_cap > 65536) return -1;
    if (c->hello_bytes) return -2; /* cannot resize buffers while flows pend */
    c->tcp_idle = tcp_idle;
    c->udp_idle = udp_idle;
    c->hello_cap = hello_cap;
    c->hello_timeout = hello_timeout;
    c->hello_budget = hello_budget;
    return 0;
}

int ns_ctx_set_frag_limits(ns_ctx *c, uint32_t max_records, double lifetime) {
    return ns_frag_configure(c->frags, max_records, lifetime);
}

void ns_ctx_frag_stats(ns_ctx *c, ns_frag_stats *out) { ns_frag_stats_get(c->frags, out); }

int ns_ctx_set_block_dns_bypass(ns_ctx *c, int on) {
    c->block_dns_bypass = on ? 1 : 0;
    return 0;
}

/* The verdict for a DNS side door (see ns_ctx_set_block_dns_bypass), or 0 if `fr` is
 * not one. */
static uint8_t dns_bypass_verdict(const ns_frame *fr) {
    if (fr->pbit == NS_P_TCP) return fr->dport == 853 ? NS_DENY_RST : 0;
    if (fr->pbit != NS_P_UDP) return 0;
    if (fr->dport == 853) return NS_DENY_ICMP;
    return (fr->dport == 5353 || fr->dport == 5355 || fr->dport == 137) ? NS_DENY : 0;
}

static void free_retired(ns_ctx *c) {
    while (c->retired) {
        ns_policy *n = c->retired->next_retired;
        ns_policy_free(c->retired);
        c->retired = n;
    }
}

/* Install p (taking ownership).  Safe against a batch running concurrently
 * in another thread: the old tables are freed only when no batch is active
 * (else at the next swap or at ns_ctx_free). */
void ns_ctx_set_policy(ns_ctx *c, ns_policy *p) {
    p->gen = ++c->gen_counter;
    ns_policy *old = __atomic_exchange_n(&c->pol, p, __ATOMIC_SEQ_CST);
    if (old) {
        old->next_retired = c->retired;
        c->retired = old;
    }
    if (__atomic_load_n(&c->active, __ATOMIC_SEQ_CST) == 0) free_retired(c);
}

static ns_policy *enter(ns_ctx *c) {
    __atomic_add_fetch(&c->active, 1, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&c->pol, __ATOMIC_SEQ_CST);
}

static void leave(ns_ctx *c) { __atomic_sub_fetch(&c->active, 1, __ATOMIC_SEQ_CST); }

/* ------------------------------------------------------------ table */

/* SipHash-1-3 of the key's addresses, ports and protocol under the context's
 * secret, tweaked by direction and kind (a guest cannot aim its 5-tuples at
 * one bucket, see siphash.h).  Two v4-mapped addresses (every IPv4 frame) are
 * hashed as the 13 bytes src4 dst4 sport dport proto, anything else as the 37
 * bytes src16 dst16 sport dport proto: the lengths differ, so the encodings
 * never meet.  The words are built from fields, never loaded across the
 * narrow stores that wrote them (a store-forwarding stall per frame). */
static inline uint64_t key_tail(uint16_t sport, uint16_t dport, uint8_t proto) {
    return (uint64_t)sport | (uint64_t)dport << 16 | (uint64_t)proto << 32;
}

NS_SIP_INLINE uint32_t hash_v4(const ns_ctx *c, const uint8_t *src16, const uint8_t *dst16,
                               uint64_t tail, unsigned dir, unsigned kind) {
    uint32_t s4, d4;
    memcpy(&s4, src16 + 12, 4);
    memcpy(&d4, dst16 + 12, 4);
    const uint64_t key[2] = {c->hkey[0] ^ (dir | kind << 8), c->hkey[1]};
    ns_sip_state st;
    ns_sip_init(&st, key);
    ns_sip_word(&st, (uint64_t)s4 | (uint64_t)d4 << 32);
    return (uint32_t)ns_sip_finish(&st, tail | (uint64_t)13 << 56);
}

NS_SIP_INLINE uint32_t hash_v6(const ns_ctx *c, const uint8_t *src16, const uint8_t *dst16,
                               uint64_t tail, unsigned dir, unsigned kind) {
    uint64_t w[4];
    memcpy(w, src16, 16);
    memcpy(w + 2, dst16, 16);
    const uint64_t key[2] = {c->hkey[0] ^ (dir | kind << 8), c->hkey[1]};
    ns_sip_state st;
    ns_sip_init(&st, key);
    for (int i = 0; i < 4; i++) ns_sip_word(&st, w[i]);
    return (uint32_t)ns_sip_finish(&st, tail | (uint64_t)37 << 56);
}

NS_SIP_INLINE uint32_t key_hash(const ns_ctx *c, const flow_key *k) {
    uint64_t tail = key_tail(k->sport, k->dport, k->proto);
    if (ns_is_v4mapped(k->src) && ns_is_v4mapped(k->dst))
        return hash_v4(c, k->src, k->dst, tail, k->dir, k->kind);
    return hash_v6(c, k->src, k->dst, tail, k->dir, k->kind);
}

/* key_hash of the flow key of a parsed frame (direction dir, kind 0), from its fields. */
NS_SIP_INLINE uint32_t frame_hash(const ns_ctx *c, const ns_frame *fr, int dir) {
    uint16_t sport = fr->has_ports ? fr->sport : 0, dport = fr->has_ports ? fr->dport : 0;
    uint64_t tail = key_tail(sport, dport, fr->ipproto);
    /* an IPv4 frame's addresses are v4-mapped; an IPv6 frame's may be too */
    if (fr->l3 == NS_L3_IPV4 || (ns_is_v4mapped(fr->src) && ns_is_v4mapped(fr->dst)))
        return hash_v4(c, fr->src, fr->dst, tail, (unsigned)dir, 0);
    return hash_v6(c, fr->src, fr->dst, tail, (unsigned)dir, 0);
}

static inline int key_eq(const flow_key *a, const flow_key *b) {
    uint64_t x[5], y[5];
    memcpy(x, a, sizeof(x));
    memcpy(y, b, sizeof(y));
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

static flow *tab_find(ns_ctx *c, const flow_key *k, uint32_t h) {
    for (uint32_t i = h & c->mask;; i = (i + 1) & c->mask) {
        flow *f = &c->tab[i];
        if (!f->used) return NULL;
        if (f->hash == h && key_eq(&f->k, k)) return f;
    }
}

static void tab_delete(ns_ctx *c, uint32_t i) {
    flow_release(c, &c->tab[i]);
    for (uint32_t j = i;;) {
        j = (j + 1) & c->mask;
        if (!c->tab[j].used) break;
        uint32_t home = c->tab[j].hash & c->mask;
        /* can entry j move to the hole at i?  yes unless home lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (stays) continue;
        c->tab[i] = c->tab[j];
        i = j;
    }
    memset(&c->tab[i], 0, sizeof(flow));
    c->count--;
}

static double idle_for(const ns_ctx *c, uint8_t pbit) { return pbit == NS_P_TCP ? c->tcp_idle : c->udp_idle; }

static int expired(const ns_ctx *c, const flow *f, double now) {
    return now - f->last_seen > idle_for(c, f->pbit);
}

static void evict_one(ns_ctx *c, double now) {
    uint32_t best = UINT32_MAX, seen = 0;
    for (uint32_t step = 0; step <= c->mask && seen < EVICT_SAMPLE; step++) {
        uint32_t i = c->cursor;
        c->cursor = (c->cursor + 1) & c->mask;
        if (!c->tab[i].used) continue;
        seen++;
        if (expired(c, &c->tab[i], now)) {
            best = i;
            break;
        }
        if (best == UINT32_MAX || c->tab[i].last_seen < c->tab[best].last_seen) best = i;
    }
    if (best != UINT32_MAX) {
        tab_delete(c, best);
        c->st.flows_evicted++;
    }
}

static flow *tab_insert(ns_ctx *c, const flow_key *k, uint32_t h, double now) {
    if (c->count >= c->max_flows) evict_one(c, now);
    for (uint32_t i = h & c->mask, probe = 1;; i = (i + 1) & c->mask, probe++) {
        flow *f = &c->tab[i];
        if (!f->used) {
            /* the longest walk an insert (= a miss from this home slot) took */
            if (probe > c->st.max_probe) c->st.max_probe = probe;
            memset(f, 0, sizeof(*f));
            f->k = *k;
            f->hash = h;
            f->used = 1;
            c->count++;
            c->st.flows_created++;
            return f;
        }
    }
}

void ns_ctx_expire(ns_ctx *c, double now) {
    for (uint32_t i = 0; i <= c->mask;) {
        if (c->tab[i].used && expired(c, &c->tab[i], now)) {
            tab_delete(c, i);
            c->st.flows_expired++;
            continue; /* re-check the slot an entry may have shifted into */
        }
        i++;
    }
    ns_frag_expire(c->frags, now);
}

/* ------------------------------------------------------------ decisions */

static uint8_t verdict_for(const ns_policy *p, int action, uint8_t pbit, int dir, uint16_t port,
                           const uint8_t *sni, size_t sni_len) {
    if (action == NS_ACT_DENY)
        return pbit == NS_P_TCP ? NS_DENY_RST : pbit == NS_P_UDP ? NS_DENY_ICMP : NS_DENY;
    if (sni && dir == NS_DIR_EGRESS && pbit == NS_P_TCP && ns_policy_intercept_port(p, port) &&
        ns_policy_intercept_name(p, sni, sni_len))
        return NS_TO_PROXY;
    return NS_ALLOW;
}

typedef struct name_buf {
    const uint8_t *ptr[NS_MAX_NAMES];
    uint16_t lens[NS_MAX_NAMES];
    uint8_t blob[NS_MAX_NAMES * 256];
} name_buf;

static void fill_query(ns_ctx *c, const ns_policy *p, ns_flowq *q, const ns_frame *fr, int dir,
                       double now, name_buf *nb) {
    q->direction = (uint8_t)dir;
    q->pbit = fr->pbit;
    q->has_port = fr->has_ports;
    q->port = fr->dport;
    memcpy(q->remote, dir == NS_DIR_EGRESS ? fr->dst : fr->src, 16);
    q->family = ns_is_v4mapped(q->remote) ? 4 : 6;
    q->sni = NULL;
    q->sni_len = 0;
    q->gateway = p->gw;
    q->ngw = p->ngw;
    q->names = nb->ptr;
    q->name_lens = nb->lens;
    q->nnames = 0;
    if (p->has_domain && c->pins) {
        size_t n = ns_pin_lookup(c->pins, q->remote, now, nb->blob, sizeof(nb->blob), nb->lens,
                                 NS_MAX_NAMES);
        size_t off = 0;
        for (size_t i = 0; i < n; i++) {
            nb->ptr[i] = nb->blob + off;
            off += nb->lens[i];
        }
        q->nnames = (uint32_t)n;
    }
}

static void decide(ns_ctx *c, ns_policy *p, flow *f, ns_flowq *q, int dir) {
    int32_t rule;
    int act = ns_policy_eval(p, q, &rule);
    f->verdict = verdict_for(p, act, q->pbit, dir, q->port, q->sni, q->sni_len);
    f->rule = rule;
    f->state = ST_DECIDED;
    f->gen = p->gen;
    uint32_t ci = rule >= 0 ? (uint32_t)rule : p->nrules + (dir == NS_DIR_INGRESS ? 1u : 0u);
    p->counters[ci].hits++;
    if (f->hbuf) {
        free(f->hbuf);
        f->hbuf = NULL;
        c->hello_bytes -= c->hello_cap;
    }
}

static void remember_sni(flow *f, const uint8_t *sni, uint16_t len) {
    free(f->sni);
    f->sni = (uint8_t *)malloc(len ? len : 1);
    if (!f->sni) {
        f->has_sni = 0;
        return;
    }
    memcpy(f->sni, sni, len);
    f->sni_len = len;
    f->has_sni = 1;
}

/* Feed one frame of a pending TLS flow.  Returns 1 when decided. */
static int feed_pending(ns_ctx *c, ns_policy *p, flow *f, const ns_frame *fr, const uint8_t *buf,
                        ns_flowq *q, double now) {
    if (fr->tcp_flags & 0x02) { /* SYN */
        f->next_seq = fr->seq + 1;
        f->seq_known = 1;
    }
    int ended = (fr->tcp_flags & 0x05) != 0; /* FIN or RST */
    int status = NS_HELLO_NEED_MORE;
    ns_hello h;
    if (fr->payload_len > 0) {
        if (!f->seq_known) {
            f->next_seq = fr->seq;
            f->seq_known = 1;
        }
        uint32_t behind = f->next_seq - fr->seq; /* bytes already buffered */
        if ((int32_t)(fr->seq - f->next_seq) <= 0 && behind < fr->payload_len) {
            if (!f->hbuf) {
                if (c->hello_bytes + c->hello_cap > c->hello_budget) {
                    f->verdict = q->pbit == NS_P_TCP ? NS_DENY_RST : NS_DENY;
                    f->rule = -1;
                    f->state = ST_DECIDED;
                    f->gen = p->gen;
                    c->st.hello_denied++;
                    return 1;
                }
                f->hbuf = (uint8_t *)malloc(c->hello_cap);
                if (!f->hbuf) {
                    f->verdict = NS_DENY_RST;
                    f->rule = -1;
                    f->state = ST_DECIDED;
                    f->gen = p->gen;
                    c->st.hello_denied++;
                    return 1;
                }
                c->hello_bytes += c->hello_cap;
            }
            uint32_t take = fr->payload_len - behind;
            if (take > c->hello_cap - f->hlen) take = c->hello_cap - f->hlen;
            memcpy(f->hbuf + f->hlen, buf + fr->payload_off + behind, take);
            f->hlen += take;
            f->next_seq += take;
        }
        if (f->hlen > 0) status = ns_parse_client_hello(f->hbuf, f->hlen, c->hello_cap, &h);
    }
    if (status == NS_HELLO_COMPLETE && h.has_sni) {
        q->sni = h.sni;
        q->sni_len = h.sni_len;
        remember_sni(f, h.sni, h.sni_len);
        decide(c, p, f, q, NS_DIR_EGRESS);
        return 1;
    }
    if (status == NS_HELLO_NEED_MORE && !ended && f->hlen < c->hello_cap &&
        now - f->created <= c->hello_timeout)
        return 0;
    /* complete without SNI, not TLS, malformed, too big, timed out or closed */
    decide(c, p, f, q, NS_DIR_EGRESS);
    return 1;
}

static inline int needs_sni(const ns_policy *p, const ns_flowq *q, int dir) {
    if (dir != NS_DIR_EGRESS || q->pbit != NS_P_TCP) return 0;
    if (ns_policy_sni_dependent(p, q)) return 1;
    if (q->has_port && ns_policy_intercept_port(p, q->port)) {
        int32_t r;
        return ns_policy_eval(p, q, &r) == NS_ACT_ALLOW;
    }
    return 0;
}

static inline int frag_side(int dir) {
    return dir == NS_DIR_EGRESS ? NS_FRAG_FROM_GUEST : NS_FRAG_FROM_UPLINK;
}

/* A later fragment (no L4 header): the verdict recorded for its datagram's first
 * fragment under these tables, else NS_DENY. */
static uint8_t later_fragment(ns_ctx *c, ns_policy *p, const uint8_t *buf, size_t len,
                              const ns_frame *fr, int dir, double now, int32_t *rule_out) {
    uint8_t v;
    int32_t r;
    int acct;
    if (!ns_frag_follow(c->frags, buf, len, fr, frag_side(dir), p->gen, now, &v, &r, &acct))
        return NS_DENY;
    if (acct) { /* the rule (or default) the first fragment's flow was decided by */
        uint32_t ci = r >= 0 ? (uint32_t)r : p->nrules + (dir == NS_DIR_INGRESS ? 1u : 0u);
        p->counters[ci].packets++;
        p->counters[ci].bytes += len;
    }
    *rule_out = r;
    return v;
}

/* Record first fragment `fr`'s verdict v for the later fragments of its datagram.
 * Denied (or pending: that datagram is not let through) first fragments only revoke a
 * record of the same key, they take no slot; a later fragment is never answered (no
 * L4 header to quote): NS_DENY.  `acct`: v comes from a flow (counted per rule). */
__attribute__((noinline, cold)) static void first_fragment(ns_ctx *c, const ns_policy *p,
                                                          const uint8_t *buf, size_t len,
                                                          const ns_frame *fr, int dir,
                                                          uint8_t v, int32_t rule, int acct,
                                                          double now) {
    int deny = v == NS_DENY || v == NS_DENY_RST || v == NS_DENY_ICMP || v == NS_NEED_MORE;
    ns_frag_record(c->frags, buf, len, fr, frag_side(dir), deny ? NS_DENY : v, rule, p->gen,
                   deny ? NS_FRAG_REPLACE_ONLY : acct ? NS_FRAG_ACCT : 0, now);
}

static uint8_t classify_one(ns_ctx *c, ns_policy *p, const uint8_t *buf, size_t len, int dir,
                            double now, int32_t *rule_out) {
    ns_frame fr;
    *rule_out = -1;
    if (ns_parse_frame(buf, len, &fr) != NS_PARSE_OK) {
        c->st.malformed++;
        return NS_MALFORMED;
    }
    if (fr.l3 == NS_L3_ARP || ns_is_ndp(buf, len, &fr)) return NS_ALLOW;
    if (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6) return NS_DENY;
    /* (before the protocol test: an IPv6 later fragment's Next Header may name an
     * extension header; its first fragment was judged by its L4 protocol) */
    if (__builtin_expect(fr.frag == 2, 0)) return later_fragment(c, p, buf, len, &fr, dir, now, rule_out);
    if (fr.pbit == 0) return NS_DENY;
    flow_key k;
    flow_key_of(&fr, dir, 0, &k);
    if (dir == NS_DIR_EGRESS && fr.has_ports && (fr.pbit & (NS_P_TCP | NS_P_UDP)) && fr.dport == 53) {
        if (fr.frag == 1) first_fragment(c, p, buf, len, &fr, dir, NS_TO_DNS, -1, 0, now);
        return NS_TO_DNS;
    }
    if (c->block_dns_bypass && dir == NS_DIR_EGRESS && fr.has_ports) {
        uint8_t bv = dns_bypass_verdict(&fr);
        if (bv) {
            if (fr.frag == 1) first_fragment(c, p, buf, len, &fr, dir, bv, -1, 0, now);
            return bv;
        }
    }
    uint32_t h = frame_hash(c, &fr, dir); /* == key_hash(c, &k), from the fields */
    flow *f = tab_find(c, &k, h);

    name_buf nb;
    ns_flowq q;

    if (f && f->state == ST_DECIDED && f->gen == p->gen && !expired(c, f, now)) {
        /* established fast path */
    } else {
        if (f && expired(c, f, now)) {
            flow_release(c, f);
            flow_key kk = f->k;
            uint32_t hh = f->hash;
            memset(f, 0, sizeof(*f));
            f->k = kk;
            f->hash = hh;
            f->used = 1;
            c->st.flows_expired++;
            c->st.flows_created++;
            f->created = now;
            f->gen = 0;
        } else if (!f) {
            f = tab_insert(c, &k, h, now);
            f->created = now;
        }
        f->pbit = fr.pbit;
        fill_query(c, p, &q, &fr, dir, now, &nb);
        int pending = 0;
        if (f->state == ST_PENDING && f->gen != p->gen && !needs_sni(p, &q, dir)) {
            /* policy swapped while waiting for the hello, and the new tables
             * decide this flow without an SNI: decide now */
            decide(c, p, f, &q, dir);
        } else if (f->state == ST_PENDING) {
            f->gen = p->gen;
            pending = !feed_pending(c, p, f, &fr, buf, &q, now);
        } else if (f->gen != 0 && f->gen != p->gen) {
            /* policy swapped: re-evaluate with the SNI the flow had */
            if (f->has_sni) {
                q.sni = f->sni;
                q.sni_len = f->sni_len;
            }
            decide(c, p, f, &q, dir);
        } else if (needs_sni(p, &q, dir)) {
            f->state = ST_PENDING;
            f->gen = p->gen;
            pending = !feed_pending(c, p, f, &fr, buf, &q, now);
        } else {
            decide(c, p, f, &q, dir);
        }
        if (pending) {
            f->last_seen = now;
            f->packets++;
            f->bytes += len;
            if (fr.frag == 1) first_fragment(c, p, buf, len, &fr, dir, NS_NEED_MORE, -1, 0, now);
            return NS_NEED_MORE;
        }
    }
    if (f->last_seen != now) f->last_seen = now;
    f->packets++;
    f->bytes += len;
    uint32_t ci = f->rule >= 0 ? (uint32_t)f->rule : p->nrules + (dir == NS_DIR_INGRESS ? 1u : 0u);
    p->counters[ci].packets++;
    p->counters[ci].bytes += len;
    *rule_out = f->rule;
    /* (the fragment table is apart from the flow table: f stays valid) */
    if (__builtin_expect(fr.frag == 1, 0))
        first_fragment(c, p, buf, len, &fr, dir, f->verdict, f->rule, 1, now);
    return f->verdict;
}

/* ------------------------------------------------------------ batch API */

void ns_classify_batch(ns_ctx *c, const uint8_t *const *frames, const uint32_t *lens, size_t count,
                       int direction, double now, uint8_t *verdicts, int32_t *rules) {
    ns_policy *p = enter(c);
    int32_t r;
    for (size_t i = 0; i < count; i++) {
        if (!p) {
            verdicts[i] = NS_DENY;
            r = -1;
        } else {
            verdicts[i] = classify_one(c, p, frames[i], lens[i], direction, now, &r);
        }
        if (rules) rules[i] = r;
    }
    leave(c);
}

size_t ns_classify_stream(ns_ctx *c, const uint8_t *buf, size_t len, int direction, double now,
                          uint8_t *verdicts, int32_t *rules, size_t max_frames, size_t *consumed) {
    ns_policy *p = enter(c);
    size_t off = 0, n = 0;
    int32_t r;
    c->stream_broken = 0;
    while (n < max_frames && len - off >= 4) {
        uint32_t fl = ns_rd32(buf + off);
        if (fl == 0 || fl > NS_MAX_FRAME) {
            verdicts[n] = NS_MALFORMED;
            if (rules) rules[n] = -1;
            n++;
            c->stream_broken = 1;
            c->st.malformed++;
            break;
        }
        if (len - off - 4 < fl) break;
        verdicts[n] = p ? classify_one(c, p, buf + off + 4, fl, direction, now, &r) : NS_DENY;
        if (!p) r = -1;
        if (rules) rules[n] = r;
        n++;
        off += 4 + (size_t)fl;
    }
    leave(c);
    if (consumed) *consumed = off;
    return n;
}

int ns_stream_broken(const ns_ctx *c) { return c->stream_broken; }

/* ------------------------------------------------------------ introspection */

void ns_ctx_stats_get(ns_ctx *c, ns_ctx_stats *out) {
    *out = c->st;
    out->live_flows = c->count;
    out->hello_bytes = c->hello_bytes;
}

int ns_ctx_flow_info(ns_ctx *c, const uint8_t *buf, size_t len, int dir, ns_flow_info *out) {
    ns_frame fr;
    memset(out, 0, sizeof(*out));
    if (ns_parse_frame(buf, len, &fr) != NS_PARSE_OK) return -1;
    flow_key k;
    flow_key_of(&fr, dir, 0, &k);
    flow *f = tab_find(c, &k, key_hash(c, &k));
    if (!f) return 0;
    out->found = 1;
    out->state = f->state;
    out->verdict = f->verdict;
    out->rule = f->rule;
    out->packets = f->packets;
    out->bytes = f->bytes;
    out->created = f->created;
    out->last_seen = f->last_seen;
    return 1;
}

/* Copy the current tables' rule counters (nrules + 2 entries: the last two
 * are the egress and ingress defaults).  Returns the number copied. */
uint32_t ns_ctx_rule_counters(ns_ctx *c, ns_rule_counter *out, uint32_t max) {
    ns_policy *p = enter(c);
    uint32_t n = 0;
    if (p) {
        n = p->nrules + 2;
        if (n > max) n = max;
        memcpy(out, p->counters, sizeof(ns_rule_counter) * n);
    }
    leave(c);
    return n;
}

uint32_t ns_ctx_flow_count(const ns_ctx *c) { return c->count; }

/* ------------------------------------------------------------ replies (gateway) */

/* Is `buf` (a frame arriving from the uplink, towards the guest) a reply within
 * an egress flow?  Looks the reversed 5-tuple up among the egress flows:
 * returns 1 for a flow decided NS_ALLOW (refreshing its idle timer) or an ICMP
 * error quoting a packet of an allowed or pending flow, 2 for a
 * flow still waiting for its ClientHello (NS_NEED_MORE), 3 for ARP, 0 when
 * there is no such live flow (or it was denied), -1 for an unparseable frame.  A
 * later IP fragment gets 1 when its first fragment did (or was classified
 * NS_ALLOW as ingress), else 0 (frag.c).  Same threading rule as the batch
 * calls: only the thread driving the context may call it. */
/* For an ICMP(v6) error (unreachable, time exceeded, parameter problem, packet
 * too big) whose quoted packet was sent by the frame's destination: the egress
 * flow key of the quoted packet.  Returns 1 and fills *k, else 0. */
static int icmp_error_key(const uint8_t *buf, size_t len, const ns_frame *fr, flow_key *k) {
    size_t o = fr->payload_off;
    if (o + 8 > len) return 0;
    uint8_t type = buf[o];
    const uint8_t *in = buf + o + 8;
    size_t avail = len - o - 8;
    size_t l4;
    uint8_t proto;
    memset(k, 0, sizeof(*k));
    if (fr->pbit == NS_P_ICMP4) {
        if (type != 3 && type != 11 && type != 12) return 0;
        if (avail < 20 || (in[0] >> 4) != 4) return 0;
        l4 = (size_t)(in[0] & 0x0f) * 4;
        if (l4 < 20) return 0;
        proto = in[9];
        static const uint8_t pre[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        memcpy(k->src, pre, 12);
        memcpy(k->src + 12, in + 12, 4);
        memcpy(k->dst, pre, 12);
        memcpy(k->dst + 12, in + 16, 4);
    } else if (fr->pbit == NS_P_ICMP6) {
        if (type < 1 || type > 4) return 0;
        if (avail < 40 || (in[0] >> 4) != 6) return 0;
        l4 = 40;
        proto = in[6];
        memcpy(k->src, in + 8, 16);
        memcpy(k->dst, in + 24, 16);
    } else {
        return 0;
    }
    if (memcmp(k->src, fr->dst, 16) != 0) return 0; /* not about a packet the guest sent */
    k->proto = proto;
    k->dir = NS_DIR_EGRESS;
    if (proto == 6 || proto == 17) {
        if (avail < l4 + 4) return 0;
        k->sport = ns_rd16(in + l4);
        k->dport = ns_rd16(in + l4 + 2);
    }
    return 1;
}

static int reply_lookup(ns_ctx *c, const uint8_t *buf, size_t len, double now, int dir);

int ns_ctx_reply_lookup(ns_ctx *c, const uint8_t *buf, size_t len, double now) {
    return reply_lookup(c, buf, len, now, NS_DIR_EGRESS);
}

/* The same for a frame from the guest answering a peer-initiated (ingress)
 * flow, e.g. a published port: 1 when it belongs to an allowed ingress flow. */
int ns_ctx_ingress_reply(ns_ctx *c, const uint8_t *buf, size_t len, double now) {
    int r = reply_lookup(c, buf, len, now, NS_DIR_INGRESS);
    return r == 1 ? 1 : r < 0 ? -1 : 0;
}

/* The generation of the tables installed now (0: none yet). */
static uint32_t current_gen(ns_ctx *c) {
    ns_policy *p = enter(c);
    uint32_t g = p ? p->gen : 0;
    leave(c);
    return g;
}

/* reply_lookup of a frame with an L4 header. */
static int reply_match(ns_ctx *c, const uint8_t *buf, size_t len, const ns_frame *fr, double now,
                       int dir) {
    flow_key k;
    if (dir == NS_DIR_EGRESS && icmp_error_key(buf, len, fr, &k)) { /* ICMP error (PMTU ...) */
        flow *f = tab_find(c, &k, key_hash(c, &k));
        if (!f || expired(c, f, now)) return 0;
        return (f->state == ST_PENDING || f->verdict == NS_ALLOW) ? 1 : 0;
    }
    flow_key_of(fr, dir, 1, &k);
    flow *f = tab_find(c, &k, key_hash(c, &k));
    if (!f || expired(c, f, now)) return 0;
    if (f->state == ST_PENDING) return 2;
    if (f->verdict != NS_ALLOW) return 0;
    f->last_seen = now;
    return 1;
}

static int reply_lookup(ns_ctx *c, const uint8_t *buf, size_t len, double now, int dir) {
    ns_frame fr;
    if (ns_parse_frame(buf, len, &fr) != NS_PARSE_OK) return -1;
    if (fr.l3 == NS_L3_ARP || ns_is_ndp(buf, len, &fr)) return 3;
    if (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6) return 0;
    /* frames from the uplink (egress replies) or from the guest (ingress replies) */
    int side = dir == NS_DIR_EGRESS ? NS_FRAG_FROM_UPLINK : NS_FRAG_FROM_GUEST;
    if (fr.frag == 2) {
        uint8_t v;
        int32_t r;
        int acct;
        return ns_frag_follow(c->frags, buf, len, &fr, side, current_gen(c), now, &v, &r, &acct) &&
               v == NS_ALLOW;
    }
    if (fr.pbit == 0) return 0;
    int res = reply_match(c, buf, len, &fr, now, dir);
    if (fr.frag == 1) /* a pending flow's datagram (res 2) is not let through */
        ns_frag_record(c->frags, buf, len, &fr, side, res == 1 ? NS_ALLOW : NS_DENY, -1,
                       current_gen(c), res == 1 ? 0 : NS_FRAG_REPLACE_ONLY, now);
    return res;
}
