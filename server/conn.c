/*
 * conn.c - the listening socket of `codemoe serve`, connection admission (total and per-address
 * caps, answered with an immediate 503) and the header / body deadlines that keep slow clients
 * (slowloris) from holding connections. See conn.h for the contract and docs/server.md for the knobs.
 *
 * Why our own accept: libmicrohttpd's own listener leaves clients beyond its connection limit in the
 * kernel backlog without a word, has no per-address cap, and its only timeout restarts on every byte
 * received. Accepting here and handing each admitted socket to it (MHD_add_connection) keeps all of
 * its HTTP handling while every connection is judged first.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "api.h"
#include "conn.h"

enum { PHASE_HEADERS = 0, PHASE_BODY, PHASE_BUSY };

struct srv_conn {
    srv_conns *cs;                 /* the list it is in (its limits) */
    srv_conn *prev, *next;
    struct sockaddr_storage addr;  /* the client's address (the per-address cap's key) */
    int fd;                        /* owned by the HTTP library; shut down here on a deadline only */
    int phase;                     /* PHASE_* */
    uint64_t header_deadline;      /* PHASE_HEADERS: ns; 0: none yet (kept-alive, idle timeout 0) */
    uint64_t body_start;           /* PHASE_BODY: when the headers were complete */
    uint64_t body_bytes;
    int shut;                      /* shut down already */
};

struct srv_conns {
    uv_loop_t *loop;
    srv_conn_limits lim;
    srv_metrics *m;
    srv_conn_add_fn add;
    void *ud;
    int fd;                        /* listening socket, -1 once closed */
    int reserve_fd;                /* spare descriptor, given up to answer a client when out of fds */
    int port;
    uv_poll_t poll;
    int polling, closing;
    srv_conn *head;
    int n;
    char *refuse_limit, *refuse_per_ip; /* canned responses (full HTTP/1.1 messages) */
};

static uint64_t secs_ns(double s) { return (uint64_t)(s * 1e9); }

/* ============================================================ canned refusals */

/* A whole 503 response with the JSON error body api/ renders: written with one send(2) on a fresh
 * connection, so it needs neither the HTTP library nor a buffer per refused client. */
static char *refusal(const char *detail) {
    api_error e;
    api_error_http(&e, 503, detail);
    char *body = api_error_json(&e);
    if (!body) return NULL;
    char *msg = NULL;
    if (asprintf(&msg, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                       "Connection: close\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body) < 0)
        msg = NULL;
    free(body);
    return msg;
}

static void refuse(int fd, const char *msg) {
    /* best effort: a fresh socket's send buffer takes a few hundred bytes without blocking; what the
     * client already sent is read first so that close() sends FIN, not a reset that could discard the
     * answer at the client */
    char sink[4096];
    while (recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0) {}
    if (msg) (void)!send(fd, msg, strlen(msg), MSG_DONTWAIT | MSG_NOSIGNAL);
    shutdown(fd, SHUT_WR);
    close(fd);
}

/* ============================================================ admission */

static int same_host(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family) return 0;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    if (a->ss_family == AF_INET6)
        return !memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &((const struct sockaddr_in6 *)b)->sin6_addr,
                       sizeof(struct in6_addr));
    return 1; /* other families (none today) share one cap */
}

static void conn_unlink(srv_conns *cs, srv_conn *c) {
    if (c->prev) c->prev->next = c->next;
    else cs->head = c->next;
    if (c->next) c->next->prev = c->prev;
    cs->n--;
    cs->m->conn_open = (uint64_t)cs->n;
}

static void admit(srv_conns *cs, int fd, const struct sockaddr_storage *ss, socklen_t len) {
    if (cs->n >= cs->lim.max_connections) {
        cs->m->conn_rejected_limit++;
        refuse(fd, cs->refuse_limit);
        return;
    }
    if (cs->lim.max_per_ip > 0) {
        int same = 0;
        for (srv_conn *c = cs->head; c && same < cs->lim.max_per_ip; c = c->next) same += same_host(&c->addr, ss);
        if (same >= cs->lim.max_per_ip) {
            cs->m->conn_rejected_per_ip++;
            refuse(fd, cs->refuse_per_ip);
            return;
        }
    }
    srv_conn *c = calloc(1, sizeof *c);
    if (!c) { refuse(fd, cs->refuse_limit); return; }
    c->cs = cs;
    c->addr = *ss;
    c->fd = fd;
    c->phase = PHASE_HEADERS;
    if (cs->lim.header_timeout > 0) c->header_deadline = uv_hrtime() + secs_ns(cs->lim.header_timeout);
    c->next = cs->head;
    if (cs->head) cs->head->prev = c;
    cs->head = c;
    cs->n++;
    cs->m->conn_open = (uint64_t)cs->n;
    if (cs->add(cs->ud, fd, (const struct sockaddr *)ss, len, c) < 0) {
        conn_unlink(cs, c);
        free(c);
    }
}

static void on_listen(uv_poll_t *p, int status, int events) {
    srv_conns *cs = p->data;
    (void)status;
    (void)events;
    /* a bounded batch per wake-up, so a flood of connects cannot starve the rest of the loop */
    for (int k = 0; k < 256 && cs->fd >= 0; k++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(cs->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) { admit(cs, fd, &ss, len); continue; }
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if ((errno == EMFILE || errno == ENFILE) && cs->reserve_fd >= 0) {
            /* out of descriptors: free the spare one to tell one waiting client, so the listen
             * socket does not stay readable (a busy loop) with clients hanging in the backlog */
            close(cs->reserve_fd);
            cs->reserve_fd = -1;
            fd = accept4(cs->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd >= 0) {
                cs->m->conn_rejected_limit++;
                refuse(fd, cs->refuse_limit);
            }
            cs->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            continue;
        }
        break; /* EAGAIN, or an error that accept will report again */
    }
}

