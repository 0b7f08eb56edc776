/*
 * frag.h - the fragment table of a classifier context (frag.c; not a stable API).
 *
 * Later IP fragments carry no L4 header: they get the verdict remembered for the
 * first fragment of their datagram.  See frag.c for the rules and the bounds.
 *
 *     ns_fragtab *t = ns_frag_new();                       // in ns_ctx_new
 *     if (fr.frag == 1) ns_frag_record(t, buf, len, &fr, NS_FRAG_FROM_GUEST, v, rule, gen, NS_FRAG_ACCT, now);
 *     if (fr.frag == 2 && ns_frag_follow(t, buf, len, &fr, NS_FRAG_FROM_GUEST, gen, now,
 *                                        &v, &rule, &acct)) ... // else drop
 */
#ifndef NS_FRAG_H
#define NS_FRAG_H

#include "ns_internal.h"

/* Which way a fragment travels through the gateway: a record made for one side is
 * never matched by a frame of the other. */
enum { NS_FRAG_FROM_GUEST = 0, NS_FRAG_FROM_UPLINK = 1 };

#define NS_FRAG_DEFAULT_RECORDS 4096u
#define NS_FRAG_DEFAULT_LIFETIME 30.0

typedef struct ns_fragtab ns_fragtab;

/* An empty table with its own SipHash secret (slots are allocated at the first record);
 * NULL if no memory or no randomness. */
ns_fragtab *ns_frag_new(void);
void ns_frag_free(ns_fragtab *t);
/* At most max_records records (16 .. 1 << 20, rounded up to a power of two), each
 * living `lifetime` seconds (0 < lifetime <= 3600); drops every record.  0 or -1. */
int ns_frag_configure(ns_fragtab *t, uint32_t max_records, double lifetime);
/* ns_frag_record flags: the later fragments count towards rule `rule`'s counters; the
 * verdict only replaces a record of the same datagram (a denial: no slot is taken for
 * it, but an older admission of the same key is revoked). */
enum { NS_FRAG_ACCT = 1, NS_FRAG_REPLACE_ONLY = 2 };

/* Remember the verdict of first fragment `fr` (frag == 1) of frame buf[0..len) for the
 * later fragments of its datagram. */
void ns_frag_record(ns_fragtab *t, const uint8_t *buf, size_t len, const ns_frame *fr, int side,
                    uint8_t verdict, int32_t rule, uint32_t gen, int flags, double now);
/* The verdict for later fragment `fr` (frag == 2): 1 and *verdict, *rule, *acct when its
 * datagram's first fragment was recorded under tables `gen`, is still live and the
 * fragment neither overlaps it nor ends past 65,535 bytes; 0 (drop it) otherwise. */
int ns_frag_follow(ns_fragtab *t, const uint8_t *buf, size_t len, const ns_frame *fr, int side,
                   uint32_t gen, double now, uint8_t *verdict, int32_t *rule, int *acct);
void ns_frag_expire(ns_fragtab *t, double now);
void ns_frag_stats_get(const ns_fragtab *t, ns_frag_stats *out);

#endif /* NS_FRAG_H */
