/*
 * http.c - the HTTP front end of `codemoe serve`: libmicrohttpd driven by the libuv loop, routes,
 * API keys, CORS, limits, completions (plain and SSE), cancellation, graceful shutdown, access log.
 * Besides OpenAI's routes it answers the ones editor plugins call on other servers: Mistral's FIM
 * route, Tabby's health, llama.cpp's tokenizer routes and /props (see docs/server.md), and the admin
 * routes that load, replace and unload models of the pool (server/pool.c).
 *
 * Event loop integration: MHD runs in "external" epoll mode. Its epoll fd is watched by a uv_poll_t
 * and MHD_get_timeout drives a uv_timer_t; MHD_run is called only from those two callbacks, so every
 * MHD callback below runs on the loop thread and never re-enters MHD_run. No thread per connection.
 * MHD has no listen socket: conn.c accepts, refuses what is over the connection limits and enforces
 * the header/body deadlines; the connections it admits are handed to MHD here (add_connection).
 *
 * A completion request (any endpoint with an api_format: OpenAI completions and chat, Ollama, llama.cpp)
 * is validated by its format (api/) on the loop, its prompts are tokenized on libuv's thread pool
 * (never on the loop: a long prompt would stall every connection), then it is turned into a srv_job
 * and handed to the engine worker of the model its body names (srv_pool_find; the request holds that
 * model until it is freed, so an unloaded model finishes what it runs); the connection is suspended from the thread pool step on. The
 * worker's output arrives through srv_sched's wake-up (on_wake): the loop renders it through the
 * format and queues the response (JSON, or a chunked SSE / NDJSON stream whose reader drains a bounded
 * per-request buffer) and resumes the connection. While a request waits (thread pool or worker), a
 * uv_poll_t on its socket watches for the client hanging up (MHD does not see disconnects of suspended
 * connections), so a client that leaves cancels its generation at the worker's next step. The watch is
 * closed in MHD's completion callback, before MHD closes the descriptor, never later (see on_completed).
 */
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <microhttpd.h>

#include "conn.h"
#include "keylimits.h"
#include "server.h"
#include "format.h"
#include "ui.h"

/* The endpoints (URL routes) the server answers; expert "routing" is a different thing (api/routing.c). */
enum {
    ENDPOINT_UNKNOWN = 0,
    ENDPOINT_HEALTH,
    ENDPOINT_METRICS,
    ENDPOINT_MODELS,
    ENDPOINT_MODEL,
    ENDPOINT_COMPLETIONS,
    ENDPOINT_COMPLETION_ROUTING,
    ENDPOINT_PREFLIGHT,
    ENDPOINT_CHAT,
    ENDPOINT_OLLAMA_GENERATE,
    ENDPOINT_OLLAMA_CHAT,
    ENDPOINT_OLLAMA_TAGS,
    ENDPOINT_OLLAMA_PS,
    ENDPOINT_OLLAMA_SHOW,
    ENDPOINT_OLLAMA_VERSION,
    ENDPOINT_LLAMA_COMPLETION,
    ENDPOINT_LLAMA_INFILL,
    ENDPOINT_FIM_COMPLETIONS,   /* POST /v1/fim/completions (Mistral, DeepSeek; Continue's fimStream) */
    ENDPOINT_TABBY_HEALTH,      /* GET /v1/health (Tabby) */
    ENDPOINT_TOKENIZE,          /* POST /tokenize (llama.cpp) */
    ENDPOINT_DETOKENIZE,        /* POST /detokenize (llama.cpp) */
    ENDPOINT_PROPS,             /* GET /props (llama.cpp) */
    ENDPOINT_ADMIN_MODELS,      /* POST /admin/models: load a model */
    ENDPOINT_ADMIN_MODEL,       /* PUT (replace) or DELETE (unload) /admin/models/{id} */
    ENDPOINT_TABBY_EVENTS,      /* POST /v1/events (Tabby's telemetry) */
    ENDPOINT_UI,                /* GET / and /ui/...: the playground's files (ui.c), unless --no-ui */
    ENDPOINT_STATUS,            /* GET /v1/status: the playground's live server view (ui.c) */
};

/* the "route" label of the access log and the request metrics: a fixed name per endpoint, never the
 * raw path */
static const char *endpoint_label[] = {"unknown", "health", "metrics", "models", "model", "completions",
                                       "routing", "preflight", "chat", "ollama_generate", "ollama_chat",
                                       "ollama_tags", "ollama_ps", "ollama_show", "ollama_version",
                                       "llama_completion", "llama_infill", "fim_completions", "tabby_health",
                                       "tokenize", "detokenize", "props", "admin_models", "admin_model", "tabby_events",
                                       "ui", "status"};

/* The dialect of an endpoint that runs a completion job (its parser and renderers), NULL for the others. */
static const api_format *endpoint_format(int endpoint) {
    switch (endpoint) {
    case ENDPOINT_COMPLETIONS: return &api_format_completions;
    case ENDPOINT_CHAT: return &api_format_chat;
    case ENDPOINT_OLLAMA_GENERATE: return &api_format_ollama_generate;
    case ENDPOINT_OLLAMA_CHAT: return &api_format_ollama_chat;
    case ENDPOINT_LLAMA_COMPLETION: return &api_format_llama_completion;
    case ENDPOINT_LLAMA_INFILL: return &api_format_llama_infill;
    case ENDPOINT_FIM_COMPLETIONS: return &api_format_fim;
    default: return NULL;
    }
}

/* Endpoints answered to POST with a JSON body: the completion dialects, Ollama's /api/show,
 * llama.cpp's /tokenize and /detokenize, and Tabby's /v1/events. */
static int endpoint_is_post(int endpoint) {
    return endpoint_format(endpoint) || endpoint == ENDPOINT_OLLAMA_SHOW || endpoint == ENDPOINT_TOKENIZE ||
           endpoint == ENDPOINT_DETOKENIZE || endpoint == ENDPOINT_TABBY_EVENTS;
}

enum { WATCH_NONE = 0, WATCH_ACTIVE, WATCH_STOPPED, WATCH_CLOSING, WATCH_CLOSED };

/* Loop-side accumulation of one choice for the non-streamed response. */
typedef struct choice_acc {
    srv_buf text;       /* echo text + completion */
    srv_tokvec toks;    /* echoed prompt tokens, then generated ones */
    api_finish finish;
    int stop_word;      /* api_choice.stop_word of the finish */
    long chars;         /* characters of the completion text sent so far (stream text_offset) */
    int started;        /* stream: the echo part went out */
    int chunks;         /* stream: deltas rendered */
} choice_acc;

typedef struct srv_req srv_req;
struct srv_req {
    srv_http *h;
    struct MHD_Connection *conn;
    srv_req *prev, *next;       /* h->reqs */
    srv_conn *sconn;            /* the connection's admission record (conn.c), NULL if none */
    srv_member *mem;            /* the model it uses (held until the request is freed), or NULL */
    char id[72];                /* request id */
    char method[12];
    char path[160];             /* for the log, truncated */
    int endpoint;               /* ENDPOINT_*: what the URL names */
    char arg[256];              /* path parameter (model id, completion id) */
    int seen;                   /* access handler called once */
    int status;                 /* status sent (0: none yet) */
    uint64_t t_start;
    size_t bytes_in, bytes_out;
    char origin[256];           /* CORS origin to allow in the response, "" for none */
    int key;                    /* who asked: srv_keys_find's result (owner of what it creates) */
    int client;                 /* completions: its srv_keylimits client */
    int limited;                /* srv_keylimits_begin let it in and srv_keylimits_end is still due */
    long long charged;          /* tokens charged to its client so far */
    int preemptions;            /* preemptions of its job counted to its client so far */
    int retry_after;            /* seconds in a 429's Retry-After (0: 1) */

    srv_buf body;
    int too_large;
    size_t discarded;
    int responded;              /* a response is queued */
    int close;                  /* the response ends the connection (the request's framing is unsafe) */

    /* completion */
    const api_format *fmt;      /* the endpoint's dialect: parser and renderers */
    api_completion_req creq;    /* while tokenizing, only the pool thread touches it */
    int has_creq;
    uv_work_t tok_work;         /* api_completion_tokenize (or /tokenize, /detokenize) on libuv's thread pool */
    int tokenizing;             /* tok_work queued and its after-work callback not run yet */
    int tok_rc;                 /* its result (pool thread -> loop, ordered by uv_queue_work) */
    api_error tok_err;
    char *tok_out;              /* /tokenize, /detokenize: the response body (owned until queued) */
    srv_job job;
    int job_active;             /* submitted and not done */
    int job_admitted;
    srv_out *outs;              /* (n_choices) drained outbox */
    choice_acc *acc;            /* (n_choices) */
    api_token_lp *lp_scratch;   /* rendering scratch */
    int lp_cap;
    char cmpl_id[40];
    int64_t created;
    json_t *routing;            /* the routing record once done (a reference is in the retention store) */
    int prompt_tokens, completion_tokens, cached_tokens;
    int64_t t_first_token_ns;
    uint64_t deadline;          /* uv_hrtime ns; 0: none */
    int cancel_reason;
    const char *outcome;        /* for the log: "ok", "error", "client_gone", "timeout", ... */

    int suspended;
    uv_poll_t watch;            /* client hang-up detection while the request is in flight */
    int watch_state;
    int client_gone;

    /* streaming */
    int stream;
    int stream_started;         /* SSE response queued */
    srv_buf sse;                /* pending SSE bytes; sse_off of them already sent */
    size_t sse_off;
    int sse_end;                /* nothing more will be appended */
    int conn_done;              /* MHD's completion callback ran */
};

struct srv_http {
    uv_loop_t *loop;
    srv_config *cfg;
    struct MHD_Daemon *mhd;
    srv_conns *conns;           /* the listener: admission and deadlines of connections */
    srv_conn *adding;           /* the connection being handed to MHD (its STARTED notification) */
    uv_poll_t poll;
    uv_timer_t timer;           /* MHD timeouts and "run MHD soon" kicks */
    uv_timer_t tick;            /* request timeouts, shutdown checks */
    uv_timer_t grace;
    uv_timer_t finish;          /* runs `done` from a clean stack (never inside an MHD callback) */
    int port;
    srv_pool *pool;             /* the models */
    srv_metrics metrics;
    srv_retention *ret;
    srv_keylimits *kl;          /* per-client limits and figures (server-wide; every model's jobs) */
    api_limits limits;
    srv_req *reqs;
    int n_reqs;
    int n_jobs;                 /* completions submitted and not done */
    int n_tokenizing;           /* completions whose prompts are being tokenized off the loop */
    int draining, grace_over;
    void (*done)(void *);
    void *done_ud;
    int done_called;
    int exit_code;
    int handles_open;
    int abort_quiet;            /* a stream reader just ended a stream whose client left: MHD's
                                   report of that close is expected, not a warning */
};

static void mhd_kick(srv_http *h);
static void req_try_free(srv_req *r);
static void check_drained(srv_http *h);

/* ============================================================ responses */

