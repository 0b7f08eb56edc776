/* Test double for libkrun.so.1: exports the krun_* subset microvm binds, records every call
 * (function, arguments, NULL-terminated arrays, fd kinds) as JSON lines in $KRUN_DOUBLE_LOG,
 * fails a chosen call with $KRUN_DOUBLE_FAIL="krun_fn=ERRNO", reports features listed in
 * $KRUN_DOUBLE_FEATURES ("0,1"), and on krun_start_enter plays a tiny guest: it writes a banner
 * to the console port, echoes bytes on the "agent" port until it reads "exit N\n", then _exit(N).
 * Build: cc -shared -fPIC -o libkrun.so.1 krun_double.c [-DNO_BLK] */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static uint32_t next_ctx = 1;
static int agent_in = -1, agent_out = -1, console_out = -1;

static void jstr(FILE *f, const char *s) {
    if (!s) { fputs("null", f); return; }
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void jarr(FILE *f, const char *const a[]) {
    if (!a) { fputs("null", f); return; }
    fputc('[', f);
    for (int i = 0; a[i]; i++) { if (i) fputc(',', f); jstr(f, a[i]); }
    fputc(']', f);
}

static const char *fdkind(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return "bad";
    if (S_ISSOCK(st.st_mode)) return "sock";
    if (S_ISREG(st.st_mode)) return "file";
    if (S_ISCHR(st.st_mode)) return "chr";
    if (S_ISFIFO(st.st_mode)) return "fifo";
    return "other";
}

static FILE *logf_open(void) {
    const char *p = getenv("KRUN_DOUBLE_LOG");
    return p ? fopen(p, "a") : NULL;
}

/* returns the injected -errno for fn, or 0 */
static int injected(const char *fn) {
    const char *spec = getenv("KRUN_DOUBLE_FAIL");
    size_t n = strlen(fn);
    if (!spec) return 0;
    if (strncmp(spec, fn, n) == 0 && spec[n] == '=') return -atoi(spec + n + 1);
    return 0;
}

#define BEGIN(fn) FILE *f = logf_open(); if (f) { fprintf(f, "{\"fn\":\"%s\",\"args\":[", fn); }
#define END(fn) int rc__ = injected(fn); if (f) { fprintf(f, "],\"rc\":%d}\n", rc__); fclose(f); } \
    if (rc__) return rc__;

int32_t krun_set_log_level(uint32_t level) { BEGIN("krun_set_log_level") if (f) fprintf(f, "%u", level); END("krun_set_log_level") return 0; }

int32_t krun_has_feature(uint64_t feature) {
    const char *feats = getenv("KRUN_DOUBLE_FEATURES");
    if (feature > 63) return -EINVAL;
    if (!feats) return 0;
    char buf[256]; snprintf(buf, sizeof buf, "%s", feats);
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) if ((uint64_t)atoll(t) == feature) return 1;
    return 0;
}

int32_t krun_create_ctx(void) { BEGIN("krun_create_ctx") END("krun_create_ctx") return (int32_t)next_ctx++; }
int32_t krun_free_ctx(uint32_t c) { BEGIN("krun_free_ctx") if (f) fprintf(f, "%u", c); END("krun_free_ctx") return 0; }

int32_t krun_set_vm_config(uint32_t c, uint8_t vcpus, uint32_t ram) {
    BEGIN("krun_set_vm_config") if (f) fprintf(f, "%u,%u,%u", c, vcpus, ram); END("krun_set_vm_config")
    if (vcpus == 0 || ram == 0) return -EINVAL;
    return 0;
}

int32_t krun_set_root(uint32_t c, const char *p) { BEGIN("krun_set_root") if (f) { fprintf(f, "%u,", c); jstr(f, p); } END("krun_set_root") return 0; }

#ifndef NO_BLK
int32_t krun_add_disk(uint32_t c, const char *id, const char *path, bool ro) {
    BEGIN("krun_add_disk") if (f) { fprintf(f, "%u,", c); jstr(f, id); fputc(',', f); jstr(f, path); fprintf(f, ",%s", ro ? "true" : "false"); }
    END("krun_add_disk") return 0;
}
int32_t krun_set_root_disk_remount(uint32_t c, const char *dev, const char *fstype, const char *opts) {
    BEGIN("krun_set_root_disk_remount") if (f) { fprintf(f, "%u,", c); jstr(f, dev); fputc(',', f); jstr(f, fstype); fputc(',', f); jstr(f, opts); }
    END("krun_set_root_disk_remount") return 0;
}
#endif

