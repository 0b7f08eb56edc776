/* Process execution: pipes or a pty, its own session/process group, rlimits,
 * user switching, cwd, env, timeout and signals delivered to the whole group. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

enum stage { ST_PTY = 1, ST_CWD, ST_RLIMIT, ST_USER, ST_EXEC, ST_STDIO };

static const struct { const char *name; int res; } rlimit_names[] = {
    {"cpu", RLIMIT_CPU}, {"fsize", RLIMIT_FSIZE}, {"data", RLIMIT_DATA},
    {"stack", RLIMIT_STACK}, {"core", RLIMIT_CORE}, {"rss", RLIMIT_RSS},
    {"nproc", RLIMIT_NPROC}, {"nofile", RLIMIT_NOFILE}, {"memlock", RLIMIT_MEMLOCK},
    {"as", RLIMIT_AS}, {"locks", RLIMIT_LOCKS}, {"sigpending", RLIMIT_SIGPENDING},
    {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE}, {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME},
};

const char *errno_name(int err) {
    switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case E2BIG: return "E2BIG";
    case ENOEXEC: return "ENOEXEC";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EXDEV: return "EXDEV";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case EMFILE: return "EMFILE";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case EPIPE: return "EPIPE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ELOOP: return "ELOOP";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case EDQUOT: return "EDQUOT";
    default: return "EOTHER";
    }
}

static const char *getenv_in(char *const *envp, const char *key) {
    size_t n = strlen(key);
    for (char *const *e = envp; e && *e; e++)
        if (!strncmp(*e, key, n) && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

void exec_req_free(struct exec_req *r) {
    free(r->cmd);
    free(r->cwd);
    free(r->user);
    for (char **p = r->argv; p && *p; p++) free(*p);
    free(r->argv);
    for (size_t i = 0; i < r->envn; i++) free(r->envp[i]);
    free(r->envp);
    memset(r, 0, sizeof *r);
}

static int add_env(struct exec_req *r, const struct cbor_item *k, const struct cbor_item *v) {
    char *kv;
    if (v) {
        char *ks = cbor_strdup(k), *vs = cbor_strdup(v);
        if (!ks || !vs || !*ks || strchr(ks, '=')) { free(ks); free(vs); return -1; }
        size_t n = strlen(ks) + strlen(vs) + 2;
        kv = malloc(n);
        if (kv) snprintf(kv, n, "%s=%s", ks, vs);
        free(ks); free(vs);
    } else {
        kv = cbor_strdup(k);
    }
    int rc = kv ? env_set(&r->envp, &r->envn, kv) : -1;
    free(kv);
    return rc;
}

static int parse_limit(const struct cbor_item *it, uint64_t *out) {
    if (it->type == CB_NULL) { *out = UINT64_MAX; return 0; }
    if (it->type != CB_INT || it->i < -1) return -1;
    *out = it->i == -1 ? UINT64_MAX : (uint64_t)it->i;
    return 0;
}

static int parse_rlimits(const struct cbor_doc *d, int64_t idx, struct exec_req *r, char *err, size_t errlen) {
    if (idx < 0 || d->items[idx].type == CB_NULL) return 0;
    if (d->items[idx].type != CB_ARRAY) {
        snprintf(err, errlen, "\"rlimits\" must be a list of {resource, soft, hard}");
        return -1;
    }
    uint32_t c = (uint32_t)idx + 1;
    for (uint32_t k = 0; k < d->items[idx].count; k++, c = d->items[c].end) {
        int64_t res = cbor_map_get(d, c, "resource");
        int64_t soft = cbor_map_get(d, c, "soft"), hard = cbor_map_get(d, c, "hard");
        if (res < 0 || soft < 0 || d->items[res].type != CB_TEXT) {
            snprintf(err, errlen, "rlimit %u needs \"resource\" (text) and \"soft\"", k);
            return -1;
        }
        int found = -1;
        for (size_t j = 0; j < sizeof rlimit_names / sizeof rlimit_names[0]; j++)
            if (cbor_text_eq(&d->items[res], rlimit_names[j].name)) found = rlimit_names[j].res;
        if (found < 0) {
            size_t n = d->items[res].len < 32 ? d->items[res].len : 32;
            snprintf(err, errlen, "unknown rlimit resource \"%.*s\" (allowed: cpu fsize data stack core "
                     "rss nproc nofile memlock as locks sigpending msgqueue nice rtprio rttime)",
                     (int)n, (const char *)d->items[res].s);
            return -1;
        }
        if (r->nrl >= (int)(sizeof r->rl / sizeof r->rl[0])) {
            snprintf(err, errlen, "too many rlimits (max 16)");
            return -1;
        }
        struct rlimit_req *rl = &r->rl[r->nrl++];
        rl->resource = found;
        if (parse_limit(&d->items[soft], &rl->soft) < 0 ||
            (hard >= 0 ? parse_limit(&d->items[hard], &rl->hard) : (rl->hard = rl->soft, 0)) < 0) {
            snprintf(err, errlen, "rlimit %u: soft/hard must be integers >= 0, -1 or null (unlimited)", k);
            return -1;
        }
        if (rl->soft > rl->hard) {
            snprintf(err, errlen, "rlimit %u: soft limit exceeds hard limit", k);
            return -1;
        }
    }
    return 0;
}

int exec_parse(const struct cbor_doc *d, int64_t p, char *const *base_env, struct exec_req *r,
               char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    r->rows = 24;
    r->cols = 80;
    r->want_stdin = true;
    if (p < 0 || d->items[p].type != CB_MAP) { snprintf(err, errlen, "exec payload must be a map"); return -1; }
    if (cbor_get_str(d, p, "cmd", &r->cmd) != 0 || !*r->cmd) {
        snprintf(err, errlen, "\"cmd\" must be non-empty text without NUL");
        return -1;
    }
    int64_t args = cbor_map_get(d, p, "args");
    uint32_t nargs = 0;
    if (args >= 0 && d->items[args].type != CB_NULL) {
        if (d->items[args].type != CB_ARRAY) { snprintf(err, errlen, "\"args\" must be a list of text"); return -1; }
        nargs = d->items[args].count;
    }
    r->argv = calloc((size_t)nargs + 2, sizeof *r->argv);
    if (!r->argv || !(r->argv[0] = strdup(r->cmd))) { snprintf(err, errlen, "out of memory"); return -1; }
    uint32_t c = (uint32_t)args + 1;
    for (uint32_t k = 0; k < nargs; k++, c = d->items[c].end) {
        if (!(r->argv[k + 1] = cbor_strdup(&d->items[c]))) {
            snprintf(err, errlen, "args[%u] must be text without NUL", k);
            return -1;
        }
    }
    for (char *const *e = base_env; e && *e; e++)
        if (env_set(&r->envp, &r->envn, *e) < 0) { snprintf(err, errlen, "out of memory"); return -1; }
    int64_t env = cbor_map_get(d, p, "env");
    if (env >= 0 && d->items[env].type == CB_MAP) {
        c = (uint32_t)env + 1;
        for (uint32_t k = 0; k < d->items[env].count; k++) {
            const struct cbor_item *key = &d->items[c], *val = &d->items[key->end];
            c = val->end;
            if (add_env(r, key, val) < 0) {
                snprintf(err, errlen, "\"env\" entries must be text keys (no '=') with text values");
                return -1;
            }
        }
    } else if (env >= 0 && d->items[env].type == CB_ARRAY) {
        c = (uint32_t)env + 1;
        for (uint32_t k = 0; k < d->items[env].count; k++, c = d->items[c].end) {
            if (add_env(r, &d->items[c], NULL) < 0) {
                snprintf(err, errlen, "env[%u] must be \"KEY=VALUE\" text", k);
                return -1;
            }
        }
    } else if (env >= 0 && d->items[env].type != CB_NULL) {
        snprintf(err, errlen, "\"env\" must be a map or a list of \"KEY=VALUE\"");
        return -1;
    }
    if (cbor_get_str(d, p, "cwd", &r->cwd) < 0) { snprintf(err, errlen, "\"cwd\" must be text"); return -1; }
    int64_t user = cbor_map_get(d, p, "user");
    if (user >= 0 && d->items[user].type == CB_INT) {
        if (d->items[user].i < 0 || d->items[user].i > 0xfffffffeLL) {
            snprintf(err, errlen, "\"user\" uid must be 0..4294967294");
            return -1;
        }
        char tmp[24];
        snprintf(tmp, sizeof tmp, "%lld", (long long)d->items[user].i);
        r->user = strdup(tmp);
    } else if (cbor_get_str(d, p, "user", &r->user) < 0) {
        snprintf(err, errlen, "\"user\" must be a name, a uid or \"uid:gid\"");
        return -1;
    }
    if (cbor_get_bool(d, p, "tty", &r->tty) < 0 || cbor_get_bool(d, p, "stdin", &r->want_stdin) < 0) {
        snprintf(err, errlen, "\"tty\" and \"stdin\" must be booleans");
        return -1;
    }
    int64_t v;
    int rc = cbor_get_int(d, p, "rows", &v);
    if (rc < 0 || (rc == 0 && (v < 1 || v > 65535))) { snprintf(err, errlen, "\"rows\" must be 1..65535"); return -1; }
    if (rc == 0) r->rows = (uint16_t)v;
    rc = cbor_get_int(d, p, "cols", &v);
    if (rc < 0 || (rc == 0 && (v < 1 || v > 65535))) { snprintf(err, errlen, "\"cols\" must be 1..65535"); return -1; }
    if (rc == 0) r->cols = (uint16_t)v;
    rc = cbor_get_int(d, p, "timeout_ms", &r->timeout_ms);
    if (rc < 0 || (rc == 0 && (r->timeout_ms < 1 || r->timeout_ms > 365LL * 86400 * 1000))) {
        snprintf(err, errlen, "\"timeout_ms\" must be a positive integer (at most one year)");
        return -1;
    }
    if (rc == 1) r->timeout_ms = 0;
    if (parse_rlimits(d, cbor_map_get(d, p, "rlimits"), r, err, errlen) < 0) return -1;
    if (r->tty && !getenv_in(r->envp, "TERM")) env_set(&r->envp, &r->envn, "TERM=xterm-256color");
    return 0;
}

/* ---- running ---- */

