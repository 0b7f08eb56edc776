/*
 * policy.c - a NetworkPolicy compiled into first-match lookup tables.
 *
 * The result is exactly the reference evaluator's (netstack._policy.evaluate):
 * the lowest-indexed rule whose direction, protocol, port and destination all
 * match, else the direction's default.  To avoid a linear scan over thousands
 * of rules the rules are split by destination kind:
 *   - cidr rules are indexed in one hash table keyed by (family, prefix
 *     length, network address), each key holding its rules in order; a lookup
 *     probes once per distinct prefix length present in the policy (<= 33 for
 *     IPv4, <= 129 for IPv6), so its cost depends on how many different
 *     prefix lengths the policy uses, not on the number of rules;
 *     IPv4 rules of length >= 16 are in addition bucketed by their first 16
 *     bits (a bitmap of occupied /16s + rank): an IPv4 lookup whose bucket
 *     holds at most NS_CIDR_BUCKET_MAX entries scans that one contiguous,
 *     rule-ordered bucket (address test and transport filter inline) instead
 *     of probing the hash once per length >= 16; larger buckets keep the
 *     probes, so the worst case is unchanged;
 *   - group rules are bucketed by group (the remote belongs to one group);
 *   - domain and suffix rules are indexed by (kind, name) in a hash table: a
 *     flow probes its SNI (or each pinned name) exactly, and every
 *     label-aligned suffix of it for suffix rules (a.b.example.com ->
 *     b.example.com -> example.com -> com), so the cost depends on the number
 *     of labels and names, not on the number of domain rules;
 *   - any rules are kept in an ordered list.
 * Each candidate list is scanned only while its rule index is below the best
 * match found so far; the answer is the minimum over all candidates.
 */
#include <stdlib.h>

#include "ns_internal.h"

static void addr_words(const uint8_t *a16, int family, uint64_t *hi, uint64_t *lo) {
    if (family == 4) {
        *hi = 0;
        *lo = ((uint64_t)a16[12] << 24) | ((uint64_t)a16[13] << 16) | ((uint64_t)a16[14] << 8) | a16[15];
        return;
    }
    uint64_t h = 0, l = 0;
    for (int i = 0; i < 8; i++) h = (h << 8) | a16[i];
    for (int i = 8; i < 16; i++) l = (l << 8) | a16[i];
    *hi = h;
    *lo = l;
}

static void mask_words(int family, unsigned len, uint64_t *hi, uint64_t *lo) {
    if (family == 4) {
        *lo &= len == 0 ? 0 : (0xffffffffull << (32 - len)) & 0xffffffffull;
        return;
    }
    if (len <= 64) {
        *hi &= len == 0 ? 0 : ~0ull << (64 - len);
        *lo = 0;
    } else {
        *lo &= len == 128 ? ~0ull : ~0ull << (128 - len);
    }
}

/* Population count without relying on -mpopcnt (the builtin becomes a
 * library call on baseline x86-64). */
static inline uint32_t pop64(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (uint32_t)((x * 0x0101010101010101ull) >> 56);
}

static inline uint32_t cidr_hash(uint64_t hi, uint64_t lo, unsigned len, int family) {
    uint64_t h = (hi ^ (lo * 0x9e3779b97f4a7c15ull)) + ((uint64_t)len << 1 | (family == 6));
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    return (uint32_t)h;
}

static cidr_slot *cidr_find(const cidr_index *ix, uint64_t hi, uint64_t lo, unsigned len,
                            int family, int create) {
    for (uint32_t i = cidr_hash(hi, lo, len, family) & ix->mask;; i = (i + 1) & ix->mask) {
        cidr_slot *s = &ix->slots[i];
        if (!s->used) {
            if (!create) return NULL;
            s->used = 1;
            s->hi = hi;
            s->lo = lo;
            s->len = (uint8_t)len;
            s->family = (uint8_t)family;
            return s;
        }
        if (s->hi == hi && s->lo == lo && s->len == len && s->family == family) return s;
    }
}

/* The network (address with host bits cleared) of a CIDR rule, as the two words the
 * index keys on. */
