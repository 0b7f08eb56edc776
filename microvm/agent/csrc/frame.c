/* Stream framing: [u32 len BE][u32 id BE][u8 flags][CBOR body], len = 5 + body. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int frame_reader_init(struct frame_reader *r) {
    memset(r, 0, sizeof *r);
    r->cap = FRAME_MAX + 4;
    r->buf = malloc(r->cap);
    return r->buf ? 0 : -1;
}

void frame_reader_free(struct frame_reader *r) {
    free(r->buf);
    memset(r, 0, sizeof *r);
}

void frame_reader_reset(struct frame_reader *r) {
    r->len = 0;
    r->skip = 0;
}

void frame_reader_feed(struct frame_reader *r, const uint8_t *data, size_t n) {
    if (n > r->cap - r->len) n = r->cap - r->len; /* callers read at most cap - len */
    memcpy(r->buf + r->len, data, n);
    r->len += n;
}

void frame_consume(struct frame_reader *r, size_t n) {
    if (n > r->len) n = r->len;
    memmove(r->buf, r->buf + n, r->len - n);
    r->len -= n;
}

int frame_next(struct frame_reader *r, struct frame *f, struct frame_error *e) {
    if (r->skip) {
        size_t n = r->skip < r->len ? r->skip : r->len;
        frame_consume(r, n);
        r->skip -= n;
        if (r->skip) return FR_NEED_MORE;
    }
    if (r->len < 4) return FR_NEED_MORE;
    uint32_t len = be32(r->buf);
    if (len < 5) {
        e->id = 0;
        e->kind = "malformed";
        snprintf(e->message, sizeof e->message, "frame length %u is below the 5-byte minimum", len);
        frame_consume(r, 4);
        r->skip = len;
        return FR_ERROR;
    }
    if (len > FRAME_MAX) {
        if (r->len < 8) return FR_NEED_MORE;
        e->id = be32(r->buf + 4);
        e->kind = "oversized";
        snprintf(e->message, sizeof e->message, "frame length %u exceeds the maximum %u", len, FRAME_MAX);
        frame_consume(r, 4);
        r->skip = len;
        return FR_ERROR;
    }
    if (r->len - 4 < len) return FR_NEED_MORE;
    f->id = be32(r->buf + 4);
    f->flags = r->buf[8];
    f->body = r->buf + FRAME_HDR;
    f->body_len = len - 5;
    f->total = (size_t)len + 4;
    return FR_FRAME;
}

int frame_parse_envelope(struct cbor_doc *d, const uint8_t *body, size_t len,
                         struct envelope *env, const char **err) {
    if (cbor_decode(d, body, len, err) < 0) return -1;
    if (d->items[0].type != CB_MAP) { *err = "body is not a map"; return -1; }
    if (cbor_get_int(d, 0, "v", &env->v) != 0) { *err = "missing or non-integer \"v\""; return -1; }
    int64_t t = cbor_map_get(d, 0, "t");
    if (t < 0 || d->items[t].type != CB_TEXT) { *err = "missing or non-text \"t\""; return -1; }
    env->t = &d->items[t];
    env->p = cbor_map_get(d, 0, "p");
    return 0;
}

void frame_begin(struct buf *b, const char *type) {
    static const uint8_t zero[FRAME_HDR] = {0};
    b->len = 0;
    b->oom = false;
    buf_put(b, zero, FRAME_HDR);
    cbor_put_map(b, 3);
    cbor_put_text(b, "v");
    cbor_put_uint(b, AGENT_PROTO_VERSION);
    cbor_put_text(b, "t");
    cbor_put_text(b, type);
    cbor_put_text(b, "p");
}

int frame_finish(struct buf *b, uint32_t id, uint8_t flags) {
    if (b->oom || b->len < FRAME_HDR || b->len - 4 > FRAME_MAX) return -1;
    uint32_t len = (uint32_t)(b->len - 4);
    for (int i = 0; i < 4; i++) {
        b->p[i] = (uint8_t)(len >> (24 - 8 * i));
        b->p[4 + i] = (uint8_t)(id >> (24 - 8 * i));
    }
    b->p[8] = flags;
    return 0;
}
