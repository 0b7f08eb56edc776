/*
 * dns.c - DNS response parser (RFC 1035) for the pin cache.
 *
 * Reads the header, exactly one question and the answer section.  Names are
 * decompressed with loop protection: a compression pointer must point
 * strictly before the pointer itself and at most 64 jumps are followed, so a
 * crafted message can neither loop nor read out of bounds.  Names are
 * lowercased; a label containing '.', NUL or a byte outside 0x21..0x7e makes
 * the message malformed (such a name could never match a policy name and
 * would break label alignment).
 *
 * The CNAME chain is followed from the question name (owner must be the
 * question name or a CNAME target reachable from it, unrelated records are
 * ignored); A/AAAA records of the question's type whose owner is on the chain
 * are returned with min_ttl = the minimum TTL over the contributing records.
 */
#include "ns_internal.h"

#define MAX_RR 128
#define MAX_JUMPS 64

/* Read a (possibly compressed) name at *off; writes the dotted lowercase
 * name (no trailing dot; root = empty) to out, advances *off past it. */
static int read_name(const uint8_t *buf, size_t len, size_t *off, uint8_t *out, uint16_t *out_len) {
    size_t p = *off, o = 0, wire = 0;
    int jumped = 0, jumps = 0;
    for (;;) {
        if (p >= len) return NS_DNS_MALFORMED;
        uint8_t c = buf[p];
        if (c == 0) {
            if (!jumped) *off = p + 1;
            break;
        }
        if ((c & 0xc0) == 0xc0) {
            if (p + 1 >= len) return NS_DNS_MALFORMED;
            size_t ptr = ((size_t)(c & 0x3f) << 8) | buf[p + 1];
            if (ptr >= p || ++jumps > MAX_JUMPS) return NS_DNS_MALFORMED;
            if (!jumped) *off = p + 2;
            jumped = 1;
            p = ptr;
            continue;
        }
        if (c & 0xc0) return NS_DNS_MALFORMED; /* 0x40/0x80 label types */
        if (c > len - p - 1) return NS_DNS_MALFORMED;
        wire += (size_t)c + 1;
        if (wire > 254) return NS_DNS_MALFORMED;
        if (o) out[o++] = '.';
        for (size_t k = 0; k < c; k++) {
            uint8_t ch = buf[p + 1 + k];
            if (ch < 0x21 || ch > 0x7e || ch == '.') return NS_DNS_MALFORMED;
            out[o++] = (ch >= 'A' && ch <= 'Z') ? (uint8_t)(ch + 32) : ch;
        }
        p += (size_t)c + 1;
    }
    out[o] = 0;
    *out_len = (uint16_t)o;
    return NS_DNS_OK;
}

typedef struct rr {
    uint8_t owner[256];
    uint16_t owner_len;
    uint16_t type;
    uint32_t ttl;
    uint8_t data[256]; /* CNAME target or address bytes */
    uint16_t data_len;
} rr;

static int on_chain(const ns_dns_result *r, const uint8_t *name, uint16_t len) {
    if (len == r->qname_len && memcmp(name, r->qname, len) == 0) return 1;
    for (uint16_t i = 0; i < r->nchain; i++)
        if (strlen((const char *)r->chain[i]) == len && memcmp(r->chain[i], name, len) == 0) return 1;
    return 0;
}