static void rule_network_words(const ns_rule_spec *s, uint64_t *hi, uint64_t *lo) {
    uint8_t a16[16] = {0};
    if (s->family == 4) memcpy(a16 + 12, s->addr, 4);
    else memcpy(a16, s->addr, 16);
    addr_words(a16, s->family, hi, lo);
    mask_words(s->family, s->prefix, hi, lo);
}

/* Index every cidr rule by (family, prefix length, network address). */
static int cidr_build(cidr_index *ix, const ns_rule_spec *rules, uint32_t nrules) {
    uint32_t ncidr = 0;
    for (uint32_t r = 0; r < nrules; r++) ncidr += rules[r].kind == NS_D_CIDR;
    uint32_t cap = 16;
    while (cap < 2 * ncidr + 2) cap <<= 1;
    ix->slots = (cidr_slot *)calloc(cap, sizeof(cidr_slot));
    ix->list = (uint32_t *)malloc(sizeof(uint32_t) * (ncidr ? ncidr : 1));
    if (!ix->slots || !ix->list) return -1;
    ix->mask = cap - 1;
    uint8_t seen4[33] = {0}, seen6[129] = {0};
    /* pass 1: count per key */
    for (uint32_t r = 0; r < nrules; r++) {
        const ns_rule_spec *s = &rules[r];
        if (s->kind != NS_D_CIDR) continue;
        uint64_t hi, lo;
        rule_network_words(s, &hi, &lo);
        cidr_find(ix, hi, lo, s->prefix, s->family, 1)->n++;
        if (s->prefix >= 16) {
            uint32_t top = s->family == 4 ? (uint32_t)(lo >> 16) : (uint32_t)(hi >> 48);
            ix->top16[s->family == 6][top >> 6] |= 1ull << (top & 63);
        }
        if (s->family == 4) seen4[s->prefix] = 1;
        else seen6[s->prefix] = 1;
    }
    uint32_t total = 0;
    for (uint32_t i = 0; i <= ix->mask; i++) {
        if (!ix->slots[i].used) continue;
        ix->slots[i].off = total;
        total += ix->slots[i].n;
        ix->slots[i].n = 0;
    }
    /* pass 2: fill in rule order, so each slice is ascending */
    for (uint32_t r = 0; r < nrules; r++) {
        const ns_rule_spec *s = &rules[r];
        if (s->kind != NS_D_CIDR) continue;
        uint64_t hi, lo;
        rule_network_words(s, &hi, &lo);
        cidr_slot *slot = cidr_find(ix, hi, lo, s->prefix, s->family, 0);
        if (slot->n == 0) slot->first = r;
        ix->list[slot->off + slot->n++] = r;
    }
    for (int l = 32; l >= 0; l--)
        if (seen4[l]) {
            ix->nlong4 += l >= 16;
            ix->lens4[ix->nlens4++] = (uint8_t)l;
        }
    for (int l = 128; l >= 0; l--)
        if (seen6[l]) {
            ix->nlong6 += l >= 16;
            ix->lens6[ix->nlens6++] = (uint8_t)l;
        }
    return 0;
}

/* Bucket the IPv4 rules of prefix length >= 16 by their first 16 bits (the
 * bits set in top16[0]); within a bucket entries keep ascending rule order. */
