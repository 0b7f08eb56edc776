/*
 * pincache.c - the DNS pin cache: which hostnames resolved to an IP.
 *
 * Semantics (reference microsandbox §2.3):
 *  - key = (hostname, family); value = a set of IPs with one expiry per key.
 *    A new answer REPLACES the key's set; an answer without addresses or with
 *    an error RCODE clears the key.  A and AAAA refresh independently.
 *  - TTL = min over the contributing CNAME/A/AAAA TTLs, floored at 1 s and
 *    capped at the configured ceiling.
 *  - lookups see a binding iff expires_at > now (expired keys are dropped
 *    lazily when touched and by ns_pin_expire).
 *  - size bound: at most `max_bindings` (name, IP) bindings.  When an insert
 *    finds the pool full it first evicts an expired key if one is among the
 *    16 keys examined from a rotating cursor, otherwise the key with the
 *    soonest expiry among those 16 (never the key being written).  Evicting a
 *    key drops all its bindings.
 *  - at most NS_PIN_MAX_IPS_PER_NAME addresses per key are kept (DNS answers
 *    carry at most 64 anyway); lookups return names most recently pinned first.
 *
 * Thread safety: every entry point takes the cache's own mutex, so a DNS
 * forwarder thread may learn answers while a packet loop looks names up;
 * lookups copy the names out.
 *
 * Storage: stable pools (names, IPs, bindings) with free lists, indexed by
 * two chained hash tables (SipHash-1-3 under a per-cache random secret); each
 * binding sits on its IP's list and its name's list, so both "IP -> names"
 * and "replace the name's set" cost O(bindings).
 */
#include <pthread.h>
#include <stdlib.h>

#include "ns_internal.h"
#include "siphash.h"

#define NIL 0xffffffffu
#define EVICT_SAMPLE 16

typedef struct pin_name {
    uint8_t *name;
    uint16_t len;
    uint8_t family;
    uint8_t live;
    double expires;
    uint32_t hnext;   /* hash chain / free list */
    uint32_t head;    /* first binding */
} pin_name;

typedef struct pin_ip {
    uint8_t ip[16];
    uint8_t live;
    uint32_t hnext;
    uint32_t head;
} pin_ip;

typedef struct pin_bind {
    uint32_t name, ip;
    uint32_t ip_next, ip_prev;
    uint32_t name_next;
} pin_bind;

struct ns_pincache {
    uint32_t cap;          /* max bindings == pool sizes */
    uint32_t mask;         /* hash buckets - 1 */
    uint64_t hkey[2];      /* this cache's SipHash secret (getrandom, at creation) */
    double ceiling;
    pin_name *names;
    pin_ip *ips;
    pin_bind *binds;
    uint32_t *nbucket, *ibucket;
    uint32_t free_name, free_ip, free_bind;
    uint32_t nbinds, nnames;
    uint32_t cursor;
    uint64_t evictions;
    uint32_t max_chain;    /* longest hash chain walked (introspection) */
    pthread_mutex_t mu;
};

/* Bucket hashes: SipHash-1-3 under the cache's own secret (names and the
 * addresses of answers are chosen by the guest or by a DNS server it
 * controls, see siphash.h).  The family is folded into the key, so (name, 4)
 * and (name, 6) are hashed independently. */
static inline uint32_t name_hash(const ns_pincache *pc, const uint8_t *name, size_t len,
                                 int family) {
    const uint64_t key[2] = {pc->hkey[0] ^ (uint64_t)family, pc->hkey[1]};
    return (uint32_t)ns_sip13_bytes(key, name, len);
}

static inline uint32_t ip_hash(const ns_pincache *pc, const uint8_t *ip) {
    uint64_t w[2];
    memcpy(w, ip, 16);
    return (uint32_t)ns_sip13_words(pc->hkey, w, 2);
}

