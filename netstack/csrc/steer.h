/*
 * steer.h - the steering NAT of a gateway loop whose uplink has no local network stack
 * (passt): guest TCP flows to the TLS interception ports and to port 53 are rewritten to
 * listeners on the host's loopback (see steer.c).  Internal to the netstack C sources;
 * the ns_gw_steer_* entry points are declared in netstack/_cffi_build.py.
 */
#ifndef NS_STEER_H
#define NS_STEER_H

#include <stddef.h>
#include <stdint.h>

#define NS_STEER_MAX_PORTS 64   /* intercepted TLS ports */
#define NS_STEER_MAX_POOL 32    /* listener ports of one kind */

typedef struct ns_gw_steer_config {
    uint8_t gateway_ip[16];     /* v4-mapped: the address the uplink maps to 127.0.0.1 */
    uint8_t gateway_ip6[16];    /* the address it maps to ::1 (all-zero: IPv6 not steered) */
    uint8_t allow_gateway;      /* 1: other guest TCP/UDP to the gateway addresses passes
                                   (the host's loopback; the policy decided first) */
    uint8_t dns;                /* 1: guest TCP to port 53 (any address) -> dns_pool */
    uint8_t ndns_pool, ntls_pool, ntls_ports, block_udp;
    uint16_t dns_pool[NS_STEER_MAX_POOL];
    uint16_t tls_pool[NS_STEER_MAX_POOL];
    uint16_t tls_ports[NS_STEER_MAX_PORTS];  /* guest TCP to these (any address) -> tls_pool */
} ns_gw_steer_config;

typedef struct ns_gw_steer_stats {
    uint64_t flows;             /* flows steered (NAT entries created) */
    uint64_t claimed;           /* original destinations handed to a listener */
    uint64_t live;              /* NAT entries in use now */
    uint64_t pool_busy;         /* SYNs dropped: every listener port had an unclaimed flow */
    uint64_t table_full;        /* SYNs dropped: the NAT table was full */
    uint64_t stray;             /* steered-port segments of no known flow (dropped) */
    uint64_t gateway_dropped;   /* guest traffic to the gateway address not allowed */
    uint64_t udp_dropped;       /* guest UDP to the intercepted ports (QUIC) dropped */
    uint64_t frag_dropped;      /* fragmented TCP to a steered port (dropped) */
} ns_gw_steer_stats;

typedef struct ns_steer ns_steer;
struct ns_gw;

/* The gateway loop's entry points (gateway.c). */
int ns_gw_steer_enable(struct ns_gw *g, const ns_gw_steer_config *cfg);
int ns_gw_steer_tls(struct ns_gw *g, const uint16_t *ports, size_t nports, const uint16_t *pool,
                    size_t npool, int block_udp);
int ns_gw_steer_claim(struct ns_gw *g, uint16_t port, uint8_t *dst16, uint16_t *dport);
void ns_gw_steer_stats_get(struct ns_gw *g, ns_gw_steer_stats *out);

ns_steer *ns_steer_new(const ns_gw_steer_config *cfg);
void ns_steer_free(ns_steer *s);
/* Replace the TLS part of the configuration (any thread; applied by ns_steer_out). */
int ns_steer_set_tls(ns_steer *s, const uint16_t *ports, size_t nports, const uint16_t *pool,
                     size_t npool, int block_udp);
/* A guest frame on its way to the uplink (a writable copy): 0 = send it (rewritten
 * if steered), -1 = drop it. */
int ns_steer_out(ns_steer *s, uint8_t *f, size_t len, double now);
/* An uplink frame on its way to the guest (writable): 0 = not steered, 1 = a reply of a
 * steered TLS flow (rewritten: continue with the reply lookup), 2 = a reply of a steered
 * DNS flow (rewritten: pass), -1 = drop. */
int ns_steer_in(ns_steer *s, uint8_t *f, size_t len, double now);
void ns_steer_expire(ns_steer *s, double now);
/* The original destination of the unclaimed flow on listener port `port` (at most one
 * is pending per port; any thread): 0 and dst16/dport filled, or -1 (none pending). */
int ns_steer_claim(ns_steer *s, uint16_t port, double now, uint8_t *dst16, uint16_t *dport);
void ns_steer_stats(ns_steer *s, ns_gw_steer_stats *out);

#endif