struct child_err {
    int32_t stage, err;
};

static const char *fail_kind(int stage, int err) {
    switch (stage) {
    case ST_PTY: return "pty_setup_failed";
    case ST_CWD: return "bad_cwd";
    case ST_RLIMIT: return "resource_limit";
    case ST_USER: return "user_setup_failed";
    default: break;
    }
    switch (err) {
    case ENOENT: case ENOTDIR: return "not_found";
    case EACCES: case EPERM: return "permission_denied";
    case ENOEXEC: return "not_executable";
    case ENOMEM: return "out_of_memory";
    case E2BIG: return "bad_args";
    case EAGAIN: return "resource_limit";
    default: return "other";
    }
}

static const char *stage_name(int stage) {
    static const char *const names[] = {"", "pty", "cwd", "rlimit", "user", "exec", "stdio"};
    return stage >= 1 && stage <= 6 ? names[stage] : "spawn";
}

static void send_failed(struct agent *a, uint32_t id, const char *kind, int err, const char *stage,
                        const char *message) {
    frame_begin(&a->out, "core.exec.failed");
    cbor_put_map(&a->out, 5);
    cbor_put_text(&a->out, "kind");
    cbor_put_text(&a->out, kind);
    cbor_put_text(&a->out, "errno");
    cbor_put_int(&a->out, err);
    cbor_put_text(&a->out, "errno_name");
    cbor_put_text(&a->out, err ? errno_name(err) : "");
    cbor_put_text(&a->out, "stage");
    cbor_put_text(&a->out, stage);
    cbor_put_text(&a->out, "message");
    cbor_put_text_lossy(&a->out, message);
    agent_send(a, id, FLAG_TERMINAL);
}

