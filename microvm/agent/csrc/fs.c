/* File operations: streamed read/write, list, stat, mkdir, remove, rename, copy.
 * Replies are core.fs.response {"ok": true, ...} or {"ok": false, errno, errno_name, message}. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define FS_MAX_DEPTH 128

static void fs_fail(struct agent *a, uint32_t id, const char *op, const char *path, int err) {
    char msg[PATH_MAX + 96];
    snprintf(msg, sizeof msg, "%s \"%s\": %s", op, path ? path : "", strerror(err));
    frame_begin(&a->out, "core.fs.response");
    cbor_put_map(&a->out, 4);
    cbor_put_text(&a->out, "ok");
    cbor_put_bool(&a->out, false);
    cbor_put_text(&a->out, "errno");
    cbor_put_int(&a->out, err);
    cbor_put_text(&a->out, "errno_name");
    cbor_put_text(&a->out, errno_name(err));
    cbor_put_text(&a->out, "message");
    cbor_put_text_lossy(&a->out, msg);
    agent_send(a, id, FLAG_TERMINAL);
}

static void fs_ok(struct agent *a, uint32_t id) {
    frame_begin(&a->out, "core.fs.response");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "ok");
    cbor_put_bool(&a->out, true);
    agent_send(a, id, FLAG_TERMINAL);
}

static const char *type_name(mode_t m) {
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "dir";
    if (S_ISLNK(m)) return "symlink";
    return "other";
}

static void put_stat(struct buf *b, const struct stat *st) {
    cbor_put_text(b, "type"); cbor_put_text(b, type_name(st->st_mode));
    cbor_put_text(b, "size"); cbor_put_int(b, st->st_size);
    cbor_put_text(b, "mode"); cbor_put_int(b, st->st_mode & 07777);
    cbor_put_text(b, "uid"); cbor_put_int(b, st->st_uid);
    cbor_put_text(b, "gid"); cbor_put_int(b, st->st_gid);
    cbor_put_text(b, "mtime_ns");
    cbor_put_int(b, (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec);
}

static int write_all_fd(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void op_read(struct agent *a, uint32_t id, const char *path, int64_t p) {
    int64_t offset = 0, length = -1;
    if (cbor_get_int(&a->doc, p, "offset", &offset) < 0 || offset < 0 ||
        cbor_get_int(&a->doc, p, "length", &length) < 0) {
        send_error(a, id, "bad_request", "read: \"offset\" must be >= 0 and \"length\" an integer");
        return;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { fs_fail(a, id, "read", path, errno); return; }
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) { close(fd); fs_fail(a, id, "read", path, EISDIR); return; }
    uint8_t *chunk = malloc(FS_CHUNK);
    if (!chunk) { close(fd); fs_fail(a, id, "read", path, ENOMEM); return; }
    uint64_t total = 0;
    for (;;) {
        size_t want = FS_CHUNK;
        if (length >= 0 && (uint64_t)length - total < want) want = (size_t)((uint64_t)length - total);
        if (!want) break;
        ssize_t r = pread(fd, chunk, want, (off_t)(offset + (int64_t)total));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { int e = errno; free(chunk); close(fd); fs_fail(a, id, "read", path, e); return; }
        if (r == 0) break;
        frame_begin(&a->out, "core.fs.data");
        cbor_put_map(&a->out, 1);
        cbor_put_text(&a->out, "data");
        cbor_put_bytes(&a->out, chunk, (size_t)r);
        agent_send(a, id, 0);
        total += (uint64_t)r;
        if (!a->connected) break;
    }
    free(chunk);
    close(fd);
    frame_begin(&a->out, "core.fs.response");
    cbor_put_map(&a->out, 2);
    cbor_put_text(&a->out, "ok");
    cbor_put_bool(&a->out, true);
    cbor_put_text(&a->out, "size");
    cbor_put_int(&a->out, (int64_t)total);
    agent_send(a, id, FLAG_TERMINAL);
}

int mkdir_p(char *path, mode_t mode) {
    for (char *c = path + 1; *c; c++) {
        if (*c != '/') continue;
        *c = 0;
        int rc = mkdir(path, mode);
        *c = '/';
        if (rc < 0 && errno != EEXIST) return -1;
    }
    if (mkdir(path, mode) < 0 && errno != EEXIST) return -1;
    struct stat st;
    if (stat(path, &st) < 0) return -1;
    if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; return -1; }
    return 0;
}

static void finish_write(struct agent *a, struct fs_write *w) {
    int rc = close(w->fd);
    if (rc < 0) fs_fail(a, w->id, "write", w->path, errno);
    else {
        frame_begin(&a->out, "core.fs.response");
        cbor_put_map(&a->out, 2);
        cbor_put_text(&a->out, "ok");
        cbor_put_bool(&a->out, true);
        cbor_put_text(&a->out, "size");
        cbor_put_int(&a->out, (int64_t)w->written);
        agent_send(a, w->id, FLAG_TERMINAL);
    }
    free(w->path);
    memset(w, 0, sizeof *w);
}

static void op_write(struct agent *a, uint32_t id, char *path, int64_t p) {
    int64_t mode = 0644;
    bool append = false, mkdirs = false;
    if (cbor_get_int(&a->doc, p, "mode", &mode) < 0 || mode < 0 || mode > 07777 ||
        cbor_get_bool(&a->doc, p, "append", &append) < 0 || cbor_get_bool(&a->doc, p, "mkdirs", &mkdirs) < 0) {
        send_error(a, id, "bad_request", "write: \"mode\" must be 0..0o7777, \"append\"/\"mkdirs\" booleans");
        return;
    }
    int64_t data = cbor_map_get(&a->doc, p, "data");
    if (data >= 0 && a->doc.items[data].type != CB_BYTES && a->doc.items[data].type != CB_NULL) {
        send_error(a, id, "bad_request", "write: \"data\" must be bytes");
        return;
    }
    struct fs_write *w = NULL;
    for (int i = 0; i < MAX_WRITES; i++) {
        if (a->writes[i].used && a->writes[i].id == id) {
            send_error(a, id, "bad_request", "write: request id already has an open write");
            return;
        }
        if (!w && !a->writes[i].used) w = &a->writes[i];
    }
    if (!w) { fs_fail(a, id, "write", path, EMFILE); return; }
    if (mkdirs) {
        char *slash = strrchr(path, '/');
        if (slash && slash != path) {
            *slash = 0;
            int rc = mkdir_p(path, 0755);
            *slash = '/';
            if (rc < 0) { fs_fail(a, id, "write (mkdirs)", path, errno); return; }
        }
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), (mode_t)mode);
    if (fd < 0) { fs_fail(a, id, "write", path, errno); return; }
    w->used = true;
    w->id = id;
    w->fd = fd;
    w->written = 0;
    w->path = strdup(path);
    if (data >= 0 && a->doc.items[data].type == CB_BYTES) {
        const struct cbor_item *it = &a->doc.items[data];
        if (write_all_fd(fd, it->s, it->len) < 0) {
            int e = errno;
            close(fd);
            fs_fail(a, id, "write", path, e);
            free(w->path);
            memset(w, 0, sizeof *w);
            return;
        }
        w->written = it->len;
        finish_write(a, w);
    }
}

void fs_data(struct agent *a, uint32_t id, uint8_t flags, int64_t p) {
    struct fs_write *w = NULL;
    for (int i = 0; i < MAX_WRITES && !w; i++)
        if (a->writes[i].used && a->writes[i].id == id) w = &a->writes[i];
    if (!w) return; /* write already failed and answered: drop the rest */
    int64_t data = cbor_map_get(&a->doc, p, "data");
    if (data < 0 || a->doc.items[data].type != CB_BYTES) {
        close(w->fd);
        free(w->path);
        memset(w, 0, sizeof *w);
        send_error(a, id, "bad_request", "core.fs.data needs \"data\" (bytes)");
        return;
    }
    const struct cbor_item *it = &a->doc.items[data];
    if (it->len && write_all_fd(w->fd, it->s, it->len) < 0) {
        int e = errno;
        close(w->fd);
        fs_fail(a, id, "write", w->path, e);
        free(w->path);
        memset(w, 0, sizeof *w);
        return;
    }
    w->written += it->len;
    if (!it->len || (flags & FLAG_TERMINAL)) finish_write(a, w);
}

