/* core.reconfigure: a new identity for a guest restored from a snapshot (or forked).
 *
 * A restored guest carries on exactly where its snapshot stopped: same MAC and IP, a
 * clock that lags by however long the snapshot sat on disk, and a kernel CRNG whose
 * state every other restore of the same snapshot shares. The host sends
 *   {hostname?, network?, clock?: {realtime_ns}, entropy?: bytes}
 * and the agent, in this order: mixes `entropy` into the input pool (RNDADDENTROPY,
 * credited) and forces a CRNG reseed (RNDRESEEDCRNG); steps CLOCK_REALTIME; strips the
 * interface named by network.interface (default eth0) of its addresses while it stays up
 * (IPv4: setting 0.0.0.0 deletes the address, and with the last one the kernel flushes
 * the routes through the interface and its ARP entries; IPv6: every address and the
 * default routes) and configures it as core.bootstrap does (MAC, changed live: virtio-net
 * allows it; MTU, addresses, default route, /etc/hosts, /etc/resolv.conf, hostname), plus
 * the link-local address of the new MAC.
 *
 * Not taking the link down is deliberate: a restored guest's agent taking eth0 down
 * (virtnet_close) now and then slept in the kernel for ever (issue 16: the vCPU idle,
 * timer interrupts delivered, no answer to core.ping; with or without the MAC change),
 * so the re-addressing avoids the close/open of the device altogether.
 * Answer: core.reconfigure.ack {applied: [names]} or core.error bootstrap_failed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "kernel_ipv6.h"

/* linux/random.h (musl ships no kernel headers) */
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG _IO('R', 0x07)
struct rand_pool_info {
    int entropy_count;
    int buf_size;
    uint32_t buf[];
};

#define MAX_ENTROPY 512

static int add_entropy(const uint8_t *p, size_t n, char *err, size_t errlen) {
    struct {
        struct rand_pool_info info;
        uint32_t buf[MAX_ENTROPY / 4];
    } req;
    memset(&req, 0, sizeof req);
    memcpy(req.buf, p, n);
    req.info.entropy_count = (int)(n * 8);
    req.info.buf_size = (int)n;
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0) { snprintf(err, errlen, "opening /dev/urandom: %s", strerror(errno)); return -1; }
    int rc = ioctl(fd, RNDADDENTROPY, &req);
    if (rc < 0) snprintf(err, errlen, "RNDADDENTROPY: %s", strerror(errno));
    /* not fatal on kernels without it: the added entropy is mixed in on the next reseed */
    if (rc == 0) (void)ioctl(fd, RNDRESEEDCRNG, NULL);
    close(fd);
    return rc;
}

/* Every address of ifname goes, the link stays up (see the top of the file). */
static int unaddress(const char *ifname, char *err, size_t errlen) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { snprintf(err, errlen, "socket: %s", strerror(errno)); return -1; }
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    int rc = ioctl(s, SIOCGIFINDEX, &ifr);
    int ifindex = ifr.ifr_ifindex;
    if (rc == 0) {
        memset(&ifr.ifr_addr, 0, sizeof ifr.ifr_addr);
        ifr.ifr_addr.sa_family = AF_INET;   /* 0.0.0.0: delete */
        rc = ioctl(s, SIOCSIFADDR, &ifr);
    }
    close(s);
    if (rc < 0) { snprintf(err, errlen, "removing %s's IPv4 address: %s", ifname, strerror(errno)); return -1; }
    FILE *f = fopen("/proc/net/if_inet6", "re");
    if (!f) return 0;   /* no IPv6 */
    int s6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s6 < 0) { fclose(f); return 0; }
    char hex[40], name[IFNAMSIZ + 1];
    unsigned idx, plen, scope, flags;
    while (fscanf(f, "%32s %x %x %x %x %16s", hex, &idx, &plen, &scope, &flags, name) == 6) {
        if (strcmp(name, ifname) != 0) continue;   /* link-local too: see add_link_local */
        struct v6_ifreq r6 = {.prefixlen = plen, .ifindex = (int)idx};
        for (int i = 0; i < 16; i++) {
            unsigned b;
            if (sscanf(hex + 2 * i, "%2x", &b) != 1) b = 0;
            r6.addr.s6_addr[i] = (uint8_t)b;
        }
        (void)ioctl(s6, SIOCDIFADDR, &r6);
    }
    fclose(f);
    for (int i = 0; i < 8; i++) {   /* default routes (any gateway) */
        struct v6_rtmsg rt;
        memset(&rt, 0, sizeof rt);
        rt.metric = 1024;
        rt.flags = RTF_UP;
        rt.ifindex = ifindex;
        if (ioctl(s6, SIOCDELRT, &rt) < 0) break;
    }
    close(s6);
    return 0;
}