static int cidr_build_buckets4(cidr_index *ix, const ns_rule_spec *rules, const ns_tfilter *tf,
                               uint32_t nrules) {
    uint32_t nb = 0;
    for (uint32_t w = 0; w < 1024; w++) {
        ix->rank4[w] = nb;
        nb += pop64(ix->top16[0][w]);
    }
    ix->boff4 = (uint32_t *)calloc((size_t)nb + 1, sizeof(uint32_t));
    if (!ix->boff4) return -1;
    uint32_t nent = 0;
    for (uint32_t r = 0; r < nrules; r++) {
        const ns_rule_spec *s = &rules[r];
        if (s->kind != NS_D_CIDR || s->family != 4 || s->prefix < 16) continue;
        uint32_t top = ((uint32_t)s->addr[0] << 8) | s->addr[1];
        uint64_t word = ix->top16[0][top >> 6];
        uint32_t b = ix->rank4[top >> 6] +
                     pop64(word & ((1ull << (top & 63)) - 1));
        ix->boff4[b + 1]++;
        nent++;
    }
    for (uint32_t b = 0; b < nb; b++) ix->boff4[b + 1] += ix->boff4[b];
    ix->a4 = (cidr_addr4 *)calloc(nent ? nent : 1, sizeof(cidr_addr4));
    ix->t4 = (ns_tfilter *)calloc(nent ? nent : 1, sizeof(ns_tfilter));
    uint32_t *fill = (uint32_t *)calloc(nb ? nb : 1, sizeof(uint32_t));
    if (!ix->a4 || !ix->t4 || !fill) {
        free(fill);
        return -1;
    }
    for (uint32_t r = 0; r < nrules; r++) {
        const ns_rule_spec *s = &rules[r];
        if (s->kind != NS_D_CIDR || s->family != 4 || s->prefix < 16) continue;
        uint32_t top = ((uint32_t)s->addr[0] << 8) | s->addr[1];
        uint64_t word = ix->top16[0][top >> 6];
        uint32_t b = ix->rank4[top >> 6] +
                     pop64(word & ((1ull << (top & 63)) - 1));
        uint32_t at = ix->boff4[b] + fill[b]++;
        ix->a4[at].mask = (uint32_t)(0xffffffffull << (32 - s->prefix));
        ix->a4[at].net = ns_rd32(s->addr) & ix->a4[at].mask;
        ix->t4[at] = tf[r];
    }
    free(fill);
    return 0;
}

static uint32_t dom_hash(const uint8_t *name, size_t len, int kind) {
    uint32_t h = 2166136261u ^ (uint32_t)kind;
    for (size_t i = 0; i < len; i++) {
        h ^= name[i];
        h *= 16777619u;
    }
    return h ^ (h >> 16);
}

static const dom_slot *dom_find(const ns_policy *p, const uint8_t *name, size_t len, int kind) {
    const dom_index *ix = &p->dom;
    uint32_t h = dom_hash(name, len, kind);
    for (uint32_t i = h & ix->mask;; i = (i + 1) & ix->mask) {
        const dom_slot *s = &ix->slots[i];
        if (!s->used) return NULL;
        if (s->hash == h && s->kind == kind && s->len == len &&
            memcmp(p->blob + s->name_off, name, len) == 0)
            return s;
    }
}

static dom_slot *dom_slot_for(ns_policy *p, const ns_rule_spec *r) {
    dom_index *ix = &p->dom;
    const uint8_t *name = p->blob + r->name_off;
    uint32_t h = dom_hash(name, r->name_len, r->kind);
    for (uint32_t i = h & ix->mask;; i = (i + 1) & ix->mask) {
        dom_slot *s = &ix->slots[i];
        if (!s->used) {
            s->used = 1;
            s->hash = h;
            s->kind = r->kind;
            s->len = (uint16_t)r->name_len;
            s->name_off = r->name_off;
            return s;
        }
        if (s->hash == h && s->kind == r->kind && s->len == r->name_len &&
            memcmp(p->blob + s->name_off, name, r->name_len) == 0)
            return s;
    }
}

static int dom_build(ns_policy *p) {
    dom_index *ix = &p->dom;
    uint32_t nd = p->domain.n, cap = 16;
    while (cap < 2 * nd + 2) cap <<= 1;
    ix->slots = (dom_slot *)calloc(cap, sizeof(dom_slot));
    ix->list = (uint32_t *)malloc(sizeof(uint32_t) * (nd ? nd : 1));
    if (!ix->slots || !ix->list) return -1;
    ix->mask = cap - 1;
    for (uint32_t i = 0; i < nd; i++) dom_slot_for(p, &p->rules[p->domain.v[i]])->n++;
    uint32_t total = 0;
    for (uint32_t i = 0; i < cap; i++) {
        if (!ix->slots[i].used) continue;
        ix->slots[i].off = total;
        total += ix->slots[i].n;
        ix->slots[i].n = 0;
    }
    for (uint32_t i = 0; i < nd; i++) {
        dom_slot *s = dom_slot_for(p, &p->rules[p->domain.v[i]]);
        ix->list[s->off + s->n++] = p->domain.v[i];
    }
    return 0;
}

