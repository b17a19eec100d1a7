/* Native client worker for bench/loadgen.py (issue 4).
 *
 * The same job as loadgen.py's asyncio Worker, at a fraction of its CPU, so that on a
 * 2-core machine the load generator leaves the cores to the server and Redis: it holds
 * its share of the WebSocket connections on one epoll loop, answers pings and close
 * frames, checks every frame (one final unmasked text frame holding exactly one JSON
 * document, keys type/payload/timestamp in that order, an RFC 3339 timestamp, the
 * connection's own user, the next sequence number of that user) and records latencies.
 *
 *   wsclient PORT TOKENS_FILE COUNTS_FILE INDEX    one worker (loadgen.py starts it)
 *   wsclient --check                               the checks alone, on bytes given in
 *                                                  hex on stdin (bench/selfcheck.py)
 *
 * TOKENS_FILE has one line per connection: "<user index> <JWT>". COUNTS_FILE is the
 * coordinator's shared array of int64: frames received per worker, then the monotonic
 * time of each worker's last frame. Commands arrive on stdin, one per line:
 *   connect K      open every connection, K at a time -> "connected START END OK FAILED"
 *   latency R      hand over the latencies so far, then record (R=1) or not
 *                  -> "latency NBYTES\n" + NBYTES of native int64 nanoseconds
 *   handshakes     hand over the handshake times so far (connect() to the 101, one per
 *                  connection opened) -> "handshakes NBYTES\n" + NBYTES of int64 ns
 *   resyncs A      A=1: from now on a valid ``resync`` frame is expected (each connection
 *                  must get exactly one) rather than an error -> "resyncs COUNT LAST_NS":
 *                  how many connections got theirs, and when the last one arrived
 *   finish P U     P messages were published round-robin over U users: check every
 *                  connection's count, close all -> "result {json}", then exit
 * Built by loadgen.py with the system C compiler (cc -O2); no library beyond libc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WS_KEY "c21hcC1ub3RpZnk6YmVuYw=="          /* base64("smap-notify:benc") */
#define WS_ACCEPT "nzbyyC7XvQlDO+rb3Ad5fuHZqmo=" /* its Sec-WebSocket-Accept */
#define ORIGIN "http://127.0.0.1:3000"
#define CONNECT_TIMEOUT_NS (30LL * 1000000000LL)
#define STDIN_TAG UINT32_MAX

enum { C_NEW, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_DONE };

typedef struct {
    int fd, state, uidx, was_open;
    int64_t next_seq, started_ns, resync_ns;
    const char *token;
    uint8_t *buf; /* an incomplete frame (or response head) carried to the next read */
    size_t len, cap;
} conn_t;

/* -- errors, counted by kind like loadgen.py's Errors ----------------------------------- */
static const char *KINDS[] = {
    "masked server frame",
    "frame is not exactly one JSON document",
    "bad envelope keys",
    "bad type or timestamp",
    "payload not kept",
    "misrouted",
    "out of order, lost or duplicated",
    "server closed connection",
    "not one final text frame per message",
    "connection lost",
    "connect failed",
    "wrong count at end",
    "more than one resync",
};
enum { E_MASKED, E_JSON, E_KEYS, E_TYPE_TS, E_PAYLOAD, E_MISROUTED, E_SEQ, E_CLOSED,
       E_NOT_TEXT, E_LOST, E_CONNECT, E_COUNT, E_RESYNC2, E_KINDS };
static long err_count[E_KINDS];
static char samples[8][300];
static int n_samples;

