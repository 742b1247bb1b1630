/* The streams benchmark's load side in C: an upstream that drips SSE and a stream generator.
 *
 * Both share the machine's two cores with the node under test. In Python (bench/upstream.py
 * and bench/streams.py) they cost about two thirds of a core at 2,000 streams of 100 ms
 * chunks, which the node then cannot have; here they cost what the kernel does for them.
 * bench/native.py compiles this file with the system's cc for each run (no build output is
 * kept) and writes the bytes both sides send, so the wire format stays defined in Python.
 *
 *   sseload upstream --port P --blobs FILE [--chunk-ms MS]
 *       blobs: [0] a whole JSON reply, [1] a whole SSE reply, [2..] the SSE reply cut into the
 *       writes of a dripped stream. Requests are framed by Content-Length (keep-alive); a body
 *       with "stream":true is answered with [1], or with [2..] one write per MS from the first
 *       (a fixed schedule, as a model's tokens come) when MS > 0; anything else with [0].
 *
 *   sseload streams --port P --blobs FILE --streams N --ramp-s R --timeout-s T
 *       blobs: [0] the request. Opens N connections over R seconds, sends the request on each,
 *       reads the response until "data: [DONE]". Prints one line per stream:
 *       "<first event s or -> <worst gap s> <worst gap's end s> <events> <error or ok>", where
 *       first is from the request written to the first read carrying an event, the worst gap
 *       the longest interval between two reads carrying events (as bench/streams.py's Python
 *       generator), and its end is counted from the wave's start.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    char *data;
    size_t len;
} blob;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (q == NULL && n) die("realloc");
    return q;
}

/* FILE: a 4-byte little-endian count, then per blob a 4-byte little-endian length and bytes. */
static blob *read_blobs(const char *path, uint32_t *count) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die(path);
    uint32_t n;
    if (fread(&n, 4, 1, f) != 1) die("blobs: count");
    blob *out = xrealloc(NULL, sizeof(blob) * (n ? n : 1));
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len;
        if (fread(&len, 4, 1, f) != 1) die("blobs: length");
        out[i].data = xrealloc(NULL, len ? len : 1);
        out[i].len = len;
        if (len && fread(out[i].data, 1, len, f) != len) die("blobs: data");
    }
    fclose(f);
    *count = n;
    return out;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static const char *arg(int argc, char **argv, const char *name, const char *dflt) {
    for (int i = 2; i + 1 < argc; i += 2)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    if (dflt == NULL) {
        fprintf(stderr, "sseload: %s is required\n", name);
        exit(2);
    }
    return dflt;
}

/* ---------------------------------------------------------------- upstream */

typedef struct {
    int fd;
    unsigned gen;     /* bumped when the fd closes, so stale timers are skipped */
    char *in;
    size_t in_len, in_cap;
    char *out;        /* bytes the socket would not take yet */
    size_t out_len, out_off;
    int dripping;     /* a dripped stream is under way: its next request waits */
} uconn;

typedef struct {
    double due;
    int fd;
    unsigned gen;
    uint32_t next;    /* the drip frame to write */
    double start;
} timer;

static uconn *conns;
static size_t nconns;
static timer *heap;
static size_t heap_len, heap_cap;
static int ep;

static void heap_push(timer t) {
    if (heap_len == heap_cap) {
        heap_cap = heap_cap ? heap_cap * 2 : 1024;
        heap = xrealloc(heap, heap_cap * sizeof(timer));
    }
    size_t i = heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (heap[parent].due <= t.due) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = t;
}

static timer heap_pop(void) {
    timer top = heap[0];
    timer last = heap[--heap_len];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= heap_len) break;
        if (child + 1 < heap_len && heap[child + 1].due < heap[child].due) child++;
        if (last.due <= heap[child].due) break;
        heap[i] = heap[child];
        i = child;
    }
    if (heap_len) heap[i] = last;
    return top;
}

static uconn *uconn_of(int fd) {
    if ((size_t)fd >= nconns) {
        size_t n = nconns ? nconns : 1024;
        while (n <= (size_t)fd) n *= 2;
        conns = xrealloc(conns, n * sizeof(uconn));
        memset(conns + nconns, 0, (n - nconns) * sizeof(uconn));
        nconns = n;
    }
    return &conns[fd];
}

static void uclose(uconn *c) {
    close(c->fd);
    c->gen++;
    c->in_len = c->out_len = c->out_off = 0;
    c->dripping = 0;
    c->fd = -1;
}