static int list_push(idx_list *l, uint32_t v, uint32_t cap) {
    if (!l->v) {
        l->v = (uint32_t *)malloc(sizeof(uint32_t) * (cap ? cap : 1));
        if (!l->v) return -1;
    }
    l->v[l->n++] = v;
    return 0;
}

void ns_policy_free(ns_policy *p) {
    if (!p) return;
    free(p->rules);
    free(p->tf);
    free(p->ranges);
    free(p->blob);
    free(p->any.v);
    free(p->domain.v);
    free(p->domain_deny.v);
    free(p->dom.slots);
    free(p->dom.list);
    for (int g = 0; g < 8; g++) free(p->group[g].v);
    free(p->cidr.slots);
    free(p->cidr.list);
    free(p->cidr.boff4);
    free(p->cidr.a4);
    free(p->cidr.t4);
    free(p->counters);
    free(p->icpt_blob);
    free(p);
}

ns_policy *ns_policy_build(const ns_rule_spec *rules, uint32_t nrules,
                           const uint16_t *port_ranges, uint32_t nranges,
                           const uint8_t *blob, uint32_t bloblen,
                           int default_egress_deny, int default_ingress_deny) {
    ns_policy *p = (ns_policy *)calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->nrules = nrules;
    p->def_deny[NS_DIR_EGRESS] = default_egress_deny ? 1 : 0;
    p->def_deny[NS_DIR_INGRESS] = default_ingress_deny ? 1 : 0;
    p->rules = (ns_rule_spec *)malloc(sizeof(ns_rule_spec) * (nrules ? nrules : 1));
    p->ranges = (uint16_t *)malloc(sizeof(uint16_t) * 2 * (nranges ? nranges : 1));
    p->blob = (uint8_t *)malloc(bloblen ? bloblen : 1);
    p->counters = (ns_rule_counter *)calloc((size_t)nrules + 2, sizeof(ns_rule_counter));
    if (!p->rules || !p->ranges || !p->blob || !p->counters) goto fail;
    if (nrules) memcpy(p->rules, rules, sizeof(ns_rule_spec) * nrules);
    if (nranges) memcpy(p->ranges, port_ranges, sizeof(uint16_t) * 2 * nranges);
    if (bloblen) memcpy(p->blob, blob, bloblen);
    for (uint32_t r = 0; r < nrules; r++) {
        ns_rule_spec *s = &p->rules[r];
        /* validate everything the evaluator will index with */
        if ((uint64_t)s->port_off + s->port_count > nranges) goto fail;
        if (s->kind == NS_D_DOMAIN || s->kind == NS_D_SUFFIX) {
            if ((uint64_t)s->name_off + s->name_len > bloblen || s->name_len == 0) goto fail;
            if (list_push(&p->domain, r, nrules) < 0) goto fail;
            if (s->action == NS_ACT_DENY && list_push(&p->domain_deny, r, nrules) < 0) goto fail;
            p->has_domain = 1;
        } else if (s->kind == NS_D_ANY) {
            if (list_push(&p->any, r, nrules) < 0) goto fail;
        } else if (s->kind == NS_D_GROUP) {
            if (s->group < 1 || s->group > 7) goto fail;
            if (list_push(&p->group[s->group], r, nrules) < 0) goto fail;
        } else if (s->kind == NS_D_CIDR) {
            if (!((s->family == 4 && s->prefix <= 32) || (s->family == 6 && s->prefix <= 128))) goto fail;
        } else {
            goto fail;
        }
        if (s->protomask == 0) s->protomask = NS_P_ALL;
    }
    p->tf = (ns_tfilter *)calloc(nrules ? nrules : 1, sizeof(ns_tfilter));
    if (!p->tf) goto fail;
    for (uint32_t r = 0; r < nrules; r++) {
        const ns_rule_spec *s = &p->rules[r];
        ns_tfilter *t = &p->tf[r];
        const uint16_t *rg = p->ranges + 2 * s->port_off;
        t->dirmask = s->dirmask;
        t->protomask = s->protomask;
        t->action = s->action;
        t->nports = (uint8_t)(s->port_count > 3 ? 3 : s->port_count);
        if (s->port_count >= 1) { t->lo0 = rg[0]; t->hi0 = rg[1]; }
        if (s->port_count >= 2) { t->lo1 = rg[2]; t->hi1 = rg[3]; }
        t->rule = r;
    }
    if (cidr_build(&p->cidr, p->rules, nrules) < 0) goto fail;
    if (cidr_build_buckets4(&p->cidr, p->rules, p->tf, nrules) < 0) goto fail;
    if (dom_build(p) < 0) goto fail;
    return p;
fail:
    ns_policy_free(p);
    return NULL;
}

