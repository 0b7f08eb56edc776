/*
 * hello.c - TLS ClientHello parser with reassembly across TLS records.
 *
 * Input is the first bytes of a TCP stream (already reassembled from TCP
 * segments by the caller).  The handshake message may be split across any
 * number of TLS records; the parser reports NEED_MORE until the whole
 * ClientHello is present, and TOO_BIG once `cap` bytes did not suffice.
 * Extracts SNI (host_name, lowercased, trailing dot stripped), the ALPN list
 * and whether an encrypted_client_hello extension is present.
 */
#include <stdlib.h>

#include "ns_internal.h"

#define TLS_MAX_RECORD 16384u
#define EXT_SNI 0x0000
#define EXT_ALPN 0x0010
#define EXT_ECH 0xfe0d

static int valid_host_char(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_' || c == '.';
}

static int parse_sni(const uint8_t *p, size_t n, ns_hello *out) {
    if (n < 2 || ns_rd16(p) != n - 2) return NS_HELLO_MALFORMED;
    size_t i = 2;
    int seen_host = 0;
    while (i < n) {
        if (n - i < 3) return NS_HELLO_MALFORMED;
        uint8_t type = p[i];
        size_t nl = ns_rd16(p + i + 1);
        i += 3;
        if (nl > n - i) return NS_HELLO_MALFORMED;
        if (type == 0) {
            if (seen_host) return NS_HELLO_MALFORMED;
            seen_host = 1;
            const uint8_t *name = p + i;
            size_t len = nl;
            if (len > 0 && name[len - 1] == '.') len--;
            if (len == 0 || len > 253) return NS_HELLO_MALFORMED;
            size_t label = 0;
            for (size_t k = 0; k < len; k++) {
                uint8_t c = name[k];
                if (!valid_host_char(c)) return NS_HELLO_MALFORMED;
                if (c == '.') {
                    if (label == 0) return NS_HELLO_MALFORMED;
                    label = 0;
                } else if (++label > 63) {
                    return NS_HELLO_MALFORMED;
                }
                out->sni[k] = (c >= 'A' && c <= 'Z') ? (uint8_t)(c + 32) : c;
            }
            out->sni[len] = 0;
            if (!ns_valid_hostname(out->sni, len)) return NS_HELLO_MALFORMED;
            out->sni_len = (uint16_t)len;
            out->has_sni = 1;
        }
        i += nl;
    }
    return NS_HELLO_COMPLETE;
}

static int parse_alpn(const uint8_t *p, size_t n, ns_hello *out) {
    if (n < 2 || ns_rd16(p) != n - 2) return NS_HELLO_MALFORMED;
    size_t i = 2, used = 0;
    while (i < n) {
        size_t l = p[i++];
        if (l == 0 || l > n - i) return NS_HELLO_MALFORMED;
        if (out->alpn_count < NS_HELLO_MAX_ALPN) {
            memcpy(out->alpn_buf + used, p + i, l);
            out->alpn_off[out->alpn_count] = (uint16_t)used;
            out->alpn_len[out->alpn_count] = (uint8_t)l;
            out->alpn_count++;
            used += l;
        } else {
            out->alpn_truncated = 1;
        }
        i += l;
    }
    return NS_HELLO_COMPLETE;
}

/* Parse a complete ClientHello body (after the 4-byte handshake header). */
static int parse_body(const uint8_t *b, size_t n, ns_hello *out) {
    size_t i = 0;
    if (n < 2 + 32 + 1) return NS_HELLO_MALFORMED;
    if (b[0] != 3) return NS_HELLO_MALFORMED;
    i = 34;
    size_t sid = b[i++];
    if (sid > 32 || sid > n - i) return NS_HELLO_MALFORMED;
    i += sid;
    if (n - i < 2) return NS_HELLO_MALFORMED;
    size_t cs = ns_rd16(b + i);
    i += 2;
    if (cs < 2 || (cs & 1) || cs > n - i) return NS_HELLO_MALFORMED;
    i += cs;
    if (n - i < 1) return NS_HELLO_MALFORMED;
    size_t comp = b[i++];
    if (comp < 1 || comp > n - i) return NS_HELLO_MALFORMED;
    i += comp;
    if (i == n) return NS_HELLO_COMPLETE; /* no extensions */
    if (n - i < 2) return NS_HELLO_MALFORMED;
    size_t el = ns_rd16(b + i);
    i += 2;
    if (el != n - i) return NS_HELLO_MALFORMED;
    int seen_sni = 0, seen_alpn = 0, seen_ech = 0;
    while (i < n) {
        if (n - i < 4) return NS_HELLO_MALFORMED;
        uint16_t type = ns_rd16(b + i);
        size_t len = ns_rd16(b + i + 2);
        i += 4;
        if (len > n - i) return NS_HELLO_MALFORMED;
        int rc = NS_HELLO_COMPLETE;
        if (type == EXT_SNI) {
            if (seen_sni++) return NS_HELLO_MALFORMED;
            rc = parse_sni(b + i, len, out);
        } else if (type == EXT_ALPN) {
            if (seen_alpn++) return NS_HELLO_MALFORMED;
            rc = parse_alpn(b + i, len, out);
        } else if (type == EXT_ECH) {
            if (seen_ech++) return NS_HELLO_MALFORMED;
            out->ech = 1;
        }
        if (rc != NS_HELLO_COMPLETE) return rc;
        i += len;
    }
    return NS_HELLO_COMPLETE;
}