static void add_common_headers(srv_req *r, struct MHD_Response *resp) {
    MHD_add_response_header(resp, "X-Request-Id", r->id);
    if (r->origin[0]) {
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", r->origin);
        MHD_add_response_header(resp, "Vary", "Origin");
        MHD_add_response_header(resp, "Access-Control-Expose-Headers", "X-Request-Id, Retry-After");
    }
}

/* Queues body (malloc'ed, taken over; NULL -> 500 with a fixed body). */
static void respond(srv_req *r, int status, const char *ctype, char *body, size_t len) {
    if (r->responded) { free(body); return; }
    static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
    struct MHD_Response *resp;
    if (!body) {
        status = 500;
        ctype = "application/json";
        resp = MHD_create_response_from_buffer(sizeof oom - 1, (void *)oom, MHD_RESPMEM_PERSISTENT);
    } else {
        resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
        if (!resp) free(body);
    }
    if (!resp) return;
    MHD_add_response_header(resp, "Content-Type", ctype);
    add_common_headers(r, resp);
    if (status == 429 || status == 503) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", r->retry_after > 0 ? r->retry_after : 1);
        MHD_add_response_header(resp, "Retry-After", ra);
    }
    if (status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    if (r->endpoint == ENDPOINT_UI) { /* the page runs only its own files and talks only to this server */
        MHD_add_response_header(resp, "Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'");
        MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    }
    if (r->close) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    if (status == 405) {
        const char *allow = r->endpoint == ENDPOINT_ADMIN_MODEL ? "PUT, DELETE, OPTIONS"
                            : endpoint_is_post(r->endpoint) ? "POST, OPTIONS" : "GET, HEAD, OPTIONS";
        MHD_add_response_header(resp, "Allow", allow);
    }
    if (MHD_queue_response(r->conn, (unsigned)status, resp) == MHD_YES) {
        r->responded = 1;
        r->status = status;
        r->bytes_out += body ? len : sizeof oom - 1;
    }
    MHD_destroy_response(resp);
}

static void respond_json(srv_req *r, int status, char *json) {
    respond(r, status, "application/json", json, json ? strlen(json) : 0);
}

static void respond_error(srv_req *r, const api_error *e) {
    respond_json(r, e->status, r->fmt ? r->fmt->error(e, 0) : api_error_json(e));
}

static void respond_http_error(srv_req *r, int status, const char *detail) {
    api_error e;
    api_error_http(&e, status, detail);
    respond_error(r, &e);
}

/* ============================================================ suspension and hang-up watch */

static void on_watch_closed(uv_handle_t *hd) {
    srv_req *r = hd->data;
    r->watch_state = WATCH_CLOSED;
    r->h->handles_open--;
    req_try_free(r);
}

static void req_resume(srv_req *r) {
    if (!r->suspended) return;
    r->suspended = 0;
    MHD_resume_connection(r->conn);
    mhd_kick(r->h);
}

static void req_cancel(srv_req *r, int reason) {
    if (r->tokenizing) {
        /* still in libuv's pool: dropped from its queue if it has not started; a running tokenization
         * cannot be interrupted and is let finish, then tokenize_done sees the reason and submits nothing */
        if (!r->cancel_reason) r->cancel_reason = reason;
        uv_cancel((uv_req_t *)&r->tok_work);
        return;
    }
    if (!r->job_active) return;
    if (!r->cancel_reason) r->cancel_reason = reason;
    srv_sched_cancel(r->mem->sched, &r->job, reason);
}

static void on_watch(uv_poll_t *p, int status, int events) {
    srv_req *r = p->data;
    (void)events;
    /* any report is a hang-up: only UV_DISCONNECT was asked for, and errors (POLLERR/POLLHUP) also
     * mean the peer is gone */
    uv_poll_stop(p);
    r->watch_state = WATCH_STOPPED;
    r->client_gone = 1;
    if (!r->outcome) r->outcome = "client_gone";
    req_cancel(r, SRV_CANCEL_CLIENT);
    /* let MHD see the closed socket and end the request (its completion callback frees us) */
    req_resume(r);
    (void)status;
}

static void req_watch_start(srv_req *r) {
    if (r->watch_state != WATCH_NONE) return;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return;
    if (uv_poll_init(r->h->loop, &r->watch, ci->connect_fd)) return;
    r->watch.data = r;
    r->h->handles_open++;
    r->watch_state = WATCH_ACTIVE;
    if (uv_poll_start(&r->watch, UV_DISCONNECT, on_watch)) {
        uv_poll_stop(&r->watch);
        r->watch_state = WATCH_STOPPED;
    }
}

static void req_watch_close(srv_req *r) {
    if (r->watch_state == WATCH_ACTIVE || r->watch_state == WATCH_STOPPED) {
        r->watch_state = WATCH_CLOSING;
        uv_close((uv_handle_t *)&r->watch, on_watch_closed);
    }
}

static void req_suspend(srv_req *r) {
    if (r->suspended) return;
    MHD_suspend_connection(r->conn);
    r->suspended = 1;
}

/* ============================================================ request lifetime */

static void req_free(srv_req *r) {
    srv_http *h = r->h;
    if (r->prev) r->prev->next = r->next;
    else h->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    h->n_reqs--;
    h->metrics.connections_active = (uint64_t)h->n_reqs;
    if (r->limited) srv_keylimits_end(h->kl, r->client);
    srv_buf_free(&r->body);
    srv_buf_free(&r->sse);
    free(r->tok_out);
    int nc = r->job.n_choices;
    if (r->outs) for (int i = 0; i < nc; i++) srv_out_free(&r->outs[i]);
    if (r->job.out) for (int i = 0; i < nc; i++) srv_out_free(&r->job.out[i]);
    if (r->acc)
        for (int i = 0; i < nc; i++) { srv_buf_free(&r->acc[i].text); srv_tokvec_free(&r->acc[i].toks); }
    free(r->outs);
    free(r->job.out);
    free(r->acc);
    free(r->lp_scratch);
    if (r->has_creq) api_completion_req_free(&r->creq);
    api_route_agg_free(&r->job.routing); /* empty unless the job ended without being drained */
    json_decref(r->routing);
    if (r->mem) {
        if (r->mem->waiter == r) r->mem->waiter = NULL;
        srv_member_release(r->mem);
    }
    free(r);
    check_drained(h);
}

/* Frees the request once MHD, the worker and libuv are all done with it. */
static void req_try_free(srv_req *r) {
    if (!r->conn_done || r->job_active || r->tokenizing) return;
    if (r->watch_state == WATCH_ACTIVE || r->watch_state == WATCH_STOPPED) { req_watch_close(r); return; }
    if (r->watch_state == WATCH_CLOSING) return;
    req_free(r);
}

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn) {
    srv_http *h = cls;
    srv_req *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->h = h;
    r->conn = conn;
    r->t_start = uv_hrtime();
    r->key = SRV_KEY_NONE;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    r->sconn = ci ? ci->socket_context : NULL;
    srv_conn_request_line(r->sconn, r->t_start);
    snprintf(r->path, sizeof r->path, "%s", uri ? uri : "");
    srv_buf_init(&r->body, h->cfg->max_body);
    srv_buf_init(&r->sse, 0);
    r->next = h->reqs;
    if (h->reqs) h->reqs->prev = r;
    h->reqs = r;
    h->n_reqs++;
    h->metrics.connections_active = (uint64_t)h->n_reqs;
    return r;
}

static void access_log(srv_req *r, enum MHD_RequestTerminationCode toe) {
    srv_http *h = r->h;
    /* no status of ours: the client left first (nginx's 499), or libmicrohttpd refused the request
     * itself before our handler saw it (bad headers, too large: it answers 400/413/431) */
    int status = r->status ? r->status : r->seen ? 499 : 400;
    const char *outcome = r->outcome;
    if (r->stream_started && (toe == MHD_REQUEST_TERMINATED_WITH_ERROR || toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT ||
                              toe == MHD_REQUEST_TERMINATED_READ_ERROR)) {
        /* a stream that started (200 sent) and then lost its client: logged as the client's close */
        status = 499;
        if (!outcome) outcome = "client_gone";
    }
    json_t *f = json_object();
    if (!f) return;
    json_object_set_new(f, "request_id", json_string(r->id[0] ? r->id : "-"));
    json_object_set_new(f, "method", json_string(r->method));
    /* the path comes from the client: json_string refuses invalid UTF-8 */
    json_t *p = json_string(r->path);
    json_object_set_new(f, "path", p ? p : json_string("<invalid utf-8>"));
    json_object_set_new(f, "route", json_string(endpoint_label[r->endpoint]));
    json_object_set_new(f, "status", json_integer(status));
    json_object_set_new(f, "duration_ms", json_real((double)(uv_hrtime() - r->t_start) / 1e6));
    json_object_set_new(f, "bytes_in", json_integer((json_int_t)r->bytes_in));
    json_object_set_new(f, "bytes_out", json_integer((json_int_t)r->bytes_out));
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
        char addr[INET6_ADDRSTRLEN] = "";
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, addr, sizeof addr);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, addr, sizeof addr);
        json_object_set_new(f, "remote", json_string(addr));
    }
    if (r->mem) json_object_set_new(f, "model", json_string(r->mem->model.id));
    if (r->has_creq) {
        json_object_set_new(f, "completion_id", json_string(r->cmpl_id));
        json_object_set_new(f, "stream", json_boolean(r->stream));
        json_object_set_new(f, "prompt_tokens", json_integer(r->prompt_tokens));
        json_object_set_new(f, "completion_tokens", json_integer(r->completion_tokens));
        if (r->t_first_token_ns)
            json_object_set_new(f, "ttft_ms", json_real((double)((uint64_t)r->t_first_token_ns - r->t_start) / 1e6));
        if (r->creq.unknown_field[0]) json_object_set_new(f, "ignored_field", json_string(r->creq.unknown_field));
    }
    if (!outcome && !r->seen) outcome = "rejected_by_http_parser";
    if (!outcome) outcome = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "ok"
                            : toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED ? "idle_timeout"
                            : toe == MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN ? "shutdown"
                            : toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT ? "client_gone" : "connection_error";
    json_object_set_new(f, "outcome", json_string(outcome));
    srv_log("info", "request", f);
    json_decref(f);
    srv_metrics_count_request(&h->metrics, endpoint_label[r->endpoint], status);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    srv_http *h = cls;
    (void)conn;
    srv_req *r = *con_cls;
    h->abort_quiet = 0; /* MHD reports a close before it completes the request */
    if (!r) return;
    *con_cls = NULL;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) {
        r->client_gone = 1;
        if (r->job_active || r->tokenizing) {
            if (!r->outcome) r->outcome = "client_gone";
            req_cancel(r, SRV_CANCEL_CLIENT);
        }
    } else {
        srv_conn_request_done(r->sconn, uv_hrtime()); /* kept alive: the next request's deadline */
    }
    access_log(r, toe);
    r->conn_done = 1;
    r->suspended = 0;
    /* the watch goes now, while its descriptor is still this connection's: MHD closes the fd after
     * this callback and the number can be reused by the next accept at once; a poll handle stopped or
     * closed after that would take the new connection's registration out of the loop */
    req_watch_close(r);
    req_try_free(r);
}