ns_pincache *ns_pin_new(uint32_t max_bindings, double ttl_ceiling) {
    if (max_bindings < 1) max_bindings = 1;
    if (max_bindings > (1u << 24)) max_bindings = 1u << 24;
    ns_pincache *pc = (ns_pincache *)calloc(1, sizeof(*pc));
    if (!pc) return NULL;
    if (ns_random_key(pc->hkey) != 0) {
        free(pc);
        return NULL;
    }
    uint32_t b = 16;
    while (b < max_bindings) b <<= 1;
    pc->cap = max_bindings;
    pc->mask = b - 1;
    pc->ceiling = ttl_ceiling < 1.0 ? 1.0 : ttl_ceiling;
    pc->names = (pin_name *)calloc(max_bindings, sizeof(pin_name));
    pc->ips = (pin_ip *)calloc(max_bindings, sizeof(pin_ip));
    pc->binds = (pin_bind *)calloc(max_bindings, sizeof(pin_bind));
    pc->nbucket = (uint32_t *)malloc(sizeof(uint32_t) * b);
    pc->ibucket = (uint32_t *)malloc(sizeof(uint32_t) * b);
    pthread_mutex_init(&pc->mu, NULL);
    if (!pc->names || !pc->ips || !pc->binds || !pc->nbucket || !pc->ibucket) {
        ns_pin_free(pc);
        return NULL;
    }
    for (uint32_t i = 0; i < b; i++) pc->nbucket[i] = pc->ibucket[i] = NIL;
    for (uint32_t i = 0; i < max_bindings; i++) {
        pc->names[i].hnext = i + 1 < max_bindings ? i + 1 : NIL;
        pc->ips[i].hnext = i + 1 < max_bindings ? i + 1 : NIL;
        pc->binds[i].name_next = i + 1 < max_bindings ? i + 1 : NIL;
    }
    pc->free_name = pc->free_ip = pc->free_bind = 0;
    return pc;
}

void ns_pin_free(ns_pincache *pc) {
    if (!pc) return;
    if (pc->names)
        for (uint32_t i = 0; i < pc->cap; i++) free(pc->names[i].name);
    free(pc->names);
    free(pc->ips);
    free(pc->binds);
    free(pc->nbucket);
    free(pc->ibucket);
    pthread_mutex_destroy(&pc->mu);
    free(pc);
}

static inline void note_chain(ns_pincache *pc, uint32_t walked) {
    if (walked > pc->max_chain) pc->max_chain = walked;
}

static uint32_t find_name(ns_pincache *pc, const uint8_t *name, size_t len, int family) {
    uint32_t h = name_hash(pc, name, len, family) & pc->mask;
    uint32_t walked = 0;
    for (uint32_t i = pc->nbucket[h]; i != NIL; i = pc->names[i].hnext) {
        const pin_name *n = &pc->names[i];
        walked++;
        if (n->family == family && n->len == len && memcmp(n->name, name, len) == 0) {
            note_chain(pc, walked);
            return i;
        }
    }
    note_chain(pc, walked);
    return NIL;
}

static uint32_t find_ip(ns_pincache *pc, const uint8_t *ip) {
    uint32_t h = ip_hash(pc, ip) & pc->mask;
    uint32_t walked = 0;
    for (uint32_t i = pc->ibucket[h]; i != NIL; i = pc->ips[i].hnext) {
        walked++;
        if (memcmp(pc->ips[i].ip, ip, 16) == 0) {
            note_chain(pc, walked);
            return i;
        }
    }
    note_chain(pc, walked);
    return NIL;
}

static void drop_ip(ns_pincache *pc, uint32_t idx) {
    pin_ip *r = &pc->ips[idx];
    uint32_t h = ip_hash(pc, r->ip) & pc->mask;
    uint32_t *pp = &pc->ibucket[h];
    while (*pp != idx) pp = &pc->ips[*pp].hnext;
    *pp = r->hnext;
    r->live = 0;
    r->hnext = pc->free_ip;
    pc->free_ip = idx;
}

/* Remove every binding of name record idx (keeps the record). */
static void unbind_name(ns_pincache *pc, uint32_t idx) {
    pin_name *n = &pc->names[idx];
    uint32_t b = n->head;
    while (b != NIL) {
        pin_bind *bd = &pc->binds[b];
        uint32_t next = bd->name_next;
        /* unlink from the IP list */
        if (bd->ip_prev != NIL) pc->binds[bd->ip_prev].ip_next = bd->ip_next;
        else pc->ips[bd->ip].head = bd->ip_next;
        if (bd->ip_next != NIL) pc->binds[bd->ip_next].ip_prev = bd->ip_prev;
        if (pc->ips[bd->ip].head == NIL) drop_ip(pc, bd->ip);
        bd->name_next = pc->free_bind;
        pc->free_bind = b;
        pc->nbinds--;
        b = next;
    }
    n->head = NIL;
}