static void error(int kind, const char *fmt, ...) {
    err_count[kind]++;
    if (n_samples >= 8) return;
    int n = snprintf(samples[n_samples], 300, "%s: ", KINDS[kind]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(samples[n_samples] + n, 300 - n, fmt, ap);
    va_end(ap);
    n_samples++;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* -- JSON: a strict RFC 8259 validator, plus what the checks need ------------------------ */
typedef struct {
    const uint8_t *p, *end;
} jp_t;

static void ws(jp_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hexval(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if ((c | 32) >= 'a' && (c | 32) <= 'f') return (c | 32) - 'a' + 10;
    return -1;
}

/* Four hex digits at j->p (after a backslash-u): the code unit, or -1. */
static int hex4(jp_t *j) {
    if (j->end - j->p < 4) return -1;
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(j->p[i]);
        if (h < 0) return -1;
        v = v << 4 | h;
    }
    j->p += 4;
    return v;
}

/* A string at j->p (the opening quote); its raw content span in s and n. */
static int jstring(jp_t *j, const uint8_t **s, size_t *n) {
    if (j->p >= j->end || *j->p != '"') return 0;
    const uint8_t *start = ++j->p;
    while (j->p < j->end) {
        uint8_t c = *j->p;
        if (c == '"') {
            if (s) *s = start, *n = (size_t)(j->p - start);
            j->p++;
            return 1;
        }
        if (c < 0x20) return 0;
        if (c == '\\') {
            if (++j->p >= j->end) return 0;
            c = *j->p++;
            if (c == 'u') {
                int cp = hex4(j);
                if (cp >= 0xDC00 && cp <= 0xDFFF) return 0; /* lone low surrogate */
                if (cp >= 0xD800 && cp <= 0xDBFF) {         /* a high one needs its pair */
                    if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u') return 0;
                    j->p += 2;
                    cp = hex4(j);
                    if (cp < 0xDC00 || cp > 0xDFFF) return 0;
                }
                if (cp < 0) return 0;
            } else if (!strchr("\"\\/bfnrt", c) || c == 0) {
                return 0;
            }
            continue;
        }
        if (c < 0x80) {
            j->p++;
            continue;
        }
        /* UTF-8: as strict as Python's decoder (no overlongs, no surrogates, <= U+10FFFF) */
        int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
        if (!len || c > 0xF4 || j->end - j->p < len) return 0;
        for (int i = 1; i < len; i++)
            if ((j->p[i] & 0xC0) != 0x80) return 0;
        if (len == 3 && ((c == 0xE0 && j->p[1] < 0xA0) || (c == 0xED && j->p[1] > 0x9F))) return 0;
        if (len == 4 && ((c == 0xF0 && j->p[1] < 0x90) || (c == 0xF4 && j->p[1] > 0x8F))) return 0;
        j->p += len;
    }
    return 0;
}

/* A number; when it is an integer that fits, its value in *out. */
static int jnumber(jp_t *j, int64_t *out, int *is_int) {
    const uint8_t *p = j->p, *e = j->end;
    int neg = 0, integer = 1;
    int64_t v = 0;
    if (p < e && *p == '-') neg = 1, p++;
    if (p >= e) return 0;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < e && *p >= '0' && *p <= '9') {
            if (v > (INT64_MAX - 9) / 10) integer = 0;
            v = v * 10 + (*p++ - '0');
        }
    } else {
        return 0;
    }
    if (p < e && *p == '.') {
        integer = 0;
        if (++p >= e || *p < '0' || *p > '9') return 0;
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        integer = 0;
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || *p < '0' || *p > '9') return 0;
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    j->p = p;
    if (out) *out = neg ? -v : v;
    if (is_int) *is_int = integer;
    return 1;
}

/* After a member or element: 1 when a comma says another follows, 0 at the closing
 * bracket, -1 on anything else. */
static int jnext(jp_t *j, uint8_t close) {
    ws(j);
    if (j->p >= j->end) return -1;
    if (*j->p == ',') {
        j->p++;
        ws(j);
        return 1;
    }
    return *j->p++ == close ? 0 : -1;
}

static int jvalue(jp_t *j, int depth);

static int jcontainer(jp_t *j, int depth) {
    uint8_t close = *j->p == '{' ? '}' : ']';
    int object = close == '}';
    if (depth > 200) return 0;
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return 1;
    }
    for (;;) {
        if (object) {
            if (!jstring(j, NULL, NULL)) return 0;
            ws(j);
            if (j->p >= j->end || *j->p++ != ':') return 0;
            ws(j);
        }
        if (!jvalue(j, depth + 1)) return 0;
        int more = jnext(j, close);
        if (more <= 0) return more == 0;
    }
}

static int jvalue(jp_t *j, int depth) {
    if (j->p >= j->end) return 0;
    switch (*j->p) {
    case '{':
    case '[':
        return jcontainer(j, depth);
    case '"':
        return jstring(j, NULL, NULL);
    case 't':
        if (j->end - j->p >= 4 && !memcmp(j->p, "true", 4)) return j->p += 4, 1;
        return 0;
    case 'f':
        if (j->end - j->p >= 5 && !memcmp(j->p, "false", 5)) return j->p += 5, 1;
        return 0;
    case 'n':
        if (j->end - j->p >= 4 && !memcmp(j->p, "null", 4)) return j->p += 4, 1;
        return 0;
    default:
        return jnumber(j, NULL, NULL);
    }
}

static int is_digits(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d), as loadgen.py's TS_RE */
static int rfc3339(const uint8_t *s, size_t n) {
    if (n < 21 || !is_digits(s, 4) || s[4] != '-' || !is_digits(s + 5, 2) || s[7] != '-' ||
        !is_digits(s + 8, 2) || s[10] != 'T' || !is_digits(s + 11, 2) || s[13] != ':' ||
        !is_digits(s + 14, 2) || s[16] != ':' || !is_digits(s + 17, 2) || s[19] != '.')
        return 0;
    size_t i = 20;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == 20) return 0;
    if (i + 1 == n && s[i] == 'Z') return 1;
    return i + 6 == n && (s[i] == '+' || s[i] == '-') && is_digits(s + i + 1, 2) &&
           s[i + 3] == ':' && is_digits(s + i + 4, 2);
}