struct ident {
    uid_t uid;
    gid_t gid;
    bool switch_user, have_name;
    char name[64], home[256];
};

static int resolve_user(const char *spec, struct ident *id, char *err, size_t errlen) {
    memset(id, 0, sizeof *id);
    if (!spec || !*spec) return 0;
    id->switch_user = true;
    char *end;
    const char *colon = strchr(spec, ':');
    if (spec[0] >= '0' && spec[0] <= '9') {
        unsigned long u = strtoul(spec, &end, 10);
        if ((*end && *end != ':') || u > 0xfffffffeUL) goto bad;
        id->uid = (uid_t)u;
        id->gid = (gid_t)u;
        struct passwd *pw = getpwuid(id->uid);
        if (pw) {
            id->gid = pw->pw_gid;
            snprintf(id->name, sizeof id->name, "%s", pw->pw_name);
            snprintf(id->home, sizeof id->home, "%s", pw->pw_dir);
            id->have_name = true;
        }
        if (colon) {
            unsigned long g = strtoul(colon + 1, &end, 10);
            if (!colon[1] || *end || g > 0xfffffffeUL) goto bad;
            id->gid = (gid_t)g;
        }
        return 0;
    }
    if (colon) goto bad;
    struct passwd *pw = getpwnam(spec);
    if (!pw) {
        snprintf(err, errlen, "unknown user \"%.64s\" (not in /etc/passwd)", spec);
        return -1;
    }
    id->uid = pw->pw_uid;
    id->gid = pw->pw_gid;
    snprintf(id->name, sizeof id->name, "%s", pw->pw_name);
    snprintf(id->home, sizeof id->home, "%s", pw->pw_dir);
    id->have_name = true;
    return 0;
bad:
    snprintf(err, errlen, "bad user \"%.64s\": expected a name, a uid or \"uid:gid\"", spec);
    return -1;
}

