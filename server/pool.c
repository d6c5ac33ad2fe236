/*
 * pool.c - the models `codemoe serve` serves at once. Each model is a member with its own engine worker
 * (srv_sched: cm_ctx, KV pool, batch), its own view of the settings, and its share of the process's
 * compute threads. Members are added (at start, by the admin routes, on SIGHUP), looked up by name for
 * each request, and retired: a retired member takes no new request, finishes those it has, and is then
 * stopped and freed, which unmaps its model file and frees its KV pool. Loop thread only.
 *
 * Thread budget: --threads is the number of compute threads all workers together may run. A model with
 * threads= reserves that many; at start the others share what is left equally; a model added later
 * without threads= takes every thread no model holds (a replacement: those of the model it replaces).
 * The reservations never sum to more than the budget, so workers never oversubscribe the cores, except
 * while a replaced model finishes its last requests beside its replacement.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "format.h"
#include "server.h"

struct srv_pool {
    uv_loop_t *loop;
    const srv_config *cfg;
    srv_pool_wake_fn wake;
    void *wake_ud;
    srv_member *live;       /* serving or loading, in the order added */
    srv_member *retired;    /* out of service, still referenced or with a running worker */
    srv_member *stopped;    /* worker stopped: freed by srv_pool_reap */
    int threads_used;       /* reserved by live and retired members */
    char fault_id[256];     /* tests: the member started under this id fails to start its worker ("": none) */
};

srv_pool *srv_pool_create(uv_loop_t *loop, const srv_config *cfg, srv_pool_wake_fn wake, void *ud) {
    srv_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->loop = loop;
    p->cfg = cfg;
    p->wake = wake;
    p->wake_ud = ud;
    return p;
}

static void member_stop(srv_member *m);
static void residency_start(srv_member *m);

static void member_wake(void *ud) {
    srv_member *m = ud;
    m->pool->wake(m->pool->wake_ud, m);
}

/* Whether any of spec's names is a name of a live member other than `except`. */
static const char *name_taken(srv_pool *p, const srv_model_spec *spec, const srv_member *except) {
    for (srv_member *m = p->live; m; m = m->next) {
        if (m == except || (except && m->replaces == except)) continue;
        if (api_model_named(&m->model, spec->id)) return spec->id;
        for (int i = 0; i < spec->n_aliases; i++)
            if (api_model_named(&m->model, spec->aliases[i])) return spec->aliases[i];
        /* and the other way round: one of its names is one of the new model's */
        api_model v = {.id = spec->id, .aliases = (const char *const *)spec->aliases, .n_aliases = spec->n_aliases};
        if (api_model_named(&v, m->model.id)) return m->model.id;
    }
    return NULL;
}

static void list_push_back(srv_member **head, srv_member *m) {
    m->next = NULL;
    while (*head) head = &(*head)->next;
    *head = m;
}

static void list_remove(srv_member **head, srv_member *m) {
    for (; *head; head = &(*head)->next)
        if (*head == m) { *head = m->next; m->next = NULL; return; }
}

static void member_free(srv_member *m) {
    srv_sched_free(m->sched);
    api_template_free(m->chat_template);
    srv_model_spec_free(&m->spec);
    free(m);
}

