/*
 * frag.c - later IP fragments follow the verdict of their datagram's first fragment.
 *
 * Only a datagram's first fragment (offset 0) carries the L4 header, and every flow
 * lookup of the classifier (classify_one, the gateway's reply lookup) keys on ports:
 * a later fragment cannot be matched to a flow by itself.  So every first fragment is
 * judged like an unfragmented packet (policy, flow table, reply lookup) and its verdict
 * is remembered here under the datagram's reassembly key; the later fragments get that
 * verdict, or are dropped when there is none.
 *
 * Key: (side, source, destination, identification, protocol) - RFC 791's reassembly
 * key for IPv4 (16-bit id + protocol), RFC 8200's for IPv6 (32-bit id, no protocol: a
 * later fragment's Next Header names the first header of the fragmentable part, which
 * need not be the L4 one).  `side` keeps the two ways through the gateway apart (from
 * the guest, from the uplink): a frame of one side never matches a record of the other.
 *
 * Hostile input (both sides craft fragments):
 *  - a later fragment without a live record is dropped: no record, no passage;
 *  - a later fragment that starts inside the bytes its first fragment carried is
 *    dropped (an overlap: RFC 1858's rewrite of the TCP header behind the filter's
 *    back, or of the ClientHello the classifier read the SNI from; legitimate
 *    fragmentation never overlaps), and so is one ending past 65,535 bytes (the
 *    "ping of death") or whose IPv6 header chain holds a second fragment header;
 *  - a first fragment too short for its L4 header (TCP: the whole header, options
 *    included; UDP: 8 bytes; ICMP: 4) or, for IPv6, for the whole header chain (RFC
 *    7112) never reaches this file: the frame parser reports it malformed and it is
 *    dropped (RFC 1858's tiny fragment);
 *  - a first fragment seen again with the same key (a retransmission, or the id reused:
 *    16 bits wrap) replaces the record - the newest first fragment decides, so a later
 *    denied one can only shut the rest of a datagram out, never let it in.  Denied first
 *    fragments (and those of a flow still waiting for its ClientHello: that datagram is
 *    lost, the hello is never read from fragments) take no slot, they only revoke a
 *    record of the same key: a sender of denied traffic cannot fill the table;
 *  - a record made under other policy tables (a recompile in between) counts as none:
 *    the rest of that datagram is dropped (fail closed, one datagram lost).
 *
 * Bounds: a 4-way set-associative table (buckets of 4 slots of 64 bytes, indexed by
 * SipHash-1-3 under the table's own 128-bit secret from getrandom(), drawn when its
 * context is created: a sender cannot aim its ids at one bucket), at most
 * NS_FRAG_DEFAULT_RECORDS records unless configured, allocated at the first fragment
 * (contexts that never see one pay ~100 bytes).  A record lives `lifetime` seconds
 * after its first fragment (default 30, Linux's ipfrag_time), or DONE_LINGER seconds
 * after the last fragment (MF clear) passed; a full bucket replaces the slot that
 * expires first.  Every record, lookup and replacement touches one bucket: O(1)
 * whatever the input.
 *
 * Out of order: a later fragment that arrives before its first fragment is dropped,
 * not held.  Senders emit the first fragment first (Linux, the BSDs, Windows, and the
 * gateway's own fragmenter), and what reaches the gateway crossed one link and one
 * NAT (which, reassembling for conntrack, re-emits fragments in order): reordering
 * there is rare, and then the datagram is lost once and the upper layer retries.
 * Holding would need per-datagram byte buffers, a byte and time budget for them and a
 * release path in the gateway loop - for a rare case.
 *
 * Why not reassemble in the loop: reassembly must buffer up to 64 KiB per datagram
 * for seconds (a memory budget a hostile sender aims at), implement overlap and
 * duplicate rules, then re-fragment towards an uplink or guest link of smaller MTU;
 * the end hosts reassemble anyway.  Tracking keeps 64 bytes per datagram, forwards
 * every fragment untouched at once, and needs the end host to trust nothing the
 * classifier did not see: the bytes it judged (the first fragment) cannot be
 * overwritten by a fragment that passes.
 */
#define _DEFAULT_SOURCE
#include <stdlib.h>

#include "frag.h"
#include "siphash.h"

#define WAYS 4
#define DONE_LINGER 2.0

typedef struct frag_key {
    uint8_t src[16], dst[16];
    uint32_t id;
    uint8_t proto, side, pad[2];
} frag_key; /* 40 bytes */

enum { SLOT_USED = 1, SLOT_ACCT = 2 };