/* ============================================================ CORS, auth, endpoints */

static int origin_allowed(const srv_config *cfg, const char *origin) {
    for (int i = 0; i < cfg->n_cors; i++)
        if (!strcmp(cfg->cors[i], "*") || !strcasecmp(cfg->cors[i], origin)) return 1;
    return 0;
}

/* The endpoint a URL names (ENDPOINT_*); a path parameter (model id, completion id) goes into arg. */
static int endpoint_of(const char *url, char *arg, size_t arg_cap) {
    arg[0] = 0;
    if (!strcmp(url, "/health")) return ENDPOINT_HEALTH;
    if (!strcmp(url, "/metrics")) return ENDPOINT_METRICS;
    if (!strcmp(url, "/v1/models")) return ENDPOINT_MODELS;
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        snprintf(arg, arg_cap, "%s", url + 11);
        return ENDPOINT_MODEL;
    }
    if (!strcmp(url, "/v1/completions")) return ENDPOINT_COMPLETIONS;
    if (!strcmp(url, "/v1/chat/completions")) return ENDPOINT_CHAT;
    if (!strcmp(url, "/api/generate")) return ENDPOINT_OLLAMA_GENERATE;
    if (!strcmp(url, "/api/chat")) return ENDPOINT_OLLAMA_CHAT;
    if (!strcmp(url, "/api/tags")) return ENDPOINT_OLLAMA_TAGS;
    if (!strcmp(url, "/api/ps")) return ENDPOINT_OLLAMA_PS;
    if (!strcmp(url, "/api/show")) return ENDPOINT_OLLAMA_SHOW;
    if (!strcmp(url, "/api/version")) return ENDPOINT_OLLAMA_VERSION;
    if (!strcmp(url, "/completion")) return ENDPOINT_LLAMA_COMPLETION;
    if (!strcmp(url, "/infill")) return ENDPOINT_LLAMA_INFILL;
    if (!strcmp(url, "/v1/fim/completions")) return ENDPOINT_FIM_COMPLETIONS;
    if (!strcmp(url, "/v1/health")) return ENDPOINT_TABBY_HEALTH;
    if (!strcmp(url, "/tokenize")) return ENDPOINT_TOKENIZE;
    if (!strcmp(url, "/detokenize")) return ENDPOINT_DETOKENIZE;
    if (!strcmp(url, "/props")) return ENDPOINT_PROPS;
    if (!strcmp(url, "/admin/models")) return ENDPOINT_ADMIN_MODELS;
    if (!strncmp(url, "/admin/models/", 14) && url[14] && strlen(url + 14) < arg_cap) {
        snprintf(arg, arg_cap, "%s", url + 14);
        return ENDPOINT_ADMIN_MODEL;
    }
    if (!strcmp(url, "/v1/events")) return ENDPOINT_TABBY_EVENTS;
    if (!strcmp(url, "/v1/status")) return ENDPOINT_STATUS;
    if (srv_ui_find(url)) {
        snprintf(arg, arg_cap, "%s", url);
        return ENDPOINT_UI;
    }
    static const char pre[] = "/v1/completions/", suf[] = "/routing";
    size_t n = strlen(url), np = sizeof pre - 1, ns = sizeof suf - 1;
    if (n > np + ns && !strncmp(url, pre, np) && !strcmp(url + n - ns, suf)) {
        size_t idlen = n - np - ns;
        if (idlen >= arg_cap || memchr(url + np, '/', idlen)) return ENDPOINT_UNKNOWN;
        memcpy(arg, url + np, idlen);
        arg[idlen] = 0;
        return ENDPOINT_COMPLETION_ROUTING;
    }
    return ENDPOINT_UNKNOWN;
}

/* Whether a preflight's Access-Control-Request-Headers may be echoed as the allowed headers: a short
 * comma-separated list of header names (RFC 9110 token characters), nothing a response header could
 * not carry. */
static int request_headers_ok(const char *v) {
    size_t n = strlen(v);
    if (n == 0 || n > 1024) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("!#$%&'*+-.^_`|~, ", c)))
            return 0;
    }
    return 1;
}

static void respond_preflight(srv_req *r) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp) return;
    add_common_headers(r, resp);
    MHD_add_response_header(resp, "Allow", "GET, HEAD, POST, OPTIONS");
    if (r->origin[0]) {
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS");
        /* an allowed origin may send any header (SDKs add their own: x-stainless-*, x-api-key, api-key,
         * ...): answer the ones the browser asks about; the list is for a preflight without the
         * request header */
        const char *asked = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Access-Control-Request-Headers");
        MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                                asked && request_headers_ok(asked) ? asked
                                : "Authorization, Content-Type, X-Request-Id, X-Api-Key, Api-Key, OpenAI-Organization, "
                                  "OpenAI-Project, X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
                                  "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
                                  "X-Stainless-Retry-Count, X-Stainless-Timeout");
        MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
        MHD_add_response_header(resp, "Vary", "Access-Control-Request-Headers");
    }
    if (MHD_queue_response(r->conn, 204, resp) == MHD_YES) { r->responded = 1; r->status = 204; }
    MHD_destroy_response(resp);
}

/* ============================================================ simple endpoints */

/* What /health and /v1/status say of the server: "ok" once every model the process started with is
 * loaded ("loading" before; "error" when one failed: the process is stopping then), "shutting_down";
 * models loaded later by the admin routes do not change it. */
static const char *server_state(const srv_http *h) {
    int loading = 0, failed = 0, ready = 0;
    for (srv_member *m = h->pool ? srv_pool_first(h->pool) : NULL; m; m = m->next) {
        if (m->state == SRV_MODEL_READY) ready++;
        else if (m->startup && m->state == SRV_MODEL_LOADING) loading++;
        else if (m->startup && m->state == SRV_MODEL_FAILED) failed++;
    }
    return h->draining ? "shutting_down" : failed ? "error" : loading || !ready ? "loading" : "ok";
}

static void handle_health(srv_req *r) {
    const char *st = server_state(r->h);
    char *body = NULL;
    if (asprintf(&body, "{\"status\":\"%s\"}", st) < 0) body = NULL;
    respond_json(r, !strcmp(st, "ok") ? 200 : 503, body);
}

static void handle_metrics(srv_req *r) {
    srv_http *h = r->h;
    srv_model_metrics mm[SRV_POOL_MAX];
    srv_member *who[SRV_POOL_MAX];
    int n = 0;
    for (srv_member *m = srv_pool_first(h->pool); m && n < SRV_POOL_MAX; m = m->next) {
        /* a replacement still loading has its predecessor's names: that one speaks for the model */
        if (m->replaces) continue;
        srv_model_metrics *x = &mm[n];
        memset(x, 0, sizeof *x);
        x->model = m->model.id;
        x->threads = m->threads;
        srv_sched_stats(m->sched, &x->g, &x->ttft, &x->itl, &x->generated_tokens, &x->prompt_tokens);
        /* measured off the loop: the figures of the last measurement (at most a few seconds old) */
        size_t mapped = 0, cached = 0, resident = 0;
        srv_member_residency(m, &mapped, &cached, &resident);
        x->mapped_bytes = mapped;
        x->cached_bytes = cached;
        x->resident_bytes = resident;
        who[n++] = m;
    }
    size_t len = 0;
    char *text = srv_metrics_render(&h->metrics, mm, n, &len);
    srv_buf b;
    srv_buf_init(&b, 0);
    if (text) srv_buf_append(&b, text, len);
    free(text);
    /* each metric's series together (the exposition format wants them so): every model's experts, then
     * every model's adapters */
    for (int adapters = 0; adapters < 2; adapters++) {
        srv_expert_metrics_header(adapters, &b);
        for (int k = 0; k < n; k++) {
            char lab[300];
            srv_metrics_model_label(who[k]->model.id, lab, sizeof lab);
            srv_sched_render_experts(who[k]->sched, lab, adapters, &b);
        }
    }
    srv_keylimits_render(h->kl, uv_hrtime(), &b);
    if (!text || b.failed) { srv_buf_free(&b); respond_http_error(r, 500, "out of memory"); return; }
    text = srv_buf_take(&b, &len);
    respond(r, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
}

/* The model a request names: 404 model_not_found (in the request's dialect) when no live model has the
 * name; with one model served any name selects it (api_find_model). name NULL: the first model. */
static srv_member *select_model(srv_req *r, const char *name) {
    srv_member *m = srv_pool_find(r->h->pool, name);
    if (!m) {
        api_error e;
        api_error_set(&e, 404, API_ERR_NOT_FOUND, "model", "model_not_found",
                      "The model '%.200s' does not exist (see GET /v1/models).", name ? name : "");
        e.type = API_ERR_INVALID; /* OpenAI's type for a request naming an unknown model */
        respond_error(r, &e);
    }
    return m;
}

/* The model a request body's "model" selects (select_model); NULL when a response was queued. */
static srv_member *select_model_of_body(srv_req *r) {
    /* one model: any name selects it, and the body's own parse applies --strict-model; the body is not
     * parsed twice on the loop then */
    srv_member *only = NULL;
    int n = 0;
    for (srv_member *m = srv_pool_first(r->h->pool); m; m = m->next)
        if (!m->replaces && m->state != SRV_MODEL_FAILED) { only = m; n++; }
    if (n == 1) return only;
    char name[256];
    int rc = api_request_model(r->body.data ? r->body.data : "", r->body.len, name, sizeof name);
    if (rc < 0) snprintf(name, sizeof name, "(a name of more than 255 bytes)");
    return select_model(r, rc ? name : NULL);
}

/* r uses m from now until it is freed: a retired model stays until then. */
static void req_use_model(srv_req *r, srv_member *m) {
    if (r->mem) srv_member_release(r->mem);
    r->mem = m;
    srv_member_hold(m);
}

/* The playground's files (ui.c) and its status record. */
static void handle_ui(srv_req *r) {
    const srv_ui_asset *a = srv_ui_find(r->arg);
    char *body = a ? malloc(a->len + 1) : NULL;
    if (!a) { respond_http_error(r, 404, NULL); return; }
    if (body) memcpy(body, a->data, a->len);
    respond(r, 200, a->ctype, body, a->len);
}

/* The playground's view of one model: ?model= (else the first), its worker's figures. */
static void handle_status(srv_req *r) {
    srv_http *h = r->h;
    srv_member *mem = select_model(r, MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "model"));
    if (!mem) return;
    srv_gauges g;
    uint64_t prompt = 0, generated = 0;
    srv_sched_stats(mem->sched, &g, NULL, NULL, &generated, &prompt);
    respond_json(r, 200, srv_status_json(&g, mem->model.id, server_state(h), prompt, generated));
}

static int require_model(srv_req *r, const srv_member *m) {
    if (m && m->state == SRV_MODEL_READY) return 1;
    respond_http_error(r, 503, !m ? "No model is loaded." : m->state == SRV_MODEL_FAILED ? "The model failed to load."
                                                            : "The model is loading. Please retry later.");
    return 0;
}