int32_t krun_add_virtiofs(uint32_t c, const char *tag, const char *path) {
    BEGIN("krun_add_virtiofs") if (f) { fprintf(f, "%u,", c); jstr(f, tag); fputc(',', f); jstr(f, path); } END("krun_add_virtiofs") return 0;
}

int32_t krun_set_exec(uint32_t c, const char *path, const char *const argv[], const char *const envp[]) {
    BEGIN("krun_set_exec") if (f) { fprintf(f, "%u,", c); jstr(f, path); fputc(',', f); jarr(f, argv); fputc(',', f); jarr(f, envp); }
    END("krun_set_exec") return 0;
}
int32_t krun_set_env(uint32_t c, const char *const envp[]) { BEGIN("krun_set_env") if (f) { fprintf(f, "%u,", c); jarr(f, envp); } END("krun_set_env") return 0; }
int32_t krun_set_workdir(uint32_t c, const char *p) { BEGIN("krun_set_workdir") if (f) { fprintf(f, "%u,", c); jstr(f, p); } END("krun_set_workdir") return 0; }
int32_t krun_set_rlimits(uint32_t c, const char *const r[]) { BEGIN("krun_set_rlimits") if (f) { fprintf(f, "%u,", c); jarr(f, r); } END("krun_set_rlimits") return 0; }

int32_t krun_add_net_unixstream(uint32_t c, const char *path, int fd, uint8_t *const mac, uint32_t features, uint32_t flags) {
    BEGIN("krun_add_net_unixstream")
    if (f) {
        fprintf(f, "%u,", c); jstr(f, path);
        fprintf(f, ",%d,\"%02x:%02x:%02x:%02x:%02x:%02x\",%u,%u", fd, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], features, flags);
    }
    END("krun_add_net_unixstream")
    if ((path == NULL) == (fd < 0)) return -EINVAL;
    return 0;
}

int32_t krun_add_net_tap(uint32_t c, char *name, uint8_t *const mac, uint32_t features, uint32_t flags) {
    BEGIN("krun_add_net_tap")
    if (f) {
        fprintf(f, "%u,", c); jstr(f, name);
        fprintf(f, ",\"%02x:%02x:%02x:%02x:%02x:%02x\",%u,%u", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], features, flags);
    }
    END("krun_add_net_tap") return 0;
}

int32_t krun_disable_implicit_console(uint32_t c) { BEGIN("krun_disable_implicit_console") if (f) fprintf(f, "%u", c); END("krun_disable_implicit_console") return 0; }
int32_t krun_disable_implicit_vsock(uint32_t c) { BEGIN("krun_disable_implicit_vsock") if (f) fprintf(f, "%u", c); END("krun_disable_implicit_vsock") return 0; }
int32_t krun_add_virtio_console_multiport(uint32_t c) { BEGIN("krun_add_virtio_console_multiport") if (f) fprintf(f, "%u", c); END("krun_add_virtio_console_multiport") return 7; }

int32_t krun_add_console_port_inout(uint32_t c, uint32_t cid, const char *name, int in_fd, int out_fd) {
    BEGIN("krun_add_console_port_inout")
    if (f) { fprintf(f, "%u,%u,", c, cid); jstr(f, name); fprintf(f, ",\"%s\",\"%s\"", fdkind(in_fd), fdkind(out_fd)); }
    END("krun_add_console_port_inout")
    if (name && strcmp(name, "agent") == 0) { agent_in = in_fd; agent_out = out_fd; }
    else if (console_out < 0) console_out = out_fd;
    return 0;
}

int32_t krun_set_kernel_console(uint32_t c, const char *id) { BEGIN("krun_set_kernel_console") if (f) { fprintf(f, "%u,", c); jstr(f, id); } END("krun_set_kernel_console") return 0; }
int32_t krun_set_console_output(uint32_t c, const char *p) { BEGIN("krun_set_console_output") if (f) { fprintf(f, "%u,", c); jstr(f, p); } END("krun_set_console_output") return 0; }

int32_t krun_start_enter(uint32_t c) {
    BEGIN("krun_start_enter") if (f) fprintf(f, "%u", c); END("krun_start_enter")
    if (console_out >= 0) { const char b[] = "krun-double: guest up\n"; if (write(console_out, b, sizeof b - 1) < 0) _exit(99); }
    if (agent_in < 0) _exit(98);
    char line[4096]; size_t n = 0;
    for (;;) {
        ssize_t r = read(agent_in, line + n, sizeof line - 1 - n);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; _exit(97); }
        if (write(agent_out, line + n, (size_t)r) != r) _exit(96);
        n += (size_t)r; line[n] = 0;
        char *e = strstr(line, "exit ");
        if (e && strchr(e, '\n')) _exit(atoi(e + 5));
        if (n > sizeof line / 2) n = 0;
    }
}
