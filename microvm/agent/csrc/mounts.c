/* PID-1 duties: early mounts, the root mount plan and pivot, virtio-fs shares,
 * CA certificates, the agent channel lookup, and sysroot-aware file writes. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static int mnt(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY) {
        dprintf(2, "microvm-agent: mount %s on %s (%s): %s\n", src, dst, type, strerror(errno));
        return -1;
    }
    return 0;
}

int mounts_early(void) {
    int rc = 0;
    rc |= mnt("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    rc |= mnt("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    rc |= mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    rc |= mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
    rc |= mnt("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    rc |= mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    rc |= mnt("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    rc |= mnt("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    if (fcntl(1, F_GETFD) < 0 || fcntl(2, F_GETFD) < 0) {
        int fd = open("/dev/console", O_RDWR | O_NOCTTY);
        if (fd >= 0) {
            for (int i = 0; i < 3; i++)
                if (fcntl(i, F_GETFD) < 0) dup2(fd, i);
            if (fd > 2) close(fd);
        }
    }
    return rc ? -1 : 0;
}

int find_channel(char *path, size_t len) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *de;
    int rc = -1;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[300], name[64] = "";
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0) continue;
        name[n] = 0;
        if (name[n - 1] == '\n') name[n - 1] = 0;
        if (!strcmp(name, "agent")) {
            snprintf(path, len, "/dev/%s", de->d_name);
            rc = 0;
            break;
        }
    }
    closedir(d);
    return rc;
}

int write_file_at(const struct agent *a, const char *path, const char *data, size_t n, bool append) {
    char full[PATH_MAX], tmp[PATH_MAX + 16];
    if (a->host_mode && !a->sysroot) return 0; /* never touch the host's own files */
    if (snprintf(full, sizeof full, "%s%s", a->host_mode ? a->sysroot : "", path) >= (int)sizeof full) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *slash = strrchr(full, '/');
    if (slash && slash != full) {
        *slash = 0;
        int rc = mkdir_p(full, 0755);
        *slash = '/';
        if (rc < 0) return -1;
    }
    const char *target = full;
    if (!append) {
        snprintf(tmp, sizeof tmp, "%s.microvm-tmp", full);
        target = tmp;
    }
    int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) return -1;
    while (n) {
        ssize_t w = write(fd, data, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { int e = errno; close(fd); errno = e; return -1; }
        data += w;
        n -= (size_t)w;
    }
    if (close(fd) < 0) return -1;
    if (!append && rename(tmp, full) < 0) return -1;
    return 0;
}

static int file_exists(const struct agent *a, const char *path) {
    char full[PATH_MAX];
    snprintf(full, sizeof full, "%s%s", a->host_mode && a->sysroot ? a->sysroot : "", path);
    return access(full, F_OK) == 0;
}

