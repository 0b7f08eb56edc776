/* A small, bounds-checked CBOR subset: unsigned/negative ints, byte and text
 * strings, arrays, maps, false/true/null (and float64 on output only).
 * Definite lengths only; tags, floats and indefinite lengths are rejected. */
#include <stdlib.h>
#include <string.h>

#include "agent.h"

void buf_free(struct buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->oom = false;
}

static bool buf_reserve(struct buf *b, size_t n) {
    if (b->oom) return false;
    if (n > SIZE_MAX / 2 - b->len) { b->oom = true; return false; }
    if (b->len + n <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) { b->oom = true; return false; }
    b->p = p;
    b->cap = cap;
    return true;
}

void buf_put(struct buf *b, const void *data, size_t n) {
    if (!n || !buf_reserve(b, n)) return;
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void put_head(struct buf *b, uint8_t major, uint64_t v) {
    uint8_t h[9];
    size_t n;
    major <<= 5;
    if (v < 24) { h[0] = major | (uint8_t)v; n = 1; }
    else if (v <= 0xff) { h[0] = major | 24; h[1] = (uint8_t)v; n = 2; }
    else if (v <= 0xffff) { h[0] = major | 25; h[1] = (uint8_t)(v >> 8); h[2] = (uint8_t)v; n = 3; }
    else if (v <= 0xffffffffu) {
        h[0] = major | 26;
        for (int i = 0; i < 4; i++) h[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        n = 5;
    } else {
        h[0] = major | 27;
        for (int i = 0; i < 8; i++) h[1 + i] = (uint8_t)(v >> (56 - 8 * i));
        n = 9;
    }
    buf_put(b, h, n);
}

void cbor_put_uint(struct buf *b, uint64_t v) { put_head(b, 0, v); }
void cbor_put_int(struct buf *b, int64_t v) {
    if (v >= 0) put_head(b, 0, (uint64_t)v);
    else put_head(b, 1, (uint64_t)(-(v + 1)));
}
void cbor_put_bytes(struct buf *b, const void *data, size_t n) { put_head(b, 2, n); buf_put(b, data, n); }
void cbor_put_textn(struct buf *b, const char *s, size_t n) { put_head(b, 3, n); buf_put(b, s, n); }
void cbor_put_text(struct buf *b, const char *s) { cbor_put_textn(b, s, strlen(s)); }
bool utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
        else return false;
        if (n - i < len) return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

void cbor_put_name(struct buf *b, const char *s, size_t n) {
    if (utf8_valid((const uint8_t *)s, n)) cbor_put_textn(b, s, n);
    else cbor_put_bytes(b, s, n);
}

void cbor_put_text_lossy(struct buf *b, const char *s) {
    size_t n = strlen(s);
    if (utf8_valid((const uint8_t *)s, n)) { cbor_put_textn(b, s, n); return; }
    put_head(b, 3, n);
    for (size_t i = 0; i < n; i++) {
        char c = (unsigned char)s[i] < 0x80 ? s[i] : '?';
        buf_put(b, &c, 1);
    }
}

void cbor_put_bool(struct buf *b, bool v) { uint8_t c = v ? 0xf5 : 0xf4; buf_put(b, &c, 1); }
void cbor_put_null(struct buf *b) { uint8_t c = 0xf6; buf_put(b, &c, 1); }
void cbor_put_double(struct buf *b, double v) {
    uint64_t u;
    uint8_t h[9];
    memcpy(&u, &v, 8);
    h[0] = 0xfb;
    for (int i = 0; i < 8; i++) h[1 + i] = (uint8_t)(u >> (56 - 8 * i));
    buf_put(b, h, 9);
}
void cbor_put_array(struct buf *b, uint64_t n) { put_head(b, 4, n); }
void cbor_put_map(struct buf *b, uint64_t n) { put_head(b, 5, n); }

static size_t put_open(struct buf *b, uint8_t major) {
    uint8_t h[5] = {(uint8_t)((major << 5) | 26), 0, 0, 0, 0};
    size_t pos = b->len;
    buf_put(b, h, 5);
    return pos;
}
size_t cbor_put_array_open(struct buf *b) { return put_open(b, 4); }
size_t cbor_put_map_open(struct buf *b) { return put_open(b, 5); }
void cbor_patch_count(struct buf *b, size_t pos, uint32_t n) {
    if (b->oom || pos + 5 > b->len) return;
    for (int i = 0; i < 4; i++) b->p[pos + 1 + i] = (uint8_t)(n >> (24 - 8 * i));
}

/* ---- decoder ---- */
struct dec {
    const uint8_t *p;
    size_t len, off;
    struct cbor_doc *d;
    const char *err;
};

static int read_arg(struct dec *x, uint8_t info, uint64_t *v) {
    size_t n;
    if (info < 24) { *v = info; return 0; }
    switch (info) {
    case 24: n = 1; break;
    case 25: n = 2; break;
    case 26: n = 4; break;
    case 27: n = 8; break;
    case 31: x->err = "indefinite lengths are not supported"; return -1;
    default: x->err = "reserved additional info"; return -1;
    }
    if (x->len - x->off < n) { x->err = "truncated item"; return -1; }
    uint64_t r = 0;
    for (size_t i = 0; i < n; i++) r = (r << 8) | x->p[x->off + i];
    x->off += n;
    *v = r;
    return 0;
}

static int dec_item(struct dec *x, int depth) {
    if (depth > CBOR_MAX_DEPTH) { x->err = "nesting too deep"; return -1; }
    if (x->off >= x->len) { x->err = "truncated item"; return -1; }
    if (x->d->n >= x->d->cap) { x->err = "too many items"; return -1; }
    uint32_t idx = x->d->n++;
    struct cbor_item *it = &x->d->items[idx];
    memset(it, 0, sizeof *it);
    uint8_t ib = x->p[x->off++];
    uint8_t major = ib >> 5, info = ib & 31;
    uint64_t v;
    if (major == 7) {
        if (info == 20 || info == 21) { it->type = CB_BOOL; it->i = info == 21; }
        else if (info == 22) it->type = CB_NULL;
        else { x->err = "unsupported simple/float value"; return -1; }
        it->end = x->d->n;
        return 0;
    }
    if (major == 6) { x->err = "tags are not supported"; return -1; }
    if (read_arg(x, info, &v) < 0) return -1;
    switch (major) {
    case 0:
        if (v > INT64_MAX) { x->err = "integer out of range"; return -1; }
        it->type = CB_INT; it->i = (int64_t)v;
        break;
    case 1:
        if (v > INT64_MAX) { x->err = "integer out of range"; return -1; }
        it->type = CB_INT; it->i = -1 - (int64_t)v;
        break;
    case 2: case 3:
        if (v > x->len - x->off) { x->err = "string runs past the end"; return -1; }
        it->type = major == 2 ? CB_BYTES : CB_TEXT;
        it->s = x->p + x->off; it->len = (size_t)v;
        x->off += (size_t)v;
        break;
    case 4: case 5: {
        uint64_t items = major == 5 ? v * 2 : v;
        if (v > x->len - x->off || items > x->len - x->off) { x->err = "container runs past the end"; return -1; }
        it->type = major == 4 ? CB_ARRAY : CB_MAP;
        it->count = (uint32_t)v;
        for (uint64_t k = 0; k < items; k++) {
            uint32_t kidx = x->d->n;
            if (dec_item(x, depth + 1) < 0) return -1;
            if (major == 5 && (k % 2) == 0) {
                uint8_t kt = x->d->items[kidx].type;
                if (kt != CB_TEXT && kt != CB_INT) { x->err = "map keys must be text or int"; return -1; }
            }
        }
        it = &x->d->items[idx];
        break;
    }
    }
    it->end = x->d->n;
    return 0;
}

int cbor_decode(struct cbor_doc *d, const uint8_t *buf, size_t len, const char **err) {
    struct dec x = {buf, len, 0, d, NULL};
    d->n = 0;
    if (dec_item(&x, 0) < 0) { *err = x.err; return -1; }
    if (x.off != len) { *err = "trailing bytes after the item"; return -1; }
    return 0;
}

bool cbor_text_eq(const struct cbor_item *it, const char *s) {
    size_t n = strlen(s);
    return it->type == CB_TEXT && it->len == n && memcmp(it->s, s, n) == 0;
}

int64_t cbor_map_get(const struct cbor_doc *d, int64_t idx, const char *key) {
    if (idx < 0 || (uint64_t)idx >= d->n || d->items[idx].type != CB_MAP) return -1;
    uint32_t c = (uint32_t)idx + 1;
    for (uint32_t k = 0; k < d->items[idx].count; k++) {
        uint32_t val = d->items[c].end;
        if (cbor_text_eq(&d->items[c], key)) return val;
        c = d->items[val].end;
    }
    return -1;
}

int cbor_get_int(const struct cbor_doc *d, int64_t map, const char *key, int64_t *out) {
    int64_t i = cbor_map_get(d, map, key);
    if (i < 0 || d->items[i].type == CB_NULL) return 1;
    if (d->items[i].type != CB_INT) return -1;
    *out = d->items[i].i;
    return 0;
}

int cbor_get_bool(const struct cbor_doc *d, int64_t map, const char *key, bool *out) {
    int64_t i = cbor_map_get(d, map, key);
    if (i < 0 || d->items[i].type == CB_NULL) return 1;
    if (d->items[i].type != CB_BOOL) return -1;
    *out = d->items[i].i != 0;
    return 0;
}

char *cbor_strdup(const struct cbor_item *it) {
    if (it->type != CB_TEXT || memchr(it->s, 0, it->len)) return NULL;
    char *s = malloc(it->len + 1);
    if (!s) return NULL;
    memcpy(s, it->s, it->len);
    s[it->len] = 0;
    return s;
}

int cbor_get_str(const struct cbor_doc *d, int64_t map, const char *key, char **out) {
    int64_t i = cbor_map_get(d, map, key);
    *out = NULL;
    if (i < 0 || d->items[i].type == CB_NULL) return 1;
    *out = cbor_strdup(&d->items[i]);
    return *out ? 0 : -1;
}
