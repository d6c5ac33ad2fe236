/*
 * serve.c - `codemoe serve`: flags (the models to serve: --model, repeatable, or --config), then the event
 * loop. The loop starts listening first (so /health answers 503 while the models load), then starts the
 * pool (server/pool.c): one engine worker per model, each of which loads its model. SIGTERM and SIGINT
 * (uv_signal_t) start a graceful shutdown: stop accepting, let in-flight requests finish within --grace
 * seconds, end the rest with an error event, exit 0. SIGHUP re-reads --config and makes the pool match
 * it. See docs/server.md.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/resource.h>

#include "cli.h"
#include "commands.h"
#include "server.h"

static void serve_usage(FILE *f) {
    fprintf(f,
        "usage: codemoe serve --model M.gguf [--model M2.gguf ...] [flags]\n"
        "       codemoe serve --config POOL.json [flags]\n"
        "\n"
        "  --model PATH[,key=value...]  GGUF model to serve (repeatable: a pool of models, each with its\n"
        "                          own engine worker). Settings of this model only: id=NAME, alias=NAME\n"
        "                          (repeatable), ctx=N, kv-size=N[KiB|MiB|GiB], threads=N, parallel=N,\n"
        "                          queue=N, batch=N, kv-type=f16|f32, prefix-cache=0|1, max-itl-ms=MS,\n"
        "                          experts-resident=N, pack-output=auto|on|off,\n"
        "                          pack-layers=auto|on|off;\n"
        "                          default sampling: temperature, top-p, top-k, min-p, repetition-penalty,\n"
        "                          presence-penalty, frequency-penalty, seed, max-tokens, stop (repeatable)\n"
        "  --config FILE           the models as JSON: {\"models\": [{\"path\", \"id\", \"aliases\",\n"
        "                          \"ctx\", \"kv_size\", \"threads\", ...}]}; SIGHUP re-reads it and loads,\n"
        "                          unloads or replaces models to match\n"
        "  --model-id NAME         the \"model\" clients send (default: file name without .gguf;\n"
        "                          one --model only)\n"
        "  --alias NAME            one more name of the model (repeatable; one --model only)\n"
        "  --strict-model          a request's \"model\" must be the id, an alias or the file's\n"
        "                          general.name (else 404); by default, while one model is served,\n"
        "                          any name selects it\n"
        "  --strict-context        prompt + max_tokens beyond --ctx is a 400 (OpenAI) instead of\n"
        "                          max_tokens clamped to what the context leaves\n"
        "  --no-ui                 no playground page at / (the API is unchanged)\n"
        "  --host H                address to listen on (default 127.0.0.1)\n"
        "  --port P                port (default 8080; 0 picks a free one, logged at start)\n"
        "  --threads N             compute threads all models' workers share (default: CPUs, at\n"
        "                          most 16): a model with threads= reserves its own, the others\n"
        "                          split the rest (see docs/server.md)\n"
        "  --ctx N                 tokens per sequence, prompt + completion (default: the model's)\n"
        "  --parallel N            sequences decoded together in one batch (default 4)\n"
        "  --queue N               requests that may wait for a slot; beyond: 429 (default 64)\n"
        "  --batch N               max tokens per forward pass, bounds prefill chunks (default 512)\n"
        "  --kv-size N[KiB|MiB|GiB] KV memory shared by all sequences: tokens, or bytes with a suffix\n"
        "                          (default: parallel x ctx tokens); requests wait for room in it\n"
        CLI_KV_TYPE_HELP
        "                          (--kv-size in bytes holds twice the tokens with f16)\n"
        "  --no-prefix-cache       do not reuse the KV blocks of earlier prompts' common prefixes\n"
        "  --max-itl-ms MS         while sequences decode, limit each step's prefill so the step stays\n"
        "                          under MS milliseconds (soft; at least 32 tokens; 0 = off, default)\n"
        "  --spec-draft N          greedy choices draft up to N tokens per step from earlier text\n"
        "                          (prompt lookup) and verify them in the same forward pass; the\n"
        "                          output is unchanged (default 0 = off; e.g. 8; at most 32)\n"
        "  --experts-resident N    MoE models (qwen3moe, hybrid): keep at most N experts per layer in\n"
        "                          memory, releasing the least recently used ones' pages of the model\n"
        "                          file (paged back in when they run again; 0 = no limit, default)\n"
        "  --pack-output MODE      keep the output head repacked for the int8 GEMM, for steps with\n"
        "                          several logits rows: auto (default: Q8_0 and legacy heads, at most\n"
        "                          512 MiB, about 1.2x the head's bytes), on (K-quant heads too), off\n"
        "  --pack-layers MODE      keep the layers' matrices repacked for the int8 GEMM, for decode\n"
        "                          steps of several rows: auto (default: Q8_0 and legacy layers whose\n"
        "                          copies take at most 64 MiB, about 1.2x their bytes), on (any), off\n"
        "  --kv-check              check the KV pool's bookkeeping after every step (tests; slow)\n"
        "  --api-key KEY           require 'Authorization: Bearer KEY' (repeatable)\n"
        "  --api-key-file PATH     one key per line ('#' comments)\n"
        "                          (also the CODEMOE_API_KEY environment variable)\n"
        "  --admin-key KEY         a key that may also read every completion's routing record and\n"
        "                          load, replace and unload models (/admin/models; repeatable)\n"
        "  --cors-origin ORIGIN    allow browser requests from ORIGIN (repeatable; '*' for any)\n"
        "  --max-body BYTES        largest request body (default 4194304)\n"
        "  --request-timeout SEC   max seconds per completion, 0 = none (default 600)\n"
        "  --idle-timeout SEC      close connections idle this long, 0 = never (default 60)\n"
        "  --header-timeout SEC    a request's headers must be complete this long after the\n"
        "                          connection (or its request line) began, 0 = no limit (default 10)\n"
        "  --min-body-rate B/S     after --header-timeout seconds a body must average this many\n"
        "                          bytes per second, 0 = no limit (default 1024)\n"
        "  --grace SEC             on SIGTERM, time in-flight requests get to finish (default 30)\n"
        "  --routing-retention N   completions whose routing records are kept (default 1024)\n"
        "  --routing-retention-bytes BYTES  and at most this many bytes of them (default 16777216)\n"
        "  --stream-buffer BYTES   how far a slow stream reader may fall behind (default 1048576)\n"
        "  --max-connections N     open connections; beyond: an immediate 503 (default 1024)\n"
        "  --max-conn-per-ip N     open connections from one client address; beyond: 503,\n"
        "                          0 = no cap (default 128; behind a proxy every client has its address)\n"
        "  --user-header NAME      trust header NAME (e.g. X-Codemoe-User) to name the user of a shared\n"
        "                          key: each user is a client of its own for fair queuing and limits\n"
        "  --key-max-concurrent N  completions one client (key, or user) may have in flight; beyond:\n"
        "                          429 (default 0: no limit)\n"
        "  --key-tokens-per-minute N  prompt + generated tokens one client may use per minute; beyond:\n"
        "                          429 with Retry-After (default 0: no limit)\n"
        "  --no-preempt            never pause a running completion of the busiest client to give a\n"
        "                          slot to a client with nothing running (preemption is on by default)\n"
        "  --no-nested-steps       a newcomer's prompt waits for the step in progress to end instead of\n"
        "                          running between two of its layers (dense models; on by default)\n");
}

void srv_config_free(srv_config *c) {
    srv_keys_free(&c->keys);
    for (int i = 0; i < c->n_cors; i++) free(c->cors[i]);
    free(c->cors);
    c->cors = NULL;
    c->n_cors = 0;
    for (int i = 0; i < c->n_models; i++) srv_model_spec_free(&c->models[i]);
    free(c->models);
    c->models = NULL;
    c->n_models = 0;
}

/* Appends a copy of s to the list (*v, *n). -1 when out of memory (the list is unchanged). */
static int add_string(char ***v, int *n, const char *s) {
    char **p = realloc(*v, (size_t)(*n + 1) * sizeof *p);
    if (!p) return -1;
    *v = p;
    if (!(p[*n] = strdup(s))) return -1;
    (*n)++;
    return 0;
}