static void child_fail(int fd, int stage, int err) {
    struct child_err ce = {stage, err};
    ssize_t w = write(fd, &ce, sizeof ce);
    (void)w;
    _exit(127);
}

static void exec_search(const struct exec_req *r, int errfd) {
    if (strchr(r->cmd, '/')) {
        execve(r->cmd, r->argv, r->envp);
        child_fail(errfd, ST_EXEC, errno);
    }
    const char *path = getenv_in(r->envp, "PATH");
    if (!path) path = "/usr/local/bin:/usr/bin:/bin";
    int saved = ENOENT;
    char full[4096];
    while (*path) {
        const char *sep = strchr(path, ':');
        size_t dl = sep ? (size_t)(sep - path) : strlen(path);
        if (dl + strlen(r->cmd) + 2 <= sizeof full) {
            memcpy(full, path, dl);
            full[dl] = '/';
            strcpy(full + dl + 1, r->cmd);
            execve(full, r->argv, r->envp);
            if (errno == EACCES) saved = EACCES;
            else if (errno != ENOENT && errno != ENOTDIR) saved = errno;
        }
        if (!sep) break;
        path = sep + 1;
    }
    child_fail(errfd, ST_EXEC, saved);
}

static void run_child(const struct exec_req *r, const struct ident *id, const char *slave, int in, int out,
                      int err, int errfd) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < 32; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    setsid();
    if (slave) {
        int fd = open(slave, O_RDWR);
        if (fd < 0 || ioctl(fd, TIOCSCTTY, 0) < 0) child_fail(errfd, ST_PTY, errno);
        in = out = err = fd;
    }
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) child_fail(errfd, ST_STDIO, errno);
    for (int i = 0; i < r->nrl; i++) {
        struct rlimit rl = {
            r->rl[i].soft == UINT64_MAX ? RLIM_INFINITY : (rlim_t)r->rl[i].soft,
            r->rl[i].hard == UINT64_MAX ? RLIM_INFINITY : (rlim_t)r->rl[i].hard,
        };
        if (setrlimit(r->rl[i].resource, &rl) < 0) child_fail(errfd, ST_RLIMIT, errno);
    }
    if (id->switch_user) {
        int rc = id->have_name ? initgroups(id->name, id->gid) : setgroups(0, NULL);
        if (rc < 0) child_fail(errfd, ST_USER, errno);
        if (setgid(id->gid) < 0 || setuid(id->uid) < 0) child_fail(errfd, ST_USER, errno);
    }
    if (r->cwd && chdir(r->cwd) < 0) child_fail(errfd, ST_CWD, errno);
    exec_search(r, errfd);
}

