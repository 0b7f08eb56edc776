"""cffi (API mode) build of ``netstack._fastpath``, the C hot path.

``setup.py`` discovers ``ffibuilder`` here.  For development, build in place::

    python3 netstack/_cffi_build.py            # -> netstack/_fastpath*.so

``NETSTACK_SANITIZE=1`` builds an ASan+UBSan variant (clang if present, else gcc)
for the fuzz targets; run those with the ASan runtime in ``LD_PRELOAD`` (see
``tests/fuzz/_asan.py``); it lands in ``build/asan/`` (or ``NETSTACK_SANITIZE_OUT``),
never over the production module in the source tree.
"""

from __future__ import annotations

import os
import shutil
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
SOURCES = ["frame.c", "hello.c", "dns.c", "pincache.c", "policy.c", "classify.c",
           "frag.c", "gateway.c", "steer.c"]

CDEF = r"""
enum ns_verdict { NS_ALLOW = 0, NS_DENY = 1, NS_DENY_RST = 2, NS_DENY_ICMP = 3,
                  NS_NEED_MORE = 4, NS_TO_DNS = 5, NS_TO_PROXY = 6, NS_MALFORMED = 7 };
#define NS_MAX_FRAME 65549
#define NS_HELLO_MAX_ALPN 16
#define NS_DNS_MAX_ADDRS 64
#define NS_DNS_MAX_CHAIN 16
#define NS_MAX_NAMES 64

typedef struct ns_ctx ns_ctx;
typedef struct ns_policy ns_policy;
typedef struct ns_pincache ns_pincache;

typedef struct ns_frame {
    uint8_t l3, family, ipproto, pbit, tcp_flags, frag, vlan, has_ports;
    uint16_t ethertype, sport, dport;
    uint32_t seq, frag_id;
    uint8_t src[16], dst[16];
    uint32_t l4_off, payload_off, payload_len;
} ns_frame;
int ns_parse_frame(const uint8_t *buf, size_t len, ns_frame *out);

typedef struct ns_hello {
    uint8_t sni[256];
    uint16_t sni_len;
    uint8_t has_sni, ech, alpn_count, alpn_truncated;
    uint16_t alpn_off[16];
    uint8_t alpn_len[16];
    uint8_t alpn_buf[4096];
    uint32_t consumed;
} ns_hello;
int ns_parse_client_hello(const uint8_t *buf, size_t len, size_t cap, ns_hello *out);

typedef struct ns_dns_result {
    uint8_t qname[256];
    uint16_t qname_len, qtype, id;
    uint8_t rcode, is_response, truncated;
    uint16_t naddrs;
    uint8_t addrs[64][16];
    uint8_t addr_family[64];
    uint32_t addr_ttl[64];
    uint32_t min_ttl;
    uint16_t nchain;
    uint8_t chain[16][256];
} ns_dns_result;
int ns_parse_dns(const uint8_t *buf, size_t len, ns_dns_result *out);

ns_pincache *ns_pin_new(uint32_t max_bindings, double ttl_ceiling);
void ns_pin_free(ns_pincache *pc);
int ns_pin_set(ns_pincache *pc, const uint8_t *name, size_t name_len, int family,
               const uint8_t *ips, size_t n, double ttl, double now);
int ns_pin_learn_dns(ns_pincache *pc, const uint8_t *buf, size_t len, double now);
size_t ns_pin_lookup(ns_pincache *pc, const uint8_t *ip, double now, uint8_t *blob,
                     size_t blob_cap, uint16_t *lens, size_t max);
size_t ns_pin_count(ns_pincache *pc);
void ns_pin_expire(ns_pincache *pc, double now);
uint64_t ns_pin_evictions(ns_pincache *pc);
uint32_t ns_pin_max_chain(ns_pincache *pc);

typedef struct ns_rule_spec {
    uint8_t action, dirmask, protomask, kind, family, prefix, group, pad;
    uint8_t addr[16];
    uint32_t port_off, port_count, name_off, name_len;
} ns_rule_spec;

typedef struct ns_flowq {
    uint8_t direction, pbit, has_port;
    uint16_t port;
    uint8_t remote[16];
    uint8_t family;
    const uint8_t *sni;
    uint16_t sni_len;
    const uint8_t *const *names;
    const uint16_t *name_lens;
    uint32_t nnames;
    const uint8_t *gateway;
    uint32_t ngw;
} ns_flowq;

typedef struct ns_rule_counter { uint64_t hits, packets, bytes; } ns_rule_counter;

ns_policy *ns_policy_build(const ns_rule_spec *rules, uint32_t nrules,
                           const uint16_t *port_ranges, uint32_t nranges,
                           const uint8_t *blob, uint32_t bloblen,
                           int default_egress_deny, int default_ingress_deny);
void ns_policy_free(ns_policy *p);
int ns_policy_set_gateway(ns_policy *p, const uint8_t *ips, uint32_t n);
int ns_policy_set_intercept(ns_policy *p, const uint8_t *blob, const uint16_t *lens, uint32_t n,
                            const uint16_t *ports, uint32_t nports);
int ns_policy_eval_packed(const ns_policy *p, ns_flowq *q, const uint8_t *names_blob,
                          const uint16_t *lens, uint32_t n, int32_t *rule_index);
int ns_policy_sni_dependent(const ns_policy *p, const ns_flowq *q);
int ns_classify_group(const uint8_t *ip16, const uint8_t *gateway, uint32_t ngw);

typedef struct ns_flow_info {
    uint8_t found, state, verdict, pad;
    int32_t rule;
    uint64_t packets, bytes;
    double created, last_seen;
} ns_flow_info;
typedef struct ns_ctx_stats {
    uint64_t flows_created, flows_evicted, flows_expired, malformed, hello_denied;
    uint64_t live_flows, hello_bytes;
    uint64_t max_probe;
} ns_ctx_stats;
typedef struct ns_frag_stats {
    uint64_t recorded, followed, unmatched, bad, evicted, live, capacity;
} ns_frag_stats;
int ns_ctx_set_frag_limits(ns_ctx *ctx, uint32_t max_records, double lifetime);
void ns_ctx_frag_stats(ns_ctx *ctx, ns_frag_stats *out);

ns_ctx *ns_ctx_new(uint32_t max_flows, ns_pincache *pins);
void ns_ctx_free(ns_ctx *ctx);
int ns_ctx_configure(ns_ctx *ctx, double tcp_idle, double udp_idle, uint32_t hello_cap,
                     double hello_timeout, uint64_t hello_budget);
int ns_ctx_set_block_dns_bypass(ns_ctx *ctx, int on);
void ns_ctx_set_policy(ns_ctx *ctx, ns_policy *p);
void ns_ctx_expire(ns_ctx *ctx, double now);
void ns_ctx_stats_get(ns_ctx *ctx, ns_ctx_stats *out);
uint32_t ns_ctx_flow_count(const ns_ctx *ctx);
int ns_ctx_flow_info(ns_ctx *c, const uint8_t *buf, size_t len, int dir, ns_flow_info *out);
uint32_t ns_ctx_rule_counters(ns_ctx *c, ns_rule_counter *out, uint32_t max);

void ns_classify_batch(ns_ctx *ctx, const uint8_t *const *frames, const uint32_t *lens,
                       size_t count, int direction, double now,
                       uint8_t *verdicts, int32_t *rules);
size_t ns_classify_stream(ns_ctx *ctx, const uint8_t *buf, size_t len, int direction,
                          double now, uint8_t *verdicts, int32_t *rules,
                          size_t max_frames, size_t *consumed);
int ns_stream_broken(const ns_ctx *ctx);
int ns_ctx_reply_lookup(ns_ctx *ctx, const uint8_t *buf, size_t len, double now);
int ns_ctx_ingress_reply(ns_ctx *ctx, const uint8_t *buf, size_t len, double now);

enum ns_gw_mode { NS_GW_STREAM = 0, NS_GW_DGRAM = 1, NS_GW_TAP = 2 };
enum ns_gw_event_kind { NS_EV_DNS = 1, NS_EV_DENIED = 2, NS_EV_CAPTURE = 3,
                        NS_EV_GUEST_CLOSED = 4, NS_EV_NOT_REPLY = 5 };
#define NS_GW_EVENT_DATA 2048
typedef struct ns_gw ns_gw;
typedef struct ns_gw_config {
    int guest_fd, guest_mode, uplink_fd;
    uint8_t guest_mac[6], gateway_mac[6];
    uint32_t event_slots;
    uint32_t hold_frames;
    double hello_timeout;
    uint8_t capture;
    uint8_t log_denied;
    uint8_t npublished;
    uint8_t uplink_vnet;
    uint16_t published[16];
    uint8_t gateway_ip[16];
    uint16_t guest_mtu;
    uint16_t uplink_mtu;
    uint8_t npublished_udp;
    uint16_t published_udp[16];
    uint8_t gateway_ip6[16];
    uint8_t dns_tcp_reset;
    uint8_t uplink_stream;
} ns_gw_config;
typedef struct ns_gw_event {
    uint8_t kind, verdict, direction, pad;
    int32_t rule;
    double ts;
    uint32_t len, orig_len;
} ns_gw_event;
typedef struct ns_gw_stats {
    uint64_t guest_frames, guest_bytes, uplink_frames, uplink_bytes;
    uint64_t to_uplink, to_guest, not_reply, rst_sent, icmp_sent, dns_queries;
    uint64_t events_dropped, injected, held, released, hold_dropped, guest_overflow;
    uint64_t write_errors, loops;
    uint64_t verdicts[8];
    uint64_t too_big;
    uint64_t mss_raised;
    uint64_t frag_needed, fragmented, oversize_dropped;
} ns_gw_stats;
ns_gw *ns_gw_new(ns_ctx *ctx, const ns_gw_config *cfg);
int ns_gw_start(ns_gw *gw);
void ns_gw_stop(ns_gw *gw);
void ns_gw_free(ns_gw *gw);
int ns_gw_event_fd(const ns_gw *gw);
int ns_gw_next_event(ns_gw *gw, ns_gw_event *ev, uint8_t *data, size_t cap);
int ns_gw_inject(ns_gw *gw, const uint8_t *frame, size_t len);
int ns_gw_inject_udp(ns_gw *gw, const uint8_t *src16, uint16_t sport, const uint8_t *dst16,
                     uint16_t dport, const uint8_t *payload, size_t len);
size_t ns_gw_build_udp(const uint8_t *dst_mac, const uint8_t *src_mac, const uint8_t *src16,
                       uint16_t sport, const uint8_t *dst16, uint16_t dport,
                       const uint8_t *payload, size_t len, uint8_t *out, size_t cap);
size_t ns_gw_build_reject(const uint8_t *frame, size_t len, uint8_t *out, size_t cap);
size_t ns_gw_build_too_big(const uint8_t *frame, size_t len, uint32_t mtu, const uint8_t *src16,
                           uint8_t *out, size_t cap);
void ns_gw_stats_get(ns_gw *gw, ns_gw_stats *out);
uint32_t ns_gw_pending(ns_gw *gw);

#define NS_STEER_MAX_PORTS 64
#define NS_STEER_MAX_POOL 32
typedef struct ns_gw_steer_config {
    uint8_t gateway_ip[16];
    uint8_t gateway_ip6[16];
    uint8_t allow_gateway;
    uint8_t dns;
    uint8_t ndns_pool, ntls_pool, ntls_ports, block_udp;
    uint16_t dns_pool[32];
    uint16_t tls_pool[32];
    uint16_t tls_ports[64];
} ns_gw_steer_config;
typedef struct ns_gw_steer_stats {
    uint64_t flows, claimed, live, pool_busy, table_full, stray, gateway_dropped,
             udp_dropped, frag_dropped;
} ns_gw_steer_stats;
int ns_gw_steer_enable(ns_gw *gw, const ns_gw_steer_config *cfg);
int ns_gw_steer_tls(ns_gw *gw, const uint16_t *ports, size_t nports, const uint16_t *pool,
                    size_t npool, int block_udp);
int ns_gw_steer_claim(ns_gw *gw, uint16_t port, uint8_t *dst16, uint16_t *dport);
void ns_gw_steer_stats_get(ns_gw *gw, ns_gw_steer_stats *out);
"""

