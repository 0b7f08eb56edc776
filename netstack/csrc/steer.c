/*
 * steer.c - the steering NAT: TLS interception and DNS over TCP without nftables.
 *
 * With the TAP uplink, the uplink namespace's nftables redirect guest TCP to the TLS
 * ports (any address) to the TLS proxy and guest TCP/53 to the DNS forwarder, and the
 * listeners read the original destination with SO_ORIGINAL_DST.  A passt uplink has no
 * namespace: passt re-originates every guest TCP flow from the host with a kernel-chosen
 * source port, so a listener cannot tell from its peer which guest flow it got.  This
 * NAT, in the gateway loop in front of passt, does the redirect instead:
 *
 *  - the listeners (the proxy's, the forwarder's) sit on a small pool of ports on the
 *    host's loopback, which passt reaches at the gateway address (its gateway mapping:
 *    gateway -> 127.0.0.1, gateway6 -> ::1);
 *  - a guest SYN that must be steered (TCP to an intercepted TLS port, or to port 53,
 *    at any address: the same flows the TAP uplink's nftables redirect), that the
 *    policy let out, gets a pool port P of its kind that has no unclaimed flow and is
 *    not already paired with the guest's source port; pending[P] = the original
 *    (address, port); the frame leaves to (gateway, P), checksums fixed incrementally
 *    (RFC 1624).  The entry (keyed by the guest's source port and the original
 *    destination, and by the guest's source port and P for the replies) rewrites the
 *    flow's later segments the same way and its replies back (source = the original
 *    destination), so the guest and the gateway's flow table see the original flow;
 *  - the listener that accepts passt's connection on P asks the gateway
 *    (ns_gw_steer_claim, from any thread) and gets pending[P]: one unclaimed flow per
 *    port at a time makes that unambiguous whatever passt's source port is;
 *  - a SYN finding every pool port busy, or the table full, is dropped (the guest
 *    retries its SYN); the table is per gateway, so a guest only exhausts its own.
 *    Entries expire: 2 s after a RST, 30 s after FINs both ways or without an answer,
 *    1 h idle; an unclaimed pending[P] after 10 s.
 *  - guest traffic straight to a pool port at the gateway is dropped (never a listener
 *    reached without its flow), and so is other TCP/UDP to the gateway address unless
 *    allow_gateway (the host's loopback, the policy's `host` group: passt's gateway
 *    mapping is on for the pool's sake); fragmented TCP to a steered port is dropped
 *    (the rewrite needs the ports); with block_udp, guest UDP to the TLS ports (QUIC)
 *    is dropped so that clients fall back to TCP, as the TAP uplink's forward chain does.
 * Guest frames are hostile: every offset is checked against the frame length, the
 * hash is SipHash-1-3 under a per-table secret, the table is bounded.
 */
#define _GNU_SOURCE
#include "steer.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ns_internal.h"
#include "siphash.h"

#define STEER_ENTRIES 4096
#define STEER_SLOTS 8192            /* power of two, twice the entries */
#define PENDING_TTL 10.0
#define KIND_TLS 1
#define KIND_DNS 2
#define ST_FIN_G 1
#define ST_FIN_H 2
#define ST_RST 4
#define ST_ANSWERED 8

typedef struct steer_ent {
    uint8_t used, kind, v6, state;
    uint16_t sport, oport, pport, pad;
    uint8_t odst[16];
    double last;
} steer_ent;

typedef struct steer_pend {
    uint8_t used, v6;
    uint16_t oport;
    uint8_t odst[16];
    double t;
} steer_pend;

typedef struct steer_pool {
    uint16_t port[NS_STEER_MAX_POOL];
    steer_pend pend[NS_STEER_MAX_POOL];
    uint32_t n, next;
} steer_pool;

struct ns_steer {
    ns_gw_steer_config cfg;
    uint64_t key[2];
    uint8_t tls_bits[8192];         /* guest destination ports steered to the TLS pool */
    uint8_t pool_bits[8192];        /* every listener port (both pools) */
    steer_pool tls, dns;
    int block_udp;
    /* a new TLS configuration from another thread, applied by the loop */
    pthread_mutex_t mu;             /* guards the pools' pend[] and `next_tls` */
    int tls_changed;
    uint16_t next_ports[NS_STEER_MAX_PORTS], next_pool[NS_STEER_MAX_POOL];
    uint32_t next_nports, next_npool;
    int next_block_udp;
    steer_ent ent[STEER_ENTRIES];
    uint16_t fwd[STEER_SLOTS];      /* entry index + 1, 0 = empty */
    uint16_t rev[STEER_SLOTS];
    uint32_t nent;
    ns_gw_steer_stats st;
};