/*
 * Parse the ClientHello at the start of a TCP stream.  `cap` bounds the
 * number of stream bytes the caller is willing to buffer (0 = 65536).
 * Returns an ns_hello_status; on COMPLETE, `out` holds the result.
 */
int ns_parse_client_hello(const uint8_t *buf, size_t len, size_t cap, ns_hello *out) {
    memset(out, 0, sizeof(*out));
    if (cap == 0 || cap > 65536) cap = 65536;
    if (buf == NULL) len = 0;
    if (len >= 1 && buf[0] != 0x16) return NS_HELLO_NOT_TLS;
    if (len >= 2 && buf[1] != 3) return NS_HELLO_NOT_TLS;

    /* Pass 1: walk records, find how many handshake bytes are present and
     * whether the ClientHello message is complete. */
    size_t pos = 0, hs_have = 0, msg_len = 0, nrec = 0;
    uint8_t hdr[4];
    int have_len = 0;
    size_t end_pos = 0;
    for (;;) {
        if (len - pos < 5) {
            if (pos >= cap || len >= cap) return NS_HELLO_TOO_BIG;
            return NS_HELLO_NEED_MORE;
        }
        const uint8_t *r = buf + pos;
        if (r[0] != 0x16 || r[1] != 3) return pos == 0 ? NS_HELLO_NOT_TLS : NS_HELLO_MALFORMED;
        size_t rlen = ns_rd16(r + 3);
        if (rlen == 0 || rlen > TLS_MAX_RECORD) return NS_HELLO_MALFORMED;
        size_t avail = len - pos - 5;
        if (avail > rlen) avail = rlen;
        nrec++;
        for (size_t k = 0; k < avail && hs_have + k < 4; k++) hdr[hs_have + k] = r[5 + k];
        hs_have += avail;
        if (!have_len && hs_have >= 4) {
            if (hdr[0] != 1) return NS_HELLO_MALFORMED;
            msg_len = ((size_t)hdr[1] << 16) | ((size_t)hdr[2] << 8) | hdr[3];
            have_len = 1;
            if (msg_len + 4 > cap) return NS_HELLO_TOO_BIG;
        }
        if (have_len && hs_have >= msg_len + 4) {
            end_pos = pos + 5 + rlen; /* the record holding the last byte */
            if (avail < rlen) {
                /* the hello is complete but its record is not: fine, we
                 * only need the hello bytes */
                end_pos = len;
            }
            break;
        }
        if (avail < rlen) {
            if (len >= cap) return NS_HELLO_TOO_BIG;
            return NS_HELLO_NEED_MORE;
        }
        pos += 5 + rlen;
    }

    size_t total = msg_len + 4;
    int rc;
    if (nrec == 1) {
        rc = parse_body(buf + 5 + 4, msg_len, out);
    } else {
        uint8_t *m = (uint8_t *)malloc(total);
        if (m == NULL) return NS_HELLO_TOO_BIG;
        size_t got = 0;
        pos = 0;
        while (got < total) {
            size_t rlen = ns_rd16(buf + pos + 3);
            size_t avail = len - pos - 5;
            if (avail > rlen) avail = rlen;
            size_t take = avail < total - got ? avail : total - got;
            memcpy(m + got, buf + pos + 5, take);
            got += take;
            pos += 5 + rlen;
        }
        rc = parse_body(m + 4, msg_len, out);
        free(m);
    }
    if (rc == NS_HELLO_COMPLETE) out->consumed = (uint32_t)end_pos;
    return rc;
}
