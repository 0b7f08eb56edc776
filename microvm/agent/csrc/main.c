/* microvm-agent entry point and event loop.
 *
 * Guest mode (PID 1): early mounts, find the virtio-serial port named "agent",
 * serve the protocol, reap zombies, reboot on shutdown.
 * Host mode (--channel-fd N | --channel-path SOCK): serve the same protocol
 * over a given fd or a listening unix socket, without PID-1 duties.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void disconnect(struct agent *a);

#define GUEST_GRACE_MS 2000 /* how long a closed-looking virtio port may be a reconnect */

static void write_all(struct agent *a, const uint8_t *p, size_t n) {
    int stalls = 0;
    int64_t hup_since = 0;
    if (a->chan_fd < 0) return;
    if (!a->connected) {
        /* Host mode: nobody to talk to. Guest mode: keep writing through a short hang-up
         * (the port holds the bytes back until the host is attached again). */
        if (a->host_mode || !a->disc_since) return;
        hup_since = a->disc_since;
        if (now_ms() - hup_since >= GUEST_GRACE_MS) return;
    }
    while (n) {
        ssize_t w = write(a->chan_fd, p, n);
        if (w > 0) { p += w; n -= (size_t)w; stalls = 0; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pfd = {a->chan_fd, POLLOUT, 0};
            int r = poll(&pfd, 1, 1000);
            if (r == 0 && ++stalls >= 30) break; /* host stopped reading for 30 s */
            if (r > 0 && (pfd.revents & (POLLERR | POLLNVAL))) break;
            if (r > 0 && (pfd.revents & POLLHUP) && !(pfd.revents & POLLOUT)) {
                if (a->host_mode) break;
                /* virtio-serial: open/close notices travel on the control queue and can be
                 * seen after the new host's data (a quick reconnect); the port refuses
                 * writes while it looks closed, so give the host a grace period. */
                if (!hup_since) hup_since = now_ms();
                if (now_ms() - hup_since >= GUEST_GRACE_MS) break;
                struct timespec ts = {0, 10 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        break;
    }
    if (n) disconnect(a);
}

void agent_send(struct agent *a, uint32_t id, uint8_t flags) {
    if (frame_finish(&a->out, id, flags) < 0) {
        /* Only reachable on oom or an oversized payload: report that instead. */
        frame_begin(&a->out, "core.error");
        cbor_put_map(&a->out, 2);
        cbor_put_text(&a->out, "kind");
        cbor_put_text(&a->out, "internal");
        cbor_put_text(&a->out, "message");
        cbor_put_text(&a->out, "response too large or out of memory");
        if (frame_finish(&a->out, id, FLAG_TERMINAL) < 0) return;
    }
    write_all(a, a->out.p, a->out.len);
}

void send_error(struct agent *a, uint32_t id, const char *kind, const char *message) {
    frame_begin(&a->out, "core.error");
    cbor_put_map(&a->out, 2);
    cbor_put_text(&a->out, "kind");
    cbor_put_text(&a->out, kind);
    cbor_put_text(&a->out, "message");
    cbor_put_text_lossy(&a->out, message);
    agent_send(a, id, FLAG_TERMINAL);
}

int env_set(char ***env, size_t *n, const char *kv) {
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv) return -1;
    size_t klen = (size_t)(eq - kv) + 1;
    char *dup = strdup(kv);
    if (!dup) return -1;
    for (size_t i = 0; i < *n; i++) {
        if (strncmp((*env)[i], kv, klen) == 0) {
            free((*env)[i]);
            (*env)[i] = dup;
            return 0;
        }
    }
    char **e = realloc(*env, (*n + 2) * sizeof *e);
    if (!e) { free(dup); return -1; }
    e[(*n)++] = dup;
    e[*n] = NULL;
    *env = e;
    return 0;
}

/* The host session is over: drop framing state, fs writes and (by policy) processes. */
static void end_host_session(struct agent *a) {
    a->hello_seen = false;
    frame_reader_reset(&a->rd);
    fs_abort_all(a);
    if (a->kill_on_disconnect) exec_kill_all(a);
    exec_detach_all(a);
}

static void disconnect(struct agent *a) {
    if (!a->connected) return;
    a->connected = false;
    if (!a->host_mode) {
        /* virtio-serial: a hang-up may be a stale notice of a quick reconnect whose data
         * is already here, so the session ends only after 2 s of silence or on a new
         * core.hello (see guest_idle). */
        a->disc_since = now_ms();
        return;
    }
    if (a->listen_fd < 0) {
        /* --channel-fd: the host is gone for good. */
        exec_kill_all(a);
        exit(0);
    }
    end_host_session(a);
    close(a->chan_fd);
    a->chan_fd = -1;
}

/* Guest mode, while the port looks closed: end the host session after 2 s. */
static void guest_idle(struct agent *a) {
    if (a->connected || !a->disc_since || now_ms() - a->disc_since < GUEST_GRACE_MS) return;
    a->disc_since = 0;
    end_host_session(a);
}

/* ---- message handlers ---- */

static void on_hello(struct agent *a, uint32_t id, int64_t p) {
    int64_t ver = AGENT_PROTO_VERSION;
    int r = cbor_get_int(&a->doc, p, "version", &ver);
    if (r < 0 || ver < 1) {
        send_error(a, id, "version", "core.hello needs an integer \"version\" >= 1");
        return;
    }
    a->generation = ver < AGENT_PROTO_VERSION ? (int)ver : AGENT_PROTO_VERSION;
    if (a->hello_seen) {
        /* A hello on a live channel starts a new host session: the host may have
         * reconnected faster than the port's hang-up could be observed. */
        if (a->kill_on_disconnect) exec_kill_all(a);
        exec_detach_all(a);
        fs_abort_all(a);
    }
    a->hello_seen = true;
    int64_t boot_ms = a->host_mode ? now_ms() - a->start_ms : 0;
    if (!a->host_mode) {
        struct timespec ts;
        clock_gettime(CLOCK_BOOTTIME, &ts);
        boot_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    }
    frame_begin(&a->out, "core.ready");
    cbor_put_map(&a->out, 6);
    cbor_put_text(&a->out, "version");
    cbor_put_int(&a->out, AGENT_PROTO_VERSION);
    cbor_put_text(&a->out, "generation");
    cbor_put_int(&a->out, a->generation);
    cbor_put_text(&a->out, "pid");
    cbor_put_int(&a->out, getpid());
    cbor_put_text(&a->out, "boot_ms");
    cbor_put_int(&a->out, boot_ms);
    cbor_put_text(&a->out, "agent");
    cbor_put_text(&a->out, AGENT_VERSION_STRING);
    cbor_put_text(&a->out, "host_mode");
    cbor_put_bool(&a->out, a->host_mode);
    agent_send(a, id, FLAG_TERMINAL);
}

static int bootstrap_env(struct agent *a, int64_t envm, char *err, size_t errlen) {
    const struct cbor_doc *d = &a->doc;
    if (envm < 0 || d->items[envm].type == CB_NULL) return 0;
    if (d->items[envm].type != CB_MAP) { snprintf(err, errlen, "\"env\" must be a map"); return -1; }
    uint32_t c = (uint32_t)envm + 1;
    for (uint32_t k = 0; k < d->items[envm].count; k++) {
        const struct cbor_item *key = &d->items[c], *val = &d->items[key->end];
        c = val->end;
        char *ks = cbor_strdup(key), *vs = cbor_strdup(val);
        if (!ks || !vs || !*ks || strchr(ks, '=')) {
            snprintf(err, errlen, "\"env\" keys must be non-empty text without '=' and values text");
            free(ks); free(vs);
            return -1;
        }
        size_t n = strlen(ks) + strlen(vs) + 2;
        char *kv = malloc(n);
        if (kv) {
            snprintf(kv, n, "%s=%s", ks, vs);
            env_set(&a->env, &a->env_n, kv);
        }
        free(kv); free(ks); free(vs);
    }
    return 0;
}

static void on_bootstrap(struct agent *a, uint32_t id, int64_t p) {
    static const char *const skipped_host[] = {"root", "hostname", "network", "mounts"};
    char err[256] = "";
    const struct cbor_doc *d = &a->doc;
    char *hostname = NULL;
    if (p < 0 || d->items[p].type != CB_MAP) {
        send_error(a, id, "bad_request", "core.bootstrap payload must be a map");
        return;
    }
    if (a->bootstrapped) {
        send_error(a, id, "bad_request", "core.bootstrap was already applied (it is one-shot)");
        return;
    }
    if (cbor_get_str(d, p, "hostname", &hostname) < 0) {
        send_error(a, id, "bad_request", "\"hostname\" must be text");
        return;
    }
    int rc = 0;
    if (!a->host_mode) rc = mounts_root(a, cbor_map_get(d, p, "root"), err, sizeof err);
    if (rc == 0) rc = net_configure(a, cbor_map_get(d, p, "network"), hostname, err, sizeof err);
    if (rc == 0 && !a->host_mode) rc = mounts_shares(a, cbor_map_get(d, p, "mounts"), err, sizeof err);
    if (rc == 0) rc = install_ca_certs(a, cbor_map_get(d, p, "ca_certs"), err, sizeof err);
    if (rc == 0) rc = bootstrap_env(a, cbor_map_get(d, p, "env"), err, sizeof err);
    bool kill = false;
    if (rc == 0 && cbor_get_bool(d, p, "kill_on_disconnect", &kill) == 0) a->kill_on_disconnect = kill;
    free(hostname);
    if (rc != 0) {
        send_error(a, id, "bootstrap_failed", err);
        return;
    }
    a->bootstrapped = true;
    frame_begin(&a->out, "core.bootstrap.ack");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "skipped");
    if (a->host_mode) {
        cbor_put_array(&a->out, 4);
        for (int i = 0; i < 4; i++) cbor_put_text(&a->out, skipped_host[i]);
    } else {
        cbor_put_array(&a->out, 0);
    }
    agent_send(a, id, FLAG_TERMINAL);
}

static void do_shutdown(struct agent *a, uint32_t id, int64_t p) {
    int64_t code = 0;
    if (cbor_get_int(&a->doc, p, "exit_code", &code) < 0 || code < 0 || code > 255) {
        send_error(a, id, "bad_request", "\"exit_code\" must be an integer 0..255");
        return;
    }
    a->exit_code = (int)code;
    frame_begin(&a->out, "core.shutdown.ack");
    cbor_put_map(&a->out, 1);
    cbor_put_text(&a->out, "exit_code");
    cbor_put_int(&a->out, code);
    agent_send(a, id, FLAG_TERMINAL | FLAG_SHUTDOWN);
    exec_kill_all(a);
    fs_abort_all(a);
    if (a->host_mode) exit(a->exit_code);
    dprintf(2, "microvm-agent: shutdown exit_code=%d\n", a->exit_code);
    kill(-1, SIGTERM);
    for (int i = 0; i < 80; i++) { /* up to 2 s for everything to exit on SIGTERM */
        pid_t r;
        while ((r = waitpid(-1, NULL, WNOHANG)) > 0) {}
        if (r < 0 && errno == ECHILD) break;
        struct timespec ts = {0, 25 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kill(-1, SIGKILL);
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause(); /* PID 1 must never exit */
}

static void dispatch(struct agent *a, const struct frame *f) {
    struct envelope env;
    const char *err = NULL;
    char msg[160];
    if (frame_parse_envelope(&a->doc, f->body, f->body_len, &env, &err) < 0) {
        snprintf(msg, sizeof msg, "malformed frame body: %s", err);
        send_error(a, f->id, "malformed", msg);
        return;
    }
    if (env.v < 1) {
        send_error(a, f->id, "version", "envelope \"v\" must be >= 1");
        return;
    }
    const struct cbor_item *t = env.t;
    uint32_t id = f->id;
    if (cbor_text_eq(t, "core.exec.stdin")) exec_stdin(a, id, env.p);
    else if (cbor_text_eq(t, "core.fs.data")) fs_data(a, id, f->flags, env.p);
    else if (cbor_text_eq(t, "core.exec.request")) exec_request(a, id, env.p);
    else if (cbor_text_eq(t, "core.exec.resize")) exec_resize(a, id, env.p);
    else if (cbor_text_eq(t, "core.exec.signal")) exec_signal(a, id, env.p);
    else if (cbor_text_eq(t, "core.fs.request")) fs_request(a, id, env.p);
    else if (cbor_text_eq(t, "core.ping")) {
        frame_begin(&a->out, "core.pong");
        cbor_put_map(&a->out, 0);
        agent_send(a, id, FLAG_TERMINAL);
    } else if (cbor_text_eq(t, "core.hello")) on_hello(a, id, env.p);
    else if (cbor_text_eq(t, "core.bootstrap")) on_bootstrap(a, id, env.p);
    else if (cbor_text_eq(t, "core.reconfigure")) on_reconfigure(a, id, env.p);
    else if (cbor_text_eq(t, "core.metrics.request")) metrics_request(a, id);
    else if (cbor_text_eq(t, "core.shutdown")) do_shutdown(a, id, env.p);
    else {
        size_t n = t->len < 64 ? t->len : 64;
        snprintf(msg, sizeof msg, "unknown message type \"%.*s\"", (int)n, (const char *)t->s);
        for (char *c = msg; *c; c++)
            if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f) *c = '?';
        send_error(a, id, "unknown_type", msg);
    }
}

/* Dispatch every complete frame in the read buffer; malformed ones get an error frame.
 * Returns false when a frame ended the host session (stop reading). */
static bool drain_frames(struct agent *a) {
    for (;;) {
        struct frame f;
        struct frame_error e;
        int st = frame_next(&a->rd, &f, &e);
        if (st == FR_NEED_MORE) return true;
        if (st == FR_ERROR) { send_error(a, e.id, e.kind, e.message); continue; }
        dispatch(a, &f);
        if (!a->connected) return false;
        frame_consume(&a->rd, f.total);
    }
}

static void on_channel_readable(struct agent *a) {
    for (int rounds = 0; rounds < 64 && a->connected; rounds++) {
        size_t room = a->rd.cap - a->rd.len;
        ssize_t r = read(a->chan_fd, a->rd.buf + a->rd.len, room);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return;
        if (r <= 0) { disconnect(a); return; }
        a->rd.len += (size_t)r;
        if (!drain_frames(a)) return;
    }
}

/* Guest mode: the port reads 0 while no host is attached; data or EAGAIN means attached. */
static void guest_probe(struct agent *a) {
    uint8_t *dst = a->rd.buf + a->rd.len;
    ssize_t r = read(a->chan_fd, dst, a->rd.cap - a->rd.len);
    if (r > 0 || (r < 0 && errno == EAGAIN)) {
        a->connected = true;
        a->disc_since = 0;
        if (r > 0) {
            /* Put the bytes back through the normal path. */
            a->rd.len += (size_t)r;
            drain_frames(a);
        }
    }
}

static int setup_signals(struct agent *a) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0) return -1;
    signal(SIGPIPE, SIG_IGN);
    a->sig_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return a->sig_fd < 0 ? -1 : 0;
}