typedef struct frag_slot {
    frag_key k;
    uint32_t hash;
    int32_t rule;
    uint32_t gen;
    uint16_t first_end; /* bytes of the fragmentable part the first fragment carried */
    uint8_t verdict, flags;
    double expires;
} frag_slot; /* 64 bytes: one cache line */

struct ns_fragtab {
    frag_slot *slots; /* nbuckets * WAYS, NULL until the first record */
    uint64_t key[2];
    uint32_t nbuckets, live;
    double lifetime;
    ns_frag_stats st;
};

ns_fragtab *ns_frag_new(void) {
    ns_fragtab *t = (ns_fragtab *)calloc(1, sizeof(*t));
    if (!t) return NULL;
    if (ns_random_key(t->key) != 0) {
        free(t);
        return NULL;
    }
    t->nbuckets = NS_FRAG_DEFAULT_RECORDS / WAYS;
    t->lifetime = NS_FRAG_DEFAULT_LIFETIME;
    return t;
}

void ns_frag_free(ns_fragtab *t) {
    if (!t) return;
    free(t->slots);
    free(t);
}

int ns_frag_configure(ns_fragtab *t, uint32_t max_records, double lifetime) {
    if (max_records < 16 || max_records > (1u << 20)) return -1;
    if (!(lifetime > 0) || lifetime > 3600) return -1;
    uint32_t n = WAYS;
    while (n < max_records) n <<= 1;
    free(t->slots);
    t->slots = NULL;
    t->live = 0;
    t->nbuckets = n / WAYS;
    t->lifetime = lifetime;
    return 0;
}

/* Where a fragment sits in its datagram, read from the frame (already parsed). */
typedef struct frag_geo {
    uint32_t off;   /* its offset in the fragmentable part, bytes */
    uint32_t len;   /* bytes of the fragmentable part it carries */
    uint32_t limit; /* off + len must stay within this (65,535 minus what precedes) */
    uint32_t id;
    uint8_t more, proto;
} frag_geo;

static int geometry(const uint8_t *buf, size_t len, const ns_frame *fr, frag_geo *g) {
    size_t ip = fr->vlan ? 18 : 14;
    if (fr->l3 == NS_L3_IPV4) {
        if (len < ip + 20) return 0;
        size_t ihl = (size_t)(buf[ip] & 0x0f) * 4, tot = ns_rd16(buf + ip + 2);
        if (ihl < 20 || tot < ihl || tot > len - ip) return 0;
        uint16_t fl = ns_rd16(buf + ip + 6);
        g->off = (uint32_t)(fl & 0x1fff) * 8;
        g->more = (fl & 0x2000) != 0;
        g->len = (uint32_t)(tot - ihl);
        g->limit = (uint32_t)(65535 - ihl);
        g->id = ns_rd16(buf + ip + 4);
        g->proto = buf[ip + 9];
        return 1;
    }
    if (fr->l3 != NS_L3_IPV6 || len < ip + 40) return 0;
    size_t end = ip + 40 + ns_rd16(buf + ip + 4);
    if (end > len || fr->l4_off > end) return 0;
    /* walk the header chain up to where the parser stopped (the L4 header of a first
     * fragment, the data of a later one): exactly one fragment header on the way */
    uint8_t nh = buf[ip + 6];
    size_t p = ip + 40, fh = 0;
    for (int i = 0; p < fr->l4_off; i++) {
        if (i > 9 || end - p < 8) return 0;
        size_t hl;
        if (nh == 44) {
            if (fh) return 0;
            fh = p;
            hl = 8;
        } else if (nh == 51) {
            hl = ((size_t)buf[p + 1] + 2) * 4;
        } else if (nh == 0 || nh == 43 || nh == 60) {
            hl = ((size_t)buf[p + 1] + 1) * 8;
        } else {
            return 0;
        }
        nh = buf[p];
        p += hl;
    }
    if (!fh || p != fr->l4_off) return 0;
    uint16_t fo = ns_rd16(buf + fh + 2);
    g->off = fo & 0xfff8u;
    g->more = fo & 1;
    g->len = (uint32_t)(end - fh - 8);
    g->limit = 65535;
    g->id = ns_rd32(buf + fh + 4);
    g->proto = 0;
    return 1;
}

static void key_of(const ns_frame *fr, const frag_geo *g, int side, frag_key *k) {
    memcpy(k->src, fr->src, 16);
    memcpy(k->dst, fr->dst, 16);
    k->id = g->id;
    k->proto = g->proto;
    k->side = (uint8_t)side;
    k->pad[0] = k->pad[1] = 0;
}

