/*
 * siphash.h - keyed hashing of guest-chosen keys (SipHash-1-3), header-only.
 *
 * The flow table (classify.c) and the pin cache (pincache.c) index keys a
 * guest chooses: 5-tuples, DNS names, the addresses a DNS server it controls
 * answers with.  With a fixed hash function a guest can precompute keys that
 * share one bucket and turn every lookup into a walk of a long chain (CPU
 * denial of service).  Each context therefore draws its own 128-bit secret
 * from getrandom() when it is created and hashes with SipHash-1-3 under it:
 * without the secret, colliding keys cannot be predicted.  No global state:
 * the key lives in the context that uses it.
 *
 * SipHash: Aumasson & Bernstein, "SipHash: a fast short-input PRF" (2012);
 * 1-3 = one compression round per 8-byte word, three finalization rounds
 * (the variant Rust's and Python's hash tables use).
 *
 *     uint64_t key[2];
 *     if (ns_random_key(key) != 0) return NULL;           // at creation
 *     uint64_t h = ns_sip13_bytes(key, name, len);          // any byte string
 *     uint64_t w[2] = {a, b};
 *     uint64_t g = ns_sip13_words(key, w, 2);               // 8-byte words
 */
#ifndef NS_SIPHASH_H
#define NS_SIPHASH_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

/* The hash sits on the per-frame path: always inline (a call per frame costs more than
 * half of the hash). */
#define NS_SIP_INLINE static inline __attribute__((always_inline))

#define NS_ROTL64(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

#define NS_SIPROUND(v0, v1, v2, v3) \
    do {                            \
        v0 += v1;                   \
        v1 = NS_ROTL64(v1, 13);     \
        v1 ^= v0;                   \
        v0 = NS_ROTL64(v0, 32);     \
        v2 += v3;                   \
        v3 = NS_ROTL64(v3, 16);     \
        v3 ^= v2;                   \
        v0 += v3;                   \
        v3 = NS_ROTL64(v3, 21);     \
        v3 ^= v0;                   \
        v2 += v1;                   \
        v1 = NS_ROTL64(v1, 17);     \
        v1 ^= v2;                   \
        v2 = NS_ROTL64(v2, 32);     \
    } while (0)

typedef struct ns_sip_state {
    uint64_t v0, v1, v2, v3;
} ns_sip_state;

NS_SIP_INLINE void ns_sip_init(ns_sip_state *s, const uint64_t key[2]) {
    s->v0 = key[0] ^ 0x736f6d6570736575ull;
    s->v1 = key[1] ^ 0x646f72616e646f6dull;
    s->v2 = key[0] ^ 0x6c7967656e657261ull;
    s->v3 = key[1] ^ 0x7465646279746573ull;
}

NS_SIP_INLINE void ns_sip_word(ns_sip_state *s, uint64_t m) {
    uint64_t v0 = s->v0, v1 = s->v1, v2 = s->v2, v3 = s->v3;
    v3 ^= m;
    NS_SIPROUND(v0, v1, v2, v3);
    v0 ^= m;
    s->v0 = v0, s->v1 = v1, s->v2 = v2, s->v3 = v3;
}

/* The final block (length byte + tail `b`) and the three finalization rounds. */
NS_SIP_INLINE uint64_t ns_sip_finish(ns_sip_state *s, uint64_t b) {
    ns_sip_word(s, b);
    uint64_t v0 = s->v0, v1 = s->v1, v2 = s->v2 ^ 0xff, v3 = s->v3;
    NS_SIPROUND(v0, v1, v2, v3);
    NS_SIPROUND(v0, v1, v2, v3);
    NS_SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* n (<= 8) bytes at p as a little-endian integer. */
NS_SIP_INLINE uint64_t ns_load_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    memcpy(&v, p, n);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* SipHash-1-3 of the byte string p[0..n) under key (the reference function). */
NS_SIP_INLINE uint64_t ns_sip13_bytes(const uint64_t key[2], const uint8_t *p, size_t n) {
    ns_sip_state s;
    ns_sip_init(&s, key);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) ns_sip_word(&s, ns_load_le(p + i, 8));
    return ns_sip_finish(&s, (uint64_t)n << 56 | ns_load_le(p + i, n - i));
}

/* SipHash-1-3 of n 64-bit words (the message is their little-endian bytes, so
 * on little-endian hosts this equals ns_sip13_bytes of the words' memory). */
NS_SIP_INLINE uint64_t ns_sip13_words(const uint64_t key[2], const uint64_t *w, size_t n) {
    ns_sip_state s;
    ns_sip_init(&s, key);
    for (size_t i = 0; i < n; i++) ns_sip_word(&s, w[i]);
    return ns_sip_finish(&s, (uint64_t)(8 * n) << 56);
}

/* A fresh 128-bit secret from the kernel's CSPRNG.  0 on success, -1 if none
 * could be had (the caller must then refuse to create its table). */
static inline int ns_random_key(uint64_t key[2]) {
    uint8_t buf[16];
    size_t got = 0;
    while (got < sizeof(buf)) {
        ssize_t r = getrandom(buf + got, sizeof(buf) - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        got += (size_t)r;
    }
    memcpy(key, buf, sizeof(buf));
    return 0;
}

#endif /* NS_SIPHASH_H */