static void handle_models(srv_req *r) {
    srv_http *h = r->h;
    api_model v[SRV_POOL_MAX];
    int n = srv_pool_views(h->pool, v, NULL);
    json_t *root = NULL;
    char *ready = api_render_models(v, n);
    if (ready) root = json_loads(ready, 0, NULL);
    free(ready);
    json_t *data = json_object_get(root, "data");
    /* the id of a model still loading is known before its weights: listed so clients can configure
     * themselves */
    for (srv_member *m = srv_pool_first(h->pool); data && m; m = m->next)
        if (m->state == SRV_MODEL_LOADING && !m->replaces)
            json_array_append_new(data, json_pack("{s:s,s:s,s:I,s:s}", "id", m->model.id, "object", "model",
                                                  "created", (json_int_t)m->model.created, "owned_by", "codemoe"));
    char *s = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    respond_json(r, 200, s);
}

static void handle_model(srv_req *r, const char *id) {
    srv_http *h = r->h;
    /* a lookup by name (id, alias, general.name once loaded), never "any name" as a request's model */
    srv_member *m = srv_pool_first(h->pool);
    for (; m; m = m->next)
        if (!m->replaces && api_model_named(&m->model, id)) break;
    if (!m) {
        api_error e;
        api_error_set(&e, 404, API_ERR_NOT_FOUND, "model", "model_not_found", "The model '%.200s' does not exist.", id);
        respond_error(r, &e);
        return;
    }
    if (!require_model(r, m)) return;
    respond_json(r, 200, api_render_model(&m->model));
}

/* Ollama's listings: /api/tags, /api/ps (the loaded models), /api/show, /api/version. */
static void handle_ollama(srv_req *r) {
    srv_http *h = r->h;
    if (r->endpoint == ENDPOINT_OLLAMA_VERSION) { respond_json(r, 200, api_render_ollama_version()); return; }
    if (r->too_large) { respond_http_error(r, 413, NULL); return; }
    api_model v[SRV_POOL_MAX];
    int n = srv_pool_views(h->pool, v, NULL);
    if (n == 0) { require_model(r, srv_pool_first(h->pool)); return; }
    if (r->endpoint != ENDPOINT_OLLAMA_SHOW) {
        respond_json(r, 200, api_render_ollama_tags(v, n, r->endpoint == ENDPOINT_OLLAMA_PS));
        return;
    }
    api_error e;
    const api_model *m = NULL;
    if (api_ollama_show_model(r->body.data ? r->body.data : "", r->body.len, v, n, &m, &e)) {
        respond_json(r, e.status, api_ollama_error_json(&e));
        return;
    }
    respond_json(r, 200, api_render_ollama_show(m));
}

/* A record is served only to the key that created its completion (or an admin key); to anyone else it
 * does not exist: the same 404 as an unknown id, so ids cannot be probed. */
static void handle_routing(srv_req *r, const char *id) {
    int owner = SRV_KEY_NONE;
    size_t len = 0;
    const char *v = srv_retention_get(r->h->ret, id, &owner, &len);
    if (!v || !srv_keys_may_read(&r->h->cfg->keys, r->key, owner)) {
        api_error e;
        api_error_set(&e, 404, API_ERR_NOT_FOUND, NULL, "completion_not_found",
                      "No routing statistics for completion '%.64s' (unknown, or no longer retained).", id);
        respond_error(r, &e);
        return;
    }
    char *body = malloc(len + 1);
    if (body) memcpy(body, v, len + 1);
    respond(r, 200, "application/json", body, len);
}

/* The CPU's model name (/proc/cpuinfo), "" where unknown. */
static void cpu_model_name(char *buf, size_t cap) {
    buf[0] = 0;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "model name", 10) || !colon) continue;
        colon++;
        while (*colon == ' ' || *colon == '\t') colon++;
        colon[strcspn(colon, "\n")] = 0;
        snprintf(buf, cap, "%s", colon);
        break;
    }
    fclose(f);
}

/* GET /v1/health in Tabby's shape (its agent checks it before completing, and shows model and device):
 * {model, device, arch, cpu_info, cpu_count, cuda_devices, accelerators, version{build_date,
 * build_timestamp, git_sha, git_describe}}. 503 (OpenAI-shaped) until the model is loaded. */
/* Tabby's telemetry: counted by type, answered 200 with an empty body as Tabby's server does. */
static void handle_tabby_events(srv_req *r) {
    if (r->too_large) { respond_http_error(r, 413, NULL); return; }
    api_error e;
    api_tabby_event_kind kind;
    const char *select_kind = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "select_kind");
    if (api_tabby_event(r->body.data ? r->body.data : "", r->body.len, &r->h->limits, select_kind, &kind, &e)) {
        respond_error(r, &e);
        return;
    }
    srv_metrics_count_tabby_event(&r->h->metrics, (int)kind, api_tabby_event_name(kind));
    respond(r, 200, "text/plain", strdup(""), 0);
}

static void handle_tabby_health(srv_req *r) {
    srv_member *mem = srv_pool_first(r->h->pool); /* the default model */
    if (!require_model(r, mem)) return;
    char cpu[256];
    cpu_model_name(cpu, sizeof cpu);
    struct utsname u;
    const char *arch = uname(&u) == 0 ? u.machine : "";
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:I,s:[],s:[],s:{s:s,s:s,s:s,s:s}}", "model", mem->model.id, "device",
                          "cpu", "arch", arch, "cpu_info", cpu, "cpu_count", (json_int_t)(ncpu > 0 ? ncpu : 1),
                          "cuda_devices", "accelerators", "version", "build_date", "", "build_timestamp", "",
                          "git_sha", "", "git_describe", CM_VERSION);
    char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    respond_json(r, 200, body);
}

/* GET /props in llama.cpp's shape, the fields editor plugins read: the context size, the generation
 * defaults, the slots and the model; of the model ?model= names (llama.cpp's router mode), else the
 * first. */
static void handle_props(srv_req *r) {
    srv_http *h = r->h;
    srv_member *mem = select_model(r, MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "model"));
    if (!mem || !require_model(r, mem)) return;
    /* the defaults are those of a request that sets nothing: api/ owns them */
    api_completion_req d;
    api_error e;
    static const char minimal[] = "{\"prompt\":\"\"}";
    if (api_parse_completion(minimal, sizeof minimal - 1, &mem->model, &h->limits, &d, &e) < 0) {
        respond_error(r, &e);
        return;
    }
    json_t *stop = json_array();
    for (int i = 0; stop && i < d.stop.n; i++) json_array_append_new(stop, json_stringn(d.stop.s[i], d.stop.len[i]));
    json_t *params = json_pack("{s:i,s:f,s:f,s:i,s:f,s:f,s:f,s:f,s:o,s:I}", "n_predict", d.max_tokens, "temperature",
                               (double)d.sampling.temperature, "top_p", (double)d.sampling.top_p, "top_k",
                               d.sampling.top_k, "min_p", (double)d.sampling.min_p, "repeat_penalty",
                               (double)d.sampling.repetition_penalty, "presence_penalty",
                               (double)d.sampling.presence_penalty, "frequency_penalty",
                               (double)d.sampling.frequency_penalty, "stop", stop, "seed",
                               d.seed_set ? (json_int_t)d.seed : (json_int_t)-1);
    api_completion_req_free(&d);
    json_t *o = params ? json_pack("{s:{s:i,s:o},s:i,s:s,s:s,s:s,s:i,s:s}", "default_generation_settings", "n_ctx",
                                   mem->model.n_ctx, "params", params, "total_slots", mem->cfg.parallel, "model_path",
                                   mem->cfg.model_path, "model_alias", mem->model.id, "chat_template", "", "n_ctx",
                                   mem->model.n_ctx, "build_info", CM_VERSION)
                       : NULL;
    char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    respond_json(r, 200, body);
}

/* ============================================================ completions: output */