typedef struct {
    int ok; /* 0, or the E_ kind of the first failed check */
    int64_t u, seq, ts;
    int resync; /* a well-formed resync frame (ok is then E_TYPE_TS: no notification) */
} verdict_t;

/* The payload object: u, seq and ts must be integers (other members: any JSON). */
static int jpayload(jp_t *j, verdict_t *v, int *have) {
    if (j->p >= j->end || *j->p != '{') return jvalue(j, 1);
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == '}') return j->p++, 1;
    for (;;) {
        const uint8_t *k;
        size_t kn;
        if (!jstring(j, &k, &kn)) return 0;
        ws(j);
        if (j->p >= j->end || *j->p++ != ':') return 0;
        ws(j);
        int64_t *slot = NULL;
        int bit = 0;
        if (kn == 1 && k[0] == 'u') slot = &v->u, bit = 1;
        else if (kn == 3 && !memcmp(k, "seq", 3)) slot = &v->seq, bit = 2;
        else if (kn == 2 && !memcmp(k, "ts", 2)) slot = &v->ts, bit = 4;
        if (slot && j->p < j->end && (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))) {
            int is_int;
            if (!jnumber(j, slot, &is_int)) return 0;
            if (is_int) *have |= bit;
        } else if (!jvalue(j, 2)) {
            return 0;
        }
        int more = jnext(j, '}');
        if (more <= 0) return more == 0;
    }
}

static verdict_t check_frame(const uint8_t *data, size_t n) {
    static const char *keys[] = {"type", "payload", "timestamp"};
    verdict_t v = {E_JSON, 0, 0, 0, 0};
    jp_t j = {data, data + n};
    const uint8_t *type = NULL, *ts = NULL;
    size_t type_n = 0, ts_n = 0;
    int have = 0, nkeys = 0, keys_ok = 1, type_str = 0, ts_str = 0;
    ws(&j);
    if (j.p >= j.end || *j.p != '{') {
        /* not an object: valid JSON is a key error, anything else a JSON error */
        if (!jvalue(&j, 0)) return v;
        ws(&j);
        if (j.p != j.end) return v;
        v.ok = E_KEYS;
        return v;
    }
    j.p++;
    ws(&j);
    if (j.p < j.end && *j.p == '}') {
        j.p++;
        keys_ok = 0;
    } else {
        for (;;) {
            const uint8_t *k;
            size_t kn;
            if (!jstring(&j, &k, &kn)) return v;
            ws(&j);
            if (j.p >= j.end || *j.p++ != ':') return v;
            ws(&j);
            int idx = nkeys < 3 && strlen(keys[nkeys]) == kn && !memcmp(k, keys[nkeys], kn)
                          ? nkeys : -1;
            if (idx < 0) keys_ok = 0;
            nkeys++;
            if (idx == 0 && j.p < j.end && *j.p == '"') {
                if (!jstring(&j, &type, &type_n)) return v;
                type_str = 1;
            } else if (idx == 2 && j.p < j.end && *j.p == '"') {
                if (!jstring(&j, &ts, &ts_n)) return v;
                ts_str = 1;
            } else if (idx == 1) {
                if (!jpayload(&j, &v, &have)) return v;
            } else if (!jvalue(&j, 1)) {
                return v;
            }
            int more = jnext(&j, '}');
            if (more < 0) return v;
            if (more == 0) break;
        }
    }
    ws(&j);
    if (j.p != j.end) return v; /* trailing data: two documents, or garbage */
    if (!keys_ok || nkeys != 3) {
        v.ok = E_KEYS;
    } else if (!type_str || type_n != 12 || memcmp(type, "notification", 12) || !ts_str ||
               !rfc3339(ts, ts_n)) {
        v.ok = E_TYPE_TS;
        v.resync = type_str && type_n == 6 && !memcmp(type, "resync", 6) && ts_str &&
                   rfc3339(ts, ts_n);
    } else if (have != 7) {
        v.ok = E_PAYLOAD;
    } else {
        v.ok = 0;
    }
    return v;
}

/* The coordinator's shared counters: [workers] frames received, [workers] last frame time. */
static int64_t *shared;
static int n_workers;

static int map_counts(const char *path, int index) {
    int cfd = open(path, O_RDWR);
    off_t size = cfd < 0 ? 0 : lseek(cfd, 0, SEEK_END);
    if (size < 16 || index < 0 || index >= size / 16) return fprintf(stderr, "bad counts file\n"), 1;
    shared = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
    if (shared == MAP_FAILED) return perror("mmap"), 1;
    n_workers = (int)(size / 16);
    close(cfd);
    return 0;
}

