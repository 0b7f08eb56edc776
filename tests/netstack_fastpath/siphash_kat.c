/* Known-answer checks of netstack/csrc/siphash.h (run by test_hash_flood.py).
 * The SipHash round, key schedule and padding are checked against the paper's
 * SipHash-2-4 vector (key 00..0f, message 00..0e); SipHash-1-3 differs only in
 * the number of rounds.  The byte and word entry points must agree, and two
 * keys drawn from getrandom() must differ. */
#include <stdio.h>

#include "siphash.h"

static uint64_t siphash24(const uint64_t key[2], const uint8_t *p, size_t n) {
    ns_sip_state s;
    ns_sip_init(&s, key);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t m = ns_load_le(p + i, 8);
        s.v3 ^= m;
        NS_SIPROUND(s.v0, s.v1, s.v2, s.v3);
        NS_SIPROUND(s.v0, s.v1, s.v2, s.v3);
        s.v0 ^= m;
    }
    uint64_t b = (uint64_t)n << 56 | ns_load_le(p + i, n - i);
    s.v3 ^= b;
    NS_SIPROUND(s.v0, s.v1, s.v2, s.v3);
    NS_SIPROUND(s.v0, s.v1, s.v2, s.v3);
    s.v0 ^= b;
    s.v2 ^= 0xff;
    for (int k = 0; k < 4; k++) NS_SIPROUND(s.v0, s.v1, s.v2, s.v3);
    return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

int main(void) {
    uint8_t kb[16], m[64];
    for (int i = 0; i < 16; i++) kb[i] = (uint8_t)i;
    for (int i = 0; i < 64; i++) m[i] = (uint8_t)i;
    const uint64_t key[2] = {ns_load_le(kb, 8), ns_load_le(kb + 8, 8)};
    int bad = 0;
    if (siphash24(key, m, 15) != 0xa129ca6149be45e5ull) bad |= 1;
    uint64_t w[4];
    for (int i = 0; i < 4; i++) w[i] = ns_load_le(m + 8 * i, 8);
    if (ns_sip13_words(key, w, 4) != ns_sip13_bytes(key, m, 32)) bad |= 2;
    /* every length hashes differently (the length byte is part of the message) */
    for (size_t n = 0; n < 63; n++)
        if (ns_sip13_bytes(key, m, n) == ns_sip13_bytes(key, m, n + 1)) bad |= 4;
    uint64_t k1[2], k2[2];
    if (ns_random_key(k1) != 0 || ns_random_key(k2) != 0) bad |= 8;
    if (k1[0] == k2[0] && k1[1] == k2[1]) bad |= 16;
    if (ns_sip13_bytes(k1, m, 13) == ns_sip13_bytes(k2, m, 13)) bad |= 32;
    printf("siphash kat bad=%d\n", bad);
    return bad;
}