static long utf8_chars(const char *s, size_t n) {
    long c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

static api_token_lp *lp_view(srv_req *r, const srv_tokvec *a, const srv_tokvec *b, int *n) {
    int total = (a ? a->n : 0) + (b ? b->n : 0);
    *n = 0;
    if (total == 0) return NULL;
    if (total > r->lp_cap) {
        api_token_lp *p = realloc(r->lp_scratch, (size_t)total * sizeof *p);
        if (!p) return NULL;
        r->lp_scratch = p;
        r->lp_cap = total;
    }
    int k = 0;
    const srv_tokvec *v[2] = {a, b};
    for (int s = 0; s < 2; s++)
        for (int i = 0; v[s] && i < v[s]->n; i++) {
            const srv_tok *t = &v[s]->v[i];
            r->lp_scratch[k++] = (api_token_lp){t->token, t->logprob, t->n_top ? t->top : NULL, t->n_top};
        }
    *n = k;
    return r->lp_scratch;
}

static void sse_append(srv_req *r, char *chunk) {
    srv_http *h = r->h;
    if (!chunk) return;
    if (r->sse_end) { free(chunk); return; }
    size_t pending = r->sse.len - r->sse_off;
    size_t n = strlen(chunk);
    if (pending + n > h->cfg->stream_buffer) {
        /* a reader this far behind is stuck: end its stream rather than buffer without bound */
        free(chunk);
        h->metrics.slow_readers++;
        r->outcome = "slow_reader";
        req_cancel(r, SRV_CANCEL_SLOW);
        api_error e;
        api_error_set(&e, 500, API_ERR_SERVER, NULL, "slow_reader",
                      "The client did not read the stream fast enough; it was ended.");
        char *ev = r->fmt->error(&e, 1); /* the stream's own framing */
        if (ev) { srv_buf_puts(&r->sse, ev); free(ev); }
        r->sse_end = 1;
        return;
    }
    srv_buf_append(&r->sse, chunk, n);
    free(chunk);
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    srv_req *r = cls;
    (void)pos;
    size_t avail = r->sse.len - r->sse_off;
    if (avail) {
        size_t n = avail < max ? avail : max;
        memcpy(buf, r->sse.data + r->sse_off, n);
        r->sse_off += n;
        if (r->sse_off == r->sse.len) { r->sse.len = 0; r->sse_off = 0; }
        r->bytes_out += n;
        return (ssize_t)n;
    }
    if (r->client_gone) {
        r->h->abort_quiet = 1;
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (r->sse_end) return MHD_CONTENT_READER_END_OF_STREAM;
    /* nothing to send yet: park the connection until the worker produces more (on_wake resumes) */
    req_suspend(r);
    return 0;
}

static void stream_start(srv_req *r) {
    if (r->stream_started) return;
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, sse_reader, r, NULL);
    if (!resp) return;
    MHD_add_response_header(resp, "Content-Type", api_format_stream_type(r->fmt));
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    add_common_headers(r, resp);
    if (MHD_queue_response(r->conn, 200, resp) == MHD_YES) {
        r->responded = 1;
        r->status = 200;
        r->stream_started = 1;
    }
    MHD_destroy_response(resp);
}

/* Renders the job's routing statistics into the record GET .../routing serves, keeps it in the
 * retention store, and returns it borrowed (valid until the request is freed) or NULL. */
static json_t *store_routing(srv_req *r, const api_route_agg *agg) {
    srv_http *h = r->h;
    api_routing_info info = {.id = r->cmpl_id, .created = r->created, .model = r->mem->model.id,
                             .prompt_tokens = r->prompt_tokens, .completion_tokens = r->completion_tokens,
                             .full = r->creq.routing >= API_ROUTING_FULL,
                             .tokens = r->creq.routing == API_ROUTING_TOKENS};
    json_t *v = api_routing_json(agg, r->mem->model.model, &info);
    if (!v) return NULL;
    json_decref(r->routing);
    r->routing = v;
    srv_retention_put(h->ret, r->cmpl_id, r->key, v);
    h->metrics.routing_store_bytes = srv_retention_bytes(h->ret);
    h->metrics.routing_store_records = (uint64_t)srv_retention_count(h->ret);
    return v;
}

static api_usage req_usage(const srv_req *r) {
    api_usage u = {.prompt_tokens = r->prompt_tokens, .completion_tokens = r->completion_tokens,
                   .cached_tokens = r->cached_tokens};
    if (r->t_first_token_ns) {
        u.prompt_ns = (int64_t)((uint64_t)r->t_first_token_ns - r->t_start);
        u.gen_ns = (int64_t)(uv_hrtime() - (uint64_t)r->t_first_token_ns);
    }
    return u;
}

/* The end of a stream: the format's trailer, given every choice's finish reason. */
static void stream_end(srv_req *r, json_t *routing) {
    int nc = r->job.n_choices;
    api_choice *ch = calloc((size_t)nc, sizeof *ch);
    if (!ch) { sse_append(r, NULL); return; }
    for (int i = 0; i < nc; i++)
        ch[i] = (api_choice){.index = i, .text = "", .finish = r->acc[i].finish ? r->acc[i].finish : API_FINISH_LENGTH,
                             .stop_word = r->acc[i].stop_word};
    api_meta meta = {.id = r->cmpl_id, .created = r->created, .system_fingerprint = NULL};
    api_usage u = req_usage(r);
    sse_append(r, r->fmt->stream_end(&r->creq, &meta, ch, nc, &u, routing));
    free(ch);
}

static void finish_plain(srv_req *r, json_t *routing) {
    int nc = r->job.n_choices;
    api_choice *ch = calloc((size_t)nc, sizeof *ch);
    api_token_lp **lps = calloc((size_t)nc, sizeof *lps);
    if (!ch || !lps) { free(ch); free(lps); respond_http_error(r, 500, "out of memory"); return; }
    int ok = 1;
    for (int i = 0; i < nc; i++) {
        choice_acc *a = &r->acc[i];
        int p = api_completion_prompt_of(&r->creq, i);
        ch[i].index = i;
        ch[i].text = a->text.data ? a->text.data : "";
        ch[i].text_len = a->text.len;
        ch[i].finish = a->finish ? a->finish : API_FINISH_LENGTH;
        ch[i].stop_word = a->stop_word;
        ch[i].text_offset = r->creq.echo ? 0 : api_prompt_chars(&r->creq, p);
        if (r->creq.logprobs >= 0 && a->toks.n) {
            lps[i] = malloc((size_t)a->toks.n * sizeof **lps);
            if (!lps[i]) { ok = 0; break; }
            for (int k = 0; k < a->toks.n; k++) {
                const srv_tok *t = &a->toks.v[k];
                lps[i][k] = (api_token_lp){t->token, t->logprob, t->n_top ? t->top : NULL, t->n_top};
            }
            ch[i].lp = lps[i];
            ch[i].n_lp = a->toks.n;
        }
    }
    if (ok) {
        api_meta meta = {.id = r->cmpl_id, .created = r->created, .system_fingerprint = NULL};
        api_usage u = req_usage(r);
        respond_json(r, 200, r->fmt->response(&r->creq, &meta, ch, nc, &u, routing));
    } else {
        respond_http_error(r, 500, "out of memory");
    }
    for (int i = 0; i < nc; i++) free(lps[i]);
    free(lps);
    free(ch);
}

/* New output of one choice: accumulate (plain) or render a chunk (stream). */
static void choice_output(srv_req *r, int i, srv_out *o) {
    choice_acc *a = &r->acc[i];
    const api_completion_req *q = &r->creq;
    int p = api_completion_prompt_of(q, i);
    if (o->ended) {
        a->finish = o->finish ? o->finish : API_FINISH_LENGTH;
        a->stop_word = o->stop_hit + 1;
    }
    if (!r->stream) {
        if (!a->started) {
            a->started = 1;
            if (q->echo) srv_buf_append(&a->text, q->prompts[p].text, q->prompts[p].text_len);
        }
        for (int k = 0; k < o->prompt_toks.n; k++) srv_tokvec_push(&a->toks, &o->prompt_toks.v[k]);
        srv_buf_append(&a->text, o->text.data ? o->text.data : "", o->text.len);
        for (int k = 0; k < o->toks.n; k++) srv_tokvec_push(&a->toks, &o->toks.v[k]);
        return;
    }
    api_meta meta = {.id = r->cmpl_id, .created = r->created, .system_fingerprint = NULL};
    if (!a->started && q->echo && (o->prompt_toks.n || o->text.len || o->toks.n || o->ended)) {
        /* the echoed prompt goes out as the choice's first chunk */
        a->started = 1;
        int n_lp = 0;
        api_token_lp *lp = lp_view(r, &o->prompt_toks, NULL, &n_lp);
        api_choice c = {.index = i, .text = q->prompts[p].text, .text_len = q->prompts[p].text_len,
                        .finish = API_FINISH_NONE, .lp = lp, .n_lp = n_lp, .text_offset = 0};
        sse_append(r, r->fmt->chunk(q, &meta, &c, a->chunks++ == 0));
        a->chars = utf8_chars(q->prompts[p].text, q->prompts[p].text_len);
    } else if (!a->started) {
        a->started = 1;
        a->chars = q->echo ? 0 : api_prompt_chars(q, p);
    }
    if (o->text.len || o->toks.n || o->ended) {
        int n_lp = 0;
        api_token_lp *lp = lp_view(r, &o->toks, NULL, &n_lp);
        api_choice c = {.index = i, .text = o->text.data ? o->text.data : "", .text_len = o->text.len,
                        .finish = o->ended ? a->finish : API_FINISH_NONE, .stop_word = a->stop_word, .lp = lp, .n_lp = n_lp,
                        .text_offset = a->chars};
        sse_append(r, r->fmt->chunk(q, &meta, &c, a->chunks++ == 0));
        a->chars += utf8_chars(o->text.data ? o->text.data : "", o->text.len);
    }
}

/* The worker reported on r's job. */
static void job_output(srv_req *r, srv_drained *info) {
    srv_http *h = r->h;
    int nc = r->job.n_choices;
    int any = 0, completion = 0;
    for (int i = 0; i < nc; i++) {
        srv_out *o = &r->outs[i];
        completion += o->n_generated;
        if (o->text.len || o->toks.n || o->prompt_toks.n || o->ended) any = 1;
    }
    if (completion > r->completion_tokens) r->completion_tokens = completion;
    r->prompt_tokens = info->prompt_tokens;
    long long used = (long long)r->prompt_tokens + r->completion_tokens;
    if (used > r->charged) { /* the client's tokens per minute count as they are used */
        srv_keylimits_charge(h->kl, r->client, used - r->charged, uv_hrtime());
        r->charged = used;
    }
    if (info->preemptions > r->preemptions) {
        srv_keylimits_preempted(h->kl, r->client, info->preemptions - r->preemptions);
        r->preemptions = info->preemptions;
    }
    r->cached_tokens = info->cached_tokens;
    if (info->t_first_token_ns) r->t_first_token_ns = info->t_first_token_ns;
    r->job_admitted = info->admitted;
    int failed = info->done && info->has_error;
    if (r->stream && !r->client_gone) {
        if (!r->stream_started && (any || (info->done && !failed))) stream_start(r);
        if (r->stream_started)
            for (int i = 0; i < nc; i++) {
                srv_out *o = &r->outs[i];
                if (o->text.len || o->toks.n || o->prompt_toks.n || o->ended) choice_output(r, i, o);
            }
    } else if (!r->client_gone) {
        for (int i = 0; i < nc; i++) choice_output(r, i, &r->outs[i]);
    }
    if (info->done) {
        r->job_active = 0;
        h->n_jobs--;
        if (r->limited) { srv_keylimits_end(h->kl, r->client); r->limited = 0; }
        r->mem->n_jobs--;
        srv_hist_observe(&h->metrics.e2e, (double)(uv_hrtime() - r->t_start) / 1e9);
        if (r->cancel_reason == SRV_CANCEL_CLIENT) h->metrics.cancelled++;
        if (r->cancel_reason == SRV_CANCEL_TIMEOUT) { h->metrics.timeouts++; r->outcome = "timeout"; }
        if (r->cancel_reason == SRV_CANCEL_SHUTDOWN) r->outcome = "shutdown";
        json_t *routing = NULL; /* borrowed: the record, when the client asked for it in the response */
        if (!failed && !r->client_gone) {
            json_t *rec = store_routing(r, &info->routing);
            if (r->creq.routing != API_ROUTING_NONE) routing = rec;
        }
        if (!r->client_gone) {
            if (failed) {
                if (!r->outcome) r->outcome = "error";
                if (r->stream_started) {
                    sse_append(r, r->fmt->error(&info->err, 1));
                } else {
                    respond_error(r, &info->err);
                }
            } else if (r->stream) {
                stream_end(r, routing);
            } else {
                finish_plain(r, routing);
            }
        }
        r->sse_end = 1;
    }
    /* wake the connection if it is parked and has something to do: a response was just queued, or
     * its stream has new bytes or has ended, or the client left */
    if (r->suspended &&
        (r->client_gone || (r->responded && (!r->stream_started || r->sse.len > r->sse_off || r->sse_end))))
        req_resume(r);
    if (r->conn_done) req_try_free(r);
}

static void admin_loaded(srv_req *r, srv_member *m, const cm_err *err);

/* A model's worker reported: its load finished (ready: it serves; failed: a model of the start stops
 * the process with exit code 1, one loaded later is dropped and its admin request told why), or jobs
 * have output. */
static void on_wake(void *ud, srv_member *mem) {
    srv_http *h = ud;
    cm_err err = {0};
    int st = srv_pool_update(mem, &err);
    if (st == SRV_MODEL_READY && !mem->retired) {
        const cm_model_info *info = cm_model_get_info(mem->model.model);
        json_t *f = json_pack("{s:s,s:s,s:i,s:i,s:i,s:i}", "model", mem->model.id, "arch", info->arch, "n_ctx",
                              mem->model.n_ctx, "parallel", mem->cfg.parallel, "n_vocab", info->n_vocab, "threads",
                              mem->threads);
        json_object_set_new(f, "chat_template", json_string(mem->chat_template ? "yes"
                                                            : mem->chat_template_error[0] ? mem->chat_template_error : "none"));
        srv_log("info", "model loaded", f);
        json_decref(f);
    } else if (st == SRV_MODEL_FAILED) {
        json_t *f = json_pack("{s:s,s:s}", "model", mem->cfg.model_path, "error", err.msg);
        srv_log("error", "model load failed", f);
        json_decref(f);
        if (mem->startup && !mem->retired) {
            h->exit_code = 1;
            srv_http_shutdown(h, h->done, h->done_ud);
        } else {
            srv_pool_retire(mem); /* stopped once its admin request lets go */
        }
    }
    if (st >= 0 && mem->waiter) {
        srv_req *r = mem->waiter;
        mem->waiter = NULL;
        admin_loaded(r, mem, &err);
    }
    for (srv_job *j = srv_sched_take(mem->sched); j;) {
        srv_req *r = j->owner;
        srv_drained info;
        srv_job *next = srv_sched_drain(mem->sched, j, r->outs, &info);
        job_output(r, &info);
        api_route_agg_free(&info.routing);
        j = next;
    }
    mhd_kick(h);
    check_drained(h);
}

/* ============================================================ completions: request */

/* The prompts are built: hand the request to the worker. */
static void submit_completion(srv_req *r) {
    srv_http *h = r->h;
    int nc = api_completion_n_choices(&r->creq);
    r->stream = r->creq.stream;
    r->outs = calloc((size_t)nc, sizeof *r->outs);
    r->job.out = calloc((size_t)nc, sizeof *r->job.out);
    r->acc = calloc((size_t)nc, sizeof *r->acc);
    if (!r->outs || !r->job.out || !r->acc) { respond_http_error(r, 500, "out of memory"); return; }
    r->job.n_choices = nc;
    for (int i = 0; i < nc; i++) {
        srv_out_init(&r->outs[i]);
        srv_out_init(&r->job.out[i]);
        srv_buf_init(&r->acc[i].text, 0);
    }
    if (!r->creq.seed_set) r->creq.seed = srv_random_u64();
    api_make_id(r->cmpl_id, sizeof r->cmpl_id, srv_random_u64());
    r->created = (int64_t)time(NULL);
    r->job.req = &r->creq;
    r->job.t_arrival_ns = r->t_start;
    r->job.client = srv_keylimits_fair_id(h->kl, r->client);
    r->job.owner = r;
    atomic_init(&r->job.cancel, SRV_CANCEL_NONE);
    if (srv_sched_submit(r->mem->sched, &r->job) < 0) {
        respond_http_error(r, 503, "The server is shutting down.");
        return;
    }
    r->job_active = 1;
    h->n_jobs++;
    r->mem->n_jobs++;
}

/* libuv's pool thread: the only code that touches r->creq (or, for /tokenize and /detokenize, r->body)
 * until tokenize_done. */
static void tokenize_work(uv_work_t *w) {
    srv_req *r = w->data;
    if (r->fmt) {
        r->tok_rc = api_format_tokenize(&r->creq, &r->tok_err);
        return;
    }
    const srv_http *h = r->h;
    const char *body = r->body.data ? r->body.data : "";
    const api_model *m = &r->mem->model;
    r->tok_out = r->endpoint == ENDPOINT_TOKENIZE ? api_tokenize(body, r->body.len, m, &h->limits, &r->tok_err)
                                                  : api_detokenize(body, r->body.len, m, &h->limits, &r->tok_err);
    r->tok_rc = r->tok_out ? 0 : -1;
}

/* Loop thread, after tokenize_work ran (status 0) or was taken off the pool's queue (UV_ECANCELED). */
static void tokenize_done(uv_work_t *w, int status) {
    srv_req *r = w->data;
    srv_http *h = r->h;
    r->tokenizing = 0;
    h->n_tokenizing--;
    r->mem->n_tokenizing--;
    if (r->client_gone || r->conn_done) {
        req_try_free(r);
        check_drained(h);
        return;
    }
    if (status == UV_ECANCELED || r->cancel_reason == SRV_CANCEL_SHUTDOWN || h->grace_over) {
        respond_http_error(r, 503, "The server is shutting down.");
    } else if (r->tok_rc < 0) {
        r->has_creq = 0; /* api_completion_tokenize emptied it: logged like any request refused by api/ */
        respond_error(r, &r->tok_err);
    } else if (!r->fmt) { /* /tokenize, /detokenize */
        respond_json(r, 200, r->tok_out);
        r->tok_out = NULL;
    } else {
        submit_completion(r);
    }
    if (!r->job_active) req_resume(r); /* a response is queued */
    check_drained(h);
}

/* Queues r's tokenize_work on libuv's thread pool and suspends the connection until tokenize_done.
 * Returns 0, or -1 when a response was queued instead (429: the queue is full; 500). */
static int tokenize_queue(srv_req *r) {
    srv_http *h = r->h;
    /* requests still tokenizing count against the queue, or a flood of long prompts would wait unbounded
     * in the thread pool */
    srv_member *mem = r->mem;
    if (mem->n_jobs + mem->n_tokenizing >= mem->cfg.parallel + mem->cfg.queue) {
        h->metrics.rejected_queue_full++;
        respond_http_error(r, 429, NULL);
        return -1;
    }
    r->tok_work.data = r;
    if (uv_queue_work(h->loop, &r->tok_work, tokenize_work, tokenize_done) < 0) {
        respond_http_error(r, 500, "could not queue the request");
        return -1;
    }
    r->tokenizing = 1;
    h->n_tokenizing++;
    mem->n_tokenizing++;
    req_suspend(r);
    req_watch_start(r);
    return 0;
}

/* Finds the client a completion is for (its key, and its user when --user-header is set) and applies
 * the per-client limits. Returns 0 (the request holds its client until it ends), or -1 when a response
 * was queued instead (400 for an unusable user name, 429 with Retry-After for a limit). */
static int client_admit(srv_req *r) {
    srv_http *h = r->h;
    const char *user = NULL;
    if (h->cfg->user_header) {
        user = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, h->cfg->user_header);
        if (user && *user && !srv_user_name_ok(user)) {
            api_error e;
            api_error_set(&e, 400, API_ERR_INVALID, NULL, "invalid_user",
                          "The %.64s header must be 1 to 64 characters of A-Z a-z 0-9 . _ @ : + = -.",
                          h->cfg->user_header);
            respond_error(r, &e);
            return -1;
        }
    }
    uint64_t now = uv_hrtime();
    r->client = srv_keylimits_client(h->kl, r->key, user, now);
    int lim = srv_keylimits_begin(h->kl, r->client, now, &r->retry_after);
    if (lim == SRV_LIMIT_OK) { r->limited = 1; return 0; }
    char detail[200];
    if (lim == SRV_LIMIT_CONCURRENCY)
        snprintf(detail, sizeof detail, "Too many requests: this client has %d completions in flight "
                 "(--key-max-concurrent). Please retry later.", h->cfg->key_max_concurrent);
    else
        snprintf(detail, sizeof detail, "Too many tokens: this client used its %lld tokens per minute "
                 "(--key-tokens-per-minute). Please retry in %d s.", h->cfg->key_tokens_per_minute, r->retry_after);
    respond_http_error(r, 429, detail);
    return -1;
}