/* -- the worker -------------------------------------------------------------------------- */
static conn_t *conns;
static int n_conns, port, epfd, idx;
static int64_t received;
static int64_t *lat;
static size_t lat_n, lat_cap;
static int recording;
static int64_t *hs; /* handshake times, ns */
static size_t hs_n, hs_cap;
static int resync_expected, resync_count;
static int64_t resync_last_ns;
static uint8_t rbuf[1 << 18];

/* connect phase */
static int connecting, next_new, opened, failed, concurrency, inflight;
static double connect_start;

/* one-entry-per-slot cache: a message fanned out to many connections is checked once */
#define CACHE_SLOTS 64
static struct {
    size_t n; /* length + 1: 0 is an empty slot */
    uint8_t data[512];
    verdict_t v;
} cache[CACHE_SLOTS];

static void send_small(conn_t *c, const void *data, size_t n) {
    if (c->fd >= 0 && send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)n)
        error(E_LOST, "user %d: short write of %zu bytes", c->uidx, n);
}

static void send_frame(conn_t *c, int opcode, const uint8_t *payload, size_t n) {
    uint8_t out[2 + 4 + 125];
    uint32_t r = (uint32_t)rand();
    if (n > 125) n = 125;
    out[0] = 0x80 | opcode;
    out[1] = 0x80 | (uint8_t)n;
    memcpy(out + 2, &r, 4);
    for (size_t i = 0; i < n; i++) out[6 + i] = payload[i] ^ out[2 + (i & 3)];
    send_small(c, out, 6 + n);
}

static void close_conn(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->state = C_DONE;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}

static void keep(conn_t *c, const uint8_t *data, size_t n) {
    if (n > c->cap) {
        c->cap = n < 4096 ? 4096 : n;
        c->buf = realloc(c->buf, c->cap);
        if (!c->buf) abort();
    }
    memmove(c->buf, data, n);
    c->len = n;
}

static void start_next(void);

static void connect_done(conn_t *c, int ok, const char *why) {
    inflight--;
    if (ok) {
        opened++;
        if (hs_n == hs_cap) {
            hs_cap = hs_cap ? hs_cap * 2 : 4096;
            hs = realloc(hs, hs_cap * sizeof *hs);
            if (!hs) abort();
        }
        hs[hs_n++] = now_ns() - c->started_ns;
    } else {
        failed++;
        error(E_CONNECT, "user %d: %s", c->uidx, why);
        close_conn(c);
    }
    start_next();
}

static void text_frame(conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    verdict_t v;
    unsigned slot = (unsigned)n;
    if (n > 24) slot += p[n - 1] * 31u + p[n - 12] * 7u + p[n / 2];
    slot %= CACHE_SLOTS;
    if (n <= sizeof cache[0].data && cache[slot].n == n + 1 && !memcmp(cache[slot].data, p, n)) {
        v = cache[slot].v;
    } else {
        v = check_frame(p, n);
        if (n <= sizeof cache[0].data) {
            cache[slot].n = n + 1;
            memcpy(cache[slot].data, p, n);
            cache[slot].v = v;
        }
    }
    if (v.resync && resync_expected) { /* not a message: counted apart */
        if (c->resync_ns) {
            error(E_RESYNC2, "user %d", c->uidx);
        } else {
            resync_count++;
            if (now > resync_last_ns) resync_last_ns = now;
        }
        c->resync_ns = now;
        return;
    }
    received++;
    if (v.ok) {
        error(v.ok, "%.*s", (int)(n < 120 ? n : 120), (const char *)p);
        return;
    }
    if (v.u != c->uidx) {
        error(E_MISROUTED, "user %d got message for %lld", c->uidx, (long long)v.u);
        return;
    }
    if (v.seq != c->next_seq)
        error(E_SEQ, "user %d: expected seq %lld, got %lld", c->uidx, (long long)c->next_seq,
              (long long)v.seq);
    c->next_seq = v.seq + 1;
    if (recording) {
        if (lat_n == lat_cap) {
            lat_cap = lat_cap ? lat_cap * 2 : 65536;
            lat = realloc(lat, lat_cap * sizeof *lat);
            if (!lat) abort();
        }
        lat[lat_n++] = now - v.ts;
    }
}