int install_ca_certs(struct agent *a, int64_t list, char *err, size_t errlen) {
    static const char *const bundles[] = {"/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                                          "/etc/ssl/cert.pem"};
    const struct cbor_doc *d = &a->doc;
    if (list < 0 || d->items[list].type == CB_NULL) return 0;
    if (d->items[list].type != CB_ARRAY || d->items[list].count > 64) {
        snprintf(err, errlen, "\"ca_certs\" must be a list of at most 64 PEM strings");
        return -1;
    }
    struct buf pem = {0};
    uint32_t c = (uint32_t)list + 1;
    for (uint32_t k = 0; k < d->items[list].count; k++, c = d->items[c].end) {
        const struct cbor_item *it = &d->items[c];
        static const char marker[] = "-----BEGIN CERTIFICATE-----";
        if (it->type != CB_TEXT || it->len > 65536 || !memmem(it->s, it->len, marker, sizeof marker - 1) ||
            memchr(it->s, 0, it->len)) {
            snprintf(err, errlen, "ca_certs[%u] is not a PEM certificate (text with %s, <= 64 KiB)", k, marker);
            buf_free(&pem);
            return -1;
        }
        buf_put(&pem, "\n", 1);
        buf_put(&pem, it->s, it->len);
        if (it->len && it->s[it->len - 1] != '\n') buf_put(&pem, "\n", 1);
    }
    if (pem.oom) { snprintf(err, errlen, "out of memory"); buf_free(&pem); return -1; }
    if (!pem.len) return 0;
    int rc = write_file_at(a, "/usr/local/share/ca-certificates/microvm.crt", (char *)pem.p + 1, pem.len - 1, false);
    bool any = false;
    for (size_t i = 0; rc == 0 && i < sizeof bundles / sizeof bundles[0]; i++) {
        if (!file_exists(a, bundles[i])) continue;
        any = true;
        rc = write_file_at(a, bundles[i], (char *)pem.p, pem.len, true);
    }
    if (rc == 0 && !any) rc = write_file_at(a, bundles[0], (char *)pem.p + 1, pem.len - 1, false);
    buf_free(&pem);
    if (rc < 0) {
        snprintf(err, errlen, "installing CA certificates: %s", strerror(errno));
        return -1;
    }
    env_set(&a->env, &a->env_n, "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt");
    env_set(&a->env, &a->env_n, "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt");
    env_set(&a->env, &a->env_n, "NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/microvm.crt");
    return 0;
}

/* Text field of a map as a heap string, with a type error message. */
static int need_str(const struct cbor_doc *d, int64_t m, const char *key, char **out, const char *what, char *err,
                    size_t errlen) {
    if (cbor_get_str(d, m, key, out) != 0 || !**out) {
        snprintf(err, errlen, "%s needs a non-empty text \"%s\"", what, key);
        free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

static int checked_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data,
                         char *err, size_t errlen) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", dst);
    mkdir_p(tmp, 0755);
    if (mount(src, dst, type, flags, data) < 0) {
        snprintf(err, errlen, "mount %s on %s (%s): %s", src, dst, type, strerror(errno));
        return -1;
    }
    return 0;
}

static int switch_root(const char *newroot, char *err, size_t errlen) {
    static const char *const moves[] = {"/proc", "/sys", "/dev", "/tmp", "/run"};
    char dst[PATH_MAX];
    for (size_t i = 0; i < sizeof moves / sizeof moves[0]; i++) {
        snprintf(dst, sizeof dst, "%s%s", newroot, moves[i]);
        mkdir(dst, 0755);
        if (mount(moves[i], dst, NULL, MS_MOVE, NULL) < 0)
            dprintf(2, "microvm-agent: moving %s: %s\n", moves[i], strerror(errno));
    }
    if (chdir(newroot) < 0 || mount(newroot, "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0) {
        snprintf(err, errlen, "switching root to %s: %s", newroot, strerror(errno));
        return -1;
    }
    return 0;
}

int mounts_root(struct agent *a, int64_t plan, char *err, size_t errlen) {
    const struct cbor_doc *d = &a->doc;
    char *kind = NULL, *dev = NULL, *fstype = NULL, *upperdir = NULL, *workdir = NULL;
    int rc = -1;
    if (plan < 0 || d->items[plan].type == CB_NULL) return 0;
    if (need_str(d, plan, "kind", &kind, "root", err, errlen) < 0) return -1;
    if (!strcmp(kind, "disk")) {
        bool ro = false;
        if (need_str(d, plan, "device", &dev, "root disk", err, errlen) < 0 ||
            need_str(d, plan, "fstype", &fstype, "root disk", err, errlen) < 0)
            goto out;
        cbor_get_bool(d, plan, "readonly", &ro);
        if (checked_mount(dev, "/.microvm/root", fstype, ro ? MS_RDONLY : 0, NULL, err, errlen) < 0) goto out;
    } else if (!strcmp(kind, "overlay")) {
        int64_t lower = cbor_map_get(d, plan, "lower"), upper = cbor_map_get(d, plan, "upper");
        if (lower < 0 || d->items[lower].type != CB_ARRAY || d->items[lower].count < 1 ||
            d->items[lower].count > 64 || upper < 0 || d->items[upper].type != CB_MAP) {
            snprintf(err, errlen, "overlay root needs \"lower\" (1..64 disks, top-most first) and \"upper\" (map)");
            goto out;
        }
        struct buf opts = {0};
        buf_put(&opts, "lowerdir=", 9);
        uint32_t c = (uint32_t)lower + 1;
        for (uint32_t k = 0; k < d->items[lower].count; k++, c = d->items[c].end) {
            char dir[64];
            if (need_str(d, c, "device", &dev, "overlay lower", err, errlen) < 0 ||
                need_str(d, c, "fstype", &fstype, "overlay lower", err, errlen) < 0) {
                buf_free(&opts);
                goto out;
            }
            snprintf(dir, sizeof dir, "/.microvm/lower/%u", k);
            if (checked_mount(dev, dir, fstype, MS_RDONLY, NULL, err, errlen) < 0) { buf_free(&opts); goto out; }
            if (k) buf_put(&opts, ":", 1);
            buf_put(&opts, dir, strlen(dir));
            free(dev); free(fstype);
            dev = fstype = NULL;
        }
        if (need_str(d, upper, "device", &dev, "overlay upper", err, errlen) < 0 ||
            need_str(d, upper, "fstype", &fstype, "overlay upper", err, errlen) < 0) {
            buf_free(&opts);
            goto out;
        }
        if (cbor_get_str(d, upper, "upperdir", &upperdir) < 0 || cbor_get_str(d, upper, "workdir", &workdir) < 0 ||
            (upperdir && (upperdir[0] != '/' || strstr(upperdir, ".."))) ||
            (workdir && (workdir[0] != '/' || strstr(workdir, "..")))) {
            snprintf(err, errlen, "overlay upper \"upperdir\"/\"workdir\" must be absolute paths without \"..\"");
            buf_free(&opts);
            goto out;
        }
        if (checked_mount(dev, "/.microvm/upper", fstype, 0, NULL, err, errlen) < 0) { buf_free(&opts); goto out; }
        char ud[PATH_MAX], wd[PATH_MAX];
        snprintf(ud, sizeof ud, "/.microvm/upper%s", upperdir ? upperdir : "/upper");
        snprintf(wd, sizeof wd, "/.microvm/upper%s", workdir ? workdir : "/work");
        mkdir_p(ud, 0755);
        mkdir_p(wd, 0755);
        buf_put(&opts, ",upperdir=", 10);
        buf_put(&opts, ud, strlen(ud));
        buf_put(&opts, ",workdir=", 9);
        buf_put(&opts, wd, strlen(wd) + 1);
        if (opts.oom) { snprintf(err, errlen, "out of memory"); buf_free(&opts); goto out; }
        int m = checked_mount("overlay", "/.microvm/root", "overlay", 0, (char *)opts.p, err, errlen);
        buf_free(&opts);
        if (m < 0) goto out;
    } else if (!strcmp(kind, "virtiofs")) {
        bool ro = false;
        if (need_str(d, plan, "tag", &dev, "virtiofs root", err, errlen) < 0) goto out;
        cbor_get_bool(d, plan, "readonly", &ro);
        if (checked_mount(dev, "/.microvm/root", "virtiofs", ro ? MS_RDONLY : 0, NULL, err, errlen) < 0) goto out;
    } else {
        snprintf(err, errlen, "unknown root kind \"%.32s\" (allowed: overlay, disk, virtiofs, or null)", kind);
        goto out;
    }
    rc = switch_root("/.microvm/root", err, errlen); /* submounts (pts, shm, cgroup) move along */
out:
    free(kind); free(dev); free(fstype); free(upperdir); free(workdir);
    return rc;
}

int mounts_shares(struct agent *a, int64_t list, char *err, size_t errlen) {
    const struct cbor_doc *d = &a->doc;
    if (list < 0 || d->items[list].type == CB_NULL) return 0;
    if (d->items[list].type != CB_ARRAY) {
        snprintf(err, errlen, "\"mounts\" must be a list of {tag, path, readonly}");
        return -1;
    }
    uint32_t c = (uint32_t)list + 1;
    for (uint32_t k = 0; k < d->items[list].count; k++, c = d->items[c].end) {
        char *tag = NULL, *path = NULL;
        bool ro = false;
        if (need_str(d, c, "tag", &tag, "mount", err, errlen) < 0 ||
            need_str(d, c, "path", &path, "mount", err, errlen) < 0 || path[0] != '/' ||
            cbor_get_bool(d, c, "readonly", &ro) < 0) {
            if (path && path[0] != '/') snprintf(err, errlen, "mount path \"%.200s\" must be absolute", path);
            free(tag); free(path);
            return -1;
        }
        int rc = checked_mount(tag, path, "virtiofs", ro ? MS_RDONLY : 0, NULL, err, errlen);
        free(tag); free(path);
        if (rc < 0) return -1;
    }
    return 0;
}
