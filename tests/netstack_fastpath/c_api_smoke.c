/* C-level smoke test of netstack.h: what a gateway's own C loop does. */
#include <stdio.h>
#include <string.h>

#include "netstack.h"
#include "ns_internal.h"

static size_t put_frame(uint8_t *out, const uint8_t dst[4], uint16_t dport, uint8_t flags) {
    uint8_t f[54] = {0};
    f[12] = 0x08; /* IPv4 */
    uint8_t *ip = f + 14;
    ip[0] = 0x45;
    ip[3] = 40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12] = 10; ip[13] = 0; ip[14] = 2; ip[15] = 15;
    memcpy(ip + 16, dst, 4);
    uint8_t *tcp = ip + 20;
    tcp[0] = 0x9c; tcp[1] = 0x40;
    tcp[2] = (uint8_t)(dport >> 8); tcp[3] = (uint8_t)dport;
    tcp[12] = 0x50;
    tcp[13] = flags;
    out[0] = 0; out[1] = 0; out[2] = 0; out[3] = sizeof f;
    memcpy(out + 4, f, sizeof f);
    return 4 + sizeof f;
}

int main(void) {
    /* policy: allow tcp to 192.0.2.0/24, default deny */
    ns_rule_spec r;
    memset(&r, 0, sizeof r);
    r.action = NS_ACT_ALLOW;
    r.dirmask = 3;
    r.protomask = NS_P_TCP;
    r.kind = NS_D_CIDR;
    r.family = 4;
    r.prefix = 24;
    r.addr[0] = 192; r.addr[1] = 0; r.addr[2] = 2;
    uint16_t ranges[2] = {0, 0};
    ns_policy *p = ns_policy_build(&r, 1, ranges, 0, (const uint8_t *)"", 0, 1, 0);
    ns_ctx *ctx = ns_ctx_new(1024, NULL);
    if (!p || !ctx) return 2;
    ns_ctx_set_policy(ctx, p);

    uint8_t buf[4096];
    size_t len = 0;
    const uint8_t ok[4] = {192, 0, 2, 7}, bad[4] = {198, 51, 100, 7};
    len += put_frame(buf + len, ok, 443, 0x02);
    len += put_frame(buf + len, ok, 443, 0x10);
    len += put_frame(buf + len, bad, 443, 0x02);
    buf[len++] = 0; buf[len++] = 0; /* an incomplete prefix */
    uint8_t verdicts[8];
    int32_t rules[8];
    size_t used = 0;
    size_t n = ns_classify_stream(ctx, buf, len, NS_DIR_EGRESS, 1.0, verdicts, rules, 8, &used);
    printf("n=%zu used=%zu v=%d,%d,%d r=%d,%d,%d broken=%d flows=%u\n", n, used, verdicts[0],
           verdicts[1], verdicts[2], rules[0], rules[1], rules[2], ns_stream_broken(ctx),
           ns_ctx_flow_count(ctx));
    int good = n == 3 && used == len - 2 && verdicts[0] == NS_ALLOW && verdicts[1] == NS_ALLOW &&
               verdicts[2] == NS_DENY_RST && rules[0] == 0 && rules[2] == -1 &&
               !ns_stream_broken(ctx) && ns_ctx_flow_count(ctx) == 2;
    ns_ctx_free(ctx);
    return good ? 0 : 1;
}