/* Frames in data[0:n]; returns how many bytes were consumed. */
static size_t frames(conn_t *c, const uint8_t *data, size_t n, int64_t now) {
    size_t pos = 0;
    while (n - pos >= 2 && c->state == C_OPEN) {
        uint8_t b0 = data[pos];
        uint64_t ln = data[pos + 1];
        size_t start;
        if (ln & 0x80) {
            error(E_MASKED, "user %d", c->uidx);
            ln &= 0x7F;
        }
        if (ln < 126) {
            start = pos + 2;
        } else if (ln == 126) {
            if (n - pos < 4) break;
            ln = (uint64_t)data[pos + 2] << 8 | data[pos + 3];
            start = pos + 4;
        } else {
            if (n - pos < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = ln << 8 | data[pos + 2 + i];
            start = pos + 10;
        }
        if (ln > n - start) break;
        pos = start + ln;
        const uint8_t *payload = data + start;
        if (b0 == 0x81) {
            text_frame(c, payload, ln, now);
            continue;
        }
        int opcode = b0 & 0x0F;
        if ((b0 & 0x80) && opcode == 0x9) {
            send_frame(c, 0xA, payload, ln);
        } else if ((b0 & 0x80) && opcode == 0xA) {
        } else if ((b0 & 0x80) && opcode == 0x8) {
            int code = ln >= 2 ? payload[0] << 8 | payload[1] : -1;
            error(E_CLOSED, "user %d: code %d", c->uidx, code);
            send_frame(c, 0x8, payload, ln >= 2 ? 2 : 0);
            close_conn(c);
            return n;
        } else {
            error(E_NOT_TEXT, "header byte %#x (fragment/rsv/binary)", b0);
        }
    }
    return pos;
}

static void on_bytes(conn_t *c, const uint8_t *in, size_t n) {
    int64_t now = now_ns();
    const uint8_t *data = in;
    if (c->len) { /* complete what the last read left */
        if (c->len + n > c->cap) {
            c->cap = (c->len + n) * 2;
            c->buf = realloc(c->buf, c->cap);
            if (!c->buf) abort();
        }
        memcpy(c->buf + c->len, in, n);
        n += c->len;
        c->len = 0;
        data = c->buf;
    }
    if (c->state == C_HANDSHAKE) {
        const uint8_t *end = memmem(data, n, "\r\n\r\n", 4);
        if (!end) {
            if (n > 8192) connect_done(c, 0, "oversized handshake response");
            else keep(c, data, n);
            return;
        }
        size_t head = (size_t)(end - data);
        if (n < 12 || memcmp(data, "HTTP/1.1 101", 12)) {
            char status[100];
            size_t sl = (size_t)((uint8_t *)memchr(data, '\r', head + 1) - data);
            snprintf(status, sizeof status, "upgrade refused: %.*s", (int)(sl < 80 ? sl : 80),
                     (const char *)data);
            connect_done(c, 0, status);
            return;
        }
        if (!memmem(data, head, WS_ACCEPT, sizeof WS_ACCEPT - 1)) {
            connect_done(c, 0, "bad Sec-WebSocket-Accept");
            return;
        }
        c->state = C_OPEN;
        c->was_open = 1;
        connect_done(c, 1, NULL);
        data += head + 4;
        n -= head + 4;
    }
    int64_t before = received;
    size_t used = frames(c, data, n, now);
    if (c->state == C_OPEN && used < n) keep(c, data + used, n - used);
    if (shared && received != before) {
        shared[idx] = received;
        shared[n_workers + idx] = now;
    }
}

static void on_readable(conn_t *c) {
    ssize_t got = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (got > 0) {
        on_bytes(c, rbuf, (size_t)got);
    } else if (got < 0 && (errno == EAGAIN || errno == EINTR)) {
    } else if (c->state == C_HANDSHAKE) {
        connect_done(c, 0, "closed during handshake");
    } else {
        error(E_LOST, "user %d: %s", c->uidx, got ? strerror(errno) : "end of stream");
        close_conn(c);
    }
}

static void on_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        connect_done(c, 0, strerror(err));
        return;
    }
    char req[2048];
    int n = snprintf(req, sizeof req,
                     "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                     "Sec-WebSocket-Version: 13\r\nOrigin: " ORIGIN "\r\n"
                     "Cookie: smap_auth_token=%s\r\n\r\n",
                     port, c->token);
    c->state = C_HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    send_small(c, req, (size_t)n);
}