/* A canonical host name as netstack._names.normalize_domain accepts it:
 * 1..253 chars, labels of 1..63 chars from [a-z0-9_-], not starting or
 * ending with '-'.  Names failing this never take part in domain matching. */
int ns_valid_hostname(const uint8_t *name, size_t len) {
    if (len == 0 || len > 253) return 0;
    size_t label = 0;
    for (size_t i = 0; i <= len; i++) {
        uint8_t c = i < len ? name[i] : '.';
        if (c == '.') {
            if (label == 0 || label > 63 || name[i - 1] == '-' || name[i - label] == '-') return 0;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_')) return 0;
        label++;
    }
    return 1;
}

int ns_name_matches(const uint8_t *name, size_t nlen, const uint8_t *dom, size_t dlen, int suffix) {
    if (nlen == dlen) return memcmp(name, dom, dlen) == 0;
    if (!suffix || nlen <= dlen) return 0;
    return name[nlen - dlen - 1] == '.' && memcmp(name + nlen - dlen, dom, dlen) == 0;
}

static const uint8_t V4_METADATA[4] = {169, 254, 169, 254};

int ns_classify_group(const uint8_t *ip, const uint8_t *gw, uint32_t ngw) {
    static const uint8_t zero[16] = {0};
    int v4 = ns_is_v4mapped(ip);
    if (v4 ? (ip[12] | ip[13] | ip[14] | ip[15]) == 0 : memcmp(ip, zero, 16) == 0) return NS_G_NONE;
    for (uint32_t i = 0; i < ngw; i++)
        if (memcmp(gw + 16 * i, ip, 16) == 0) return NS_G_HOST;
    if (v4) {
        const uint8_t *a = ip + 12;
        if (memcmp(a, V4_METADATA, 4) == 0) return NS_G_METADATA;
        if (a[0] == 127) return NS_G_LOOPBACK;
        if (a[0] == 10 || (a[0] == 172 && (a[1] & 0xf0) == 16) || (a[0] == 192 && a[1] == 168) ||
            (a[0] == 100 && (a[1] & 0xc0) == 64))
            return NS_G_PRIVATE;
        if (a[0] == 169 && a[1] == 254) return NS_G_LINK_LOCAL;
        if ((a[0] & 0xf0) == 224) return NS_G_MULTICAST;
        return NS_G_PUBLIC;
    }
    static const uint8_t one[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    if (memcmp(ip, one, 16) == 0) return NS_G_LOOPBACK;
    if ((ip[0] & 0xfe) == 0xfc) return NS_G_PRIVATE;
    if (ip[0] == 0xfe && (ip[1] & 0xc0) == 0x80) return NS_G_LINK_LOCAL;
    if (ip[0] == 0xff) return NS_G_MULTICAST;
    return NS_G_PUBLIC;
}

/* Transport filter t (p->tf[t->rule] or a copy of it) admits q. */
static inline int tf_ok(const ns_policy *p, const ns_tfilter *t, const ns_flowq *q) {
    if (!(t->dirmask & q->direction) || !(t->protomask & q->pbit)) return 0;
    if (t->nports == 0) return 1;
    if (!q->has_port) return 0;
    if (q->port >= t->lo0 && q->port <= t->hi0) return 1;
    if (t->nports == 1) return 0;
    if (q->port >= t->lo1 && q->port <= t->hi1) return 1;
    if (t->nports == 2) return 0;
    const ns_rule_spec *s = &p->rules[t->rule];
    const uint16_t *rg = p->ranges + 2 * s->port_off;
    for (uint32_t i = 2; i < s->port_count; i++)
        if (q->port >= rg[2 * i] && q->port <= rg[2 * i + 1]) return 1;
    return 0;
}

static inline int transport_ok(const ns_policy *p, const ns_rule_spec *s, const ns_flowq *q) {
    return tf_ok(p, &p->tf[s - p->rules], q);
}

static int names_match(const ns_policy *p, const ns_rule_spec *s, const ns_flowq *q) {
    const uint8_t *dom = p->blob + s->name_off;
    for (uint32_t i = 0; i < q->nnames; i++)
        if (ns_name_matches(q->names[i], q->name_lens[i], dom, s->name_len, s->kind == NS_D_SUFFIX))
            return 1;
    return 0;
}

/* Best (lowest) matching non-domain rule index, or UINT32_MAX; its action
 * goes to *act (taken from memory the match already read, so the decision
 * needs no further per-rule load). */
static uint32_t best_address_match(const ns_policy *p, const ns_flowq *q, uint8_t *act) {
    uint32_t best = UINT32_MAX;
    for (uint32_t i = 0; i < p->any.n && p->any.v[i] < best; i++)
        if (transport_ok(p, &p->rules[p->any.v[i]], q)) { best = p->any.v[i]; break; }
    int g = ns_classify_group(q->remote, q->gateway, q->ngw);
    if (g != NS_G_NONE) {
        const idx_list *l = &p->group[g];
        for (uint32_t i = 0; i < l->n && l->v[i] < best; i++)
            if (transport_ok(p, &p->rules[l->v[i]], q)) { best = l->v[i]; break; }
    }
    const cidr_index *ix = &p->cidr;
    int fam = q->family == 4 ? 4 : 6;
    const uint8_t *lens = fam == 4 ? ix->lens4 : ix->lens6;
    unsigned nl = fam == 4 ? ix->nlens4 : ix->nlens6;
    uint64_t ahi, alo;
    addr_words(q->remote, fam, &ahi, &alo);
    uint32_t top = fam == 4 ? (uint32_t)(alo >> 16) : (uint32_t)(ahi >> 48);
    uint64_t word = ix->top16[fam == 6][top >> 6];
    int long_ok = (word >> (top & 63)) & 1;
    /* IPv4 with a small /16 bucket: the rules of length >= 16 are scanned
     * there (below) instead of probed per length */
    uint32_t b0 = 0, b1 = 0;
    if (fam == 4 && long_ok) {
        uint32_t b = ix->rank4[top >> 6] +
                     pop64(word & ((1ull << (top & 63)) - 1));
        b0 = ix->boff4[b];
        b1 = ix->boff4[b + 1];
        if (b1 - b0 <= NS_CIDR_BUCKET_MAX) {
            const char *a = (const char *)(ix->a4 + b0), *end = (const char *)(ix->a4 + b1);
            for (; a < end; a += 64) __builtin_prefetch(a);
            long_ok = 0;
        } else {
            b1 = b0; /* too big: probed below instead */
        }
    }
    /* compute every probe's home slot and prefetch them all first, so the
     * cache misses of the probes overlap instead of adding up */
    uint64_t mhi[129], mlo[129];
    uint32_t home[129];
    uint8_t plen[129];
    unsigned np = 0;
    /* lengths >= 16 come first in lens: skip them all when not probed */
    for (unsigned k = long_ok ? 0 : (fam == 4 ? ix->nlong4 : ix->nlong6); k < nl; k++) {
        uint64_t hi = ahi, lo = alo;
        mask_words(fam, lens[k], &hi, &lo);
        mhi[np] = hi;
        mlo[np] = lo;
        plen[np] = lens[k];
        home[np] = cidr_hash(hi, lo, lens[k], fam) & ix->mask;
        __builtin_prefetch(&ix->slots[home[np]]);
        np++;
    }
    const cidr_slot *hit[129];
    unsigned nh = 0;
    for (unsigned k = 0; k < np; k++) {
        for (uint32_t i = home[k];; i = (i + 1) & ix->mask) {
            const cidr_slot *c = &ix->slots[i];
            if (!c->used) break;
            if (c->hi == mhi[k] && c->lo == mlo[k] && c->len == plen[k] && c->family == fam) {
                if (c->first < best) {
                    __builtin_prefetch(&p->tf[c->first]);
                    hit[nh++] = c;
                }
                break;
            }
        }
    }
    for (unsigned k = 0; k < nh; k++) {
        const cidr_slot *s = hit[k];
        for (uint32_t i = 0; i < s->n; i++) {
            uint32_t r = i == 0 ? s->first : ix->list[s->off + i];
            if (r >= best) break;
            if (tf_ok(p, &p->tf[r], q)) { best = r; break; }
        }
    }
    uint32_t a4 = (uint32_t)alo;
    /* entries ascend by rule: the first address match at or above best ends it */
    for (uint32_t i = b0; i < b1; i++) {
        if ((a4 & ix->a4[i].mask) != ix->a4[i].net) continue;
        const ns_tfilter *t = &ix->t4[i];
        if (t->rule >= best) break;
        if (tf_ok(p, t, q)) {
            *act = t->action;
            return t->rule;
        }
    }
    if (best != UINT32_MAX) *act = p->tf[best].action;
    return best;
}

enum { SCAN_SNI = 0, SCAN_NAME = 1, SCAN_ALLOW_NAME = 2 };

/* Lowest rule index below `best` among the domain/suffix rules keyed by `name`
 * or one of its label-aligned suffixes that passes the transport filter and:
 * SCAN_SNI: name is the SNI (allow rules also need a pinned name match);
 * SCAN_NAME: name is a pinned name; SCAN_ALLOW_NAME: likewise, allow rules only. */
static uint32_t scan_name(const ns_policy *p, const ns_flowq *q, const uint8_t *name, size_t len,
                          uint32_t best, int mode) {
    for (size_t start = 0; start < len;) {
        for (int kind = (start == 0 ? NS_D_DOMAIN : NS_D_SUFFIX); kind <= NS_D_SUFFIX; kind++) {
            const dom_slot *sl = dom_find(p, name + start, len - start, kind);
            if (!sl) continue;
            for (uint32_t i = 0; i < sl->n; i++) {
                uint32_t r = p->dom.list[sl->off + i];
                if (r >= best) break;
                const ns_rule_spec *s = &p->rules[r];
                if (!transport_ok(p, s, q)) continue;
                if (mode == SCAN_ALLOW_NAME && s->action != NS_ACT_ALLOW) continue;
                if (mode == SCAN_SNI && s->action == NS_ACT_ALLOW && !names_match(p, s, q)) continue;
                best = r;
                break;
            }
        }
        const uint8_t *dot = memchr(name + start, '.', len - start);
        if (!dot) break;
        start = (size_t)(dot - name) + 1;
    }
    return best;
}

static uint32_t best_domain_match(const ns_policy *p, const ns_flowq *q, uint32_t best) {
    if (q->sni) return scan_name(p, q, q->sni, q->sni_len, best, SCAN_SNI);
    for (uint32_t i = 0; i < q->nnames; i++)
        best = scan_name(p, q, q->names[i], q->name_lens[i], best, SCAN_NAME);
    return best;
}

int ns_policy_eval(const ns_policy *p, const ns_flowq *q, int32_t *rule_index) {
    uint8_t act = NS_ACT_DENY;
    uint32_t best = best_address_match(p, q, &act);
    if (p->has_domain) {
        uint32_t addr_best = best;
        best = best_domain_match(p, q, best);
        if (best != addr_best && best != UINT32_MAX) act = p->tf[best].action;
    }
    if (best == UINT32_MAX) {
        *rule_index = -1;
        return p->def_deny[q->direction == NS_DIR_INGRESS ? NS_DIR_INGRESS : NS_DIR_EGRESS]
                   ? NS_ACT_DENY : NS_ACT_ALLOW;
    }
    *rule_index = (int32_t)best;
    return act;
}

int ns_policy_sni_dependent(const ns_policy *p, const ns_flowq *q) {
    if (!p->has_domain) return 0;
    uint8_t act;
    uint32_t best = best_address_match(p, q, &act);
    /* a deny domain rule before the decision point: an SNI could match it */
    for (uint32_t i = 0; i < p->domain_deny.n && p->domain_deny.v[i] < best; i++)
        if (transport_ok(p, &p->rules[p->domain_deny.v[i]], q)) return 1;
    /* an allow domain rule matching a pinned name: an SNI could fail to match it */
    for (uint32_t i = 0; i < q->nnames; i++)
        if (scan_name(p, q, q->names[i], q->name_lens[i], best, SCAN_ALLOW_NAME) < best) return 1;
    return 0;
}

int ns_policy_has_domain_rules(const ns_policy *p) { return p->has_domain; }
uint32_t ns_policy_rule_count(const ns_policy *p) { return p->nrules; }
ns_rule_counter *ns_policy_counters(ns_policy *p) { return p->counters; }


int ns_policy_set_gateway(ns_policy *p, const uint8_t *ips, uint32_t n) {
    if (n > NS_MAX_GATEWAY) return -1;
    if (n) memcpy(p->gw, ips, 16 * (size_t)n);
    p->ngw = n;
    return 0;
}

int ns_policy_set_intercept(ns_policy *p, const uint8_t *blob, const uint16_t *lens, uint32_t n,
                            const uint16_t *ports, uint32_t nports) {
    if (n > NS_MAX_INTERCEPT || nports > NS_MAX_INTERCEPT_PORTS) return -1;
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (lens[i] == 0 || lens[i] > 253) return -1;
        total += lens[i];
    }
    free(p->icpt_blob);
    p->icpt_blob = (uint8_t *)malloc(total ? total : 1);
    if (!p->icpt_blob) return -1;
    if (total) memcpy(p->icpt_blob, blob, total);
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        p->icpt_off[i] = (uint32_t)off;
        p->icpt_len[i] = lens[i];
        off += lens[i];
    }
    p->nicpt = n;
    if (nports) memcpy(p->icpt_ports, ports, sizeof(uint16_t) * nports);
    p->nicpt_ports = nports;
    return 0;
}

