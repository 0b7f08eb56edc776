/* Host-build entry points for fuzzing and property tests (not linked into the agent).
 * agent_fuzz_stream: feed bytes through the frame reader in odd-sized pieces; for
 * every complete frame decode the envelope and run the pure request parsers. */
#include <stdlib.h>
#include <string.h>

#include "agent.h"


static void reencode(struct buf *b, const struct cbor_doc *d, uint32_t i) {
    const struct cbor_item *it = &d->items[i];
    switch (it->type) {
    case CB_INT: cbor_put_int(b, it->i); break;
    case CB_BYTES: cbor_put_bytes(b, it->s, it->len); break;
    case CB_TEXT: cbor_put_textn(b, (const char *)it->s, it->len); break;
    case CB_BOOL: cbor_put_bool(b, it->i != 0); break;
    case CB_NULL: cbor_put_null(b); break;
    case CB_ARRAY: case CB_MAP: {
        if (it->type == CB_ARRAY) cbor_put_array(b, it->count);
        else cbor_put_map(b, it->count);
        for (uint32_t c = i + 1; c < it->end; c = d->items[c].end) reencode(b, d, c);
        break;
    }
    }
}

int agent_cbor_roundtrip(const uint8_t *in, size_t len, uint8_t *out, size_t cap, size_t *out_len) {
    struct cbor_doc d = {calloc(CBOR_MAX_ITEMS, sizeof(struct cbor_item)), 0, CBOR_MAX_ITEMS};
    const char *err = NULL;
    struct buf b = {0};
    int rc = -1;
    if (!d.items) return -2;
    if (cbor_decode(&d, in, len, &err) == 0) {
        reencode(&b, &d, 0);
        if (!b.oom && b.len <= cap) {
            memcpy(out, b.p, b.len);
            *out_len = b.len;
            rc = 0;
        } else {
            rc = -2;
        }
    }
    buf_free(&b);
    free(d.items);
    return rc;
}

int agent_fuzz_stream(const uint8_t *data, size_t len) {
    struct frame_reader r;
    /* Smaller item arena than the agent's so "too many items" paths are reachable quickly. */
    struct cbor_doc d = {calloc(4096, sizeof(struct cbor_item)), 0, 4096};
    char *base_env[] = {"PATH=/bin", "HOME=/root", NULL};
    int frames = 0;
    /* A 256 KiB window instead of 4 MiB keeps runs fast; larger frames just never complete. */
    memset(&r, 0, sizeof r);
    r.cap = 256 * 1024;
    r.buf = malloc(r.cap);
    if (!d.items || !r.buf) { free(d.items); free(r.buf); return -1; }
    size_t off = 0, step = 1;
    while (off < len) {
        size_t n = len - off < step ? len - off : step;
        if (n > r.cap - r.len) n = r.cap - r.len;
        if (!n) break;
        frame_reader_feed(&r, data + off, n);
        off += n;
        step = step * 3 + 1; /* vary the split points */
        for (;;) {
            struct frame f;
            struct frame_error e;
            int st = frame_next(&r, &f, &e);
            if (st == FR_NEED_MORE) break;
            if (st == FR_ERROR) { frames++; continue; }
            struct envelope env;
            const char *err;
            (void)utf8_valid(f.body, f.body_len);
            if (frame_parse_envelope(&d, f.body, f.body_len, &env, &err) == 0) {
                struct exec_req req;
                char msg[256];
                exec_parse(&d, env.p, base_env, &req, msg, sizeof msg);
                exec_req_free(&req);
                struct buf b = {0};
                reencode(&b, &d, 0);
                buf_free(&b);
            }
            frames++;
            frame_consume(&r, f.total);
        }
    }
    frame_reader_free(&r);
    free(d.items);
    return frames;
}