static uint32_t key_hash(const ns_fragtab *t, const frag_key *k) {
    uint64_t w[4];
    memcpy(w, k->src, 16);
    memcpy(w + 2, k->dst, 16);
    ns_sip_state st;
    ns_sip_init(&st, t->key);
    for (int i = 0; i < 4; i++) ns_sip_word(&st, w[i]);
    uint64_t tail = (uint64_t)k->id | (uint64_t)k->proto << 32 | (uint64_t)k->side << 40;
    return (uint32_t)ns_sip_finish(&st, tail | (uint64_t)38 << 56);
}

static frag_slot *bucket_of(const ns_fragtab *t, uint32_t h) {
    return t->slots + (size_t)(h & (t->nbuckets - 1)) * WAYS;
}

static frag_slot *find(ns_fragtab *t, const frag_key *k, uint32_t h) {
    if (!t->slots) return NULL;
    frag_slot *b = bucket_of(t, h);
    for (int i = 0; i < WAYS; i++)
        if ((b[i].flags & SLOT_USED) && b[i].hash == h && memcmp(&b[i].k, k, sizeof(*k)) == 0)
            return &b[i];
    return NULL;
}

static void clear(ns_fragtab *t, frag_slot *s) {
    memset(s, 0, sizeof(*s));
    t->live--;
}

void ns_frag_record(ns_fragtab *t, const uint8_t *buf, size_t len, const ns_frame *fr, int side,
                    uint8_t verdict, int32_t rule, uint32_t gen, int flags, double now) {
    frag_geo g;
    if (fr->frag != 1 || !geometry(buf, len, fr, &g) || g.off != 0 || !g.more) return;
    if (flags & NS_FRAG_REPLACE_ONLY) {
        if (!t->slots) return;
    } else if (!t->slots) {
        t->slots = (frag_slot *)calloc((size_t)t->nbuckets * WAYS, sizeof(frag_slot));
        if (!t->slots) return; /* no record: the later fragments are dropped */
    }
    frag_key k;
    key_of(fr, &g, side, &k);
    uint32_t h = key_hash(t, &k);
    frag_slot *s = find(t, &k, h);
    if (!s && (flags & NS_FRAG_REPLACE_ONLY)) return;
    if (!s) {
        frag_slot *b = bucket_of(t, h);
        for (int i = 0; i < WAYS; i++) {
            frag_slot *c = &b[i];
            if (!(c->flags & SLOT_USED)) {
                s = c;
                break;
            }
            if (!s || c->expires < s->expires) s = c;
        }
        if (s->flags & SLOT_USED) {
            if (s->expires >= now) t->st.evicted++;
            clear(t, s);
        }
        s->k = k;
        s->hash = h;
        t->live++;
    }
    s->flags = (uint8_t)(SLOT_USED | ((flags & NS_FRAG_ACCT) ? SLOT_ACCT : 0));
    s->verdict = verdict;
    s->rule = rule;
    s->gen = gen;
    s->first_end = (uint16_t)(g.len > 65535 ? 65535 : g.len);
    s->expires = now + t->lifetime;
    t->st.recorded++;
}

int ns_frag_follow(ns_fragtab *t, const uint8_t *buf, size_t len, const ns_frame *fr, int side,
                   uint32_t gen, double now, uint8_t *verdict, int32_t *rule, int *acct) {
    frag_geo g;
    if (fr->frag != 2 || !geometry(buf, len, fr, &g) || g.off == 0 || g.len > g.limit ||
        g.off > g.limit - g.len) {
        t->st.bad++;
        return 0;
    }
    frag_key k;
    key_of(fr, &g, side, &k);
    frag_slot *s = find(t, &k, key_hash(t, &k));
    if (!s || s->expires < now || s->gen != gen) {
        t->st.unmatched++;
        return 0;
    }
    if (g.off < s->first_end) {
        t->st.bad++;
        return 0;
    }
    if (!g.more && s->expires > now + DONE_LINGER) s->expires = now + DONE_LINGER;
    *verdict = s->verdict;
    *rule = s->rule;
    *acct = (s->flags & SLOT_ACCT) != 0;
    t->st.followed++;
    return 1;
}

void ns_frag_expire(ns_fragtab *t, double now) {
    if (!t->slots) return;
    size_t n = (size_t)t->nbuckets * WAYS;
    for (size_t i = 0; i < n; i++)
        if ((t->slots[i].flags & SLOT_USED) && t->slots[i].expires < now) clear(t, &t->slots[i]);
}

void ns_frag_stats_get(const ns_fragtab *t, ns_frag_stats *out) {
    *out = t->st;
    out->live = t->live;
    out->capacity = (uint64_t)t->nbuckets * WAYS;
}