/* Validates the body here (a bad field is a 400 at once), then tokenizes its prompts on libuv's thread
 * pool with the connection suspended, so that a long prompt never stalls the loop: the other
 * connections and the running streams go on meanwhile. */
static void handle_completion(srv_req *r) {
    srv_http *h = r->h;
    r->fmt = endpoint_format(r->endpoint); /* errors from here on take the dialect's shape too */
    if (r->too_large) { respond_http_error(r, 413, NULL); return; }
    if (h->draining) { respond_http_error(r, 503, "The server is shutting down."); return; }
    srv_member *mem = select_model_of_body(r);
    if (!mem || !require_model(r, mem)) return;
    req_use_model(r, mem);
    api_error e;
    memset(&e, 0, sizeof e);
    if (r->fmt->parse(r->body.data ? r->body.data : "", r->body.len, &mem->model, &h->limits, &r->creq, &e) < 0) {
        respond_error(r, &e);
        return;
    }
    r->has_creq = 1;
    srv_buf_free(&r->body); /* the request keeps what it needs */
    int nc = api_completion_n_choices(&r->creq);
    if (nc < 1 || nc > mem->cfg.parallel) {
        api_error_set(&e, 400, API_ERR_INVALID, "n", NULL,
                      "This request needs %d sequences (prompts x n) but the server runs at most %d at once "
                      "(--parallel).", nc, mem->cfg.parallel);
        respond_error(r, &e);
        return;
    }
    if (client_admit(r) < 0) return;
    if (tokenize_queue(r) < 0) return;
    if (h->cfg->request_timeout > 0) r->deadline = r->t_start + (uint64_t)(h->cfg->request_timeout * 1e9);
}

/* POST /tokenize, POST /detokenize (llama.cpp): like a completion's prompts, tokenized on libuv's thread
 * pool with the connection suspended (a 4 MiB body must not stall the loop), and counted against the
 * same queue bound. */
static void handle_tokens(srv_req *r) {
    srv_http *h = r->h;
    if (r->too_large) { respond_http_error(r, 413, NULL); return; }
    if (h->draining) { respond_http_error(r, 503, "The server is shutting down."); return; }
    srv_member *mem = select_model_of_body(r);
    if (!mem || !require_model(r, mem)) return;
    req_use_model(r, mem);
    tokenize_queue(r);
}

/* ============================================================ admin: load, replace, unload */

/* The live instance whose id is id (not a replacement still loading), or NULL. */
static srv_member *member_by_id(srv_http *h, const char *id) {
    for (srv_member *m = srv_pool_first(h->pool); m; m = m->next)
        if (!m->replaces && !strcmp(m->model.id, id)) return m;
    return NULL;
}

static void respond_admin_error(srv_req *r, int status, const char *code, const char *msg) {
    api_error e;
    api_error_set(&e, status, status == 404 ? API_ERR_NOT_FOUND : API_ERR_INVALID, NULL, code, "%s", msg);
    respond_error(r, &e);
}

/* The load an admin request waits for ended (on_wake): 201 (POST) or 200 (PUT) with the model, or 422
 * with the reason the file did not load. */
static void admin_loaded(srv_req *r, srv_member *m, const cm_err *err) {
    if (m->retired && m->state == SRV_MODEL_READY) {
        respond_admin_error(r, 409, "conflict", "The model was unloaded while it loaded.");
    } else if (m->state == SRV_MODEL_READY) {
        respond_json(r, r->endpoint == ENDPOINT_ADMIN_MODELS ? 201 : 200, api_render_model(&m->model));
    } else {
        api_error e;
        api_error_set(&e, 422, API_ERR_INVALID, "path", "model_load_failed", "The model did not load: %.300s",
                      err && err->msg[0] ? err->msg : "unknown error");
        respond_error(r, &e);
    }
    req_resume(r);
}


/* POST /admin/models {path, id, aliases, ctx, kv_size, threads, parallel, ...}: loads one more model;
 * PUT /admin/models/{id} {path, ...}: loads a new instance for id, which takes over once ready (the old
 * one finishes what it runs, then is unloaded); DELETE /admin/models/{id}: unloads. Admin keys only
 * (checked with the headers). A load answers once it has ended. */