static void want_out(uconn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write now what the socket takes; keep the rest for EPOLLOUT. */
static void usend(uconn *c, const char *data, size_t len) {
    if (c->out_len == c->out_off) {
        ssize_t n = write(c->fd, data, len);
        if (n < 0) {
            if (errno != EAGAIN) return;  /* the read side sees the close */
            n = 0;
        }
        if ((size_t)n == len) return;
        data += n;
        len -= (size_t)n;
        c->out_len = c->out_off = 0;
        want_out(c, 1);
    }
    c->out = xrealloc(c->out, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

static void uflush(uconn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n <= 0) return;
        c->out_off += (size_t)n;
    }
    c->out_len = c->out_off = 0;
    want_out(c, 0);
}

static blob *ublobs;
static uint32_t nublobs;
static double interval;

static void uparse(uconn *c) {
    size_t pos = 0;
    while (!c->dripping) {
        char *base = c->in + pos;
        size_t avail = c->in_len - pos;
        char *end = memmem(base, avail, "\r\n\r\n", 4);
        if (end == NULL) break;
        size_t head_len = (size_t)(end - base);
        size_t length = 0;
        for (char *p = base; p + 16 <= end; p++) {
            if ((p == base || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
                length = strtoul(p + 15, NULL, 10);
                break;
            }
        }
        size_t total = head_len + 4 + length;
        if (avail < total) break;
        char *body = end + 4;
        int streaming = memmem(body, length, "\"stream\":true", 13) != NULL ||
                        memmem(body, length, "\"stream\": true", 14) != NULL;
        pos += total;
        if (streaming && interval > 0) {
            double start = now_s();
            usend(c, ublobs[2].data, ublobs[2].len);
            if (nublobs > 3) {
                heap_push((timer){start + interval, c->fd, c->gen, 3, start});
                c->dripping = 1;  /* keep-alive clients send the next request after this one ends */
            }
        } else {
            blob *b = &ublobs[streaming ? 1 : 0];
            usend(c, b->data, b->len);
        }
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
}

static void fire_timers(void) {
    double now = now_s();
    while (heap_len && heap[0].due <= now) {
        timer t = heap_pop();
        uconn *c = &conns[t.fd];
        if (c->fd != t.fd || c->gen != t.gen) continue;
        usend(c, ublobs[t.next].data, ublobs[t.next].len);
        if (t.next + 1 < nublobs) {
            uint32_t k = t.next + 1 - 2;  /* frames written so far, from the first */
            heap_push((timer){t.start + k * interval, t.fd, t.gen, t.next + 1, t.start});
        } else {
            c->dripping = 0;
            uparse(c);
        }
    }
}

static int run_upstream(int argc, char **argv) {
    int port = atoi(arg(argc, argv, "--port", NULL));
    ublobs = read_blobs(arg(argc, argv, "--blobs", NULL), &nublobs);
    interval = atof(arg(argc, argv, "--chunk-ms", "0")) / 1000.0;
    if (nublobs < 3) {
        fprintf(stderr, "sseload upstream: blobs needs a reply, a stream and its drip frames\n");
        return 2;
    }
    raise_nofile();
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, arg(argc, argv, "--host", "127.0.0.1"), &sa.sin_addr);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    nonblock(ls);
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256];
    char buf[65536];
    for (;;) {
        int timeout = -1;
        if (heap_len) {
            double wait = heap[0].due - now_s();
            timeout = wait <= 0 ? 0 : (int)(wait * 1000.0 + 0.999);
        }
        int n = epoll_wait(ep, evs, 256, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    nodelay(cfd);
                    uconn *c = uconn_of(cfd);
                    c->fd = cfd;
                    c->in_len = c->out_len = c->out_off = 0;
                    c->dripping = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            uconn *c = &conns[fd];
            if (c->fd != fd) continue;
            if (evs[i].events & EPOLLOUT) uflush(c);
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    uclose(c);
                    continue;
                }
                if (r < 0) continue;
                if (c->in_len + (size_t)r > c->in_cap) {
                    c->in_cap = (c->in_len + (size_t)r) * 2;
                    c->in = xrealloc(c->in, c->in_cap);
                }
                memcpy(c->in + c->in_len, buf, (size_t)r);
                c->in_len += (size_t)r;
                uparse(c);
            }
        }
        fire_timers();
    }
}

/* ---------------------------------------------------------------- generator */

enum { IDLE, CONNECTING, READING, DONE };

typedef struct {
    int fd;
    int state;
    double started, sent, last, deadline;
    double first, worst;   /* first < 0: no event yet */
    double worst_at;       /* when the worst gap ended, from the wave's start */
    long events;
    size_t written;
    char head[16];
    size_t head_len;
    const char *error;
    char errbuf[48];
} stream;

static stream *streams;
static long nstreams, ndone;
static double wave_start;

static void gend(stream *s, const char *error) {
    if (s->state == DONE) return;
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    s->state = DONE;
    s->error = error;
    ndone++;
}

static void gerrno(stream *s, const char *what, int err) {
    snprintf(s->errbuf, sizeof s->errbuf, "%s: %s", what, strerrorname_np(err) ? strerrorname_np(err) : "?");
    gend(s, s->errbuf);
}