static void on_signals(struct agent *a) {
    struct signalfd_siginfo si;
    bool child = false;
    while (read(a->sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGCHLD) child = true;
        else if (a->host_mode && (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)) {
            exec_kill_all(a);
            exit(0);
        }
    }
    if (child) exec_reap(a);
}

static int listen_unix(const char *path) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) return -1;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 4) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void serve(struct agent *a) {
    struct pollfd pfds[2 + 3 * MAX_SESSIONS];
    struct session *owner[2 + 3 * MAX_SESSIONS];
    for (;;) {
        nfds_t n = 0;
        int timeout = -1;
        pfds[n] = (struct pollfd){a->sig_fd, POLLIN, 0}; owner[n++] = NULL;
        if (a->chan_fd >= 0 && a->connected) {
            pfds[n] = (struct pollfd){a->chan_fd, POLLIN, 0}; owner[n++] = NULL;
        } else if (a->listen_fd >= 0 && a->chan_fd < 0) {
            pfds[n] = (struct pollfd){a->listen_fd, POLLIN, 0}; owner[n++] = NULL;
        } else if (!a->host_mode) {
            timeout = 20;
        }
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &a->sessions[i];
            if (!s->used) continue;
            if (s->starting) { /* output waits until "started" went out */
                pfds[n] = (struct pollfd){s->fail_fd, POLLIN, 0}; owner[n++] = s;
                continue;
            }
            if (s->out_fd >= 0) { pfds[n] = (struct pollfd){s->out_fd, POLLIN, 0}; owner[n++] = s; }
            if (s->err_fd >= 0) { pfds[n] = (struct pollfd){s->err_fd, POLLIN, 0}; owner[n++] = s; }
            if (s->in_fd >= 0 && (s->inbuf.len > s->inoff || s->stdin_eof)) {
                pfds[n] = (struct pollfd){s->in_fd, POLLOUT, 0}; owner[n++] = s;
            }
        }
        int64_t dl = exec_next_deadline(a);
        if (dl) {
            int64_t wait = dl - now_ms();
            if (wait < 0) wait = 0;
            if (timeout < 0 || wait < timeout) timeout = (int)wait;
        }
        int r = poll(pfds, n, timeout);
        if (r < 0 && errno != EINTR) { perror("microvm-agent: poll"); return; }
        for (nfds_t i = 0; r > 0 && i < n; i++) {
            if (!pfds[i].revents) continue;
            struct session *s = owner[i];
            int fd = pfds[i].fd;
            if (!s) {
                if (fd == a->sig_fd) on_signals(a);
                else if (fd == a->listen_fd && a->chan_fd < 0) {
                    int c = accept4(a->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c >= 0) {
                        a->chan_fd = c;
                        a->connected = true;
                        frame_reader_reset(&a->rd);
                    }
                } else if (fd == a->chan_fd && a->connected) {
                    if (pfds[i].revents & (POLLIN | POLLHUP | POLLERR)) on_channel_readable(a);
                }
                continue;
            }
            if (!s->used) continue;
            if (s->starting) {
                if (fd == s->fail_fd) exec_on_start(a, s);
                continue;
            }
            if (fd == s->in_fd && (pfds[i].revents & (POLLOUT | POLLERR | POLLHUP))) exec_on_writable(a, s);
            else if (fd == s->out_fd || fd == s->err_fd) exec_on_readable(a, s, fd);
        }
        if (!a->host_mode && !a->connected) {
            guest_probe(a);
            guest_idle(a);
        }
        exec_check_timeouts(a);
    }
}

