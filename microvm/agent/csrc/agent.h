/* microvm guest agent: shared declarations.
 *
 * One file per concern: cbor.c (codec), frame.c (stream framing), exec.c
 * (processes), fs.c (file operations), mounts.c (PID-1 mounts, root, CA),
 * net.c (eth0/lo/resolv.conf/hosts), metrics.c, main.c (event loop), and
 * fuzz.c (host-only entry points for the fuzzer; not part of the agent).
 * All mutable state lives in struct agent, passed explicitly.
 */
#ifndef MICROVM_AGENT_H
#define MICROVM_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AGENT_PROTO_VERSION 1
#define AGENT_VERSION_STRING "microvm-agent 0.1.0"
#define FRAME_MAX (4u * 1024u * 1024u) /* max of len (id + flags + body) */
#define FRAME_HDR 9u                   /* len + id + flags */
#define FLAG_TERMINAL 0x01
#define FLAG_SESSION_START 0x02
#define FLAG_SHUTDOWN 0x04
#define CBOR_MAX_ITEMS 65536u
#define CBOR_MAX_DEPTH 32
#define MAX_SESSIONS 256
#define MAX_WRITES 64
#define IO_CHUNK (64u * 1024u)
#define FS_CHUNK (256u * 1024u)
#define STDIN_BUF_MAX (16u * 1024u * 1024u)

/* ---- growable byte buffer + CBOR encoder (cbor.c) ---- */
struct buf {
    uint8_t *p;
    size_t len, cap;
    bool oom;
};
void buf_free(struct buf *b);
void buf_put(struct buf *b, const void *data, size_t n);
void cbor_put_uint(struct buf *b, uint64_t v);
void cbor_put_int(struct buf *b, int64_t v);
void cbor_put_bytes(struct buf *b, const void *data, size_t n);
void cbor_put_textn(struct buf *b, const char *s, size_t n);
void cbor_put_text(struct buf *b, const char *s);
void cbor_put_bool(struct buf *b, bool v);
bool utf8_valid(const uint8_t *s, size_t n);
/* A file name or path from the guest: text when valid UTF-8, else a byte string. */
void cbor_put_name(struct buf *b, const char *s, size_t n);
/* Messages: text, with any non-UTF-8 byte replaced by '?' (e.g. a truncated path). */
void cbor_put_text_lossy(struct buf *b, const char *s);
void cbor_put_null(struct buf *b);
void cbor_put_double(struct buf *b, double v);
void cbor_put_array(struct buf *b, uint64_t n);
void cbor_put_map(struct buf *b, uint64_t n);
/* Header with a 4-byte count patched later by cbor_patch_count. */
size_t cbor_put_array_open(struct buf *b);
size_t cbor_put_map_open(struct buf *b);
void cbor_patch_count(struct buf *b, size_t pos, uint32_t n);

/* ---- CBOR decoder: a flat pre-order item array ---- */
enum cbor_type { CB_INT, CB_BYTES, CB_TEXT, CB_ARRAY, CB_MAP, CB_BOOL, CB_NULL };
struct cbor_item {
    uint8_t type;
    uint32_t count; /* array: items, map: pairs */
    uint32_t end;   /* index just after this item's subtree */
    int64_t i;      /* CB_INT value, CB_BOOL 0/1 */
    const uint8_t *s; /* CB_BYTES / CB_TEXT */
    size_t len;
};
struct cbor_doc {
    struct cbor_item *items;
    uint32_t n, cap;
};
/* Decode exactly one item spanning all of buf. Returns 0, or -1 with *err set. */
int cbor_decode(struct cbor_doc *d, const uint8_t *buf, size_t len, const char **err);
/* Map lookup by text key; returns item index or -1 (also when idx is not a map). */
int64_t cbor_map_get(const struct cbor_doc *d, int64_t idx, const char *key);
bool cbor_text_eq(const struct cbor_item *it, const char *s);
/* Typed getters: return 0 ok, 1 absent (or null), -1 wrong type. */
int cbor_get_int(const struct cbor_doc *d, int64_t map, const char *key, int64_t *out);
int cbor_get_bool(const struct cbor_doc *d, int64_t map, const char *key, bool *out);
/* Text copied into a fresh NUL-terminated heap string; rejects embedded NULs. */
int cbor_get_str(const struct cbor_doc *d, int64_t map, const char *key, char **out);
char *cbor_strdup(const struct cbor_item *it); /* NULL if embedded NUL / oom */

/* ---- framing (frame.c) ---- */
struct frame_reader {
    uint8_t *buf;
    size_t len, cap;
    size_t skip; /* bytes of an oversized frame still to discard */
};
struct frame {
    uint32_t id;
    uint8_t flags;
    const uint8_t *body;
    size_t body_len;
    size_t total; /* bytes to consume */
};
enum frame_status { FR_NEED_MORE = 0, FR_FRAME = 1, FR_ERROR = 2 };
struct frame_error {
    uint32_t id;
    const char *kind;
    char message[128];
};
int frame_reader_init(struct frame_reader *r);
void frame_reader_free(struct frame_reader *r);
void frame_reader_reset(struct frame_reader *r);
/* Append bytes (n must fit in cap - len). */
void frame_reader_feed(struct frame_reader *r, const uint8_t *data, size_t n);
int frame_next(struct frame_reader *r, struct frame *f, struct frame_error *e);
void frame_consume(struct frame_reader *r, size_t n);
/* Envelope {"v": int, "t": text, "p": any}. Returns 0 or -1 with *err. */
struct envelope {
    int64_t v;
    const struct cbor_item *t;
    int64_t p; /* item index of payload */
};
int frame_parse_envelope(struct cbor_doc *d, const uint8_t *body, size_t len,
                         struct envelope *env, const char **err);