static int parse_seconds(const char *flag, const char *v, double *out) {
    float f;
    if (!cli_float("serve", flag, v, 0, 1e7, &f)) return 0;
    *out = f;
    return 1;
}

/* --kv-size: "N" tokens, or "N" with KiB, MiB or GiB (bytes, converted once the model is known). */
static int parse_kv_size(const char *v, srv_config *c) {
    if (srv_kv_size_parse(v, &c->kv_size, &c->kv_size_bytes) < 0) {
        fprintf(stderr, "codemoe serve: --kv-size expects tokens (at most 2^30) or a size with KiB, MiB or GiB "
                        "(at most 1 TiB), got '%s'\n", v);
        return 0;
    }
    return 1;
}

static int parse_size(const char *flag, const char *v, size_t lo, size_t *out) {
    unsigned long long x;
    if (!cli_u64("serve", flag, v, &x)) return 0;
    if (x < lo || x > (1ull << 40)) {
        fprintf(stderr, "codemoe serve: %s must be in [%zu, 2^40]\n", flag, lo);
        return 0;
    }
    *out = (size_t)x;
    return 1;
}

/* A header field name (RFC 9110 token), at most 64 characters. */
static int header_name_ok(const char *v) {
    size_t n = strlen(v);
    if (n == 0 || n > 64) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)v[i]) && !strchr("!#$%&'*+-.^_`|~", v[i])) return 0;
    return 1;
}