static void handle_admin(srv_req *r) {
    srv_http *h = r->h;
    if (r->too_large) { respond_http_error(r, 413, NULL); return; }
    if (h->draining) { respond_http_error(r, 503, "The server is shutting down."); return; }
    int is_delete = !strcmp(r->method, "DELETE");
    srv_member *old = NULL;
    if (r->endpoint == ENDPOINT_ADMIN_MODEL && !(old = member_by_id(h, r->arg))) {
        respond_admin_error(r, 404, "model_not_found", "No served model has this id.");
        return;
    }
    if (is_delete) {
        char *body = NULL;
        json_t *o = json_pack("{s:s,s:s,s:b}", "id", old->model.id, "object", "model", "deleted", 1);
        if (o) body = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        srv_pool_retire(old); /* after the id was rendered: retiring may free the instance */
        respond_json(r, 200, body);
        return;
    }
    json_error_t je;
    json_t *root = json_loadb(r->body.data ? r->body.data : "", r->body.len, 0, &je);
    srv_model_spec spec;
    char err[256];
    if (!root || srv_model_spec_from_json(root, &spec, err, sizeof err) < 0) {
        if (!root) snprintf(err, sizeof err, "The body is not JSON: %s", je.text);
        json_decref(root);
        respond_admin_error(r, 400, NULL, err);
        return;
    }
    json_decref(root);
    if (old && spec.id[0] && strcmp(spec.id, old->model.id)) {
        srv_model_spec_free(&spec);
        respond_admin_error(r, 400, NULL, "The body's id differs from the URL's.");
        return;
    }
    if (old) snprintf(spec.id, sizeof spec.id, "%s", old->model.id);
    srv_member *m = NULL;
    int status = srv_pool_add(h->pool, &spec, old, &m, err, sizeof err);
    srv_model_spec_free(&spec);
    if (status) {
        respond_admin_error(r, status, status == 409 ? "conflict" : NULL, err);
        return;
    }
    json_t *f = json_pack("{s:s,s:s,s:b,s:i}", "model", m->model.id, "path", m->cfg.model_path, "replace", old != NULL,
                          "threads", m->threads);
    srv_log("info", "model loading", f);
    json_decref(f);
    req_use_model(r, m);
    m->waiter = r;
    req_suspend(r);
}

void srv_http_apply_config(srv_http *h, const srv_model_spec *specs, int n) {
    char err[256];
    /* first what goes, so that its threads return to the budget as soon as its requests end */
    for (srv_member *m = srv_pool_first(h->pool), *next; m; m = next) {
        next = m->next;
        int keep = 0;
        for (int i = 0; i < n && !keep; i++) keep = !strcmp(specs[i].id, m->model.id);
        if (!keep && !m->replaces) srv_pool_retire(m);
    }
    for (int i = 0; i < n; i++) {
        srv_member *old = member_by_id(h, specs[i].id), *m = NULL;
        if (old && srv_model_spec_same(&old->spec, &specs[i])) continue;
        int status = srv_pool_add(h->pool, &specs[i], old, &m, err, sizeof err);
        json_t *f = json_pack("{s:s,s:s,s:b}", "model", specs[i].id, "path", specs[i].path, "replace", old != NULL);
        if (status) json_object_set_new(f, "error", json_string(err));
        srv_log(status ? "error" : "info", status ? "SIGHUP: model not loaded" : "model loading", f);
        json_decref(f);
    }
}

/* ============================================================ the access handler */

/* Limits of our own below MHD's memory pool (MHD_OPTION_CONNECTION_MEMORY_LIMIT): a request over
 * them gets the JSON error here instead of MHD's HTML page, which it sends only when the pool
 * itself overflows. */
enum { MAX_URI_BYTES = 8 * 1024, MAX_HEADER_BYTES = 24 * 1024 };

typedef struct framing {
    int n_cl, cl_differ, te;
    const char *cl;
    size_t header_bytes;
} framing;

static enum MHD_Result framing_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    framing *f = cls;
    (void)kind;
    f->header_bytes += strlen(key) + (value ? strlen(value) : 0) + 4;
    if (!strcasecmp(key, "Content-Length")) {
        if (f->n_cl++ == 0) f->cl = value;
        else if (!value || !f->cl || strcmp(value, f->cl)) f->cl_differ = 1;
    } else if (!strcasecmp(key, "Transfer-Encoding")) {
        f->te = 1;
    }
    return MHD_YES;
}

/* Rejects what MHD would accept but must not be (400/414/431 with Connection: close); returns 1 if
 * it answered. Conflicting framing (RFC 9112 section 6.3: Content-Length with Transfer-Encoding, or
 * Content-Length values that differ) is the request-smuggling shape: the two ends of a proxy chain
 * could split the bytes into different requests, so the connection is not reused. */
static int reject_unsafe(srv_req *r, const char *url) {
    framing f = {0};
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, framing_header, &f);
    int status = 0;
    const char *why = NULL;
    if (f.te && f.n_cl) status = 400, why = "Content-Length and Transfer-Encoding together are not allowed.";
    else if (f.cl_differ) status = 400, why = "Conflicting Content-Length headers.";
    else if (strlen(url) > MAX_URI_BYTES) status = 414;
    else if (f.header_bytes > MAX_HEADER_BYTES) status = 431;
    if (!status) return 0;
    r->close = 1;
    respond_http_error(r, status, why);
    return 1;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size,
                                  void **con_cls) {
    srv_http *h = cls;
    (void)version;
    srv_req *r = *con_cls;
    if (!r) return MHD_NO; /* allocation failed in on_uri: drop the connection */
    if (r->client_gone && !r->responded) return MHD_NO;
    if (!r->seen) {
        r->seen = 1;
        srv_conn_headers_done(r->sconn, uv_hrtime());
        snprintf(r->method, sizeof r->method, "%s", method);
        const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
        if (srv_request_id_ok(rid)) snprintf(r->id, sizeof r->id, "%s", rid);
        else srv_request_id_new(r->id, sizeof r->id);
        const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
        if (origin && strlen(origin) < sizeof r->origin && origin_allowed(h->cfg, origin)) {
            /* with "*" configured, answer "*" (no credentials are used) */
            int any = 0;
            for (int i = 0; i < h->cfg->n_cors; i++) any |= !strcmp(h->cfg->cors[i], "*");
            snprintf(r->origin, sizeof r->origin, "%s", any ? "*" : origin);
        }
        if (reject_unsafe(r, url)) return MHD_YES;
        char arg[256];
        r->endpoint = endpoint_of(url, arg, sizeof arg);
        int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        int is_post = !strcmp(method, "POST");
        if (!strcmp(method, "OPTIONS")) {
            if (r->endpoint == ENDPOINT_UNKNOWN) respond_http_error(r, 404, NULL);
            else r->endpoint = ENDPOINT_PREFLIGHT; /* answered on the final call */
            return MHD_YES;
        }
        if (r->endpoint == ENDPOINT_UI && h->cfg->no_ui) r->endpoint = ENDPOINT_UNKNOWN;
        if (r->endpoint == ENDPOINT_UNKNOWN) { respond_http_error(r, 404, NULL); return MHD_YES; }
        /* health, and the playground's static files, which hold no data: the page asks for the key
         * and sends it with its API calls */
        if (r->endpoint == ENDPOINT_HEALTH || r->endpoint == ENDPOINT_UI) {
            if (!is_get) respond_http_error(r, 405, NULL);
            snprintf(r->arg, sizeof r->arg, "%s", arg);
            return MHD_YES;
        }
        r->key = srv_keys_find(&h->cfg->keys, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization"));
        if (r->key == SRV_KEY_NONE) {
            respond_http_error(r, 401, NULL);
            return MHD_YES;
        }
        int admin = r->endpoint == ENDPOINT_ADMIN_MODELS || r->endpoint == ENDPOINT_ADMIN_MODEL;
        if (admin) {
            int is_put = !strcmp(method, "PUT"), is_delete = !strcmp(method, "DELETE");
            if (r->endpoint == ENDPOINT_ADMIN_MODELS ? !is_post : !(is_put || is_delete)) {
                respond_http_error(r, 405, NULL);
                return MHD_YES;
            }
            if (!srv_keys_is_admin(&h->cfg->keys, r->key)) {
                respond_http_error(r, 403, "Loading and unloading models needs an admin key (--admin-key).");
                return MHD_YES;
            }
            snprintf(r->arg, sizeof r->arg, "%s", arg);
        }
        if (endpoint_is_post(r->endpoint) || admin) {
            if (!is_post && !admin) { respond_http_error(r, 405, NULL); return MHD_YES; }
            const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
            if (cl) {
                char *end = NULL;
                errno = 0;
                unsigned long long v = strtoull(cl, &end, 10);
                if (errno || end == cl || v > h->cfg->max_body) { respond_http_error(r, 413, NULL); return MHD_YES; }
            }
            return MHD_YES; /* the body follows */
        }
        if (!is_get) { respond_http_error(r, 405, NULL); return MHD_YES; }
        snprintf(r->arg, sizeof r->arg, "%s", arg);
        return MHD_YES; /* answered on the final call: a response queued before it ends keep-alive */
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        r->bytes_in += n;
        srv_conn_body(r->sconn, n);
        if (r->responded) return MHD_YES;
        if (!r->too_large && srv_buf_append(&r->body, upload_data, n) < 0) {
            r->too_large = 1;
            srv_buf_free(&r->body);
        }
        if (r->too_large) {
            /* keep reading (so the client gets its 413) but not forever */
            r->discarded += n;
            if (r->discarded > 4 * h->cfg->max_body + (1u << 20)) return MHD_NO;
        }
        return MHD_YES;
    }
    srv_conn_busy(r->sconn); /* the request is read: the deadlines are over */
    if (r->responded || r->job_active) return MHD_YES;
    switch (r->endpoint) {
    case ENDPOINT_PREFLIGHT: respond_preflight(r); break;
    case ENDPOINT_HEALTH: handle_health(r); break;
    case ENDPOINT_COMPLETIONS:
    case ENDPOINT_CHAT:
    case ENDPOINT_OLLAMA_GENERATE:
    case ENDPOINT_OLLAMA_CHAT:
    case ENDPOINT_LLAMA_COMPLETION:
    case ENDPOINT_LLAMA_INFILL:
    case ENDPOINT_FIM_COMPLETIONS: handle_completion(r); break;
    case ENDPOINT_TOKENIZE:
    case ENDPOINT_DETOKENIZE: handle_tokens(r); break;
    case ENDPOINT_TABBY_HEALTH: handle_tabby_health(r); break;
    case ENDPOINT_PROPS: handle_props(r); break;
    case ENDPOINT_TABBY_EVENTS: handle_tabby_events(r); break;
    case ENDPOINT_UI: handle_ui(r); break;
    case ENDPOINT_STATUS: handle_status(r); break;
    case ENDPOINT_OLLAMA_TAGS:
    case ENDPOINT_OLLAMA_PS:
    case ENDPOINT_OLLAMA_SHOW:
    case ENDPOINT_OLLAMA_VERSION: handle_ollama(r); break;
    case ENDPOINT_METRICS: handle_metrics(r); break;
    case ENDPOINT_MODELS: handle_models(r); break;
    case ENDPOINT_MODEL: handle_model(r, r->arg); break;
    case ENDPOINT_COMPLETION_ROUTING: handle_routing(r, r->arg); break;
    case ENDPOINT_ADMIN_MODELS:
    case ENDPOINT_ADMIN_MODEL: handle_admin(r); break;
    default: respond_http_error(r, 404, NULL); break;
    }
    return MHD_YES;
}

/* ============================================================ MHD <-> libuv */

static void on_mhd_timer(uv_timer_t *t);

static void mhd_run_and_arm(srv_http *h) {
    if (!h->mhd) return;
    MHD_run(h->mhd);
    MHD_UNSIGNED_LONG_LONG to = 0;
    if (MHD_get_timeout(h->mhd, &to) == MHD_YES) {
        if (to > 60000) to = 60000;
        uv_timer_start(&h->timer, on_mhd_timer, (uint64_t)to, 0);
    } else {
        uv_timer_start(&h->timer, on_mhd_timer, 1000, 0);
    }
}

static void on_mhd_timer(uv_timer_t *t) { mhd_run_and_arm(t->data); }

static void on_mhd_poll(uv_poll_t *p, int status, int events) {
    (void)status;
    (void)events;
    mhd_run_and_arm(p->data);
}

static void mhd_kick(srv_http *h) {
    if (h->mhd) uv_timer_start(&h->timer, on_mhd_timer, 0, 0);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    srv_http *h = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (h->abort_quiet && !strncmp(msg, "Closing connection (application", 31)) {
        /* the close sse_reader asked for: the access log records it as the client's (499) */
        h->abort_quiet = 0;
        return;
    }
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    json_t *f = json_pack("{s:s}", "source", "microhttpd");
    srv_log("warn", msg, f);
    json_decref(f);
}

/* ============================================================ timers: timeouts and shutdown */

static void on_tick(uv_timer_t *t) {
    srv_http *h = t->data;
    uint64_t now = uv_hrtime();
    if (h->pool) srv_pool_reap(h->pool);
    for (srv_req *r = h->reqs; r; r = r->next)
        if (r->job_active && r->deadline && now >= r->deadline && !r->cancel_reason) req_cancel(r, SRV_CANCEL_TIMEOUT);
    if (h->conns && srv_conns_check(h->conns, now)) mhd_kick(h);
    check_drained(h);
}

static void on_finish(uv_timer_t *t) {
    srv_http *h = t->data;
    if (h->done) h->done(h->done_ud);
}

static void check_drained(srv_http *h) {
    if (!h->draining || h->done_called) return;
    if (h->n_jobs > 0 || h->n_tokenizing > 0) return;
    for (srv_req *r = h->reqs; r; r = r->next)
        if (r->job.n_choices && !r->conn_done && !r->client_gone)
            return; /* a response still being written */
    h->done_called = 1;
    uv_timer_start(&h->finish, on_finish, 0, 0);
}

static void on_grace(uv_timer_t *t) {
    srv_http *h = t->data;
    if (!h->grace_over) {
        /* grace is over: end what is still running (streams get an error event) and give the
         * worker a moment to report, then stop regardless */
        h->grace_over = 1;
        for (srv_req *r = h->reqs; r; r = r->next) req_cancel(r, SRV_CANCEL_SHUTDOWN);
        json_t *f = json_pack("{s:i}", "in_flight", h->n_jobs);
        srv_log("warn", "grace period over: ending in-flight requests", f);
        json_decref(f);
        uv_timer_start(&h->grace, on_grace, 5000, 0);
        return;
    }
    srv_log("error", "in-flight requests did not end in time; stopping anyway", NULL);
    h->done_called = 1;
    uv_timer_start(&h->finish, on_finish, 0, 0);
}

/* ============================================================ public */

static void on_handle_closed(uv_handle_t *hd) {
    srv_http *h = hd->data;
    h->handles_open--;
}

/* conn.c admitted a connection: MHD takes the socket over (and closes it, also on failure). */
static int add_connection(void *ud, int fd, const struct sockaddr *addr, socklen_t addrlen, srv_conn *c) {
    srv_http *h = ud;
    h->adding = c;
    enum MHD_Result ok = MHD_add_connection(h->mhd, fd, addr, addrlen);
    int started = h->adding == NULL; /* on_connection took c */
    h->adding = NULL;
    if (ok != MHD_YES) {
        /* MHD closed the socket; if it had announced the connection, its CLOSED notice frees c */
        return started ? 0 : -1;
    }
    if (!started) return -1; /* not expected: the connection runs without deadlines */
    mhd_kick(h);
    return 0;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    srv_http *h = cls;
    (void)conn;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        *socket_context = h->adding;
        h->adding = NULL;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        srv_conn_closed(*socket_context);
        *socket_context = NULL;
    }
}