/* Start an outgoing frame in b: reserves the header, writes {"v","t","p":...}; caller encodes p. */
void frame_begin(struct buf *b, const char *type);
/* Patch the header; returns 0, or -1 if the frame is oversized or oom. */
int frame_finish(struct buf *b, uint32_t id, uint8_t flags);

/* ---- agent state (main.c) ---- */
struct session {
    bool used, exited, timed_out, tty, stdin_eof;
    bool detached; /* its host connection is gone: runs on, output is dropped */
    bool starting; /* forked; waiting for exec to succeed (fail_fd EOF) or fail */
    int fail_fd;   /* CLOEXEC pipe from the child: a struct child_err on failure */
    char cmd[200], cwd[200]; /* for the failure message */
    uint32_t id;
    pid_t pid;
    int in_fd, out_fd, err_fd; /* tty: out_fd is the pty master, in_fd a dup */
    struct buf inbuf;
    size_t inoff;
    size_t unacked; /* stdin bytes consumed (or dropped) but not yet acknowledged */
    int status;
    int64_t deadline_ms; /* 0 = none */
};
struct fs_write {
    bool used;
    uint32_t id;
    int fd;
    uint64_t written;
    char *path;
};
struct agent {
    bool host_mode, connected, bootstrapped, hello_seen;
    int chan_fd;   /* -1 when disconnected (host path mode) */
    int listen_fd; /* host mode --channel-path */
    int sig_fd;
    int64_t start_ms;
    int64_t disc_since; /* guest mode: when the port last looked closed (0: not) */
    int generation;
    int exit_code;
    const char *sysroot; /* host mode: prefix for files bootstrap writes */
    bool kill_on_disconnect;
    struct frame_reader rd;
    struct cbor_doc doc;
    struct buf out;
    char **env; /* base environment for execs, NULL-terminated */
    size_t env_n;
    struct session sessions[MAX_SESSIONS];
    struct fs_write writes[MAX_WRITES];
};

int64_t now_ms(void);
/* Send helpers (main.c). They never fail loudly: a lost host just drops output. */
void agent_send(struct agent *a, uint32_t id, uint8_t flags);
void send_error(struct agent *a, uint32_t id, const char *kind, const char *message);
int env_set(char ***env, size_t *n, const char *kv); /* replaces same key */

/* exec.c */
struct rlimit_req {
    int resource;
    uint64_t soft, hard; /* UINT64_MAX = unlimited */
};
struct exec_req {
    char *cmd, *cwd, *user;
    char **argv; /* argv[0] = cmd */
    char **envp; /* full environment (base + request), NULL-terminated */
    size_t envn;
    bool tty, want_stdin;
    uint16_t rows, cols;
    struct rlimit_req rl[16];
    int nrl;
    int64_t timeout_ms;
};
/* Parse and validate an exec request (pure: no side effects). 0 ok, -1 with err. */
int exec_parse(const struct cbor_doc *d, int64_t p, char *const *base_env, struct exec_req *r,
               char *err, size_t errlen);
void exec_req_free(struct exec_req *r);
void exec_request(struct agent *a, uint32_t id, int64_t payload);
void exec_stdin(struct agent *a, uint32_t id, int64_t payload);
void exec_resize(struct agent *a, uint32_t id, int64_t payload);
void exec_signal(struct agent *a, uint32_t id, int64_t payload);
void exec_on_readable(struct agent *a, struct session *s, int fd);
void exec_on_writable(struct agent *a, struct session *s);
void exec_on_start(struct agent *a, struct session *s);
void exec_reap(struct agent *a);
void exec_check_timeouts(struct agent *a);
void exec_kill_all(struct agent *a);
void exec_detach_all(struct agent *a);
int64_t exec_next_deadline(const struct agent *a);
const char *errno_name(int err);

/* fs.c */
int mkdir_p(char *path, mode_t mode); /* like mkdir -p; path is restored */
void fs_request(struct agent *a, uint32_t id, int64_t payload);
void fs_data(struct agent *a, uint32_t id, uint8_t flags, int64_t payload);
void fs_abort_all(struct agent *a);

/* metrics.c */
void metrics_request(struct agent *a, uint32_t id);

/* mounts.c (PID-1 duties) */
int mounts_early(void);
int mounts_root(struct agent *a, int64_t plan, char *err, size_t errlen);
int mounts_shares(struct agent *a, int64_t list, char *err, size_t errlen);
int install_ca_certs(struct agent *a, int64_t list, char *err, size_t errlen);
int find_channel(char *path, size_t len);
int write_file_at(const struct agent *a, const char *path, const char *data, size_t n, bool append);

/* net.c */
struct in6_addr;
int net_configure(struct agent *a, int64_t net, const char *hostname, char *err, size_t errlen);
/* "aa:bb:cc:dd:ee:ff" into mac; -1 when s is not exactly that. */
int parse_mac(const char *s, uint8_t mac[6]);
/* Gives ifname the IPv6 address addr/prefix through the AF_INET6 socket s (one it already
 * has is no error); its interface index, or -1 (errno set). */
int v6_add_addr(int s, const char *ifname, const struct in6_addr *addr, uint32_t prefix);
/* core.reconfigure (reconfig.c): new identity after a snapshot restore or fork */
void on_reconfigure(struct agent *a, uint32_t id, int64_t p);

/* fuzz entry (frame.c): run the frame decoder and request parsers over a byte stream. */
int agent_fuzz_stream(const uint8_t *data, size_t len);
int agent_cbor_roundtrip(const uint8_t *in, size_t len, uint8_t *out, size_t cap, size_t *out_len);

#endif