/* The link-local address of the new MAC (EUI-64), as taking the link up would make: the
 * one unaddress() removed was derived from the snapshot's MAC, shared by every restore. */
static void add_link_local(const char *ifname, const char *mac) {
    uint8_t m[6];
    if (!mac || parse_mac(mac, m) < 0) return;
    int s6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s6 < 0) return;
    struct in6_addr ll = {0};
    uint8_t *a = ll.s6_addr;
    a[0] = 0xfe; a[1] = 0x80;
    a[8] = (uint8_t)(m[0] ^ 0x02); a[9] = m[1]; a[10] = m[2];
    a[11] = 0xff; a[12] = 0xfe;
    a[13] = m[3]; a[14] = m[4]; a[15] = m[5];
    (void)v6_add_addr(s6, ifname, &ll, 64);   /* best effort: a failure is ignored */
    close(s6);
}

void on_reconfigure(struct agent *a, uint32_t id, int64_t p) {
    const struct cbor_doc *d = &a->doc;
    char err[256] = "";
    char *hostname = NULL, *ifname = NULL;
    const char *applied[4];
    int napplied = 0, rc = 0;
    if (p < 0 || d->items[p].type != CB_MAP) {
        send_error(a, id, "bad_request", "core.reconfigure payload must be a map");
        return;
    }
    if (cbor_get_str(d, p, "hostname", &hostname) < 0) {
        send_error(a, id, "bad_request", "\"hostname\" must be text");
        return;
    }
    int64_t ent = cbor_map_get(d, p, "entropy");
    if (ent >= 0 && d->items[ent].type != CB_NULL &&
        (d->items[ent].type != CB_BYTES || d->items[ent].len < 16 || d->items[ent].len > MAX_ENTROPY)) {
        send_error(a, id, "bad_request", "\"entropy\" must be 16..512 bytes");
        free(hostname);
        return;
    }
    int64_t clk = cbor_map_get(d, p, "clock"), ns = -1;
    if (clk >= 0 && d->items[clk].type != CB_NULL &&
        (d->items[clk].type != CB_MAP || cbor_get_int(d, clk, "realtime_ns", &ns) != 0 || ns <= 0)) {
        send_error(a, id, "bad_request", "\"clock\" must be {realtime_ns: nanoseconds since the epoch > 0}");
        free(hostname);
        return;
    }
    int64_t net = cbor_map_get(d, p, "network");
    bool have_net = net >= 0 && d->items[net].type != CB_NULL;
    if (have_net && (d->items[net].type != CB_MAP || cbor_get_str(d, net, "interface", &ifname) < 0)) {
        send_error(a, id, "bad_request", "\"network\" must be a map (as in core.bootstrap)");
        free(hostname);
        return;
    }
    if (ent >= 0 && d->items[ent].type == CB_BYTES && !a->host_mode) {
        rc = add_entropy(d->items[ent].s, d->items[ent].len, err, sizeof err);
        if (rc == 0) applied[napplied++] = "entropy";
    }
    if (rc == 0 && ns > 0 && !a->host_mode) {
        struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000), .tv_nsec = (long)(ns % 1000000000)};
        rc = clock_settime(CLOCK_REALTIME, &ts);
        if (rc < 0) snprintf(err, sizeof err, "clock_settime: %s", strerror(errno));
        else applied[napplied++] = "clock";
    }
    if (rc == 0 && have_net && !a->host_mode) rc = unaddress(ifname ? ifname : "eth0", err, sizeof err);
    if (rc == 0 && (have_net || hostname)) {
        rc = net_configure(a, have_net ? net : -1, hostname, err, sizeof err);
        if (rc == 0 && have_net && !a->host_mode) {
            char *mac = NULL;
            if (cbor_get_str(d, net, "mac", &mac) == 0) add_link_local(ifname ? ifname : "eth0", mac);
            free(mac);
        }
        if (rc == 0 && have_net) applied[napplied++] = "network";
        if (rc == 0 && hostname) applied[napplied++] = "hostname";
    }
    free(hostname);
    free(ifname);
    if (rc != 0) {
        send_error(a, id, "bootstrap_failed", err);
        return;
    }
    frame_begin(&a->out, "core.reconfigure.ack");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "applied");
    cbor_put_array(&a->out, (uint64_t)napplied);
    for (int i = 0; i < napplied; i++) cbor_put_text(&a->out, applied[i]);
    agent_send(a, id, FLAG_TERMINAL);
}