static void drop_name(ns_pincache *pc, uint32_t idx) {
    pin_name *n = &pc->names[idx];
    unbind_name(pc, idx);
    uint32_t h = name_hash(pc, n->name, n->len, n->family) & pc->mask;
    uint32_t *pp = &pc->nbucket[h];
    while (*pp != idx) pp = &pc->names[*pp].hnext;
    *pp = n->hnext;
    free(n->name);
    n->name = NULL;
    n->live = 0;
    n->hnext = pc->free_name;
    pc->free_name = idx;
    pc->nnames--;
}

/* Make room for one binding; never evicts `keep`. Returns 0 on failure. */
static int make_room(ns_pincache *pc, uint32_t keep, double now) {
    if (pc->free_bind != NIL) return 1;
    uint32_t best = NIL, seen = 0;
    for (uint32_t step = 0; step < pc->cap && seen < EVICT_SAMPLE; step++) {
        uint32_t i = pc->cursor;
        pc->cursor = (pc->cursor + 1) % pc->cap;
        if (!pc->names[i].live || i == keep || pc->names[i].head == NIL) continue;
        seen++;
        if (pc->names[i].expires <= now) {
            best = i;
            break;
        }
        if (best == NIL || pc->names[i].expires < pc->names[best].expires) best = i;
    }
    if (best == NIL) return 0;
    drop_name(pc, best);
    pc->evictions++;
    return pc->free_bind != NIL;
}

static int pin_set(ns_pincache *pc, const uint8_t *name, size_t name_len, int family,
                   const uint8_t *ips, size_t n, double ttl, double now) {
    if (!ns_valid_hostname(name, name_len) || (family != 4 && family != 6)) return -1;
    uint32_t idx = find_name(pc, name, name_len, family);
    if (idx != NIL) unbind_name(pc, idx);
    if (n == 0) {
        if (idx != NIL) drop_name(pc, idx);
        return 0;
    }
    if (idx == NIL) {
        if (pc->free_name == NIL && !make_room(pc, NIL, now)) return -1;
        if (pc->free_name == NIL) return -1;
        idx = pc->free_name;
        pin_name *nr = &pc->names[idx];
        uint8_t *copy = (uint8_t *)malloc(name_len + 1);
        if (!copy) return -1;
        memcpy(copy, name, name_len);
        copy[name_len] = 0;
        pc->free_name = nr->hnext;
        nr->name = copy;
        nr->len = (uint16_t)name_len;
        nr->family = (uint8_t)family;
        nr->live = 1;
        nr->head = NIL;
        uint32_t h = name_hash(pc, copy, name_len, family) & pc->mask;
        nr->hnext = pc->nbucket[h];
        pc->nbucket[h] = idx;
        pc->nnames++;
    }
    if (ttl < 1.0 || ttl != ttl) ttl = 1.0;
    if (ttl > pc->ceiling) ttl = pc->ceiling;
    pc->names[idx].expires = now + ttl;
    int added = 0;
    for (size_t k = 0; k < n && k < NS_DNS_MAX_ADDRS; k++) {
        const uint8_t *ip = ips + 16 * k;
        /* skip duplicates within this set */
        int dup = 0;
        for (uint32_t b = pc->names[idx].head; b != NIL; b = pc->binds[b].name_next)
            if (memcmp(pc->ips[pc->binds[b].ip].ip, ip, 16) == 0) { dup = 1; break; }
        if (dup) continue;
        if (!make_room(pc, idx, now)) break;
        uint32_t ipi = find_ip(pc, ip);
        if (ipi == NIL) {
            ipi = pc->free_ip;
            if (ipi == NIL) break;
            pin_ip *r = &pc->ips[ipi];
            pc->free_ip = r->hnext;
            memcpy(r->ip, ip, 16);
            r->live = 1;
            r->head = NIL;
            uint32_t h = ip_hash(pc, ip) & pc->mask;
            r->hnext = pc->ibucket[h];
            pc->ibucket[h] = ipi;
        }
        uint32_t b = pc->free_bind;
        pin_bind *bd = &pc->binds[b];
        pc->free_bind = bd->name_next;
        bd->name = idx;
        bd->ip = ipi;
        bd->ip_prev = NIL;
        bd->ip_next = pc->ips[ipi].head;
        if (bd->ip_next != NIL) pc->binds[bd->ip_next].ip_prev = b;
        pc->ips[ipi].head = b;
        bd->name_next = pc->names[idx].head;
        pc->names[idx].head = b;
        pc->nbinds++;
        added++;
    }
    if (pc->names[idx].head == NIL) drop_name(pc, idx);
    return added;
}