static void gread(stream *s, char *buf, size_t cap) {
    ssize_t r = read(s->fd, buf, cap);
    double now = now_s();
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) gerrno(s, "read", errno);
        return;
    }
    if (r == 0) {
        gend(s, "closed early");
        return;
    }
    if (s->events == 0 && s->head_len < 12) {
        size_t take = (size_t)r < 12 - s->head_len ? (size_t)r : 12 - s->head_len;
        memcpy(s->head + s->head_len, buf, take);
        s->head_len += take;
        if (s->head_len == 12 && memcmp(s->head, "HTTP/1.1 200", 12) != 0) {
            snprintf(s->errbuf, sizeof s->errbuf, "status %.3s", s->head + 9);
            gend(s, s->errbuf);
            return;
        }
    }
    long n = 0;
    for (char *p = buf, *end = buf + r; (p = memmem(p, (size_t)(end - p), "data: ", 6)) != NULL; p += 6) n++;
    if (n) {
        if (s->first < 0)
            s->first = now - s->sent;
        else if (now - s->last > s->worst) {
            s->worst = now - s->last;
            s->worst_at = now - wave_start;
        }
        s->last = now;
        s->events += n;
    }
    if (memmem(buf, (size_t)r, "data: [DONE]", 12) != NULL) gend(s, NULL);
}

static int run_streams(int argc, char **argv) {
    int port = atoi(arg(argc, argv, "--port", NULL));
    uint32_t nb;
    blob *req = read_blobs(arg(argc, argv, "--blobs", NULL), &nb);
    if (nb < 1) die("blobs: the request");
    nstreams = atol(arg(argc, argv, "--streams", NULL));
    double ramp = atof(arg(argc, argv, "--ramp-s", "1"));
    double timeout = atof(arg(argc, argv, "--timeout-s", "60"));
    raise_nofile();
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, arg(argc, argv, "--host", "127.0.0.1"), &sa.sin_addr);
    streams = xrealloc(NULL, (size_t)(nstreams ? nstreams : 1) * sizeof(stream));
    memset(streams, 0, (size_t)(nstreams ? nstreams : 1) * sizeof(stream));
    ep = epoll_create1(0);
    struct epoll_event evs[512];
    static char buf[65536];
    double t0 = now_s(), next_check = t0 + 0.1;
    wave_start = t0;
    long started = 0;
    while (ndone < nstreams) {
        double now = now_s();
        while (started < nstreams && now >= t0 + ramp * (double)started / (double)nstreams) {
            stream *s = &streams[started++];
            s->first = -1;
            s->started = now;
            s->deadline = now + timeout;
            s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (s->fd < 0) {
                gerrno(s, "connect", errno);
                continue;
            }
            nodelay(s->fd);
            if (connect(s->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
                gerrno(s, "connect", errno);
                continue;
            }
            s->state = CONNECTING;
            struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)(s - streams)};
            epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
        }
        int wait_ms = 100;
        if (started < nstreams) {
            double due = t0 + ramp * (double)started / (double)nstreams - now_s();
            wait_ms = due <= 0 ? 0 : (int)(due * 1000.0 + 0.999);
            if (wait_ms > 100) wait_ms = 100;
        }
        int n = epoll_wait(ep, evs, 512, wait_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            stream *s = &streams[evs[i].data.u64];
            if (s->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    gerrno(s, "connect", err);
                    continue;
                }
                ssize_t w = write(s->fd, req[0].data + s->written, req[0].len - s->written);
                if (w < 0) {
                    if (errno != EAGAIN) gerrno(s, "write", errno);
                    continue;
                }
                s->written += (size_t)w;
                if (s->written < req[0].len) continue;
                s->sent = now_s();
                s->state = READING;
                struct epoll_event ev = {.events = EPOLLIN, .data.u64 = evs[i].data.u64};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
            } else if (s->state == READING) {
                gread(s, buf, sizeof buf);
            }
        }
        now = now_s();
        if (now >= next_check) {
            next_check = now + 0.1;
            for (long i = 0; i < started; i++)
                if (streams[i].state != DONE && now > streams[i].deadline) gend(&streams[i], "timeout");
        }
    }
    for (long i = 0; i < nstreams; i++) {
        stream *s = &streams[i];
        if (s->first < 0)
            printf("- %.6f %.6f %ld %s\n", s->worst, s->worst_at, s->events, s->error ? s->error : "ok");
        else
            printf("%.6f %.6f %.6f %ld %s\n", s->first, s->worst, s->worst_at, s->events,
                   s->error ? s->error : "ok");
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if (argc >= 2 && strcmp(argv[1], "upstream") == 0) return run_upstream(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "streams") == 0) return run_streams(argc, argv);
    fprintf(stderr, "usage: sseload upstream|streams --port P --blobs FILE ...\n");
    return 2;
}
