/*
 * ns_internal.h - types shared by the netstack C sources (not a stable API).
 */
#ifndef NS_INTERNAL_H
#define NS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "netstack.h"

/* ---------------------------------------------------------------- frame */

enum ns_l3 { NS_L3_NONE = 0, NS_L3_ARP = 1, NS_L3_IPV4 = 4, NS_L3_IPV6 = 6, NS_L3_OTHER = 9 };

/* policy protocol bits */
enum { NS_P_TCP = 1, NS_P_UDP = 2, NS_P_ICMP4 = 4, NS_P_ICMP6 = 8, NS_P_ALL = 15 };

enum ns_parse_status {
    NS_PARSE_OK = 0,
    NS_PARSE_MALFORMED = 1,
    NS_PARSE_TOO_BIG = 2
};

typedef struct ns_frame {
    uint8_t l3;          /* enum ns_l3 */
    uint8_t family;      /* 4 or 6 (IP frames) */
    uint8_t ipproto;     /* IP protocol number (after the IPv6 extension walk) */
    uint8_t pbit;        /* NS_P_* bit of the L4 protocol, 0 if not one of the four */
    uint8_t tcp_flags;
    uint8_t frag;        /* 0 none, 1 first fragment (MF set), 2 non-first fragment */
    uint8_t vlan;        /* 1 if an 802.1Q tag was present */
    uint8_t has_ports;
    uint16_t ethertype;
    uint16_t sport, dport;
    uint32_t seq;
    uint32_t frag_id;
    uint8_t src[16], dst[16];   /* IPv4 stored as ::ffff:a.b.c.d */
    uint32_t l4_off;     /* offset of the L4 header in the frame */
    uint32_t payload_off;/* offset of the L4 payload (TCP/UDP) */
    uint32_t payload_len;
} ns_frame;

int ns_parse_frame(const uint8_t *buf, size_t len, ns_frame *out);

/* ---------------------------------------------------------------- hello */

enum ns_hello_status {
    NS_HELLO_COMPLETE = 0,
    NS_HELLO_NEED_MORE = 1,
    NS_HELLO_NOT_TLS = 2,     /* first bytes are not a TLS handshake record */
    NS_HELLO_MALFORMED = 3,   /* TLS framing but a broken ClientHello */
    NS_HELLO_TOO_BIG = 4      /* exceeds the byte cap before completing */
};

#define NS_HELLO_MAX_ALPN 16

typedef struct ns_hello {
    uint8_t sni[256];         /* lowercased, no trailing dot, NUL-terminated */
    uint16_t sni_len;
    uint8_t has_sni;
    uint8_t ech;              /* encrypted_client_hello (0xfe0d) present */
    uint8_t alpn_count;
    uint8_t alpn_truncated;   /* more than NS_HELLO_MAX_ALPN entries */
    uint16_t alpn_off[NS_HELLO_MAX_ALPN]; /* offsets into alpn_buf */
    uint8_t alpn_len[NS_HELLO_MAX_ALPN];
    uint8_t alpn_buf[NS_HELLO_MAX_ALPN * 256];
    uint32_t consumed;        /* bytes of the stream the hello occupied */
} ns_hello;

int ns_parse_client_hello(const uint8_t *buf, size_t len, size_t cap, ns_hello *out);

/* ---------------------------------------------------------------- dns */

#define NS_DNS_MAX_ADDRS 64
#define NS_DNS_MAX_CHAIN 16

typedef struct ns_dns_result {
    uint8_t qname[256];
    uint16_t qname_len;
    uint16_t qtype;
    uint16_t id;
    uint8_t rcode;
    uint8_t is_response;
    uint8_t truncated;        /* TC bit */
    uint16_t naddrs;
    uint8_t addrs[NS_DNS_MAX_ADDRS][16];
    uint8_t addr_family[NS_DNS_MAX_ADDRS];
    uint32_t addr_ttl[NS_DNS_MAX_ADDRS];
    uint32_t min_ttl;         /* min TTL over contributing CNAME/A/AAAA records */
    uint16_t nchain;          /* CNAME chain names (targets), in order */
    uint8_t chain[NS_DNS_MAX_CHAIN][256];
} ns_dns_result;