/* Creates the member with `threads` compute threads and starts its worker (which loads the model). */
static int member_start(srv_pool *p, const srv_model_spec *spec, int threads, srv_member *replaces,
                        srv_member **out, char *err, size_t cap) {
    srv_member *m = calloc(1, sizeof *m);
    if (!m || srv_model_spec_copy(&m->spec, spec) < 0) {
        free(m);
        snprintf(err, cap, "out of memory");
        return 500;
    }
    srv_model_spec_finish(&m->spec);
    const srv_model_spec *s = &m->spec;
    m->pool = p;
    m->cfg = *p->cfg;
    m->cfg.models = NULL;
    m->cfg.n_models = 0;
    m->cfg.config_path = NULL;
    m->cfg.model_path = s->path;
    snprintf(m->cfg.model_id, sizeof m->cfg.model_id, "%s", s->id);
    m->cfg.aliases = s->aliases;
    m->cfg.n_aliases = s->n_aliases;
    m->cfg.n_threads = threads;
    m->cfg.fault_worker_start = p->fault_id[0] && !strcmp(p->fault_id, s->id);
    if (s->n_ctx >= 0) m->cfg.n_ctx = s->n_ctx;
    if (s->parallel >= 0) m->cfg.parallel = s->parallel;
    if (s->queue >= 0) m->cfg.queue = s->queue;
    if (s->n_batch >= 0) m->cfg.n_batch = s->n_batch;
    if (s->kv_type >= 0) m->cfg.kv_type = s->kv_type;
    if (s->prefix_cache >= 0) m->cfg.prefix_cache = s->prefix_cache;
    if (s->kv_size >= 0) { m->cfg.kv_size = s->kv_size; m->cfg.kv_size_bytes = s->kv_size_bytes; }
    if (s->max_itl_ms >= 0) m->cfg.max_itl_ms = s->max_itl_ms;
    if (s->experts_resident >= 0) m->cfg.experts_resident = s->experts_resident;
    if (s->pack_output != SRV_PACK_UNSET) m->cfg.pack_output = s->pack_output;
    if (s->pack_layers != SRV_PACK_UNSET) m->cfg.pack_layers = s->pack_layers;
    /* the names are known before the weights: /v1/models/{id} answers while the model loads */
    m->model.id = m->cfg.model_id;
    m->model.aliases = (const char *const *)m->cfg.aliases;
    m->model.n_aliases = m->cfg.n_aliases;
    m->model.strict_name = m->cfg.strict_model;
    m->model.n_batch = m->cfg.n_batch;
    m->model.defaults = s->defaults;
    struct stat st;
    m->model.created = stat(s->path, &st) == 0 ? (int64_t)st.st_mtime : (int64_t)time(NULL);
    m->state = SRV_MODEL_LOADING;
    m->replaces = replaces;
    m->sched = srv_sched_create(p->loop, &m->cfg, member_wake, m);
    if (!m->sched) {
        member_free(m);
        snprintf(err, cap, "cannot start the engine worker");
        return 500;
    }
    m->threads = threads;
    p->threads_used += threads;
    list_push_back(&p->live, m);
    *out = m;
    return 0;
}

int srv_pool_start(srv_pool *p, char *err, size_t cap) {
    const srv_config *c = p->cfg;
    int reserved = 0, shared = 0;
    for (int i = 0; i < c->n_models; i++) {
        if (c->models[i].n_threads > 0) reserved += c->models[i].n_threads;
        else shared++;
    }
    int left = c->n_threads - reserved;
    if (left < 0 || (shared && left < shared)) {
        snprintf(err, cap, "--threads %d is fewer than the models need (%d reserved with threads=, and one at "
                 "least for each of the %d others)", c->n_threads, reserved, shared);
        return -1;
    }
    for (int i = 0; i < c->n_models; i++) {
        const srv_model_spec *s = &c->models[i];
        /* the first models take the remainder of an uneven split */
        int threads = s->n_threads > 0 ? s->n_threads : left / shared + (left % shared > 0);
        if (s->n_threads <= 0) { left -= threads; shared--; }
        srv_model_spec tmp = *s;
        srv_model_spec_finish(&tmp);
        const char *taken = name_taken(p, &tmp, NULL);
        if (taken) {
            snprintf(err, cap, "two models are named '%s'", taken);
            return -1;
        }
        srv_member *m;
        if (member_start(p, s, threads, NULL, &m, err, cap)) return -1;
        m->startup = 1;
    }
    return 0;
}

int srv_pool_add(srv_pool *p, const srv_model_spec *spec, srv_member *replaces, srv_member **out, char *err,
                 size_t cap) {
    srv_model_spec tmp = *spec;
    srv_model_spec_finish(&tmp);
    if (!tmp.path) { snprintf(err, cap, "a model needs a path"); return 400; }
    if (srv_pool_count(p) >= SRV_POOL_MAX) { snprintf(err, cap, "the pool serves %d models already", SRV_POOL_MAX); return 409; }
    const char *taken = name_taken(p, &tmp, replaces);
    if (taken) { snprintf(err, cap, "the name '%.200s' is taken by a served model", taken); return 409; }
    if (replaces && replaces->retired) replaces = NULL;
    for (srv_member *m = p->live; replaces && m; m = m->next)
        if (m->replaces == replaces) { snprintf(err, cap, "'%.200s' is being replaced already", replaces->model.id); return 409; }
    int free_threads = p->cfg->n_threads - p->threads_used + (replaces ? replaces->threads : 0);
    int threads = spec->n_threads > 0 ? spec->n_threads : replaces ? replaces->threads : free_threads;
    if (threads < 1 || threads > free_threads) {
        snprintf(err, cap, "%d compute threads are free of the budget of %d (--threads); the model asks for %d",
                 free_threads < 0 ? 0 : free_threads, p->cfg->n_threads, threads);
        return 409;
    }
    /* the replaced instance's threads pass to this one while it finishes its requests */
    int rc = member_start(p, spec, threads, replaces, out, err, cap);
    if (!rc && replaces) { /* counted once: the reservation moved */
        p->threads_used -= replaces->threads;
        replaces->threads = 0;
    }
    return rc;
}

