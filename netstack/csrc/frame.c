/*
 * frame.c - Ethernet II (+ one 802.1Q tag), ARP, IPv4, IPv6, TCP, UDP,
 * ICMPv4/v6 parsing.  Every read is bounds-checked against `len`; nothing
 * here allocates or keeps state.  L4 checksums are never verified (guest
 * frames may carry partial checksums when offloads are negotiated).
 */
#include "ns_internal.h"

#define ETH_HDR 14
#define IPV6_MAX_EXT 8

static void map_v4(uint8_t *dst16, const uint8_t *v4) {
    memset(dst16, 0, 10);
    dst16[10] = 0xff;
    dst16[11] = 0xff;
    memcpy(dst16 + 12, v4, 4);
}

/* Parse TCP/UDP/ICMP at buf[off..end). */
static int parse_l4(const uint8_t *buf, size_t off, size_t end, ns_frame *f) {
    size_t avail = end - off;
    f->l4_off = (uint32_t)off;
    switch (f->ipproto) {
    case 6: { /* TCP */
        f->pbit = NS_P_TCP;
        if (avail < 20) return NS_PARSE_MALFORMED;
        size_t doff = (size_t)(buf[off + 12] >> 4) * 4;
        if (doff < 20 || doff > avail) return NS_PARSE_MALFORMED;
        f->sport = ns_rd16(buf + off);
        f->dport = ns_rd16(buf + off + 2);
        f->seq = ns_rd32(buf + off + 4);
        f->tcp_flags = buf[off + 13];
        f->has_ports = 1;
        f->payload_off = (uint32_t)(off + doff);
        f->payload_len = (uint32_t)(avail - doff);
        return NS_PARSE_OK;
    }
    case 17: { /* UDP */
        f->pbit = NS_P_UDP;
        if (avail < 8) return NS_PARSE_MALFORMED;
        size_t ulen = ns_rd16(buf + off + 4);
        f->sport = ns_rd16(buf + off);
        f->dport = ns_rd16(buf + off + 2);
        f->has_ports = 1;
        f->payload_off = (uint32_t)(off + 8);
        /* UDP length 0 is legal for jumbo/GSO; otherwise it must fit. */
        if (ulen != 0 && f->frag == 0) {
            if (ulen < 8 || ulen > avail) return NS_PARSE_MALFORMED;
            f->payload_len = (uint32_t)(ulen - 8);
        } else {
            f->payload_len = (uint32_t)(avail - 8);
        }
        return NS_PARSE_OK;
    }
    case 1:
        f->pbit = NS_P_ICMP4;
        if (avail < 4) return NS_PARSE_MALFORMED;
        f->payload_off = (uint32_t)off;
        f->payload_len = (uint32_t)avail;
        return NS_PARSE_OK;
    case 58:
        f->pbit = NS_P_ICMP6;
        if (avail < 4) return NS_PARSE_MALFORMED;
        f->payload_off = (uint32_t)off;
        f->payload_len = (uint32_t)avail;
        return NS_PARSE_OK;
    default:
        f->pbit = 0;
        f->payload_off = (uint32_t)off;
        f->payload_len = (uint32_t)avail;
        return NS_PARSE_OK;
    }
}

static int parse_ipv4(const uint8_t *buf, size_t off, size_t len, ns_frame *f) {
    if (len - off < 20) return NS_PARSE_MALFORMED;
    const uint8_t *ip = buf + off;
    if ((ip[0] >> 4) != 4) return NS_PARSE_MALFORMED;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    size_t tot = ns_rd16(ip + 2);
    if (ihl < 20 || tot < ihl || tot > len - off) return NS_PARSE_MALFORMED;
    f->l3 = NS_L3_IPV4;
    f->family = 4;
    f->ipproto = ip[9];
    map_v4(f->src, ip + 12);
    map_v4(f->dst, ip + 16);
    uint16_t fl = ns_rd16(ip + 6);
    uint16_t foff = fl & 0x1fff;
    int mf = (fl & 0x2000) != 0;
    f->frag_id = ns_rd16(ip + 4);
    if (foff != 0) {
        f->frag = 2;
        f->pbit = f->ipproto == 6 ? NS_P_TCP : f->ipproto == 17 ? NS_P_UDP
                : f->ipproto == 1 ? NS_P_ICMP4 : f->ipproto == 58 ? NS_P_ICMP6 : 0;
        f->l4_off = (uint32_t)(off + ihl);
        f->payload_off = f->l4_off;
        f->payload_len = (uint32_t)(tot - ihl);
        return NS_PARSE_OK;
    }
    if (mf) f->frag = 1;
    return parse_l4(buf, off + ihl, off + tot, f);
}