int ns_policy_intercept_port(const ns_policy *p, uint16_t port) {
    if (p->nicpt == 0) return 0;
    for (uint32_t i = 0; i < p->nicpt_ports; i++)
        if (p->icpt_ports[i] == port) return 1;
    return 0;
}

int ns_policy_intercept_name(const ns_policy *p, const uint8_t *sni, size_t len) {
    for (uint32_t i = 0; i < p->nicpt; i++)
        if (ns_name_matches(sni, len, p->icpt_blob + p->icpt_off[i], p->icpt_len[i], 1)) return 1;
    return 0;
}

int ns_policy_eval_packed(const ns_policy *p, ns_flowq *q, const uint8_t *names_blob,
                          const uint16_t *lens, uint32_t n, int32_t *rule_index) {
    const uint8_t *ptrs[NS_MAX_NAMES];
    if (n > NS_MAX_NAMES) n = NS_MAX_NAMES;
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        ptrs[i] = names_blob + off;
        off += lens[i];
    }
    q->names = ptrs;
    q->name_lens = lens;
    q->nnames = n;
    if (q->gateway == NULL) {
        q->gateway = p->gw;
        q->ngw = p->ngw;
    }
    int act = ns_policy_eval(p, q, rule_index);
    q->names = NULL;
    q->name_lens = NULL;
    return act;
}