void srv_pool_fault_worker_start(srv_pool *p, const char *model_id) {
    snprintf(p->fault_id, sizeof p->fault_id, "%s", model_id ? model_id : "");
}

int srv_pool_update(srv_member *m, cm_err *err) {
    if (m->state != SRV_MODEL_LOADING) return -1;
    const cm_model *cm = NULL;
    int n_ctx = 0;
    int st = srv_sched_model(m->sched, &cm, &n_ctx, err);
    if (st == SRV_MODEL_LOADING) return -1;
    m->state = st;
    if (m->retired) { /* unloaded while it loaded: it serves nothing */
        if (m->n_refs == 0) member_stop(m);
        return st;
    }
    if (st == SRV_MODEL_FAILED && m->replaces) { /* the instance it was to replace keeps its threads */
        m->replaces->threads = m->threads;
        m->threads = 0;
        m->replaces = NULL;
    }
    if (st != SRV_MODEL_READY) return st;
    m->model.model = cm;
    m->model.n_ctx = n_ctx;
    api_template_error te;
    m->chat_template = api_chat_template_load(cm, &te);
    snprintf(m->chat_template_error, sizeof m->chat_template_error, "%s", m->chat_template ? "" : te.message);
    m->model.chat_template = m->chat_template;
    m->model.chat_template_error = m->chat_template_error;
    residency_start(m); /* the first figures, before the first scrape asks */
    if (m->replaces) {
        srv_member *old = m->replaces;
        m->replaces = NULL;
        /* take the old instance's place in the order (the first model is the default one) */
        srv_member **pp = &m->pool->live;
        list_remove(pp, m);
        while (*pp && *pp != old) pp = &(*pp)->next;
        m->next = *pp;
        *pp = m;
        srv_pool_retire(old);
    }
    return st;
}

/* ------------------------------------------------------------ residency of the model file */