/* Parse a DNS message.  Returns NS_DNS_OK or NS_DNS_MALFORMED. */
int ns_parse_dns(const uint8_t *buf, size_t len, ns_dns_result *out) {
    static const rr zero_rr;
    memset(out, 0, sizeof(*out));
    if (buf == NULL || len < 12 || len > 65535) return NS_DNS_MALFORMED;
    out->id = ns_rd16(buf);
    uint16_t flags = ns_rd16(buf + 2);
    out->is_response = (flags >> 15) & 1;
    out->truncated = (flags >> 9) & 1;
    out->rcode = flags & 0x0f;
    uint16_t qd = ns_rd16(buf + 4), an = ns_rd16(buf + 6);
    if (qd != 1) return NS_DNS_MALFORMED;
    size_t off = 12;
    if (read_name(buf, len, &off, out->qname, &out->qname_len) != NS_DNS_OK) return NS_DNS_MALFORMED;
    if (len - off < 4) return NS_DNS_MALFORMED;
    out->qtype = ns_rd16(buf + off);
    off += 4;

    rr rrs[MAX_RR];
    size_t nrr = 0;
    for (uint16_t i = 0; i < an; i++) {
        rr tmp = zero_rr;
        rr *cur = nrr < MAX_RR ? &rrs[nrr] : &tmp;
        if (read_name(buf, len, &off, cur->owner, &cur->owner_len) != NS_DNS_OK) return NS_DNS_MALFORMED;
        if (len - off < 10) return NS_DNS_MALFORMED;
        cur->type = ns_rd16(buf + off);
        uint16_t klass = ns_rd16(buf + off + 2);
        cur->ttl = ns_rd32(buf + off + 4);
        if (cur->ttl > 0x7fffffffu) cur->ttl = 0; /* RFC 2181 §8 */
        size_t rdlen = ns_rd16(buf + off + 8);
        off += 10;
        if (rdlen > len - off) return NS_DNS_MALFORMED;
        size_t rd = off;
        off += rdlen;
        if (klass != 1) continue;
        if (cur->type == 1) {
            if (rdlen != 4) return NS_DNS_MALFORMED;
            memcpy(cur->data, buf + rd, 4);
            cur->data_len = 4;
        } else if (cur->type == 28) {
            if (rdlen != 16) return NS_DNS_MALFORMED;
            memcpy(cur->data, buf + rd, 16);
            cur->data_len = 16;
        } else if (cur->type == 5) {
            size_t noff = rd;
            if (read_name(buf, off, &noff, cur->data, &cur->data_len) != NS_DNS_OK) return NS_DNS_MALFORMED;
            if (noff != off) return NS_DNS_MALFORMED;
        } else {
            continue;
        }
        if (nrr < MAX_RR) nrr++;
    }

    /* Follow the CNAME chain from the question name. */
    uint32_t min_ttl = 0xffffffffu;
    int changed = 1;
    uint8_t used[MAX_RR];
    memset(used, 0, sizeof(used));
    while (changed) {
        changed = 0;
        for (size_t i = 0; i < nrr; i++) {
            if (used[i] || rrs[i].type != 5) continue;
            if (!on_chain(out, rrs[i].owner, rrs[i].owner_len)) continue;
            used[i] = 1;
            if (rrs[i].ttl < min_ttl) min_ttl = rrs[i].ttl;
            if (on_chain(out, rrs[i].data, rrs[i].data_len)) continue; /* loop */
            if (out->nchain >= NS_DNS_MAX_CHAIN) return NS_DNS_MALFORMED; /* chain too long */
            memcpy(out->chain[out->nchain], rrs[i].data, (size_t)rrs[i].data_len + 1);
            out->nchain++;
            changed = 1;
        }
    }
    uint16_t want = out->qtype;
    for (size_t i = 0; i < nrr; i++) {
        if (rrs[i].type != 1 && rrs[i].type != 28) continue;
        if (rrs[i].type != want) continue;
        if (!on_chain(out, rrs[i].owner, rrs[i].owner_len)) continue;
        if (out->naddrs >= NS_DNS_MAX_ADDRS) break;
        uint8_t *a = out->addrs[out->naddrs];
        if (rrs[i].type == 1) {
            memset(a, 0, 10);
            a[10] = a[11] = 0xff;
            memcpy(a + 12, rrs[i].data, 4);
            out->addr_family[out->naddrs] = 4;
        } else {
            memcpy(a, rrs[i].data, 16);
            out->addr_family[out->naddrs] = ns_is_v4mapped(a) ? 4 : 6;
        }
        out->addr_ttl[out->naddrs] = rrs[i].ttl;
        if (rrs[i].ttl < min_ttl) min_ttl = rrs[i].ttl;
        out->naddrs++;
    }
    out->min_ttl = out->naddrs ? min_ttl : 0;
    return NS_DNS_OK;
}