void fs_abort_all(struct agent *a) {
    for (int i = 0; i < MAX_WRITES; i++) {
        if (!a->writes[i].used) continue;
        close(a->writes[i].fd);
        free(a->writes[i].path);
        memset(&a->writes[i], 0, sizeof a->writes[i]);
    }
}

static void op_list(struct agent *a, uint32_t id, const char *path) {
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dir = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!dir) { int e = errno; if (dfd >= 0) close(dfd); fs_fail(a, id, "list", path, e); return; }
    frame_begin(&a->out, "core.fs.response");
    cbor_put_map(&a->out, 2);
    cbor_put_text(&a->out, "ok");
    cbor_put_bool(&a->out, true);
    cbor_put_text(&a->out, "entries");
    size_t pos = cbor_put_array_open(&a->out);
    uint32_t n = 0;
    struct dirent *de;
    while ((de = readdir(dir))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        struct stat st;
        if (fstatat(dirfd(dir), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        cbor_put_map(&a->out, 7);
        cbor_put_text(&a->out, "name");
        cbor_put_name(&a->out, de->d_name, strlen(de->d_name));
        put_stat(&a->out, &st);
        n++;
    }
    closedir(dir);
    cbor_patch_count(&a->out, pos, n);
    agent_send(a, id, FLAG_TERMINAL);
}

static void op_stat(struct agent *a, uint32_t id, const char *path, int64_t p) {
    bool follow = true;
    struct stat st;
    cbor_get_bool(&a->doc, p, "follow", &follow);
    if ((follow ? stat(path, &st) : lstat(path, &st)) < 0) { fs_fail(a, id, "stat", path, errno); return; }
    char target[PATH_MAX];
    ssize_t tl = S_ISLNK(st.st_mode) ? readlink(path, target, sizeof target - 1) : -1;
    frame_begin(&a->out, "core.fs.response");
    cbor_put_map(&a->out, tl >= 0 ? 8 : 7);
    cbor_put_text(&a->out, "ok");
    cbor_put_bool(&a->out, true);
    put_stat(&a->out, &st);
    if (tl >= 0) {
        cbor_put_text(&a->out, "target");
        cbor_put_name(&a->out, target, (size_t)tl);
    }
    agent_send(a, id, FLAG_TERMINAL);
}

static int remove_tree_at(int dfd, const char *name, int depth) {
    if (depth > FS_MAX_DEPTH) { errno = ELOOP; return -1; }
    if (unlinkat(dfd, name, 0) == 0) return 0;
    if (errno != EISDIR && errno != EPERM) return -1;
    int sub = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (sub < 0) return -1;
    DIR *dir = fdopendir(sub);
    if (!dir) { close(sub); return -1; }
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(dir))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (remove_tree_at(dirfd(dir), de->d_name, depth + 1) < 0) { rc = -1; break; }
    }
    int e = errno;
    closedir(dir);
    if (rc < 0) { errno = e; return -1; }
    return unlinkat(dfd, name, AT_REMOVEDIR);
}

