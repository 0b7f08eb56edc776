/* Network bootstrap: lo and eth0 via ioctl (address, netmask, MTU, MAC, default
 * route, IPv6 address and route), hostname, /etc/resolv.conf and /etc/hosts. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"
#include "kernel_ipv6.h"


static bool valid_name(const char *s, size_t max) {
    size_t n = strlen(s);
    if (!n || n > max) return false;
    for (const char *c = s; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '-' ||
              *c == '.' || *c == '_'))
            return false;
    return true;
}

static int if_up(int s, const char *ifname) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

int parse_mac(const char *s, uint8_t mac[6]) {
    unsigned v[6];
    char tail;
    if (sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &tail) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)v[i];
    return 0;
}

struct ipcfg {
    char *address, *gateway;
    int64_t prefix;
    bool present;
};

static int parse_ip(const struct cbor_doc *d, int64_t m, int af, struct ipcfg *c, struct buf *dns, char *err,
                    size_t errlen) {
    const char *fam = af == AF_INET ? "ipv4" : "ipv6";
    uint8_t tmp[16];
    memset(c, 0, sizeof *c);
    if (m < 0 || d->items[m].type == CB_NULL) return 0;
    if (d->items[m].type != CB_MAP) { snprintf(err, errlen, "network.%s must be a map", fam); return -1; }
    c->present = true;
    if (cbor_get_str(d, m, "address", &c->address) != 0 || inet_pton(af, c->address, tmp) != 1) {
        snprintf(err, errlen, "network.%s.address \"%.64s\" is not an %s address", fam,
                 c->address ? c->address : "", fam);
        return -1;
    }
    int64_t maxp = af == AF_INET ? 32 : 128;
    if (cbor_get_int(d, m, "prefix_len", &c->prefix) != 0 || c->prefix < 0 || c->prefix > maxp) {
        snprintf(err, errlen, "network.%s.prefix_len must be 0..%lld", fam, (long long)maxp);
        return -1;
    }
    int r = cbor_get_str(d, m, "gateway", &c->gateway);
    if (r < 0 || (r == 0 && inet_pton(af, c->gateway, tmp) != 1)) {
        snprintf(err, errlen, "network.%s.gateway \"%.64s\" is not an %s address", fam,
                 c->gateway ? c->gateway : "", fam);
        return -1;
    }
    int64_t l = cbor_map_get(d, m, "dns");
    if (l >= 0 && d->items[l].type == CB_ARRAY) {
        uint32_t i = (uint32_t)l + 1;
        for (uint32_t k = 0; k < d->items[l].count; k++, i = d->items[i].end) {
            char *ns = cbor_strdup(&d->items[i]);
            if (!ns || inet_pton(af, ns, tmp) != 1) {
                snprintf(err, errlen, "network.%s.dns[%u] \"%.64s\" is not an %s address", fam, k, ns ? ns : "",
                         fam);
                free(ns);
                return -1;
            }
            buf_put(dns, "nameserver ", 11);
            buf_put(dns, ns, strlen(ns));
            buf_put(dns, "\n", 1);
            free(ns);
        }
    } else if (l >= 0 && d->items[l].type != CB_NULL) {
        snprintf(err, errlen, "network.%s.dns must be a list of addresses", fam);
        return -1;
    }
    return 0;
}

static int apply_v4(int s, const char *ifname, const struct ipcfg *c) {
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, c->address, &sin->sin_addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) return -1;
    sin->sin_addr.s_addr = c->prefix ? htonl(0xffffffffu << (32 - c->prefix)) : 0;
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) return -1;
    if (if_up(s, ifname) < 0) return -1;
    if (!c->gateway) return 0;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
    ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
    struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
    gw->sin_family = AF_INET;
    inet_pton(AF_INET, c->gateway, &gw->sin_addr);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)ifname;
    if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) return -1;
    return 0;
}

int v6_add_addr(int s, const char *ifname, const struct in6_addr *addr, uint32_t prefix) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) return -1;
    struct v6_ifreq r6 = {.addr = *addr, .prefixlen = prefix, .ifindex = ifr.ifr_ifindex};
    if (ioctl(s, SIOCSIFADDR, &r6) < 0 && errno != EEXIST) return -1;
    return ifr.ifr_ifindex;
}

static int apply_v6(const char *ifname, const struct ipcfg *c) {
    int s = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct in6_addr addr;
    inet_pton(AF_INET6, c->address, &addr);
    int rc = -1;
    int ifindex = v6_add_addr(s, ifname, &addr, (uint32_t)c->prefix);
    if (ifindex < 0) goto out;
    if (c->gateway) {
        struct v6_rtmsg rt;
        memset(&rt, 0, sizeof rt);
        inet_pton(AF_INET6, c->gateway, &rt.gateway);
        rt.flags = RTF_UP | RTF_GATEWAY;
        rt.metric = 1024;
        rt.ifindex = ifindex;
        if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) goto out;
    }
    rc = 0;
out:
    close(s);
    return rc;
}

static int apply_link(int s, const char *ifname, const char *mac, int64_t mtu) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (mac) {
        ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
        parse_mac(mac, (uint8_t *)ifr.ifr_hwaddr.sa_data);
        if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0) return -1;
    }
    if (mtu) {
        ifr.ifr_mtu = (int)mtu;
        if (ioctl(s, SIOCSIFMTU, &ifr) < 0) return -1;
    }
    return if_up(s, ifname);
}

int net_configure(struct agent *a, int64_t net, const char *hostname, char *err, size_t errlen) {
    const struct cbor_doc *d = &a->doc;
    char *ifname = NULL, *mac = NULL;
    int64_t mtu = 0;
    struct ipcfg v4 = {0}, v6 = {0};
    struct buf dns = {0}, hosts = {0};
    int rc = -1, s = -1;
    uint8_t macb[6];
    if (hostname && !valid_name(hostname, 63)) {
        snprintf(err, errlen, "hostname \"%.64s\" is invalid (1-63 of [A-Za-z0-9._-])", hostname);
        return -1;
    }
    bool have_net = net >= 0 && d->items[net].type != CB_NULL;
    if (have_net) {
        if (d->items[net].type != CB_MAP) { snprintf(err, errlen, "\"network\" must be a map or null"); goto out; }
        int r = cbor_get_str(d, net, "interface", &ifname);
        if (r < 0 || (r == 0 && !valid_name(ifname, IFNAMSIZ - 1))) {
            snprintf(err, errlen, "network.interface \"%.32s\" is not an interface name", ifname ? ifname : "");
            goto out;
        }
        r = cbor_get_str(d, net, "mac", &mac);
        if (r < 0 || (r == 0 && parse_mac(mac, macb) < 0)) {
            snprintf(err, errlen, "network.mac \"%.32s\" is not aa:bb:cc:dd:ee:ff", mac ? mac : "");
            goto out;
        }
        r = cbor_get_int(d, net, "mtu", &mtu);
        if (r < 0 || (r == 0 && (mtu < 576 || mtu > 65535))) {
            snprintf(err, errlen, "network.mtu must be 576..65535");
            goto out;
        }
        if (parse_ip(d, cbor_map_get(d, net, "ipv4"), AF_INET, &v4, &dns, err, errlen) < 0 ||
            parse_ip(d, cbor_map_get(d, net, "ipv6"), AF_INET6, &v6, &dns, err, errlen) < 0)
            goto out;
    }
    const char *ifn = ifname ? ifname : "eth0";
    static const char base_hosts[] = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
    buf_put(&hosts, base_hosts, sizeof base_hosts - 1);
    if (hostname) {
        buf_put(&hosts, "127.0.1.1\t", 10);
        buf_put(&hosts, hostname, strlen(hostname));
        buf_put(&hosts, "\n", 1);
    }
    int64_t hm = have_net ? cbor_map_get(d, net, "hosts") : -1;
    if (hm >= 0 && d->items[hm].type == CB_MAP) {
        uint32_t c = (uint32_t)hm + 1;
        for (uint32_t k = 0; k < d->items[hm].count; k++) {
            const struct cbor_item *key = &d->items[c], *val = &d->items[key->end];
            c = val->end;
            char *name = cbor_strdup(key), *ip = cbor_strdup(val);
            uint8_t tmp[16];
            if (!name || !ip || !valid_name(name, 253) ||
                (inet_pton(AF_INET, ip, tmp) != 1 && inet_pton(AF_INET6, ip, tmp) != 1)) {
                snprintf(err, errlen, "network.hosts entry \"%.64s\" -> \"%.64s\" is not name -> IP address",
                         name ? name : "", ip ? ip : "");
                free(name); free(ip);
                goto out;
            }
            buf_put(&hosts, ip, strlen(ip));
            buf_put(&hosts, "\t", 1);
            buf_put(&hosts, name, strlen(name));
            buf_put(&hosts, "\n", 1);
            free(name); free(ip);
        }
    } else if (hm >= 0 && d->items[hm].type != CB_NULL) {
        snprintf(err, errlen, "network.hosts must be a map of name -> address");
        goto out;
    }
    if (!a->host_mode) {
        s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s < 0 || if_up(s, "lo") < 0) { snprintf(err, errlen, "bringing up lo: %s", strerror(errno)); goto out; }
        if (hostname && sethostname(hostname, strlen(hostname)) < 0) {
            snprintf(err, errlen, "sethostname \"%s\": %s", hostname, strerror(errno));
            goto out;
        }
        if (have_net && apply_link(s, ifn, mac, mtu) < 0) {
            snprintf(err, errlen, "configuring %s (mac/mtu/up): %s", ifn, strerror(errno));
            goto out;
        }
        if (v4.present && apply_v4(s, ifn, &v4) < 0) {
            snprintf(err, errlen, "configuring %s ipv4 %s/%lld: %s", ifn, v4.address, (long long)v4.prefix,
                     strerror(errno));
            goto out;
        }
        if (v6.present && apply_v6(ifn, &v6) < 0) {
            snprintf(err, errlen, "configuring %s ipv6 %s/%lld: %s", ifn, v6.address, (long long)v6.prefix,
                     strerror(errno));
            goto out;
        }
    }
    if (dns.oom || hosts.oom) { snprintf(err, errlen, "out of memory"); goto out; }
    if ((hostname || have_net) && write_file_at(a, "/etc/hosts", (char *)hosts.p, hosts.len, false) < 0) {
        snprintf(err, errlen, "writing /etc/hosts: %s", strerror(errno));
        goto out;
    }
    if (hostname) {
        char line[80];
        int n = snprintf(line, sizeof line, "%s\n", hostname);
        if (write_file_at(a, "/etc/hostname", line, (size_t)n, false) < 0) {
            snprintf(err, errlen, "writing /etc/hostname: %s", strerror(errno));
            goto out;
        }
    }
    if (dns.len && write_file_at(a, "/etc/resolv.conf", (char *)dns.p, dns.len, false) < 0) {
        snprintf(err, errlen, "writing /etc/resolv.conf: %s", strerror(errno));
        goto out;
    }
    rc = 0;
out:
    if (s >= 0) close(s);
    free(ifname); free(mac);
    free(v4.address); free(v4.gateway); free(v6.address); free(v6.gateway);
    buf_free(&dns);
    buf_free(&hosts);
    return rc;
}
