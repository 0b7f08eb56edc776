/* The kernel's IPv6 ioctl layouts (linux/ipv6.h struct in6_ifreq, linux/ipv6_route.h
 * struct in6_rtmsg) for SIOCSIFADDR/SIOCDIFADDR and SIOCADDRT/SIOCDELRT on an AF_INET6
 * socket. Declared here because musl ships no kernel headers and linux/ipv6.h clashes
 * with <netinet/in.h>; include <netinet/in.h> first. Used by net.c (boot-time setup)
 * and reconfig.c (re-addressing after a restore). */
#ifndef MICROVM_KERNEL_IPV6_H
#define MICROVM_KERNEL_IPV6_H

#include <stdint.h>

struct v6_ifreq {
    struct in6_addr addr;
    uint32_t prefixlen;
    int ifindex;
};

struct v6_rtmsg {
    struct in6_addr dst, src, gateway;
    uint32_t type;
    uint16_t dst_len, src_len;
    uint32_t metric;
    unsigned long info;
    uint32_t flags;
    int ifindex;
};

#endif