static struct session *find_session(struct agent *a, uint32_t id) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (a->sessions[i].used && !a->sessions[i].detached && a->sessions[i].id == id) return &a->sessions[i];
    return NULL;
}

static void closefd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

void exec_request(struct agent *a, uint32_t id, int64_t payload) {
    struct exec_req r;
    struct ident ident;
    char err[256];
    char slave[128] = "";
    int master = -1, pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, pfail[2] = {-1, -1};
    if (exec_parse(&a->doc, payload, a->env, &r, err, sizeof err) < 0) {
        send_failed(a, id, "bad_args", 0, "parse", err);
        exec_req_free(&r);
        return;
    }
    if (find_session(a, id)) {
        send_failed(a, id, "bad_args", 0, "parse", "request id already names a running session");
        exec_req_free(&r);
        return;
    }
    struct session *s = NULL;
    for (int i = 0; i < MAX_SESSIONS && !s; i++)
        if (!a->sessions[i].used) s = &a->sessions[i];
    if (!s) {
        send_failed(a, id, "resource_limit", 0, "spawn", "too many concurrent exec sessions (max 256)");
        exec_req_free(&r);
        return;
    }
    if (resolve_user(r.user, &ident, err, sizeof err) < 0) {
        send_failed(a, id, "user_setup_failed", 0, "user", err);
        exec_req_free(&r);
        return;
    }
    if (ident.switch_user && ident.have_name) {
        char kv[320];
        snprintf(kv, sizeof kv, "USER=%s", ident.name);
        env_set(&r.envp, &r.envn, kv);
        snprintf(kv, sizeof kv, "LOGNAME=%s", ident.name);
        env_set(&r.envp, &r.envn, kv);
        snprintf(kv, sizeof kv, "HOME=%s", ident.home);
        env_set(&r.envp, &r.envn, kv);
        /* Explicit request env still wins. */
        int64_t env = cbor_map_get(&a->doc, payload, "env");
        if (env >= 0 && a->doc.items[env].type == CB_MAP) {
            uint32_t c = (uint32_t)env + 1;
            for (uint32_t k = 0; k < a->doc.items[env].count; k++) {
                const struct cbor_item *key = &a->doc.items[c], *val = &a->doc.items[key->end];
                c = val->end;
                add_env(&r, key, val);
            }
        }
    }
    int e = 0;
    const char *stage = "spawn";
    if (r.tty) {
        stage = "pty";
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ptsname_r(master, slave, sizeof slave) != 0) {
            e = errno;
            goto fail;
        }
        struct winsize ws = {r.rows, r.cols, 0, 0};
        ioctl(master, TIOCSWINSZ, &ws);
    } else {
        stage = "stdio";
        if (pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0) { e = errno; goto fail; }
        if (r.want_stdin) {
            if (pipe2(pin, O_CLOEXEC) < 0) { e = errno; goto fail; }
        } else if ((pin[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
            e = errno;
            goto fail;
        }
    }
    stage = "spawn";
    if (pipe2(pfail, O_CLOEXEC) < 0) { e = errno; goto fail; }
    pid_t pid = fork();
    if (pid < 0) { e = errno; goto fail; }
    if (pid == 0) {
        close(pfail[0]);
        run_child(&r, &ident, r.tty ? slave : NULL, pin[0], pout[1], perr[1], pfail[1]);
        _exit(127);
    }
    closefd(&pfail[1]);
    closefd(&pin[0]);
    closefd(&pout[1]);
    closefd(&perr[1]);
    /* Do not block the loop while the child execs: fail_fd reports the outcome. */
    memset(s, 0, sizeof *s);
    s->used = true;
    s->starting = true;
    s->id = id;
    s->pid = pid;
    s->tty = r.tty;
    s->fail_fd = pfail[0];
    snprintf(s->cmd, sizeof s->cmd, "%s", r.cmd);
    snprintf(s->cwd, sizeof s->cwd, "%s", r.cwd ? r.cwd : "");
    if (r.tty) {
        s->out_fd = master;
        s->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 0);
        s->err_fd = -1;
    } else {
        s->out_fd = pout[0];
        s->err_fd = perr[0];
        s->in_fd = pin[1];
    }
    set_nonblock(s->fail_fd);
    if (s->out_fd >= 0) set_nonblock(s->out_fd);
    if (s->err_fd >= 0) set_nonblock(s->err_fd);
    if (s->in_fd >= 0) set_nonblock(s->in_fd);
    s->deadline_ms = r.timeout_ms ? now_ms() + r.timeout_ms : 0;
    exec_req_free(&r);
    return;
fail:
    snprintf(err, sizeof err, "%s setup for \"%.200s\": %s", stage, r.cmd, strerror(e));
    send_failed(a, id, e == EAGAIN || e == EMFILE ? "resource_limit" : (r.tty ? "pty_setup_failed" : "other"),
                e, stage, err);
    closefd(&master);
    for (int i = 0; i < 2; i++) { closefd(&pin[i]); closefd(&pout[i]); closefd(&perr[i]); closefd(&pfail[i]); }
    exec_req_free(&r);
}