/* ============================================================ listener */

srv_conns *srv_conns_create(uv_loop_t *loop, const struct sockaddr *addr, socklen_t addrlen,
                            const srv_conn_limits *limits, srv_metrics *m, srv_conn_add_fn add, void *ud) {
    srv_conns *cs = calloc(1, sizeof *cs);
    if (!cs) return NULL;
    cs->loop = loop;
    cs->lim = *limits;
    cs->m = m;
    cs->add = add;
    cs->ud = ud;
    cs->refuse_limit = refusal("The server has too many open connections. Please retry later.");
    cs->refuse_per_ip = refusal("Too many open connections from this address. Please retry later.");
    cs->fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    cs->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int one = 1;
    if (cs->fd < 0 || setsockopt(cs->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(cs->fd, addr, addrlen) < 0 || listen(cs->fd, SOMAXCONN) < 0) {
        int e = errno;
        fprintf(stderr, "codemoe serve: cannot listen: %s\n", strerror(e));
        if (cs->fd >= 0) close(cs->fd);
        if (cs->reserve_fd >= 0) close(cs->reserve_fd);
        free(cs->refuse_limit);
        free(cs->refuse_per_ip);
        free(cs);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(cs->fd, (struct sockaddr *)&ss, &len) == 0)
        cs->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                  : ((struct sockaddr_in *)&ss)->sin_port);
    uv_poll_init(loop, &cs->poll, cs->fd);
    cs->poll.data = cs;
    uv_poll_start(&cs->poll, UV_READABLE, on_listen);
    cs->polling = 1;
    return cs;
}

int srv_conns_port(const srv_conns *cs) { return cs->port; }

int srv_conns_count(const srv_conns *cs) { return cs->n; }

void srv_conns_stop_listening(srv_conns *cs) {
    if (cs->fd < 0) return;
    /* the poll handle lets go of the descriptor before it is closed (never the other way round) */
    uv_poll_stop(&cs->poll);
    close(cs->fd);
    cs->fd = -1;
}

static void on_poll_closed(uv_handle_t *hd) { (void)hd; }

void srv_conns_close(srv_conns *cs) {
    if (!cs || cs->closing) return;
    srv_conns_stop_listening(cs);
    cs->closing = 1;
    uv_close((uv_handle_t *)&cs->poll, on_poll_closed);
}

void srv_conns_free(srv_conns *cs) {
    if (!cs) return;
    while (cs->head) {
        srv_conn *c = cs->head;
        conn_unlink(cs, c);
        free(c);
    }
    if (cs->reserve_fd >= 0) close(cs->reserve_fd);
    free(cs->refuse_limit);
    free(cs->refuse_per_ip);
    free(cs);
}

/* ============================================================ deadlines */

static void conn_shut(srv_conn *c) {
    if (c->shut) return;
    c->shut = 1;
    shutdown(c->fd, SHUT_RDWR);
}

int srv_conns_check(srv_conns *cs, uint64_t now) {
    int n = 0;
    for (srv_conn *c = cs->head; c; c = c->next) {
        if (c->shut) continue;
        if (c->phase == PHASE_HEADERS && c->header_deadline && now >= c->header_deadline) {
            cs->m->conn_header_timeouts++;
            conn_shut(c);
            n++;
        } else if (c->phase == PHASE_BODY && cs->lim.min_body_rate > 0) {
            double t = (double)(now - c->body_start) / 1e9;
            if (t >= cs->lim.header_timeout && t > 0 && (double)c->body_bytes < cs->lim.min_body_rate * t) {
                cs->m->conn_body_timeouts++;
                conn_shut(c);
                n++;
            }
        }
    }
    return n;
}

/* ============================================================ progress reports */

void srv_conn_request_line(srv_conn *c, uint64_t now) {
    if (!c || c->phase != PHASE_HEADERS) return;
    srv_conns *cs = c->cs;
    if (cs->lim.header_timeout <= 0) return;
    uint64_t d = now + secs_ns(cs->lim.header_timeout);
    if (!c->header_deadline || d < c->header_deadline) c->header_deadline = d;
}

void srv_conn_headers_done(srv_conn *c, uint64_t now) {
    if (!c) return;
    c->phase = PHASE_BODY;
    c->body_start = now;
    c->body_bytes = 0;
}

void srv_conn_body(srv_conn *c, size_t n) {
    if (c) c->body_bytes += n;
}

void srv_conn_busy(srv_conn *c) {
    if (c) c->phase = PHASE_BUSY;
}

void srv_conn_request_done(srv_conn *c, uint64_t now) {
    if (!c) return;
    srv_conns *cs = c->cs;
    c->phase = PHASE_HEADERS;
    /* a kept-alive connection may idle (the HTTP library's idle timeout governs that) and then has
     * the header timeout for its next request; with no idle timeout only the request line starts it */
    c->header_deadline = cs->lim.header_timeout > 0 && cs->lim.idle_timeout > 0
                         ? now + secs_ns(cs->lim.idle_timeout + cs->lim.header_timeout) : 0;
}

void srv_conn_closed(srv_conn *c) {
    if (!c) return;
    conn_unlink(c->cs, c);
    free(c);
}