enum ns_dns_status { NS_DNS_OK = 0, NS_DNS_MALFORMED = 1 };

int ns_parse_dns(const uint8_t *buf, size_t len, ns_dns_result *out);

/* ---------------------------------------------------------------- pin cache */

ns_pincache *ns_pin_new(uint32_t max_bindings, double ttl_ceiling);
void ns_pin_free(ns_pincache *pc);
/* Replace the (name, family) set with ips; n == 0 clears it. ttl in seconds. */
int ns_pin_set(ns_pincache *pc, const uint8_t *name, size_t name_len, int family,
               const uint8_t *ips, size_t n, double ttl, double now);
/* Learn from a raw DNS response; returns number of addresses pinned, -1 malformed, -2 ignored. */
int ns_pin_learn_dns(ns_pincache *pc, const uint8_t *buf, size_t len, double now);
/* Names pinned to ip (16-byte, v4-mapped for IPv4) and alive at now: copies up
 * to max names back to back into blob (lengths in lens), returns how many. */
size_t ns_pin_lookup(ns_pincache *pc, const uint8_t *ip, double now, uint8_t *blob,
                     size_t blob_cap, uint16_t *lens, size_t max);
size_t ns_pin_count(ns_pincache *pc);
void ns_pin_expire(ns_pincache *pc, double now);
uint64_t ns_pin_evictions(ns_pincache *pc);

/* ---------------------------------------------------------------- policy */

enum ns_dest_kind { NS_D_ANY = 0, NS_D_CIDR = 1, NS_D_DOMAIN = 2, NS_D_SUFFIX = 3, NS_D_GROUP = 4 };
enum ns_group {
    NS_G_NONE = 0, NS_G_HOST = 1, NS_G_METADATA = 2, NS_G_LOOPBACK = 3, NS_G_PRIVATE = 4,
    NS_G_LINK_LOCAL = 5, NS_G_MULTICAST = 6, NS_G_PUBLIC = 7
};
enum { NS_ACT_ALLOW = 0, NS_ACT_DENY = 1 };

/* Rule as handed over by the Python compiler (cffi fills an array of these). */
typedef struct ns_rule_spec {
    uint8_t action;       /* NS_ACT_* */
    uint8_t dirmask;      /* bit0 egress, bit1 ingress */
    uint8_t protomask;    /* NS_P_* bits, NS_P_ALL for any */
    uint8_t kind;         /* ns_dest_kind */
    uint8_t family;       /* cidr: 4 or 6 */
    uint8_t prefix;       /* cidr: prefix length (0..32 / 0..128) */
    uint8_t group;        /* group: ns_group */
    uint8_t pad;
    uint8_t addr[16];     /* cidr network address (IPv4 in the first 4 bytes) */
    uint32_t port_off;    /* index into the port-range array */
    uint32_t port_count;  /* 0 = any port */
    uint32_t name_off;    /* domain / suffix: offset into the string blob */
    uint32_t name_len;
} ns_rule_spec;

typedef struct ns_flowq {
    uint8_t direction;    /* NS_DIR_* */
    uint8_t pbit;         /* NS_P_* of the flow protocol */
    uint8_t has_port;
    uint16_t port;
    uint8_t remote[16];   /* v4-mapped for IPv4 */
    uint8_t family;       /* 4 or 6 (after mapping normalisation) */
    const uint8_t *sni;   /* NULL if none */
    uint16_t sni_len;
    const uint8_t *const *names;
    const uint16_t *name_lens;
    uint32_t nnames;
    const uint8_t *gateway;   /* ngw 16-byte addresses (v4-mapped) */
    uint32_t ngw;
} ns_flowq;

