/*
 * conn.h - admission and deadlines of client connections for `codemoe serve` (loop thread only).
 *
 * The server accepts TCP connections itself (libmicrohttpd runs without a listen socket) so that
 * every connection is counted and judged before the HTTP library sees it:
 * - beyond --max-connections in all, or --max-conn-per-ip from one address, a connection gets a
 *   canned 503 (the documented JSON error shape, Retry-After) at once and is closed, instead of
 *   waiting unseen in the kernel's backlog;
 * - an admitted connection has --header-timeout seconds from its accept (or from the start of its
 *   request line) to complete its request headers, and a request body must average
 *   --min-body-rate bytes/s once --header-timeout seconds of it have passed. A connection past its
 *   deadline is shut down (shutdown(2)): the HTTP library then reads EOF and closes it, so the
 *   descriptor keeps a single owner.
 * The HTTP front end reports each connection's progress (srv_conn_*); srv_conns_check, run from its
 * periodic timer, enforces the deadlines.
 */
#ifndef CM_SRV_CONN_H
#define CM_SRV_CONN_H

#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>

#include "metrics.h"

typedef struct srv_conn srv_conn;
typedef struct srv_conns srv_conns;

typedef struct srv_conn_limits {
    int max_connections;      /* open connections in all */
    int max_per_ip;           /* open connections from one client address; 0: no cap */
    double header_timeout;    /* seconds to complete a request's headers; 0: no deadline */
    double idle_timeout;      /* seconds a kept-alive connection may wait for its next request (the
                                 HTTP library's own idle timeout; 0: never) */
    double min_body_rate;     /* bytes/s a body must average after header_timeout seconds; 0: off */
} srv_conn_limits;

/* Hands an admitted connection to the HTTP library, which owns (and closes) fd from then on, even
 * when it fails. On success the front end keeps c with the connection, reports its progress and
 * calls srv_conn_closed when the library closes it. Returns 0, or -1 (c is then freed here). */
typedef int (*srv_conn_add_fn)(void *ud, int fd, const struct sockaddr *addr, socklen_t addrlen, srv_conn *c);

/* Creates the listener bound to addr, listening and watched on loop. m (borrowed, outlives the
 * result) counts refusals and deadline closes. Returns NULL and writes the reason to stderr on
 * failure (nothing is left open). */
srv_conns *srv_conns_create(uv_loop_t *loop, const struct sockaddr *addr, socklen_t addrlen,
                            const srv_conn_limits *limits, srv_metrics *m, srv_conn_add_fn add, void *ud);
/* The bound port. */
int srv_conns_port(const srv_conns *cs);
/* Stops accepting and closes the listening socket; open connections go on. Idempotent. */
void srv_conns_stop_listening(srv_conns *cs);
/* Closes the listener's handles (idempotent); every connection must have been closed
 * (srv_conn_closed) by then. The struct is freed by srv_conns_free once uv_run has finished closing. */
void srv_conns_close(srv_conns *cs);
void srv_conns_free(srv_conns *cs);
/* Shuts down every connection past its deadline (call every few hundred ms); returns how many. */
int srv_conns_check(srv_conns *cs, uint64_t now_ns);
int srv_conns_count(const srv_conns *cs);

/* Progress reports of one connection (c may be NULL: then they do nothing). */
void srv_conn_request_line(srv_conn *c, uint64_t now_ns);    /* a request line has arrived */
void srv_conn_headers_done(srv_conn *c, uint64_t now_ns);    /* headers complete; a body may follow */
void srv_conn_body(srv_conn *c, size_t n);                   /* n body bytes arrived */
void srv_conn_busy(srv_conn *c);                             /* the request is read: no deadline */
void srv_conn_request_done(srv_conn *c, uint64_t now_ns);    /* response sent; kept alive for the next */
/* The HTTP library closes c (its descriptor is still open): forgets and frees c. */
void srv_conn_closed(srv_conn *c);

#endif