static inline int bit_get(const uint8_t *b, uint16_t p) { return (b[p >> 3] >> (p & 7)) & 1; }
static inline void bit_set(uint8_t *b, uint16_t p) { b[p >> 3] |= (uint8_t)(1u << (p & 7)); }

static uint32_t h_fwd(const ns_steer *s, int v6, uint16_t sport, const uint8_t *odst,
                      uint16_t oport) {
    uint64_t w[3];
    memcpy(&w[0], odst, 8);
    memcpy(&w[1], odst + 8, 8);
    w[2] = (uint64_t)sport | (uint64_t)oport << 16 | (uint64_t)v6 << 32 | 1ull << 40;
    return (uint32_t)ns_sip13_words(s->key, w, 3) & (STEER_SLOTS - 1);
}

static uint32_t h_rev(const ns_steer *s, int v6, uint16_t sport, uint16_t pport) {
    uint64_t w = (uint64_t)sport | (uint64_t)pport << 16 | (uint64_t)v6 << 32 | 2ull << 40;
    return (uint32_t)ns_sip13_words(s->key, &w, 1) & (STEER_SLOTS - 1);
}

static uint32_t h_of(const ns_steer *s, const steer_ent *e, int rev) {
    return rev ? h_rev(s, e->v6, e->sport, e->pport) : h_fwd(s, e->v6, e->sport, e->odst, e->oport);
}

static steer_ent *find_fwd(ns_steer *s, int v6, uint16_t sport, const uint8_t *odst,
                           uint16_t oport) {
    if (!s->nent) return NULL;
    for (uint32_t i = h_fwd(s, v6, sport, odst, oport), n = 0; n < STEER_SLOTS;
         i = (i + 1) & (STEER_SLOTS - 1), n++) {
        uint16_t x = s->fwd[i];
        if (!x) return NULL;
        steer_ent *e = &s->ent[x - 1];
        if (e->sport == sport && e->oport == oport && e->v6 == v6 && memcmp(e->odst, odst, 16) == 0)
            return e;
    }
    return NULL;
}

static steer_ent *find_rev(ns_steer *s, int v6, uint16_t sport, uint16_t pport) {
    if (!s->nent) return NULL;
    for (uint32_t i = h_rev(s, v6, sport, pport), n = 0; n < STEER_SLOTS;
         i = (i + 1) & (STEER_SLOTS - 1), n++) {
        uint16_t x = s->rev[i];
        if (!x) return NULL;
        steer_ent *e = &s->ent[x - 1];
        if (e->sport == sport && e->pport == pport && e->v6 == v6) return e;
    }
    return NULL;
}

static void idx_insert(uint16_t *tab, uint32_t h, uint16_t x) {
    while (tab[h]) h = (h + 1) & (STEER_SLOTS - 1);
    tab[h] = x;
}

/* Linear probing with backward-shift deletion (no tombstones). */
static void idx_remove(ns_steer *s, uint16_t *tab, int rev, uint16_t x) {
    uint32_t i = h_of(s, &s->ent[x - 1], rev);
    while (tab[i] != x) {
        if (!tab[i]) return; /* cannot happen */
        i = (i + 1) & (STEER_SLOTS - 1);
    }
    uint32_t j = i;
    for (;;) {
        tab[i] = 0;
        for (;;) {
            j = (j + 1) & (STEER_SLOTS - 1);
            if (!tab[j]) return;
            uint32_t k = h_of(s, &s->ent[tab[j] - 1], rev);
            /* move tab[j] back to i unless its home k lies cyclically in (i, j] */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
            break;
        }
        tab[i] = tab[j];
        i = j;
    }
}

static void ent_free(ns_steer *s, steer_ent *e) {
    uint16_t x = (uint16_t)(e - s->ent + 1);
    idx_remove(s, s->fwd, 0, x);
    idx_remove(s, s->rev, 1, x);
    memset(e, 0, sizeof(*e));
    s->nent--;
}

static double ent_ttl(const steer_ent *e) {
    if (e->state & ST_RST) return 2.0;
    if ((e->state & (ST_FIN_G | ST_FIN_H)) == (ST_FIN_G | ST_FIN_H)) return 30.0;
    if (!(e->state & ST_ANSWERED)) return 30.0;
    return 3600.0;
}

void ns_steer_expire(ns_steer *s, double now) {
    if (!s->nent) return;
    for (uint32_t i = 0; i < STEER_ENTRIES; i++) {
        steer_ent *e = &s->ent[i];
        if (e->used && now - e->last > ent_ttl(e)) ent_free(s, e);
    }
}