typedef struct ns_rule_counter {
    uint64_t hits, packets, bytes;
} ns_rule_counter;

#define NS_MAX_GATEWAY 16
#define NS_MAX_INTERCEPT 256
#define NS_MAX_INTERCEPT_PORTS 16
#define NS_MAX_NAMES 64

/* The transport filter of one rule, packed (16 bytes) for the lookup loops:
 * up to two port ranges inline, more (nports == 3) in the policy's range
 * array, reached through the rule. */
typedef struct ns_tfilter {
    uint8_t dirmask, protomask, nports, action;
    uint16_t lo0, hi0, lo1, hi1;
    uint32_t rule;        /* index of the rule this filter belongs to */
} ns_tfilter;

/* The address test of one IPv4 cidr rule of prefix length >= 16 in its /16
 * bucket: match iff (addr & mask) == net (host order).  Kept apart from the
 * rule index and transport filter (parallel arrays) so a bucket scan reads
 * 8 bytes per rule, most buckets one or two cache lines. */
typedef struct cidr_addr4 {
    uint32_t net, mask;
} cidr_addr4;

/* Buckets holding more entries than this are looked up by hash probes. */
#define NS_CIDR_BUCKET_MAX 48

/* CIDR index: one hash table keyed by (prefix length, masked address), plus
 * the distinct prefix lengths per family (longest first). */
typedef struct cidr_slot {
    uint64_t hi, lo;      /* masked address (IPv4: lo holds the 32 bits) */
    uint32_t off, n;      /* slice of the rule list, ascending rule indices */
    uint32_t first;       /* list[off]: the slice's lowest rule index */
    uint8_t len, family, used, pad;
} cidr_slot;

typedef struct cidr_index {
    cidr_slot *slots;
    uint32_t mask;
    uint32_t *list;
    uint8_t lens4[33], nlens4;
    uint8_t lens6[129], nlens6;
    uint8_t nlong4, nlong6;   /* how many of lens4 / lens6 are >= 16 (they come first) */
    /* first-level filter: bit i set iff some rule of prefix length >= 16
     * starts with the 16 bits i (per family); lets most lookups skip every
     * probe of length >= 16 */
    uint64_t top16[2][1024];
    /* IPv4 rules of prefix length >= 16, bucketed by their first 16 bits and
     * ascending by rule index within a bucket.  Bucket b (the rank of its bit
     * in top16[0]: rank4[word] + popcount of the lower bits) is
     * positions boff4[b] .. boff4[b + 1] of the parallel arrays a4 (address
     * test) and t4 (transport filter + rule index), read only on an address
     * match.  A lookup scans its one bucket instead of probing the hash once
     * per prefix length >= 16. */
    uint32_t rank4[1024];
    uint32_t *boff4;
    cidr_addr4 *a4;
    ns_tfilter *t4;
} cidr_index;

/* Domain index: (kind, name) -> the rules naming it, ascending. */
typedef struct dom_slot {
    uint32_t hash, name_off;  /* name_off: into the policy's string blob */
    uint32_t off, n;          /* slice of the list */
    uint16_t len;
    uint8_t kind, used;
} dom_slot;

typedef struct dom_index {
    dom_slot *slots;
    uint32_t mask;
    uint32_t *list;
} dom_index;

typedef struct idx_list {
    uint32_t *v;
    uint32_t n;
} idx_list;