static void send_output(struct agent *a, struct session *s, bool is_err, const uint8_t *data, size_t n) {
    if (s->detached) return;
    frame_begin(&a->out, is_err ? "core.exec.stderr" : "core.exec.stdout");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "data");
    cbor_put_bytes(&a->out, data, n);
    agent_send(a, s->id, 0);
}

static void release(struct session *s) {
    closefd(&s->in_fd);
    closefd(&s->out_fd);
    closefd(&s->err_fd);
    closefd(&s->fail_fd);
    buf_free(&s->inbuf);
    s->used = false;
}

/* Settle a starting session: 1 started, 0 undecided, -1 failed (session released).
 * With reaped set the child is gone, so the pipe has its final state. */
static int resolve_start(struct agent *a, struct session *s, bool reaped) {
    struct child_err ce;
    ssize_t got;
    do got = read(s->fail_fd, &ce, sizeof ce); while (got < 0 && errno == EINTR);
    if (got < 0 && errno == EAGAIN && !reaped) return 0;
    if (got == (ssize_t)sizeof ce) {
        char err[512];
        if (!reaped) waitpid(s->pid, NULL, 0); /* the child _exits right after reporting */
        snprintf(err, sizeof err, "%s \"%s\": %s", stage_name(ce.stage), ce.stage == ST_CWD ? s->cwd : s->cmd,
                 strerror(ce.err));
        if (!s->detached) send_failed(a, s->id, fail_kind(ce.stage, ce.err), ce.err, stage_name(ce.stage), err);
        release(s);
        return -1;
    }
    s->starting = false;
    closefd(&s->fail_fd);
    if (!s->detached) {
        frame_begin(&a->out, "core.exec.started");
        cbor_put_map(&a->out, 1);
        cbor_put_text(&a->out, "pid");
        cbor_put_int(&a->out, s->pid);
        agent_send(a, s->id, 0);
    }
    return 1;
}

void exec_on_start(struct agent *a, struct session *s) {
    if (s->starting) resolve_start(a, s, false);
}