int ns_pin_set(ns_pincache *pc, const uint8_t *name, size_t name_len, int family,
               const uint8_t *ips, size_t n, double ttl, double now) {
    pthread_mutex_lock(&pc->mu);
    int rc = pin_set(pc, name, name_len, family, ips, n, ttl, now);
    pthread_mutex_unlock(&pc->mu);
    return rc;
}

int ns_pin_learn_dns(ns_pincache *pc, const uint8_t *buf, size_t len, double now) {
    ns_dns_result r;
    if (ns_parse_dns(buf, len, &r) != NS_DNS_OK) return -1;
    if (!r.is_response || r.truncated) return -2;
    int family = r.qtype == 1 ? 4 : r.qtype == 28 ? 6 : 0;
    if (family == 0 || !ns_valid_hostname(r.qname, r.qname_len)) return -2;
    if (r.rcode != 0 || r.naddrs == 0)
        return ns_pin_set(pc, r.qname, r.qname_len, family, NULL, 0, 0, now);
    uint8_t ips[NS_DNS_MAX_ADDRS * 16];
    size_t n = 0;
    for (uint16_t i = 0; i < r.naddrs; i++) {
        if (r.addr_family[i] != family) continue; /* AAAA carrying a v4-mapped address */
        memcpy(ips + 16 * n, r.addrs[i], 16);
        n++;
    }
    return ns_pin_set(pc, r.qname, r.qname_len, family, ips, n, (double)r.min_ttl, now);
}

size_t ns_pin_lookup(ns_pincache *pc, const uint8_t *ip, double now, uint8_t *blob,
                     size_t blob_cap, uint16_t *lens, size_t max) {
    pthread_mutex_lock(&pc->mu);
    size_t n = 0, used = 0;
    uint32_t ipi = find_ip(pc, ip);
    for (uint32_t b = ipi == NIL ? NIL : pc->ips[ipi].head; b != NIL && n < max;
         b = pc->binds[b].ip_next) {
        pin_name *nr = &pc->names[pc->binds[b].name];
        if (!(nr->expires > now) || nr->len > blob_cap - used) continue;
        memcpy(blob + used, nr->name, nr->len);
        lens[n++] = nr->len;
        used += nr->len;
    }
    pthread_mutex_unlock(&pc->mu);
    return n;
}

size_t ns_pin_count(ns_pincache *pc) {
    pthread_mutex_lock(&pc->mu);
    size_t n = pc->nbinds;
    pthread_mutex_unlock(&pc->mu);
    return n;
}

uint32_t ns_pin_max_chain(ns_pincache *pc) {
    pthread_mutex_lock(&pc->mu);
    uint32_t n = pc->max_chain;
    pthread_mutex_unlock(&pc->mu);
    return n;
}

uint64_t ns_pin_evictions(ns_pincache *pc) {
    pthread_mutex_lock(&pc->mu);
    uint64_t n = pc->evictions;
    pthread_mutex_unlock(&pc->mu);
    return n;
}

void ns_pin_expire(ns_pincache *pc, double now) {
    pthread_mutex_lock(&pc->mu);
    for (uint32_t i = 0; i < pc->cap; i++)
        if (pc->names[i].live && pc->names[i].expires <= now) drop_name(pc, i);
    pthread_mutex_unlock(&pc->mu);
}