/* On libuv's pool: reads nothing of the member but what residency_start copied. */
static void residency_work(uv_work_t *w) {
    srv_residency *r = w->data;
    /* a slow measurement, for the test that shows /metrics never waits for one */
    const char *delay = getenv("CODEMOE_TEST_RESIDENCY_DELAY_MS");
    if (delay && atoi(delay) > 0) {
        struct timespec ts = {atoi(delay) / 1000, (long)(atoi(delay) % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (cm_model_residency(r->model, &r->next[0], &r->next[1], &r->next[2]) < 0)
        r->next[0] = r->next[1] = r->next[2] = 0;
}

static void residency_done(uv_work_t *w, int status) {
    srv_member *m = (srv_member *)((char *)w->data - offsetof(srv_member, residency));
    srv_residency *r = &m->residency;
    if (status == 0) {
        r->mapped = r->next[0];
        r->cached = r->next[1];
        r->resident = r->next[2];
        r->n_done++;
    }
    r->busy = 0;
    srv_member_release(m);
}

static void residency_start(srv_member *m) {
    srv_residency *r = &m->residency;
    if (r->busy || !m->model.model || m->stopped) return;
    r->model = m->model.model;
    r->work.data = r;
    if (uv_queue_work(m->pool->loop, &r->work, residency_work, residency_done)) return;
    r->busy = 1;
    r->started_at = uv_now(m->pool->loop);
    srv_member_hold(m);
}

void srv_member_residency(srv_member *m, size_t *mapped, size_t *cached, size_t *resident) {
    srv_residency *r = &m->residency;
    if (!r->started_at || uv_now(m->pool->loop) - r->started_at >= SRV_RESIDENCY_REFRESH_MS) residency_start(m);
    *mapped = r->mapped;
    *cached = r->cached;
    *resident = r->resident;
}

srv_member *srv_pool_find(srv_pool *p, const char *name) {
    if (!name) return p->live;
    api_model v[SRV_POOL_MAX];
    srv_member *who[SRV_POOL_MAX];
    int n = 0;
    /* a replacement that is still loading is not a candidate: its names are the live instance's */
    for (srv_member *m = p->live; m && n < SRV_POOL_MAX; m = m->next)
        if (m->state != SRV_MODEL_FAILED && !m->replaces) { v[n] = m->model; who[n++] = m; }
    const api_model *f = api_find_model(v, n, name);
    return f ? who[f - v] : NULL;
}

srv_member *srv_pool_first(srv_pool *p) { return p->live; }

int srv_pool_count(const srv_pool *p) {
    int n = 0;
    for (const srv_member *m = p->live; m; m = m->next) n++;
    return n;
}

int srv_pool_views(srv_pool *p, api_model *out, srv_member **who) {
    int n = 0;
    for (srv_member *m = p->live; m && n < SRV_POOL_MAX; m = m->next) {
        if (m->state != SRV_MODEL_READY) continue;
        out[n] = m->model;
        if (who) who[n] = m;
        n++;
    }
    return n;
}

int srv_pool_threads_used(const srv_pool *p) { return p->threads_used; }

/* Stops a retired member nobody uses: its worker joins and frees the KV pool; the model is freed with
 * the member (srv_pool_reap), once its wake-up handle has finished closing. */
static void member_stop(srv_member *m) {
    srv_pool *p = m->pool;
    list_remove(&p->retired, m);
    srv_sched_stop(m->sched);
    p->threads_used -= m->threads;
    m->threads = 0;
    m->stopped = 1;
    list_push_back(&p->stopped, m);
}

void srv_pool_retire(srv_member *m) {
    if (m->retired) return;
    srv_pool *p = m->pool;
    list_remove(&p->live, m);
    m->retired = 1;
    list_push_back(&p->retired, m);
    /* a replacement still loading goes with it (its names are this one's) */
    for (srv_member *o = p->live, *next; o; o = next) {
        next = o->next;
        if (o->replaces == m) {
            o->replaces = NULL;
            srv_pool_retire(o);
        }
    }
    json_t *f = json_pack("{s:s,s:i}", "model", m->model.id, "in_flight", m->n_refs);
    srv_log("info", "model retired", f);
    json_decref(f);
    /* a worker still loading is stopped once its load ends (srv_pool_update): joining it now would
     * block the loop for the rest of the load */
    if (m->n_refs == 0 && m->state != SRV_MODEL_LOADING) member_stop(m);
}

void srv_member_hold(srv_member *m) { m->n_refs++; }

void srv_member_release(srv_member *m) {
    if (--m->n_refs == 0 && m->retired && m->state != SRV_MODEL_LOADING && !m->stopped) member_stop(m);
}

int srv_pool_reap(srv_pool *p) {
    int freed = 0;
    for (srv_member **pp = &p->stopped; *pp;) {
        srv_member *m = *pp;
        /* its handle's close callback has run. Not "stopped before this iteration": a stop from inside a
         * close callback (a stream's request is freed once its hang-up watch has closed) finishes closing
         * only in the loop's next closing phase, and timers (our caller) run before that */
        if (srv_sched_closed(m->sched)) {
            *pp = m->next;
            json_t *f = json_pack("{s:s}", "model", m->model.id);
            member_free(m);
#if defined(__GLIBC__)
            /* the KV pool and the worker's buffers were large allocations: give the heap's free pages back */
            malloc_trim(0);
#endif
            /* logged once done: when the line appears, the file is unmapped and the heap trimmed */
            srv_log("info", "model unloaded", f);
            json_decref(f);
            freed++;
        } else {
            pp = &m->next;
        }
    }
    return freed;
}

void srv_pool_stop(srv_pool *p) {
    if (!p) return;
    for (srv_member *m = p->live; m; m = m->next) srv_sched_stop(m->sched);
    for (srv_member *m = p->retired; m; m = m->next) srv_sched_stop(m->sched);
}

void srv_pool_wake_all(srv_pool *p) {
    for (srv_member *m = p->live; m; m = m->next) p->wake(p->wake_ud, m);
    for (srv_member *m = p->retired; m; m = m->next) p->wake(p->wake_ud, m);
}

void srv_pool_free(srv_pool *p) {
    if (!p) return;
    srv_member *lists[3] = {p->live, p->retired, p->stopped};
    for (int i = 0; i < 3; i++)
        for (srv_member *m = lists[i], *next; m; m = next) {
            next = m->next;
            member_free(m);
        }
    free(p);
}