static void set_tls(ns_steer *s, const uint16_t *ports, size_t nports, const uint16_t *pool,
                    size_t npool, int block_udp) {
    memset(s->tls_bits, 0, sizeof(s->tls_bits));
    for (size_t i = 0; i < nports; i++)
        if (ports[i] && ports[i] != 53) bit_set(s->tls_bits, ports[i]);
    /* the pools' bits: the DNS pool's stay, the TLS pool's are replaced */
    memset(s->pool_bits, 0, sizeof(s->pool_bits));
    for (uint32_t i = 0; i < s->dns.n; i++) bit_set(s->pool_bits, s->dns.port[i]);
    memset(&s->tls, 0, sizeof(s->tls));
    for (size_t i = 0; i < npool && i < NS_STEER_MAX_POOL; i++) {
        if (!pool[i]) continue;
        s->tls.port[s->tls.n++] = pool[i];
        bit_set(s->pool_bits, pool[i]);
    }
    s->block_udp = block_udp;
}

ns_steer *ns_steer_new(const ns_gw_steer_config *cfg) {
    if (!cfg || cfg->ndns_pool > NS_STEER_MAX_POOL || cfg->ntls_pool > NS_STEER_MAX_POOL ||
        cfg->ntls_ports > NS_STEER_MAX_PORTS)
        return NULL;
    ns_steer *s = (ns_steer *)calloc(1, sizeof(*s));
    if (!s) return NULL;
    if (ns_random_key(s->key) != 0 || pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return NULL;
    }
    s->cfg = *cfg;
    if (cfg->dns) {
        for (uint32_t i = 0; i < cfg->ndns_pool; i++)
            if (cfg->dns_pool[i]) s->dns.port[s->dns.n++] = cfg->dns_pool[i];
    }
    set_tls(s, cfg->tls_ports, cfg->ntls_ports, cfg->tls_pool, cfg->ntls_pool, cfg->block_udp);
    return s;
}