static void start_next(void) {
    while (connecting && inflight < concurrency && next_new < n_conns) {
        conn_t *c = &conns[next_new++];
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        inflight++;
        c->started_ns = now_ns();
        if (c->fd < 0) {
            connect_done(c, 0, strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->state = C_CONNECTING;
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
            connect_done(c, 0, strerror(errno));
    }
    if (connecting && inflight == 0 && next_new == n_conns) {
        connecting = 0;
        printf("connected %.6f %.6f %d %d\n", connect_start, now_ns() / 1e9, opened, failed);
        fflush(stdout);
    }
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch > 0x7E) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

static void print_errors(void) {
    printf("{");
    int first = 1;
    for (int k = 0; k < E_KINDS; k++) {
        if (!err_count[k]) continue;
        printf("%s", first ? "" : ",");
        json_str(stdout, KINDS[k]);
        printf(":%ld", err_count[k]);
        first = 0;
    }
    printf("}");
}

static void finish(int64_t published, int64_t users) {
    int wrong = 0;
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = &conns[i];
        if (!c->was_open) continue;
        int64_t expected = published / users + (c->uidx < published % users ? 1 : 0);
        if (c->next_seq != expected) {
            wrong++;
            error(E_COUNT, "user %d: got up to %lld, want %lld", c->uidx,
                  (long long)c->next_seq, (long long)expected);
        }
        if (c->fd >= 0) close(c->fd);
    }
    printf("result {\"received\":%lld,\"conns\":%d,\"wrong_count_conns\":%d,\"errors\":",
           (long long)received, opened, wrong);
    print_errors();
    printf(",\"error_samples\":[");
    for (int i = 0; i < n_samples; i++) {
        printf("%s", i ? "," : "");
        json_str(stdout, samples[i]);
    }
    printf("]}\n");
    fflush(stdout);
}

static int command(char *line) {
    long long a = 0, b = 0;
    if (sscanf(line, "connect %lld", &a) == 1) {
        concurrency = a > 0 ? (int)a : 1;
        connecting = 1;
        connect_start = now_ns() / 1e9;
        start_next();
    } else if (sscanf(line, "latency %lld", &a) == 1) {
        printf("latency %zu\n", lat_n * sizeof *lat);
        fflush(stdout);
        if (lat_n && fwrite(lat, sizeof *lat, lat_n, stdout) != lat_n) exit(3);
        fflush(stdout);
        lat_n = 0;
        recording = a != 0;
    } else if (!strcmp(line, "handshakes")) {
        printf("handshakes %zu\n", hs_n * sizeof *hs);
        fflush(stdout);
        if (hs_n && fwrite(hs, sizeof *hs, hs_n, stdout) != hs_n) exit(3);
        fflush(stdout);
        hs_n = 0;
    } else if (sscanf(line, "resyncs %lld", &a) == 1) {
        resync_expected = a != 0;
        printf("resyncs %d %lld\n", resync_count, (long long)resync_last_ns);
        fflush(stdout);
    } else if (sscanf(line, "finish %lld %lld", &a, &b) == 2) {
        finish(a, b);
        return 0;
    } else {
        fprintf(stderr, "wsclient: unknown command %s\n", line);
        exit(2);
    }
    return 1;
}

/* selfcheck.py: cases of raw server bytes for one open connection of user 0, one chunk
 * per line in hex, each case ended by an empty line -> "NEXT_SEQ {errors}" per case. */
static int check_mode(void) {
    char *line = NULL;
    size_t cap = 0;
    conn_t c = {.fd = -1, .state = C_OPEN, .uidx = 0, .was_open = 1};
    uint8_t *buf = NULL;
    while (getline(&line, &cap, stdin) > 0) {
        size_t n = 0, len = strlen(line);
        buf = realloc(buf, len / 2 + 1);
        for (char *h = line; hexval((uint8_t)h[0]) >= 0 && hexval((uint8_t)h[1]) >= 0; h += 2)
            buf[n++] = (uint8_t)(hexval((uint8_t)h[0]) << 4 | hexval((uint8_t)h[1]));
        if (n) {
            if (c.state == C_OPEN) on_bytes(&c, buf, n);
            continue;
        }
        printf("%lld ", (long long)c.next_seq);
        print_errors();
        printf("\n");
        fflush(stdout);
        memset(err_count, 0, sizeof err_count);
        memset(cache, 0, sizeof cache);
        n_samples = 0;
        free(c.buf);
        c = (conn_t){.fd = -1, .state = C_OPEN, .uidx = 0, .was_open = 1};
    }
    free(line);
    free(buf);
    return 0;
}


/* -- the publisher ----------------------------------------------------------------------- */
/* RESP over a blocking socket. Message i goes to user i % U with sequence i / U, stamped
 * with CLOCK_MONOTONIC just before its batch is written, as loadgen.py's Publisher. */
static int rfd, n_users, conns_per_user;
static int64_t pub_i, pub_pending, pub_zero, pub_errors;
static char *pbuf;
static size_t pbuf_cap;
static char rtail[64];
static size_t rtail_n;

static void write_all(const char *p, size_t n) {
    while (n) {
        ssize_t w = send(rfd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            perror("publisher: write to redis");
            exit(1);
        }
        p += w, n -= (size_t)w;
    }
}

static void read_replies(int block) {
    static char in[1 << 18];
    while (pub_pending > 0) {
        ssize_t got = recv(rfd, in, sizeof in, block ? 0 : MSG_DONTWAIT);
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (block) continue;
            return;
        }
        if (got <= 0) {
            fprintf(stderr, "publisher: redis closed the connection\n");
            exit(1);
        }
        /* every reply is one line (":N" or "-ERR ..."): count lines, ":0" and errors */
        for (ssize_t k = 0; k < got; k++) {
            char ch = in[k];
            if (rtail_n < sizeof rtail) rtail[rtail_n++] = ch;
            if (ch != '\n') continue;
            pub_pending--;
            if (rtail_n == 4 && !memcmp(rtail, ":0\r\n", 4)) pub_zero++;
            if (rtail[0] == '-') pub_errors++;
            rtail_n = 0;
        }
    }
}