srv_http *srv_http_start(uv_loop_t *loop, srv_config *cfg) {
    srv_http *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->loop = loop;
    h->cfg = cfg;
    srv_metrics_init(&h->metrics);
    api_limits_default(&h->limits);
    h->limits.max_body_bytes = cfg->max_body;
    h->limits.strict_context = cfg->strict_context;
    h->ret = srv_retention_create(cfg->routing_retention, cfg->routing_retention_bytes);
    h->kl = srv_keylimits_create(&cfg->keys, cfg->key_max_concurrent, cfg->key_tokens_per_minute);
    if (!h->kl) {
        fprintf(stderr, "codemoe serve: out of memory\n");
        srv_retention_free(h->ret);
        free(h);
        return NULL;
    }

    /* resolve the listen address */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", cfg->port);
    int gai = getaddrinfo(cfg->host, port, &hints, &ai);
    if (gai || !ai) {
        fprintf(stderr, "codemoe serve: cannot resolve --host %s: %s\n", cfg->host, gai_strerror(gai));
        srv_retention_free(h->ret);
        srv_keylimits_free(h->kl);
        free(h);
        return NULL;
    }
    /* MHD gets no listen socket: conn.c accepts and hands it the admitted connections; MHD's own
     * limit sits above conn.c's so that conn.c's count (and its 503) always decides */
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | MHD_USE_NO_LISTEN_SOCKET;
    h->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h,
                              MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h,
                              MHD_OPTION_URI_LOG_CALLBACK, on_uri, h,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                              MHD_OPTION_NOTIFY_CONNECTION, on_connection, h,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)cfg->idle_timeout,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned int)cfg->max_connections + 64,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
                              MHD_OPTION_END);
    if (!h->mhd) {
        fprintf(stderr, "codemoe serve: cannot start the HTTP daemon: %s\n", strerror(errno));
        freeaddrinfo(ai);
        srv_retention_free(h->ret);
        srv_keylimits_free(h->kl);
        free(h);
        return NULL;
    }
    srv_conn_limits lim = {.max_connections = cfg->max_connections, .max_per_ip = cfg->max_conn_per_ip,
                           .header_timeout = cfg->header_timeout, .idle_timeout = cfg->idle_timeout,
                           .min_body_rate = cfg->min_body_rate};
    h->conns = srv_conns_create(loop, ai->ai_addr, ai->ai_addrlen, &lim, &h->metrics, add_connection, h);
    freeaddrinfo(ai);
    if (!h->conns) {
        fprintf(stderr, "codemoe serve: cannot listen on %s:%d\n", cfg->host, cfg->port);
        MHD_stop_daemon(h->mhd);
        srv_retention_free(h->ret);
        srv_keylimits_free(h->kl);
        free(h);
        return NULL;
    }
    h->port = srv_conns_port(h->conns);
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    uv_timer_init(loop, &h->timer);
    uv_timer_init(loop, &h->tick);
    uv_timer_init(loop, &h->grace);
    uv_timer_init(loop, &h->finish);
    h->timer.data = h->tick.data = h->grace.data = h->finish.data = h;
    h->handles_open = 4;
    if (!di || uv_poll_init(loop, &h->poll, di->epoll_fd)) {
        fprintf(stderr, "codemoe serve: cannot watch the HTTP daemon's epoll fd\n");
        MHD_stop_daemon(h->mhd);
        h->mhd = NULL;
        srv_conns_close(h->conns);
        uv_close((uv_handle_t *)&h->timer, NULL);
        uv_close((uv_handle_t *)&h->tick, NULL);
        uv_close((uv_handle_t *)&h->grace, NULL);
        uv_close((uv_handle_t *)&h->finish, NULL);
        uv_run(loop, UV_RUN_NOWAIT);
        srv_conns_free(h->conns);
        srv_retention_free(h->ret);
        srv_keylimits_free(h->kl);
        free(h);
        return NULL;
    }
    h->poll.data = h;
    h->handles_open++;
    uv_poll_start(&h->poll, UV_READABLE, on_mhd_poll);
    uv_timer_start(&h->tick, on_tick, 250, 250);
    mhd_kick(h);
    return h;
}

int srv_http_port(const srv_http *h) { return h->port; }

void srv_http_set_pool(srv_http *h, srv_pool *p) { h->pool = p; }

srv_pool_wake_fn srv_http_wake_fn(void) { return on_wake; }

void srv_http_on_done(srv_http *h, void (*done)(void *), void *ud) {
    h->done = done;
    h->done_ud = ud;
}

int srv_http_exit_code(const srv_http *h) { return h->exit_code; }

void srv_http_shutdown(srv_http *h, void (*done)(void *), void *ud) {
    h->done = done;
    h->done_ud = ud;
    if (h->draining) return;
    h->draining = 1;
    /* stop accepting; open connections go on */
    srv_conns_stop_listening(h->conns);
    json_t *f = json_pack("{s:i,s:f}", "in_flight", h->n_jobs, "grace_s", h->cfg->grace);
    srv_log("info", "shutting down", f);
    json_decref(f);
    uv_timer_start(&h->grace, on_grace, (uint64_t)(h->cfg->grace * 1000), 0);
    check_drained(h);
}

/* After the worker has stopped (every job done and drained): closes every connection and handle.
 * Call uv_run afterwards until the handles are closed, then srv_http_destroy. */
void srv_http_free(srv_http *h) {
    if (!h) return;
    for (srv_req *r = h->reqs; r; r = r->next) r->job_active = 0; /* the worker has let go of all */
    if (h->mhd) {
        /* MHD must not be stopped with suspended connections */
        for (srv_req *r = h->reqs; r; r = r->next)
            if (r->suspended) { r->suspended = 0; MHD_resume_connection(r->conn); }
        MHD_stop_daemon(h->mhd); /* completes every request: on_completed frees them */
        h->mhd = NULL;
    }
    srv_conns_close(h->conns); /* every connection is closed by now */
    uv_poll_stop(&h->poll);
    uv_close((uv_handle_t *)&h->poll, on_handle_closed);
    uv_close((uv_handle_t *)&h->timer, on_handle_closed);
    uv_close((uv_handle_t *)&h->tick, on_handle_closed);
    uv_close((uv_handle_t *)&h->grace, on_handle_closed);
    uv_close((uv_handle_t *)&h->finish, on_handle_closed);
}

/* Frees what is left once uv_run has finished closing the handles. */
void srv_http_destroy(srv_http *h) {
    if (!h) return;
    srv_conns_free(h->conns);
    srv_retention_free(h->ret);
    srv_keylimits_free(h->kl);
    free(h);
}