void ns_steer_free(ns_steer *s) {
    if (!s) return;
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int ns_steer_set_tls(ns_steer *s, const uint16_t *ports, size_t nports, const uint16_t *pool,
                     size_t npool, int block_udp) {
    if (nports > NS_STEER_MAX_PORTS || npool > NS_STEER_MAX_POOL || (nports && !npool)) return -1;
    pthread_mutex_lock(&s->mu);
    memcpy(s->next_ports, ports, nports * sizeof(uint16_t));
    memcpy(s->next_pool, pool, npool * sizeof(uint16_t));
    s->next_nports = (uint32_t)nports;
    s->next_npool = (uint32_t)npool;
    s->next_block_udp = block_udp;
    __atomic_store_n(&s->tls_changed, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static void apply_tls(ns_steer *s) {
    pthread_mutex_lock(&s->mu);
    set_tls(s, s->next_ports, s->next_nports, s->next_pool, s->next_npool, s->next_block_udp);
    /* flows steered to the old pool keep their entries (their listener may be gone) */
    __atomic_store_n(&s->tls_changed, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->mu);
}

/* RFC 1624: the checksum `c` after the 16-bit words old[0..n) became new[0..n) (n even). */
static uint16_t csum_replace(uint16_t c, const uint8_t *old, const uint8_t *new, size_t n) {
    uint32_t s = (uint16_t)~c;
    for (size_t i = 0; i < n; i += 2) {
        s += (uint16_t)~ns_rd16(old + i);
        s += ns_rd16(new + i);
    }
    return ns_csum_fold(s);
}

/* Replace an address (4 or 16 bytes at `addr`) and a port (at `port`) of a TCP segment
 * whose header is at `t` (checksum at t + 16), and of an IPv4 header at `ip4` (or NULL). */
static void rewrite(uint8_t *ip4, uint8_t *addr, size_t alen, const uint8_t *naddr,
                    uint8_t *port, uint16_t nport, uint8_t *t) {
    uint8_t np[2];
    ns_wr16(np, nport);
    uint16_t c = ns_rd16(t + 16);
    c = csum_replace(c, addr, naddr, alen);
    c = csum_replace(c, port, np, 2);
    ns_wr16(t + 16, c);
    if (ip4) ns_wr16(ip4 + 10, csum_replace(ns_rd16(ip4 + 10), addr, naddr, alen));
    memmove(addr, naddr, alen);
    memcpy(port, np, 2);
}

/* Where the frame's IP header, destination/source address and L4 header are. */
typedef struct where {
    size_t l3, l4;
    int v6;
    uint8_t proto;
    int frag;
} where;

static int locate(const uint8_t *f, size_t len, where *w) {
    if (len < 14) return 0;
    uint16_t et = ns_rd16(f + 12);
    if (et == 0x0800 && len >= 34) {
        size_t ihl = (size_t)(f[14] & 15) * 4;
        if (ihl < 20 || 14 + ihl > len) return 0;
        w->l3 = 14, w->l4 = 14 + ihl, w->v6 = 0, w->proto = f[23];
        w->frag = (ns_rd16(f + 20) & 0x3fff) != 0;
        return 1;
    }
    if (et == 0x86dd && len >= 54 && (f[20] == 6 || f[20] == 17 || f[20] == 58)) {
        w->l3 = 14, w->l4 = 54, w->v6 = 1, w->proto = f[20], w->frag = 0;
        return 1;
    }
    if (et != 0x8100 && et != 0x86dd) return 0;
    /* VLAN tags, IPv6 extension headers: the frame parser */
    ns_frame fr;
    if (ns_parse_frame(f, len, &fr) != NS_PARSE_OK || (fr.l3 != NS_L3_IPV4 && fr.l3 != NS_L3_IPV6))
        return 0;
    w->l3 = fr.vlan ? 18 : 14;
    w->l4 = fr.l4_off;
    w->v6 = fr.family == 6;
    w->proto = fr.ipproto;
    w->frag = fr.frag != 0;
    if (w->l3 + (w->v6 ? 40u : 20u) > len) return 0;
    return 1;
}

static const uint8_t zero16[16];

static int is_gateway(const ns_steer *s, const uint8_t *a, int v6) {
    if (v6) return memcmp(s->cfg.gateway_ip6, zero16, 16) != 0 && memcmp(a, s->cfg.gateway_ip6, 16) == 0;
    return memcmp(a, s->cfg.gateway_ip + 12, 4) == 0;
}

static steer_pool *pool_of(ns_steer *s, int kind) { return kind == KIND_DNS ? &s->dns : &s->tls; }

/* A pool port for a new flow from `sport`: no unclaimed flow on it and no entry pairing
 * it with `sport` already; round robin, so a port is reused as late as possible. */
static int pick_port(ns_steer *s, steer_pool *p, int v6, uint16_t sport, double now) {
    for (uint32_t n = 0; n < p->n; n++) {
        uint32_t i = (p->next + n) % p->n;
        steer_pend *q = &p->pend[i];
        if (q->used && now - q->t <= PENDING_TTL) continue;
        if (find_rev(s, v6, sport, p->port[i])) continue;
        p->next = (i + 1) % p->n;
        return (int)i;
    }
    return -1;
}

static steer_ent *ent_new(ns_steer *s, double now) {
    if (s->nent >= STEER_ENTRIES) ns_steer_expire(s, now);
    if (s->nent >= STEER_ENTRIES) return NULL;
    for (uint32_t i = 0; i < STEER_ENTRIES; i++)
        if (!s->ent[i].used) return &s->ent[i];
    return NULL;
}

int ns_steer_out(ns_steer *s, uint8_t *f, size_t len, double now) {
    if (__atomic_load_n(&s->tls_changed, __ATOMIC_ACQUIRE)) apply_tls(s);
    where w;
    if (!locate(f, len, &w)) return 0;
    uint8_t *dst = f + w.l3 + (w.v6 ? 24 : 16);
    size_t alen = w.v6 ? 16 : 4;
    int to_gw = is_gateway(s, dst, w.v6);
    if (w.proto != 6 && w.proto != 17) {
        if (to_gw && !s->cfg.allow_gateway && w.proto != 1 && w.proto != 58) {
            s->st.gateway_dropped++;
            return -1;
        }
        return 0;
    }
    if (w.frag) {
        /* no ports in later fragments: TCP fragments never leave (Linux sends TCP with
         * DF; passt does not reassemble), UDP ones are judged by the address alone */
        if (w.proto == 6 && (s->tls.n || s->dns.n)) {
            s->st.frag_dropped++;
            return -1;
        }
        if (to_gw && !s->cfg.allow_gateway) {
            s->st.gateway_dropped++;
            return -1;
        }
        return 0;
    }
    if (w.l4 + (w.proto == 6 ? 20u : 8u) > len) return 0; /* truncated: passt drops it */
    uint8_t *t = f + w.l4;
    uint16_t sport = ns_rd16(t), dport = ns_rd16(t + 2);
    int kind = 0;
    if (w.proto == 6) {
        if (dport == 53 && s->dns.n) kind = KIND_DNS;
        else if (bit_get(s->tls_bits, dport) && s->tls.n) kind = KIND_TLS;
    } else if (s->block_udp && bit_get(s->tls_bits, dport)) {
        s->st.udp_dropped++;
        return -1;
    }
    if (!kind) {
        if (to_gw && (!s->cfg.allow_gateway || bit_get(s->pool_bits, dport))) {
            s->st.gateway_dropped++;
            return -1;
        }
        return 0;
    }
    const uint8_t *gw = w.v6 ? s->cfg.gateway_ip6 : s->cfg.gateway_ip + 12;
    if (w.v6 && memcmp(gw, zero16, 16) == 0) { /* no IPv6 listener to steer to */
        s->st.stray++;
        return -1;
    }
    uint8_t odst[16];
    if (w.v6) memcpy(odst, dst, 16);
    else {
        memset(odst, 0, 10);
        odst[10] = odst[11] = 0xff;
        memcpy(odst + 12, dst, 4);
    }
    uint8_t flags = t[13];
    steer_ent *e = find_fwd(s, w.v6, sport, odst, dport);
    if (!e) {
        if ((flags & 0x17) != 0x02) { /* only a SYN (no ACK, RST, FIN) opens a flow */
            s->st.stray++;
            return -1;
        }
        steer_pool *p = pool_of(s, kind);
        pthread_mutex_lock(&s->mu);
        int i = pick_port(s, p, w.v6, sport, now);
        if (i < 0) {
            pthread_mutex_unlock(&s->mu);
            s->st.pool_busy++;
            return -1;
        }
        e = ent_new(s, now);
        if (!e) {
            pthread_mutex_unlock(&s->mu);
            s->st.table_full++;
            return -1;
        }
        steer_pend *q = &p->pend[i];
        q->used = 1;
        q->v6 = (uint8_t)w.v6;
        q->oport = dport;
        memcpy(q->odst, odst, 16);
        q->t = now;
        pthread_mutex_unlock(&s->mu);
        e->used = 1;
        e->kind = (uint8_t)kind;
        e->v6 = (uint8_t)w.v6;
        e->sport = sport;
        e->oport = dport;
        e->pport = p->port[i];
        memcpy(e->odst, odst, 16);
        uint16_t x = (uint16_t)(e - s->ent + 1);
        idx_insert(s->fwd, h_fwd(s, e->v6, sport, odst, dport), x);
        idx_insert(s->rev, h_rev(s, e->v6, sport, e->pport), x);
        s->nent++;
        s->st.flows++;
    }
    e->last = now;
    if (flags & 0x04) e->state |= ST_RST;
    if (flags & 0x01) e->state |= ST_FIN_G;
    rewrite(w.v6 ? NULL : f + w.l3, dst, alen, gw, t + 2, e->pport, t);
    return 0;
}

int ns_steer_in(ns_steer *s, uint8_t *f, size_t len, double now) {
    where w;
    if (!locate(f, len, &w) || w.proto != 6 || w.frag) return 0;
    uint8_t *src = f + w.l3 + (w.v6 ? 8 : 12);
    if (!is_gateway(s, src, w.v6) || w.l4 + 20 > len) return 0;
    uint8_t *t = f + w.l4;
    uint16_t sport = ns_rd16(t), dport = ns_rd16(t + 2);
    if (!bit_get(s->pool_bits, sport)) return 0;
    steer_ent *e = find_rev(s, w.v6, dport, sport);
    if (!e) {
        s->st.stray++;
        return -1;
    }
    uint8_t flags = t[13];
    e->last = now;
    e->state |= ST_ANSWERED;
    if (flags & 0x04) e->state |= ST_RST;
    if (flags & 0x01) e->state |= ST_FIN_H;
    rewrite(w.v6 ? NULL : f + w.l3, src, w.v6 ? 16 : 4, w.v6 ? e->odst : e->odst + 12, t,
            e->oport, t);
    return e->kind == KIND_DNS ? 2 : 1;
}

int ns_steer_claim(ns_steer *s, uint16_t port, double now, uint8_t *dst16, uint16_t *dport) {
    int rc = -1;
    pthread_mutex_lock(&s->mu);
    steer_pool *pools[2] = {&s->tls, &s->dns};
    for (int k = 0; k < 2 && rc < 0; k++) {
        steer_pool *p = pools[k];
        for (uint32_t i = 0; i < p->n; i++) {
            steer_pend *q = &p->pend[i];
            if (p->port[i] != port || !q->used) continue;
            if (now - q->t <= PENDING_TTL) {
                memcpy(dst16, q->odst, 16);
                *dport = q->oport;
                rc = 0;
                s->st.claimed++;
            }
            q->used = 0;
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void ns_steer_stats(ns_steer *s, ns_gw_steer_stats *out) {
    *out = s->st;
    out->live = s->nent;
}