struct ns_policy {
    uint32_t nrules;
    ns_rule_spec *rules;
    ns_tfilter *tf;             /* per rule, parallel to rules */
    uint16_t *ranges;
    uint8_t *blob;
    int def_deny[3];            /* indexed by direction 1/2 */
    idx_list any, domain, domain_deny, group[8];
    dom_index dom;
    cidr_index cidr;
    int has_domain;
    ns_rule_counter *counters;  /* nrules + 2 */
    /* classifier configuration carried with the tables (swapped atomically) */
    uint8_t gw[16 * NS_MAX_GATEWAY];
    uint32_t ngw;
    uint8_t *icpt_blob;                 /* TLS-intercepted name suffixes */
    uint32_t icpt_off[NS_MAX_INTERCEPT];
    uint16_t icpt_len[NS_MAX_INTERCEPT];
    uint32_t nicpt;
    uint16_t icpt_ports[NS_MAX_INTERCEPT_PORTS];
    uint32_t nicpt_ports;
    /* set by the classifier */
    uint32_t gen;
    struct ns_policy *next_retired;
};

ns_policy *ns_policy_build(const ns_rule_spec *rules, uint32_t nrules,
                           const uint16_t *port_ranges /* pairs lo,hi */, uint32_t nranges,
                           const uint8_t *blob, uint32_t bloblen,
                           int default_egress_deny, int default_ingress_deny);
void ns_policy_free(ns_policy *p);
/* Returns action (NS_ACT_*) and writes *rule_index (-1 for default). */
int ns_policy_eval(const ns_policy *p, const ns_flowq *q, int32_t *rule_index);
/* 1 if the decision for q (without SNI) could change once an SNI is known. */
int ns_policy_sni_dependent(const ns_policy *p, const ns_flowq *q);
int ns_policy_has_domain_rules(const ns_policy *p);
uint32_t ns_policy_rule_count(const ns_policy *p);
ns_rule_counter *ns_policy_counters(ns_policy *p);
uint32_t ns_ctx_rule_counters(ns_ctx *c, ns_rule_counter *out, uint32_t max); /* nrules + 2 (egress/ingress default) */
int ns_classify_group(const uint8_t *ip16, const uint8_t *gateway, uint32_t ngw);
int ns_name_matches(const uint8_t *name, size_t nlen, const uint8_t *dom, size_t dlen, int suffix);
int ns_valid_hostname(const uint8_t *name, size_t len);
int ns_policy_set_gateway(ns_policy *p, const uint8_t *ips, uint32_t n);
int ns_policy_set_intercept(ns_policy *p, const uint8_t *blob, const uint16_t *lens, uint32_t n,
                            const uint16_t *ports, uint32_t nports);
int ns_policy_intercept_port(const ns_policy *p, uint16_t port);
int ns_policy_intercept_name(const ns_policy *p, const uint8_t *sni, size_t len);
int ns_policy_eval_packed(const ns_policy *p, ns_flowq *q, const uint8_t *names_blob,
                          const uint16_t *lens, uint32_t n, int32_t *rule_index);

/* ---------------------------------------------------------------- helpers */

void *ns_table_alloc(size_t bytes); /* zeroed, pre-faulted, THP-advised when large; free() it */

static inline int ns_is_v4mapped(const uint8_t *a) {
    static const uint8_t pre[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, pre, 12) == 0;
}

static inline uint16_t ns_rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline void ns_wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* The Internet checksum of a 32-bit one's-complement sum: folded to 16 bits, inverted. */
static inline uint16_t ns_csum_fold(uint32_t s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)(~s & 0xffff);
}

/* IPv6 neighbour solicitation and advertisement (ICMPv6 135/136 with hop limit 255):
 * link-local address resolution between the guest and the gateway's own interface, the
 * IPv6 counterpart of ARP.  Router advertisements and redirects are not (a guest must
 * never steer the uplink namespace's routing).  `f` is the parsed `buf`. */
static inline int ns_is_ndp(const uint8_t *buf, size_t len, const ns_frame *f) {
    if (f->l3 != NS_L3_IPV6 || f->ipproto != 58 || f->frag || f->l4_off >= len) return 0;
    size_t ip = f->vlan ? 18 : 14;
    uint8_t type = buf[f->l4_off];
    return buf[ip + 7] == 255 && (type == 135 || type == 136);
}
static inline uint32_t ns_rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

#endif /* NS_INTERNAL_H */