/* --model PATH[,key=value...]: one more model of the pool. */
static int add_model(srv_config *c, const char *v) {
    char err[256];
    srv_model_spec s;
    if (srv_model_spec_parse(v, &s, err, sizeof err) < 0) {
        fprintf(stderr, "codemoe serve: --model %s: %s\n", v, err);
        return 0;
    }
    srv_model_spec *p = c->n_models < SRV_POOL_MAX ? realloc(c->models, (size_t)(c->n_models + 1) * sizeof *p) : NULL;
    if (!p) {
        fprintf(stderr, "codemoe serve: at most %d models\n", SRV_POOL_MAX);
        srv_model_spec_free(&s);
        return 0;
    }
    c->models = p;
    c->models[c->n_models++] = s;
    return 1;
}

/* Returns 0 ok, 2 usage error (message printed), -1 to exit 0 (--help). */
static int parse_flags(int argc, char **argv, srv_config *c) {
    memset(c, 0, sizeof *c);
    srv_keys_init(&c->keys);
    c->host = "127.0.0.1";
    c->port = 8080;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    c->n_threads = ncpu > 0 ? (ncpu > 16 ? 16 : (int)ncpu) : 1;
    c->parallel = 4;
    c->queue = 64;
    c->n_batch = 512;
    c->spec_draft = SRV_SPEC_DRAFT_DEFAULT;
    api_limits lim; /* the API's default body limit has one owner */
    api_limits_default(&lim);
    c->max_body = lim.max_body_bytes;
    c->request_timeout = 600;
    c->idle_timeout = 60;
    c->grace = 30;
    c->routing_retention = 1024;
    c->routing_retention_bytes = 16u << 20;
    c->stream_buffer = 1u << 20;
    c->max_connections = 1024;
    c->max_conn_per_ip = 128;
    c->header_timeout = 10;
    c->min_body_rate = 1024;
    c->prefix_cache = 1;
    c->kv_type = CLI_KV_TYPE_DEFAULT;
    const char *model_id = NULL;
    char **aliases = NULL;
    int n_aliases = 0, rc = 2;
    static const char *flags[] = {"--config", "--model", "--model-id", "--host", "--port", "--threads", "--ctx", "--parallel",
                                  "--queue", "--batch", "--api-key", "--api-key-file", "--cors-origin",
                                  "--max-body", "--request-timeout", "--idle-timeout", "--grace",
                                  "--routing-retention", "--stream-buffer", "--max-connections", "--kv-size",
                                  "--max-itl-ms", "--kv-type", "--admin-key", "--routing-retention-bytes",
                                  "--header-timeout", "--min-body-rate", "--max-conn-per-ip", "--alias",
                                  "--user-header", "--key-max-concurrent", "--key-tokens-per-minute", "--spec-draft",
                                  "--experts-resident", "--pack-output",
                                  "--pack-layers"};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { rc = -1; serve_usage(stdout); goto out; }
        if (!strcmp(argv[i], "--no-prefix-cache")) { c->prefix_cache = 0; continue; }
        if (!strcmp(argv[i], "--kv-check")) { c->kv_check = 1; continue; }
        if (!strcmp(argv[i], "--no-preempt")) { c->no_preempt = 1; continue; }
        if (!strcmp(argv[i], "--no-nested-steps")) { c->no_nested = 1; continue; }
        if (!strcmp(argv[i], "--strict-model")) { c->strict_model = 1; continue; }
        if (!strcmp(argv[i], "--strict-context")) { c->strict_context = 1; continue; }
        if (!strcmp(argv[i], "--no-ui")) { c->no_ui = 1; continue; }
        const char *f = NULL, *v = NULL;
        int m = 0;
        for (size_t k = 0; k < sizeof flags / sizeof *flags && !m; k++)
            if ((m = cli_flag(argc, argv, &i, flags[k], &v)) != 0) f = flags[k];
        if (!m) { fprintf(stderr, "codemoe serve: unknown flag '%s' (try --help)\n", argv[i]); goto out; }
        if (m < 0) { fprintf(stderr, "codemoe serve: %s needs a value\n", f); goto out; }
        int ok = 1;
        if (!strcmp(f, "--model")) ok = add_model(c, v);
        else if (!strcmp(f, "--config")) c->config_path = v;
        else if (!strcmp(f, "--model-id")) {
            ok = *v && strlen(v) < sizeof c->model_id;
            if (!ok) fprintf(stderr, "codemoe serve: bad --model-id\n");
            model_id = v;
        } else if (!strcmp(f, "--host")) c->host = v;
        else if (!strcmp(f, "--port")) ok = cli_int("serve", f, v, 0, 65535, &c->port);
        else if (!strcmp(f, "--threads")) ok = cli_int("serve", f, v, 1, 1024, &c->n_threads);
        else if (!strcmp(f, "--ctx")) ok = cli_int("serve", f, v, 0, 1 << 24, &c->n_ctx);
        else if (!strcmp(f, "--parallel")) ok = cli_int("serve", f, v, 1, 4096, &c->parallel);
        else if (!strcmp(f, "--queue")) ok = cli_int("serve", f, v, 0, 1 << 20, &c->queue);
        else if (!strcmp(f, "--batch")) ok = cli_int("serve", f, v, 1, 1 << 16, &c->n_batch);
        else if (!strcmp(f, "--api-key")) {
            ok = srv_keys_add(&c->keys, v) == 0;
            if (!ok) fprintf(stderr, "codemoe serve: empty --api-key\n");
        } else if (!strcmp(f, "--admin-key")) {
            ok = srv_keys_add_admin(&c->keys, v) == 0;
            if (!ok) fprintf(stderr, "codemoe serve: empty --admin-key\n");
        } else if (!strcmp(f, "--api-key-file")) {
            ok = srv_keys_load_file(&c->keys, v) >= 0;
            if (!ok) fprintf(stderr, "codemoe serve: cannot read --api-key-file %s: %s\n", v, strerror(errno));
        } else if (!strcmp(f, "--cors-origin")) {
            ok = *v && add_string(&c->cors, &c->n_cors, v) == 0;
            if (!ok) fprintf(stderr, "codemoe serve: bad --cors-origin\n");
        } else if (!strcmp(f, "--alias")) {
            ok = *v && add_string(&aliases, &n_aliases, v) == 0;
            if (!ok) fprintf(stderr, "codemoe serve: bad --alias\n");
        } else if (!strcmp(f, "--max-body")) ok = parse_size(f, v, 1, &c->max_body);
        else if (!strcmp(f, "--request-timeout")) ok = parse_seconds(f, v, &c->request_timeout);
        else if (!strcmp(f, "--idle-timeout")) ok = cli_int("serve", f, v, 0, 86400, &c->idle_timeout);
        else if (!strcmp(f, "--grace")) ok = parse_seconds(f, v, &c->grace);
        else if (!strcmp(f, "--routing-retention")) ok = cli_int("serve", f, v, 0, 1 << 20, &c->routing_retention);
        else if (!strcmp(f, "--routing-retention-bytes")) ok = parse_size(f, v, 0, &c->routing_retention_bytes);
        else if (!strcmp(f, "--stream-buffer")) ok = parse_size(f, v, 4096, &c->stream_buffer);
        else if (!strcmp(f, "--max-connections")) ok = cli_int("serve", f, v, 1, 1 << 20, &c->max_connections);
        else if (!strcmp(f, "--max-conn-per-ip")) ok = cli_int("serve", f, v, 0, 1 << 20, &c->max_conn_per_ip);
        else if (!strcmp(f, "--header-timeout")) ok = parse_seconds(f, v, &c->header_timeout);
        else if (!strcmp(f, "--min-body-rate")) {
            float r;
            ok = cli_float("serve", f, v, 0, 1e12, &r);
            c->min_body_rate = r;
        }
        else if (!strcmp(f, "--user-header")) {
            ok = header_name_ok(v);
            if (!ok) fprintf(stderr, "codemoe serve: bad --user-header '%s' (a header name)\n", v);
            c->user_header = v;
        } else if (!strcmp(f, "--key-max-concurrent")) ok = cli_int("serve", f, v, 0, 1 << 20, &c->key_max_concurrent);
        else if (!strcmp(f, "--key-tokens-per-minute")) {
            unsigned long long n = 0;
            ok = cli_u64("serve", f, v, &n);
            if (ok && n > (1ull << 40)) {
                fprintf(stderr, "codemoe serve: --key-tokens-per-minute must be in [0, 2^40]\n");
                ok = 0;
            }
            c->key_tokens_per_minute = (long long)n;
        }
        else if (!strcmp(f, "--spec-draft")) ok = cli_int("serve", f, v, 0, SRV_SPEC_DRAFT_MAX, &c->spec_draft);
        else if (!strcmp(f, "--kv-size")) ok = parse_kv_size(v, c);
        else if (!strcmp(f, "--kv-type")) ok = cli_kv_type("serve", f, v, &c->kv_type);
        else if (!strcmp(f, "--experts-resident")) ok = cli_int("serve", f, v, 0, 1 << 20, &c->experts_resident);
        else if (!strcmp(f, "--pack-output") || !strcmp(f, "--pack-layers")) {
            ok = srv_pack_parse(v, f[7] == 'o' ? &c->pack_output : &c->pack_layers) == 0;
            if (!ok) fprintf(stderr, "codemoe serve: %s takes auto, on or off\n", f);
        }
        else if (!strcmp(f, "--max-itl-ms")) {
            float ms;
            ok = cli_float("serve", f, v, 0, 1e6, &ms);
            c->max_itl_ms = ms;
        }
        if (!ok) goto out;
    }
    const char *env = getenv("CODEMOE_API_KEY");
    if (env && *env && srv_keys_add(&c->keys, env) < 0) {
        fprintf(stderr, "codemoe serve: CODEMOE_API_KEY is blank\n");
        goto out;
    }
    if (c->config_path) {
        if (c->n_models) {
            fprintf(stderr, "codemoe serve: --config and --model exclude each other\n");
            goto out;
        }
        char err[512];
        if (srv_config_file_read(c->config_path, &c->models, &c->n_models, err, sizeof err) < 0) {
            fprintf(stderr, "codemoe serve: %s\n", err);
            goto out;
        }
    }
    if (!c->n_models) {
        fprintf(stderr, "codemoe serve: --model (or --config) is required\n");
        serve_usage(stderr);
        goto out;
    }
    if ((model_id || n_aliases) && (c->n_models > 1 || c->config_path)) {
        fprintf(stderr, "codemoe serve: --model-id and --alias name the one model; with several, use "
                        "--model PATH,id=NAME,alias=NAME\n");
        goto out;
    }
    srv_model_spec *s0 = &c->models[0];
    if (model_id) snprintf(s0->id, sizeof s0->id, "%s", model_id);
    for (int i = 0; i < n_aliases; i++)
        if (add_string(&s0->aliases, &s0->n_aliases, aliases[i]) < 0) {
            fprintf(stderr, "codemoe serve: out of memory\n");
            goto out;
        }
    for (int i = 0; i < c->n_models; i++) srv_model_spec_finish(&c->models[i]);
    rc = 0;