SANITIZE = os.environ.get("NETSTACK_SANITIZE") == "1"


def _flags() -> tuple[list[str], list[str]]:
    if SANITIZE:
        cflags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
        if shutil.which("clang"):
            cflags.append("-fsanitize=fuzzer-no-link")
        return cflags, ["-fsanitize=address,undefined"]
    return ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"], []


_cflags, _ldflags = _flags()
if SANITIZE and shutil.which("clang"):
    os.environ.setdefault("CC", "clang")
    os.environ.setdefault("LDSHARED", "clang -shared")



def make_builder(absolute: bool = False) -> FFI:
    """Return the FFI builder (source paths relative to the cwd, as setup.py wants,
    or absolute for ``ffibuilder.compile``, which changes directory)."""
    ffi = FFI()
    ffi.cdef(CDEF)
    paths = [os.path.join(CSRC, s) for s in SOURCES]
    ffi.set_source(
        "netstack._fastpath",
        '#include "netstack.h"\n#include "ns_internal.h"\n#include "steer.h"\n',
        sources=paths if absolute else [os.path.relpath(p) for p in paths],
        include_dirs=[CSRC],
        extra_compile_args=_cflags,
        extra_link_args=_ldflags,
    )
    return ffi


ffibuilder = make_builder()


if __name__ == "__main__":
    root = os.path.dirname(HERE)
    out = (os.environ.get("NETSTACK_SANITIZE_OUT") or os.path.join(root, "build", "asan")
           if SANITIZE else None)
    tmp = os.path.join(root, "build", "cffi-asan" if SANITIZE else "cffi")
    lib = make_builder(absolute=True).compile(tmpdir=tmp, verbose=False)
    target_dir = out or HERE
    os.makedirs(target_dir, exist_ok=True)
    dest = os.path.join(target_dir, os.path.basename(lib))
    if os.path.abspath(lib) != os.path.abspath(dest):
        # copy then rename: a process that has the old module mapped keeps it
        # (overwriting in place would SIGBUS it)
        shutil.copy2(lib, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    print(dest, file=sys.stderr)