static void op_remove(struct agent *a, uint32_t id, const char *path, int64_t p) {
    bool recursive = false;
    struct stat st;
    cbor_get_bool(&a->doc, p, "recursive", &recursive);
    if (lstat(path, &st) < 0) { fs_fail(a, id, "remove", path, errno); return; }
    int rc;
    if (!S_ISDIR(st.st_mode)) rc = unlink(path);
    else if (recursive) rc = remove_tree_at(AT_FDCWD, path, 0);
    else rc = rmdir(path);
    if (rc < 0) fs_fail(a, id, "remove", path, errno);
    else fs_ok(a, id);
}

static int copy_file(const char *src, const char *dst, mode_t mode) {
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return -1;
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777);
    if (out < 0) { int e = errno; close(in); errno = e; return -1; }
    uint8_t chunk[IO_CHUNK];
    int rc = 0;
    for (;;) {
        ssize_t r = read(in, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { rc = -1; break; }
        if (r == 0) break;
        if (write_all_fd(out, chunk, (size_t)r) < 0) { rc = -1; break; }
    }
    int e = errno;
    close(in);
    if (close(out) < 0 && rc == 0) { rc = -1; e = errno; }
    if (rc == 0) fchmodat(AT_FDCWD, dst, mode & 07777, 0);
    errno = e;
    return rc;
}