out:
    for (int i = 0; i < n_aliases; i++) free(aliases[i]);
    free(aliases);
    return rc;
}

/* ============================================================ the process */

typedef struct serve_state {
    uv_loop_t *loop;
    srv_config cfg;
    srv_http *http;
    srv_pool *pool;
    uv_signal_t sigterm, sigint, sighup;
    int stopped;
} serve_state;

static void on_drained(void *ud) {
    serve_state *st = ud;
    if (st->stopped) return;
    st->stopped = 1;
    /* the workers end whatever is left (nothing, unless the grace period ran out twice) and join;
     * one more wake-up pass hands the last results to their connections */
    srv_pool_stop(st->pool);
    srv_pool_wake_all(st->pool);
    srv_http_free(st->http);
    uv_signal_stop(&st->sigterm);
    uv_signal_stop(&st->sigint);
    uv_signal_stop(&st->sighup);
    uv_close((uv_handle_t *)&st->sigterm, NULL);
    uv_close((uv_handle_t *)&st->sigint, NULL);
    uv_close((uv_handle_t *)&st->sighup, NULL);
}

static void on_signal(uv_signal_t *s, int signum) {
    serve_state *st = s->data;
    json_t *f = json_pack("{s:s}", "signal", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    srv_log("info", "signal received", f);
    json_decref(f);
    srv_http_shutdown(st->http, on_drained, st);
}

/* SIGHUP: the pool is made to match the --config file again (srv_http_apply_config). */
static void on_sighup(uv_signal_t *s, int signum) {
    serve_state *st = s->data;
    (void)signum;
    if (!st->cfg.config_path) {
        srv_log("warn", "SIGHUP ignored: no --config to re-read", NULL);
        return;
    }
    char err[512];
    srv_model_spec *specs = NULL;
    int n = 0;
    if (srv_config_file_read(st->cfg.config_path, &specs, &n, err, sizeof err) < 0) {
        json_t *f = json_pack("{s:s}", "error", err);
        srv_log("error", "SIGHUP: the config was not applied", f);
        json_decref(f);
        return;
    }
    srv_http_apply_config(st->http, specs, n);
    for (int i = 0; i < n; i++) srv_model_spec_free(&specs[i]);
    free(specs);
}

int cmd_serve(int argc, char **argv) {
    serve_state st;
    memset(&st, 0, sizeof st);
    int rc = parse_flags(argc, argv, &st.cfg);
    if (rc) {
        srv_config_free(&st.cfg);
        return rc < 0 ? 0 : rc;
    }
    /* a client that disappears mid-write must not kill the process */
    signal(SIGPIPE, SIG_IGN);
    /* every connection holds a descriptor: allow as many as the hard limit lets --max-connections use */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    uv_loop_t loop;
    if (uv_loop_init(&loop)) {
        fprintf(stderr, "codemoe serve: cannot create the event loop\n");
        srv_config_free(&st.cfg);
        return 1;
    }
    st.loop = &loop;
    st.http = srv_http_start(&loop, &st.cfg);
    if (!st.http) {
        uv_run(&loop, UV_RUN_NOWAIT);
        uv_loop_close(&loop);
        srv_config_free(&st.cfg);
        return 1;
    }
    srv_http_on_done(st.http, on_drained, &st);
    json_t *models = json_array();
    for (int i = 0; i < st.cfg.n_models; i++)
        json_array_append_new(models, json_pack("{s:s,s:s}", "id", st.cfg.models[i].id, "path", st.cfg.models[i].path));
    json_t *f = json_pack("{s:s,s:i,s:o,s:i,s:i,s:i,s:b}", "host", st.cfg.host, "port", srv_http_port(st.http),
                          "models", models, "threads", st.cfg.n_threads, "parallel", st.cfg.parallel,
                          "queue", st.cfg.queue, "auth", st.cfg.keys.n > 0);
    srv_log("info", "listening", f);
    json_decref(f);
    char err[512] = "";
    st.pool = srv_pool_create(&loop, &st.cfg, srv_http_wake_fn(), st.http);
    if (!st.pool || srv_pool_start(st.pool, err, sizeof err) < 0) {
        fprintf(stderr, "codemoe serve: %s\n", st.pool ? err : "out of memory");
        srv_pool_stop(st.pool);
        srv_http_free(st.http);
        uv_run(&loop, UV_RUN_DEFAULT);
        srv_http_destroy(st.http);
        srv_pool_free(st.pool);
        uv_loop_close(&loop);
        srv_config_free(&st.cfg);
        return 1;
    }
    srv_http_set_pool(st.http, st.pool);
    uv_signal_init(&loop, &st.sigterm);
    uv_signal_init(&loop, &st.sigint);
    uv_signal_init(&loop, &st.sighup);
    st.sigterm.data = st.sigint.data = st.sighup.data = &st;
    uv_signal_start(&st.sigterm, on_signal, SIGTERM);
    uv_signal_start(&st.sigint, on_signal, SIGINT);
    uv_signal_start(&st.sighup, on_sighup, SIGHUP);

    uv_run(&loop, UV_RUN_DEFAULT);

    int code = srv_http_exit_code(st.http);
    srv_http_destroy(st.http);
    srv_pool_free(st.pool);
    if (uv_loop_close(&loop)) srv_log("warn", "event loop closed with handles open", NULL);
    srv_log("info", "stopped", NULL);
    srv_config_free(&st.cfg);
    return code;
}
