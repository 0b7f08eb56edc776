/* core.metrics.request -> core.metrics.response: cpu, memory, disk, net counters. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "agent.h"

static size_t read_small(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { buf[0] = 0; return 0; }
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    return n;
}

static void put_cpu(struct buf *b, const char *stat) {
    static const char *const names[] = {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"};
    unsigned long long v[8] = {0};
    int ncpu = 0;
    sscanf(stat, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
           &v[6], &v[7]);
    for (const char *l = stat; (l = strstr(l, "\ncpu")); l++) ncpu++;
    cbor_put_map(b, 10);
    for (int i = 0; i < 8; i++) {
        cbor_put_text(b, names[i]);
        cbor_put_uint(b, v[i]);
    }
    cbor_put_text(b, "ncpu");
    cbor_put_int(b, ncpu);
    cbor_put_text(b, "ticks_per_second");
    cbor_put_int(b, sysconf(_SC_CLK_TCK));
}

static unsigned long long meminfo(const char *mi, const char *key) {
    const char *p = strstr(mi, key);
    unsigned long long kb = 0;
    if (p) sscanf(p + strlen(key), ": %llu", &kb);
    return kb * 1024;
}

static void put_net(struct buf *b, char *dev) {
    size_t pos = cbor_put_map_open(b);
    uint32_t n = 0;
    char *save = NULL;
    int line = 0;
    for (char *l = strtok_r(dev, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        if (line++ < 2) continue;
        char *colon = strchr(l, ':');
        if (!colon) continue;
        *colon = 0;
        while (*l == ' ') l++;
        unsigned long long rb = 0, rp = 0, re = 0, rd = 0, tb = 0, tp = 0, te = 0, td = 0, x;
        if (sscanf(colon + 1, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &rb, &rp, &re, &rd,
                   &x, &x, &x, &x, &tb, &tp, &te, &td) < 12)
            continue;
        cbor_put_text(b, l);
        cbor_put_map(b, 6);
        cbor_put_text(b, "rx_bytes"); cbor_put_uint(b, rb);
        cbor_put_text(b, "rx_packets"); cbor_put_uint(b, rp);
        cbor_put_text(b, "rx_errors"); cbor_put_uint(b, re);
        cbor_put_text(b, "tx_bytes"); cbor_put_uint(b, tb);
        cbor_put_text(b, "tx_packets"); cbor_put_uint(b, tp);
        cbor_put_text(b, "tx_errors"); cbor_put_uint(b, te);
        n++;
    }
    cbor_patch_count(b, pos, n);
}

void metrics_request(struct agent *a, uint32_t id) {
    char *tmp = malloc(65536);
    if (!tmp) { send_error(a, id, "internal", "out of memory"); return; }
    struct buf *b = &a->out;
    frame_begin(b, "core.metrics.response");
    cbor_put_map(b, 6);
    read_small("/proc/uptime", tmp, 65536);
    cbor_put_text(b, "uptime_ms");
    cbor_put_int(b, (int64_t)(strtod(tmp, NULL) * 1000));
    read_small("/proc/loadavg", tmp, 65536);
    double l1 = 0, l5 = 0, l15 = 0;
    sscanf(tmp, "%lf %lf %lf", &l1, &l5, &l15);
    cbor_put_text(b, "load");
    cbor_put_array(b, 3);
    cbor_put_double(b, l1);
    cbor_put_double(b, l5);
    cbor_put_double(b, l15);
    read_small("/proc/stat", tmp, 65536);
    cbor_put_text(b, "cpu");
    put_cpu(b, tmp);
    read_small("/proc/meminfo", tmp, 65536);
    cbor_put_text(b, "memory");
    cbor_put_map(b, 5);
    cbor_put_text(b, "total"); cbor_put_uint(b, meminfo(tmp, "MemTotal"));
    cbor_put_text(b, "free"); cbor_put_uint(b, meminfo(tmp, "MemFree"));
    cbor_put_text(b, "available"); cbor_put_uint(b, meminfo(tmp, "MemAvailable"));
    cbor_put_text(b, "buffers"); cbor_put_uint(b, meminfo(tmp, "Buffers"));
    cbor_put_text(b, "cached"); cbor_put_uint(b, meminfo(tmp, "Cached"));
    struct statvfs vfs;
    cbor_put_text(b, "disk");
    if (statvfs("/", &vfs) == 0) {
        cbor_put_map(b, 3);
        cbor_put_text(b, "total"); cbor_put_uint(b, (uint64_t)vfs.f_blocks * vfs.f_frsize);
        cbor_put_text(b, "free"); cbor_put_uint(b, (uint64_t)vfs.f_bfree * vfs.f_frsize);
        cbor_put_text(b, "available"); cbor_put_uint(b, (uint64_t)vfs.f_bavail * vfs.f_frsize);
    } else {
        cbor_put_null(b);
    }
    read_small("/proc/net/dev", tmp, 65536);
    cbor_put_text(b, "net");
    put_net(b, tmp);
    free(tmp);
    agent_send(a, id, FLAG_TERMINAL);
}