static int copy_tree(const char *src, const char *dst, bool recursive, int depth) {
    struct stat st;
    if (depth > FS_MAX_DEPTH) { errno = ELOOP; return -1; }
    if (lstat(src, &st) < 0) return -1;
    if (S_ISLNK(st.st_mode)) {
        char target[PATH_MAX];
        ssize_t n = readlink(src, target, sizeof target - 1);
        if (n < 0) return -1;
        target[n] = 0;
        return symlink(target, dst);
    }
    if (S_ISREG(st.st_mode)) return copy_file(src, dst, st.st_mode);
    if (!S_ISDIR(st.st_mode)) { errno = EINVAL; return -1; }
    if (!recursive) { errno = EISDIR; return -1; }
    if (mkdir(dst, st.st_mode & 07777) < 0 && errno != EEXIST) return -1;
    DIR *dir = opendir(src);
    if (!dir) return -1;
    struct dirent *de;
    int rc = 0;
    char *s2 = malloc(PATH_MAX), *d2 = malloc(PATH_MAX);
    if (!s2 || !d2) { rc = -1; errno = ENOMEM; }
    while (rc == 0 && (de = readdir(dir))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (snprintf(s2, PATH_MAX, "%s/%s", src, de->d_name) >= PATH_MAX ||
            snprintf(d2, PATH_MAX, "%s/%s", dst, de->d_name) >= PATH_MAX) {
            errno = ENAMETOOLONG;
            rc = -1;
            break;
        }
        rc = copy_tree(s2, d2, true, depth + 1);
    }
    int e = errno;
    free(s2);
    free(d2);
    closedir(dir);
    errno = e;
    return rc;
}

void fs_request(struct agent *a, uint32_t id, int64_t p) {
    char *op = NULL, *path = NULL, *dst = NULL;
    if (p < 0 || cbor_get_str(&a->doc, p, "op", &op) != 0 || cbor_get_str(&a->doc, p, "path", &path) != 0 ||
        !*path) {
        send_error(a, id, "bad_request", "core.fs.request needs \"op\" and a non-empty \"path\" (text, no NUL)");
        goto out;
    }
    if (strlen(path) >= PATH_MAX) { fs_fail(a, id, op, "(path too long)", ENAMETOOLONG); goto out; }
    if (!strcmp(op, "read")) op_read(a, id, path, p);
    else if (!strcmp(op, "write")) op_write(a, id, path, p);
    else if (!strcmp(op, "list")) op_list(a, id, path);
    else if (!strcmp(op, "stat")) op_stat(a, id, path, p);
    else if (!strcmp(op, "remove")) op_remove(a, id, path, p);
    else if (!strcmp(op, "mkdir")) {
        int64_t mode = 0755;
        bool parents = false;
        if (cbor_get_int(&a->doc, p, "mode", &mode) < 0 || mode < 0 || mode > 07777 ||
            cbor_get_bool(&a->doc, p, "parents", &parents) < 0) {
            send_error(a, id, "bad_request", "mkdir: \"mode\" must be 0..0o7777 and \"parents\" a boolean");
            goto out;
        }
        int rc = parents ? mkdir_p(path, (mode_t)mode) : mkdir(path, (mode_t)mode);
        if (rc < 0) fs_fail(a, id, "mkdir", path, errno);
        else fs_ok(a, id);
    } else if (!strcmp(op, "rename") || !strcmp(op, "copy")) {
        bool recursive = false;
        if (cbor_get_str(&a->doc, p, "dst", &dst) != 0 || !*dst || strlen(dst) >= PATH_MAX) {
            send_error(a, id, "bad_request", "rename/copy need a non-empty text \"dst\"");
            goto out;
        }
        cbor_get_bool(&a->doc, p, "recursive", &recursive);
        int rc = op[0] == 'r' ? rename(path, dst) : copy_tree(path, dst, recursive, 0);
        if (rc < 0) fs_fail(a, id, op, path, errno);
        else fs_ok(a, id);
    } else {
        char msg[128];
        snprintf(msg, sizeof msg, "unknown fs op \"%.32s\" (read write list stat mkdir remove rename copy)", op);
        send_error(a, id, "bad_request", msg);
    }
out:
    free(op);
    free(path);
    free(dst);
}