/* Read one chunk; returns bytes read, 0 at EOF (fd closed), -1 when it would block. */
static ssize_t pump(struct agent *a, struct session *s, int *fdp) {
    uint8_t chunk[IO_CHUNK];
    ssize_t r = read(*fdp, chunk, sizeof chunk);
    if (r > 0) {
        send_output(a, s, fdp == &s->err_fd, chunk, (size_t)r);
        return r;
    }
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
    /* EOF, or EIO on a pty master once the slave side is gone. */
    if (fdp == &s->out_fd && s->tty && s->in_fd >= 0) closefd(&s->in_fd);
    closefd(fdp);
    return 0;
}

void exec_on_readable(struct agent *a, struct session *s, int fd) {
    if (fd == s->out_fd) pump(a, s, &s->out_fd);
    else if (fd == s->err_fd) pump(a, s, &s->err_fd);
}

static void send_stdin_ack(struct agent *a, struct session *s) {
    if (!s->unacked || s->detached) return;
    frame_begin(&a->out, "core.exec.stdin.ack");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "bytes");
    cbor_put_uint(&a->out, s->unacked);
    s->unacked = 0;
    agent_send(a, s->id, 0);
}

void exec_on_writable(struct agent *a, struct session *s) {
    size_t before = s->inoff;
    while (s->in_fd >= 0 && s->inbuf.len > s->inoff) {
        ssize_t w = write(s->in_fd, s->inbuf.p + s->inoff, s->inbuf.len - s->inoff);
        if (w > 0) { s->inoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        /* EPIPE: the child closed its stdin; what is left can never be delivered. */
        closefd(&s->in_fd);
        s->inoff = s->inbuf.len;
        s->stdin_eof = false;
        break;
    }
    s->unacked += s->inoff - before;
    if (s->inoff == s->inbuf.len) {
        s->inbuf.len = s->inoff = 0;
    } else if (s->inoff >= (1u << 20)) {
        memmove(s->inbuf.p, s->inbuf.p + s->inoff, s->inbuf.len - s->inoff);
        s->inbuf.len -= s->inoff;
        s->inoff = 0;
    }
    /* Credit back consumed stdin so the host can keep at most a window in flight. */
    if (s->unacked >= (256u << 10) || (s->unacked && s->inbuf.len == 0)) send_stdin_ack(a, s);
    if (s->stdin_eof && s->in_fd >= 0 && s->inbuf.len == 0) {
        if (s->tty) {
            /* End of input on a terminal: the VEOF character at the start of a line. */
            static const uint8_t eof = 4;
            ssize_t w = write(s->in_fd, &eof, 1);
            (void)w;
        }
        closefd(&s->in_fd);
        s->stdin_eof = false;
    }
}

void exec_stdin(struct agent *a, uint32_t id, int64_t payload) {
    struct session *s = find_session(a, id);
    int64_t data = cbor_map_get(&a->doc, payload, "data");
    if (!s) return; /* finished session: drop */
    if (s->in_fd < 0) {
        /* Closed stdin: the bytes are dropped; credit them back so the host does not stall. */
        if (data >= 0 && a->doc.items[data].type == CB_BYTES && a->doc.items[data].len) {
            s->unacked += a->doc.items[data].len;
            send_stdin_ack(a, s);
        }
        return;
    }
    if (data < 0 || a->doc.items[data].type != CB_BYTES) {
        frame_begin(&a->out, "core.exec.stdin.error");
        cbor_put_map(&a->out, 1);
        cbor_put_text(&a->out, "message");
        cbor_put_text(&a->out, "core.exec.stdin needs \"data\" (bytes)");
        agent_send(a, id, 0);
        return;
    }
    const struct cbor_item *it = &a->doc.items[data];
    if (it->len == 0) {
        s->stdin_eof = true;
    } else if (s->inbuf.len - s->inoff + it->len > STDIN_BUF_MAX) {
        frame_begin(&a->out, "core.exec.stdin.error");
        cbor_put_map(&a->out, 1);
        cbor_put_text(&a->out, "message");
        cbor_put_text(&a->out, "stdin backlog over 16 MiB: the process is not reading; data dropped");
        agent_send(a, id, 0);
        s->unacked += it->len; /* dropped, but credit it back so the host does not stall */
        send_stdin_ack(a, s);
        return;
    } else {
        buf_put(&s->inbuf, it->s, it->len);
    }
    exec_on_writable(a, s);
}

void exec_resize(struct agent *a, uint32_t id, int64_t payload) {
    struct session *s = find_session(a, id);
    int64_t rows, cols;
    if (!s || !s->tty || s->out_fd < 0) return;
    if (cbor_get_int(&a->doc, payload, "rows", &rows) != 0 || cbor_get_int(&a->doc, payload, "cols", &cols) != 0 ||
        rows < 1 || rows > 65535 || cols < 1 || cols > 65535) {
        send_error(a, id, "bad_request", "core.exec.resize needs \"rows\" and \"cols\" in 1..65535");
        return;
    }
    struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
    ioctl(s->out_fd, TIOCSWINSZ, &ws);
}

void exec_signal(struct agent *a, uint32_t id, int64_t payload) {
    struct session *s = find_session(a, id);
    int64_t sig;
    if (!s || s->exited) return;
    if (cbor_get_int(&a->doc, payload, "signal", &sig) != 0 || sig < 1 || sig > 64) {
        send_error(a, id, "bad_request", "core.exec.signal needs \"signal\" in 1..64");
        return;
    }
    if (kill(-s->pid, (int)sig) < 0) kill(s->pid, (int)sig);
}

static void finish(struct agent *a, struct session *s) {
    /* Everything the process wrote before exiting is already in the pipe: drain it. */
    for (int i = 0; i < 64 && s->out_fd >= 0; i++)
        if (pump(a, s, &s->out_fd) < 0) break;
    for (int i = 0; i < 64 && s->err_fd >= 0; i++)
        if (pump(a, s, &s->err_fd) < 0) break;
    int st = s->status;
    bool signaled = WIFSIGNALED(st);
    frame_begin(&a->out, "core.exec.exited");
    cbor_put_map(&a->out, 3);
    cbor_put_text(&a->out, "code");
    cbor_put_int(&a->out, signaled ? -1 : WEXITSTATUS(st));
    cbor_put_text(&a->out, "signal");
    if (signaled) cbor_put_int(&a->out, WTERMSIG(st));
    else cbor_put_null(&a->out);
    cbor_put_text(&a->out, "timed_out");
    cbor_put_bool(&a->out, s->timed_out);
    if (!s->detached) agent_send(a, s->id, FLAG_TERMINAL);
    release(s);
}

void exec_reap(struct agent *a) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &a->sessions[i];
            if (s->used && s->pid == pid) {
                s->exited = true;
                s->status = st;
                if (!s->starting || resolve_start(a, s, true) > 0) finish(a, s);
                break;
            }
        }
    }
}

int64_t exec_next_deadline(const struct agent *a) {
    int64_t best = 0;
    for (int i = 0; i < MAX_SESSIONS; i++) {
        const struct session *s = &a->sessions[i];
        if (s->used && s->deadline_ms && (!best || s->deadline_ms < best)) best = s->deadline_ms;
    }
    return best;
}

void exec_check_timeouts(struct agent *a) {
    int64_t now = now_ms();
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *s = &a->sessions[i];
        if (s->used && s->deadline_ms && s->deadline_ms <= now) {
            s->deadline_ms = 0;
            s->timed_out = true;
            if (kill(-s->pid, SIGKILL) < 0) kill(s->pid, SIGKILL);
        }
    }
}

void exec_kill_all(struct agent *a) {
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *s = &a->sessions[i];
        if (s->used && kill(-s->pid, SIGKILL) < 0) kill(s->pid, SIGKILL);
    }
}

void exec_detach_all(struct agent *a) {
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *s = &a->sessions[i];
        if (!s->used) continue;
        s->detached = true;
        /* Nobody can feed its stdin any more. */
        buf_free(&s->inbuf);
        s->inoff = 0;
        if (s->in_fd >= 0) { close(s->in_fd); s->in_fd = -1; }
    }
}