static void publish_batch(int64_t k) {
    int64_t ts = now_ns();
    size_t need = (size_t)k * 300, n = 0;
    if (need > pbuf_cap) {
        pbuf_cap = need;
        pbuf = realloc(pbuf, pbuf_cap);
        if (!pbuf) abort();
    }
    for (int64_t i = pub_i; i < pub_i + k; i++) {
        char msg[200];
        int64_t u = i % n_users;
        int ml = snprintf(msg, sizeof msg,
                          "{\"type\":\"notification\",\"payload\":{\"u\":%lld,\"seq\":%lld,"
                          "\"ts\":%lld,\"pad\":\"%s\"}}",
                          (long long)u, (long long)(i / n_users), (long long)ts,
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        n += (size_t)sprintf(pbuf + n,
                             "*3\r\n$7\r\nPUBLISH\r\n$26\r\nuser_noti:bench-user-%05lld\r\n"
                             "$%d\r\n%s\r\n",
                             (long long)u, ml, msg);
    }
    pub_i += k;
    pub_pending += k;
    write_all(pbuf, n);
}

static int64_t delivered_msgs(void) {
    int64_t sum = 0;
    for (int w = 0; w < n_workers; w++) sum += shared[w];
    return sum / conns_per_user;
}

static void sleep_ns(int64_t ns) {
    if (ns <= 0) return;
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    nanosleep(&ts, NULL);
}

static int wait_sub(double timeout) {
    int64_t deadline = now_ns() + (int64_t)(timeout * 1e9);
    static const char cmd[] = "*2\r\n$6\r\nPUBSUB\r\n$6\r\nNUMPAT\r\n";
    while (now_ns() < deadline) {
        char in[64];
        write_all(cmd, sizeof cmd - 1);
        ssize_t got = recv(rfd, in, sizeof in, 0);
        if (got <= 0) return 0;
        if (!(got == 4 && !memcmp(in, ":0\r\n", 4))) return 1;
        sleep_ns(50000000);
    }
    return 0;
}

static void burst(int64_t n, int64_t window_per_user) {
    int64_t window = window_per_user * n_users, end = pub_i + n, waited = 0;
    int64_t t0 = now_ns();
    while (pub_i < end) {
        int64_t room = window - (pub_i - delivered_msgs());
        if (room <= 0) {
            waited++;
            sleep_ns(500000);
            continue;
        }
        int64_t k = room < 1000 ? room : 1000;
        if (k > end - pub_i) k = end - pub_i;
        publish_batch(k);
        read_replies(1);
    }
    printf("burst {\"t_start_ns\":%lld,\"t_end_ns\":%lld,\"sent\":%lld,\"window_waits\":%lld,"
           "\"zero_receivers\":%lld,\"redis_errors\":%lld,\"published\":%lld}\n",
           (long long)t0, (long long)now_ns(), (long long)n, (long long)waited,
           (long long)pub_zero, (long long)pub_errors, (long long)pub_i);
    fflush(stdout);
}

static void rate_run(double rate, double duration) {
    int64_t total = (int64_t)(rate * duration);
    if (total < 1) total = 1;
    int64_t t0 = now_ns(), sent = 0;
    double max_lag = 0;
    while (sent < total) {
        int64_t now = now_ns();
        int64_t due = (int64_t)((now - t0) / 1e9 * rate) + 1;
        if (due > total) due = total;
        due -= sent;
        if (due <= 0) {
            sleep_ns(t0 + (int64_t)(sent / rate * 1e9) - now);
            continue;
        }
        double lag = (now - t0) / 1e9 - (sent + due - 1) / rate;
        if (lag > max_lag) max_lag = lag;
        int64_t k = due < 500 ? due : 500;
        publish_batch(k);
        sent += k;
        read_replies(0);
    }
    int64_t t1 = now_ns();
    read_replies(1);
    printf("rate {\"sent\":%lld,\"rate_achieved\":%.1f,\"publisher_max_lag_ms\":%.3f,"
           "\"zero_receivers\":%lld,\"redis_errors\":%lld,\"published\":%lld}\n",
           (long long)total, total / ((t1 - t0) / 1e9 > 1e-9 ? (t1 - t0) / 1e9 : 1e-9),
           max_lag * 1000, (long long)pub_zero, (long long)pub_errors, (long long)pub_i);
    fflush(stdout);
}

/* wsclient --publish REDIS_PORT USERS CONNS_PER_USER COUNTS_FILE */
static int publisher_mode(char **argv) {
    int redis_port = atoi(argv[2]);
    n_users = atoi(argv[3]);
    conns_per_user = atoi(argv[4]);
    if (map_counts(argv[5], 0)) return 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)redis_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    rfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (rfd < 0 || connect(rfd, (struct sockaddr *)&sa, sizeof sa) < 0)
        return perror("publisher: connect to redis"), 1;
    int one = 1;
    setsockopt(rfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    printf("ready\n");
    fflush(stdout);
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, stdin) > 0) {
        double a, b;
        long long x, y;
        if (sscanf(line, "wait_sub %lf", &a) == 1) {
            printf("wait_sub %d\n", wait_sub(a));
            fflush(stdout);
        } else if (sscanf(line, "burst %lld %lld", &x, &y) == 2) {
            burst(x, y);
        } else if (sscanf(line, "rate %lf %lf", &a, &b) == 2) {
            rate_run(a, b);
        } else if (!strncmp(line, "stop", 4)) {
            break;
        } else {
            fprintf(stderr, "wsclient: unknown command %s", line);
            return 2;
        }
    }
    free(line);
    close(rfd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "--check")) return check_mode();
    if (argc == 6 && !strcmp(argv[1], "--publish")) return publisher_mode(argv);
    if (argc != 5) {
        fprintf(stderr, "usage: wsclient PORT TOKENS_FILE COUNTS_FILE INDEX\n"
                        "       wsclient --publish REDIS_PORT USERS CONNS_PER_USER COUNTS_FILE\n"
                        "       wsclient --check\n");
        return 2;
    }
    port = atoi(argv[1]);
    idx = atoi(argv[4]);
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl)) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    FILE *tf = fopen(argv[2], "r");
    if (!tf) return perror(argv[2]), 1;
    char *line = NULL;
    size_t cap = 0;
    int alloc = 0;
    while (getline(&line, &cap, tf) > 0) {
        int u;
        char tok[1800];
        if (sscanf(line, "%d %1799s", &u, tok) != 2) continue;
        if (n_conns == alloc) {
            alloc = alloc ? alloc * 2 : 1024;
            conns = realloc(conns, (size_t)alloc * sizeof *conns);
        }
        conns[n_conns++] = (conn_t){.fd = -1, .state = C_NEW, .uidx = u, .token = strdup(tok)};
    }
    fclose(tf);
    if (map_counts(argv[3], idx)) return 1;
    srand((unsigned)getpid());

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    printf("ready\n");
    fflush(stdout);
    char cmd[256];
    size_t cmd_n = 0;
    struct epoll_event events[512];
    int64_t last_scan = 0;
    for (;;) {
        int k = epoll_wait(epfd, events, 512, connecting ? 100 : 1000);
        for (int i = 0; i < k; i++) {
            uint32_t tag = events[i].data.u32;
            if (tag == STDIN_TAG) {
                ssize_t got = read(0, cmd + cmd_n, sizeof cmd - 1 - cmd_n);
                if (got <= 0) return 0; /* the coordinator went away */
                cmd_n += (size_t)got;
                char *nl;
                while ((nl = memchr(cmd, '\n', cmd_n))) {
                    *nl = 0;
                    if (!command(cmd)) return 0;
                    size_t rest = cmd_n - (size_t)(nl + 1 - cmd);
                    memmove(cmd, nl + 1, rest);
                    cmd_n = rest;
                }
                continue;
            }
            conn_t *c = &conns[tag];
            if (c->state == C_CONNECTING) on_connected(c);
            else if (c->state == C_HANDSHAKE || c->state == C_OPEN) on_readable(c);
        }
        int64_t now = now_ns();
        if (connecting && now - last_scan > 100000000LL) { /* timeouts, every 100 ms */
            last_scan = now;
            for (int i = 0; i < next_new; i++) {
                conn_t *c = &conns[i];
                if ((c->state == C_CONNECTING || c->state == C_HANDSHAKE) &&
                    now - c->started_ns > CONNECT_TIMEOUT_NS) {
                    c->state = C_HANDSHAKE;
                    connect_done(c, 0, "TimeoutError: no 101 within 30 s");
                }
            }
        }
    }
}