static int parse_ipv6(const uint8_t *buf, size_t off, size_t len, ns_frame *f) {
    if (len - off < 40) return NS_PARSE_MALFORMED;
    const uint8_t *ip = buf + off;
    if ((ip[0] >> 4) != 6) return NS_PARSE_MALFORMED;
    size_t plen = ns_rd16(ip + 4);
    if (plen > len - off - 40) return NS_PARSE_MALFORMED;
    size_t end = off + 40 + plen;
    f->l3 = NS_L3_IPV6;
    f->family = 6;
    memcpy(f->src, ip + 8, 16);
    memcpy(f->dst, ip + 24, 16);
    uint8_t nh = ip[6];
    size_t p = off + 40;
    for (int i = 0;; i++) {
        if (nh != 0 && nh != 43 && nh != 44 && nh != 60 && nh != 51) break;
        if (i >= IPV6_MAX_EXT) return NS_PARSE_MALFORMED;
        if (end - p < 8) return NS_PARSE_MALFORMED;
        size_t hl;
        if (nh == 44) { /* fragment header: fixed 8 bytes */
            uint16_t fo = ns_rd16(buf + p + 2);
            f->frag_id = ns_rd32(buf + p + 4);
            hl = 8;
            uint8_t next = buf[p];
            if ((fo & 0xfff8) != 0) {
                f->frag = 2;
                f->ipproto = next;
                f->pbit = next == 6 ? NS_P_TCP : next == 17 ? NS_P_UDP
                        : next == 1 ? NS_P_ICMP4 : next == 58 ? NS_P_ICMP6 : 0;
                f->l4_off = (uint32_t)(p + hl);
                f->payload_off = f->l4_off;
                f->payload_len = (uint32_t)(end - p - hl);
                return NS_PARSE_OK;
            }
            if (fo & 1) f->frag = 1;
            nh = next;
        } else if (nh == 51) { /* AH: length in 4-byte units, minus 2 */
            hl = ((size_t)buf[p + 1] + 2) * 4;
            if (hl > end - p) return NS_PARSE_MALFORMED;
            nh = buf[p];
        } else {
            hl = ((size_t)buf[p + 1] + 1) * 8;
            if (hl > end - p) return NS_PARSE_MALFORMED;
            nh = buf[p];
        }
        p += hl;
    }
    f->ipproto = nh;
    if (nh == 59) { /* no next header */
        f->pbit = 0;
        f->l4_off = (uint32_t)p;
        f->payload_off = (uint32_t)p;
        f->payload_len = 0;
        return NS_PARSE_OK;
    }
    return parse_l4(buf, p, end, f);
}

/*
 * Parse one Ethernet frame.  Returns NS_PARSE_OK, NS_PARSE_MALFORMED or
 * NS_PARSE_TOO_BIG.  On OK, `out` describes the frame; non-IP, non-ARP
 * ethertypes parse OK with l3 = NS_L3_OTHER.
 */
int ns_parse_frame(const uint8_t *buf, size_t len, ns_frame *out) {
    memset(out, 0, sizeof(*out));
    if (len > NS_MAX_FRAME) return NS_PARSE_TOO_BIG;
    if (buf == NULL || len < ETH_HDR) return NS_PARSE_MALFORMED;
    size_t off = 12;
    uint16_t et = ns_rd16(buf + off);
    off += 2;
    if (et == 0x8100) {
        if (len < off + 4) return NS_PARSE_MALFORMED;
        out->vlan = 1;
        et = ns_rd16(buf + off + 2);
        off += 4;
        if (et == 0x8100 || et == 0x88a8) return NS_PARSE_MALFORMED; /* one tag only */
    }
    out->ethertype = et;
    switch (et) {
    case 0x0806: /* ARP for IPv4 over Ethernet: 28 bytes */
        if (len - off < 28) return NS_PARSE_MALFORMED;
        if (ns_rd16(buf + off) != 1 || ns_rd16(buf + off + 2) != 0x0800 || buf[off + 4] != 6 ||
            buf[off + 5] != 4)
            return NS_PARSE_MALFORMED;
        out->l3 = NS_L3_ARP;
        map_v4(out->src, buf + off + 14);
        map_v4(out->dst, buf + off + 24);
        return NS_PARSE_OK;
    case 0x0800:
        return parse_ipv4(buf, off, len, out);
    case 0x86dd:
        return parse_ipv6(buf, off, len, out);
    default:
        if (et < 0x0600) return NS_PARSE_MALFORMED; /* 802.3 length field: not Ethernet II */
        out->l3 = NS_L3_OTHER;
        return NS_PARSE_OK;
    }
}