static void usage(void) {
    fputs("usage: microvm-agent [--channel-fd N | --channel-path UNIX_SOCKET] [--sysroot DIR]\n"
          "  As PID 1 (no options) it is the guest init: mounts, then serves the\n"
          "  virtio-serial port named \"agent\". With a channel option it serves the\n"
          "  same protocol as a normal host process (host mode) for testing.\n", stderr);
}

static int guest_init(struct agent *a) {
    if (mounts_early() < 0) dprintf(2, "microvm-agent: some early mounts failed\n");
    char path[64];
    for (int i = 0; i < 250; i++) {
        if (find_channel(path, sizeof path) == 0) {
            a->chan_fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            if (a->chan_fd >= 0) return 0;
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    dprintf(2, "microvm-agent: no virtio-serial port named \"agent\" found\n");
    return -1;
}

int main(int argc, char **argv) {
    struct agent *a = calloc(1, sizeof *a); /* the single agent context */
    if (!a) return 1;
    const char *chan_path = NULL;
    int chan_fd = -1;
    a->start_ms = now_ms();
    a->chan_fd = a->listen_fd = -1;
    a->generation = AGENT_PROTO_VERSION;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--channel-fd") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0 || v > 1 << 20) { usage(); return 2; }
            chan_fd = (int)v;
        } else if (!strcmp(argv[i], "--channel-path") && i + 1 < argc) {
            chan_path = argv[++i];
        } else if (!strcmp(argv[i], "--sysroot") && i + 1 < argc) {
            a->sysroot = argv[++i];
        } else if (!strcmp(argv[i], "--version")) {
            puts(AGENT_VERSION_STRING);
            return 0;
        } else {
            usage();
            return 2;
        }
    }
    a->host_mode = chan_fd >= 0 || chan_path;
    if (!a->host_mode && getpid() != 1) {
        usage();
        return 2;
    }
    a->doc.cap = CBOR_MAX_ITEMS;
    a->doc.items = calloc(CBOR_MAX_ITEMS, sizeof *a->doc.items);
    if (!a->doc.items || frame_reader_init(&a->rd) < 0 || setup_signals(a) < 0) {
        perror("microvm-agent: init");
        if (a->host_mode) return 1;
    }
    env_set(&a->env, &a->env_n, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    env_set(&a->env, &a->env_n, "HOME=/root");
    env_set(&a->env, &a->env_n, "LANG=C.UTF-8");
    if (a->host_mode) {
        prctl(PR_SET_CHILD_SUBREAPER, 1);
        if (chan_path) {
            a->listen_fd = listen_unix(chan_path);
            if (a->listen_fd < 0) { perror("microvm-agent: listen"); return 1; }
        } else {
            if (fcntl(chan_fd, F_GETFD) < 0) { perror("microvm-agent: --channel-fd"); return 1; }
            fcntl(chan_fd, F_SETFL, fcntl(chan_fd, F_GETFL) | O_NONBLOCK);
            fcntl(chan_fd, F_SETFD, FD_CLOEXEC);
            a->chan_fd = chan_fd;
            a->connected = true;
        }
        serve(a);
        return 1;
    }
    if (guest_init(a) == 0) serve(a);
    dprintf(2, "microvm-agent: fatal, rebooting\n");
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}
