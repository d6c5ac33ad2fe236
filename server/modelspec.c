/*
 * modelspec.c - what one model of the pool is configured with (srv_model_spec): parsed from a --model
 * value ("path,id=x,ctx=2048,...") or from an entry of the --config file (JSON), which is read here too.
 * One parser per source, one set of rules: both end in spec_set, so a setting means the same in either.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"
#include "server.h"

void srv_model_spec_init(srv_model_spec *s) {
    memset(s, 0, sizeof *s);
    s->n_ctx = s->parallel = s->queue = s->n_batch = s->kv_type = s->prefix_cache = -1;
    s->kv_size = -1;
    s->max_itl_ms = -1;
    s->experts_resident = -1;
    s->pack_output = s->pack_layers = SRV_PACK_UNSET;
}

void srv_model_spec_free(srv_model_spec *s) {
    free(s->path);
    json_decref(s->defaults);
    for (int i = 0; i < s->n_aliases; i++) free(s->aliases[i]);
    free(s->aliases);
    srv_model_spec_init(s);
}

static int add_alias(srv_model_spec *s, const char *a) {
    char **p = realloc(s->aliases, (size_t)(s->n_aliases + 1) * sizeof *p);
    if (!p) return -1;
    s->aliases = p;
    if (!(p[s->n_aliases] = strdup(a))) return -1;
    s->n_aliases++;
    return 0;
}

int srv_model_spec_copy(srv_model_spec *dst, const srv_model_spec *src) {
    srv_model_spec_init(dst);
    *dst = *src;
    dst->path = NULL;
    dst->aliases = NULL;
    dst->n_aliases = 0;
    dst->defaults = NULL;
    if (src->defaults && !(dst->defaults = json_deep_copy(src->defaults))) goto oom;
    if (src->path && !(dst->path = strdup(src->path))) goto oom;
    for (int i = 0; i < src->n_aliases; i++)
        if (add_alias(dst, src->aliases[i]) < 0) goto oom;
    return 0;
oom:
    srv_model_spec_free(dst);
    return -1;
}

int srv_model_spec_same(const srv_model_spec *a, const srv_model_spec *b) {
    if (a->n_aliases != b->n_aliases) return 0;
    for (int i = 0; i < a->n_aliases; i++)
        if (strcmp(a->aliases[i], b->aliases[i])) return 0;
    return a->path && b->path && !strcmp(a->path, b->path) && a->n_threads == b->n_threads && a->n_ctx == b->n_ctx &&
           a->parallel == b->parallel && a->queue == b->queue && a->n_batch == b->n_batch && a->kv_type == b->kv_type &&
           a->prefix_cache == b->prefix_cache && a->kv_size == b->kv_size && a->kv_size_bytes == b->kv_size_bytes &&
           a->max_itl_ms == b->max_itl_ms && a->experts_resident == b->experts_resident &&
           a->pack_output == b->pack_output && a->pack_layers == b->pack_layers &&
           (a->defaults && b->defaults ? json_equal(a->defaults, b->defaults) : a->defaults == b->defaults);
}

void srv_model_spec_finish(srv_model_spec *s) {
    if (s->id[0] || !s->path) return;
    const char *base = strrchr(s->path, '/');
    base = base ? base + 1 : s->path;
    snprintf(s->id, sizeof s->id, "%s", base);
    size_t n = strlen(s->id);
    if (n > 5 && !strcmp(s->id + n - 5, ".gguf")) s->id[n - 5] = 0;
}

static int fail(char *err, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return -1;
}

int srv_pack_parse(const char *v, int *mode) {
    static const char *const names[] = {"off", "auto", "on"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(v, names[i])) {
            *mode = i - 1;
            return 0;
        }
    return -1;
}

int srv_kv_size_parse(const char *v, long long *size, int *bytes) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    int shift = -1;
    if (!*end) shift = 0;
    else if (!strcasecmp(end, "KiB")) shift = 10;
    else if (!strcasecmp(end, "MiB")) shift = 20;
    else if (!strcasecmp(end, "GiB")) shift = 30;
    if (errno || end == v || *v == '-' || shift < 0 || x > (1ull << 40) >> shift || (shift == 0 && x > (1ull << 30)))
        return -1;
    *size = (long long)(x << shift);
    *bytes = shift > 0;
    return 0;
}

/* The default sampling fields (api_defaults_check), by the --model spelling. */
static const char *const default_keys[] = {"temperature", "top-p", "top-k", "min-p", "repetition-penalty",
                                           "presence-penalty", "frequency-penalty", "seed", "max-tokens", "stop"};

/* A --model stop string: \n, \t and \\ as a newline, a tab and a backslash (a shell passes them as typed). */
static json_t *stop_string(const char *v) {
    size_t n = strlen(v), k = 0;
    char *t = malloc(n + 1);
    if (!t) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '\\' && i + 1 < n && strchr("nt\\", v[i + 1])) {
            i++;
            t[k++] = v[i] == 'n' ? '\n' : v[i] == 't' ? '\t' : '\\';
        } else {
            t[k++] = v[i];
        }
    }
    json_t *j = json_stringn(t, k);
    free(t);
    return j;
}

/* A default sampling field into s->defaults (its JSON spelling); the ranges are api_defaults_check's,
 * applied once every key is read. Returns 0, 1 for a key that is not one, -1 for a value that is no
 * number (err set). */
static int default_set(srv_model_spec *s, const char *key, const char *v, json_t *given, char *err, size_t cap) {
    size_t k;
    for (k = 0; k < sizeof default_keys / sizeof *default_keys; k++)
        if (!strcmp(key, default_keys[k])) break;
    if (k == sizeof default_keys / sizeof *default_keys) return 1;
    char name[32];
    snprintf(name, sizeof name, "%s", key);
    for (char *c = name; *c; c++) if (*c == '-') *c = '_';
    if (!s->defaults && !(s->defaults = json_object())) return fail(err, cap, "out of memory");
    json_t *x = NULL;
    if (!strcmp(key, "stop")) {
        json_t *arr = json_object_get(s->defaults, "stop");
        if (!arr && (!(arr = json_array()) || json_object_set_new(s->defaults, "stop", arr)))
            return fail(err, cap, "out of memory");
        if (!(x = given ? json_incref(given) : stop_string(v)) || json_array_append_new(arr, x))
            return fail(err, cap, "out of memory");
        return 0;
    }
    char *end;
    errno = 0;
    if (given) {
        x = json_incref(given);
    } else if (!strcmp(key, "max-tokens") && !strcmp(v, "null")) {
        x = json_null();
    } else if (!strcmp(key, "seed") || !strcmp(key, "top-k") || !strcmp(key, "max-tokens")) {
        long long i = strtoll(v, &end, 10);
        if (errno || end == v || *end) return fail(err, cap, "bad model setting %s=%s: not an integer", key, v);
        x = json_integer(i);
    } else {
        double d = strtod(v, &end);
        if (errno || end == v || *end) return fail(err, cap, "bad model setting %s=%s: not a number", key, v);
        x = json_real(d);
    }
    if (!x || json_object_set_new(s->defaults, name, x)) return fail(err, cap, "out of memory");
    return 0;
}

/* Whether the defaults read are ones a request could send (api_defaults_check's rules). */
static int defaults_check(const srv_model_spec *s, char *err, size_t cap) {
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    if (api_defaults_check(s->defaults, &lim, &e) < 0)
        return fail(err, cap, "bad default %s: %s", e.param[0] ? e.param : "sampling", e.message);
    return 0;
}

/* The settings both sources share, by key (the --model spelling; the JSON one has '_' for '-'). Returns
 * 0, 1 for an unknown key, -1 for a bad value (err set). */
static int spec_set(srv_model_spec *s, const char *key, const char *v, char *err, size_t cap) {
    int bad = 0;
    if (!strcmp(key, "id")) {
        if (!*v || strlen(v) >= sizeof s->id) return fail(err, cap, "model id must be 1..255 bytes");
        snprintf(s->id, sizeof s->id, "%s", v);
    } else if (!strcmp(key, "alias")) {
        if (!*v) return fail(err, cap, "empty model alias");
        if (add_alias(s, v) < 0) return fail(err, cap, "out of memory");
    } else if (!strcmp(key, "ctx")) bad = cli_parse_int(v, 0, 1 << 24, &s->n_ctx);
    else if (!strcmp(key, "threads")) bad = cli_parse_int(v, 1, 1024, &s->n_threads);
    else if (!strcmp(key, "parallel")) bad = cli_parse_int(v, 1, 4096, &s->parallel);
    else if (!strcmp(key, "queue")) bad = cli_parse_int(v, 0, 1 << 20, &s->queue);
    else if (!strcmp(key, "batch")) bad = cli_parse_int(v, 1, 1 << 16, &s->n_batch);
    else if (!strcmp(key, "prefix-cache")) bad = cli_parse_int(v, 0, 1, &s->prefix_cache);
    else if (!strcmp(key, "experts-resident")) bad = cli_parse_int(v, 0, 1 << 20, &s->experts_resident);
    else if (!strcmp(key, "pack-output")) bad = srv_pack_parse(v, &s->pack_output);
    else if (!strcmp(key, "pack-layers")) bad = srv_pack_parse(v, &s->pack_layers);
    else if (!strcmp(key, "kv-size")) bad = srv_kv_size_parse(v, &s->kv_size, &s->kv_size_bytes);
    else if (!strcmp(key, "kv-type")) {
        if (!strcmp(v, "f16")) s->kv_type = CM_KV_F16;
        else if (!strcmp(v, "f32")) s->kv_type = CM_KV_F32;
        else bad = 1;
    } else if (!strcmp(key, "max-itl-ms")) {
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        bad = errno || end == v || *end || !(x >= 0 && x <= 1e6);
        if (!bad) s->max_itl_ms = x;
    } else {
        return default_set(s, key, v, NULL, err, cap);
    }
    if (bad) return fail(err, cap, "bad model setting %s=%s", key, v);
    return 0;
}

static const char *const spec_keys[] = {"id", "alias", "ctx", "threads", "parallel", "queue", "batch", "prefix-cache",
                                        "kv-size", "kv-type", "max-itl-ms", "experts-resident", "pack-output",
                                        "pack-layers"};

/* Whether p (just after a comma) starts "key=" for a known key. */
static int known_key_at(const char *p) {
    for (size_t k = 0; k < sizeof spec_keys / sizeof *spec_keys; k++) {
        size_t n = strlen(spec_keys[k]);
        if (!strncmp(p, spec_keys[k], n) && p[n] == '=') return 1;
    }
    for (size_t k = 0; k < sizeof default_keys / sizeof *default_keys; k++) {
        size_t n = strlen(default_keys[k]);
        if (!strncmp(p, default_keys[k], n) && p[n] == '=') return 1;
    }
    return 0;
}

int srv_model_spec_parse(const char *v, srv_model_spec *out, char *err, size_t cap) {
    srv_model_spec_init(out);
    /* the path ends at the first comma that starts a known setting: paths may contain commas */
    const char *p = v;
    while ((p = strchr(p, ',')) && !known_key_at(p + 1)) p++;
    size_t plen = p ? (size_t)(p - v) : strlen(v);
    if (plen == 0) return fail(err, cap, "--model needs a path");
    if (!(out->path = strndup(v, plen))) return fail(err, cap, "out of memory");
    while (p) {
        const char *kv = p + 1;
        p = strchr(kv, ',');
        while (p && !known_key_at(p + 1)) p = strchr(p + 1, ','); /* a comma inside a value (an alias) */
        size_t n = p ? (size_t)(p - kv) : strlen(kv);
        char *item = strndup(kv, n);
        if (!item) { srv_model_spec_free(out); return fail(err, cap, "out of memory"); }
        char *eq = strchr(item, '=');
        *eq = 0; /* known_key_at found it */
        int rc = spec_set(out, item, eq + 1, err, cap);
        free(item);
        if (rc) { srv_model_spec_free(out); return -1; }
    }
    if (defaults_check(out, err, cap)) { srv_model_spec_free(out); return -1; }
    return 0;
}

int srv_model_spec_from_json(const json_t *o, srv_model_spec *out, char *err, size_t cap) {
    srv_model_spec_init(out);
    if (!json_is_object(o)) return fail(err, cap, "a model must be a JSON object");
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)o, key, v) {
        char name[32], buf[64];
        int rc;
        if (!strcmp(key, "path")) {
            if (!json_is_string(v) || !json_string_length(v)) { rc = fail(err, cap, "\"path\" must be a string"); goto bad; }
            free(out->path);
            if (!(out->path = strdup(json_string_value(v)))) { rc = fail(err, cap, "out of memory"); goto bad; }
            continue;
        }
        if (!strcmp(key, "aliases")) {
            size_t i;
            json_t *a;
            if (!json_is_array(v)) { rc = fail(err, cap, "\"aliases\" must be an array of strings"); goto bad; }
            json_array_foreach(v, i, a) {
                if (!json_is_string(a)) { rc = fail(err, cap, "\"aliases\" must be an array of strings"); goto bad; }
                if ((rc = spec_set(out, "alias", json_string_value(a), err, cap))) goto bad;
            }
            continue;
        }
        /* the JSON spelling: kv_size for kv-size */
        snprintf(name, sizeof name, "%s", key);
        for (char *c = name; *c; c++) if (*c == '_') *c = '-';
        if (!strcmp(key, "stop") && (json_is_string(v) || json_is_array(v))) {
            size_t i;
            json_t *a, *one = json_is_string(v) ? json_pack("[O]", v) : json_incref(v);
            rc = one ? 0 : fail(err, cap, "out of memory");
            json_array_foreach(one, i, a)
                if ((rc = default_set(out, "stop", NULL, a, err, cap))) break;
            json_decref(one);
            if (rc) goto bad;
            continue;
        }
        /* a default keeps its JSON value: api_defaults_check judges its type as a request's */
        if ((rc = default_set(out, name, NULL, v, err, cap)) <= 0) {
            if (rc) goto bad;
            continue;
        }
        const char *val = buf;
        if (json_is_string(v)) val = json_string_value(v);
        else if (json_is_boolean(v)) snprintf(buf, sizeof buf, "%d", json_is_true(v));
        else if (json_is_integer(v)) snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v)) snprintf(buf, sizeof buf, "%.17g", json_real_value(v));
        else { rc = fail(err, cap, "bad value of \"%.64s\"", key); goto bad; }
        rc = spec_set(out, name, val, err, cap);
        if (rc == 1) rc = fail(err, cap, "unknown model setting \"%.64s\"", key);
        if (rc) goto bad;
    }
    if (!out->path) { fail(err, cap, "a model needs \"path\""); goto bad; }
    if (defaults_check(out, err, cap)) goto bad;
    return 0;
bad:
    srv_model_spec_free(out);
    return -1;
}

int srv_config_file_read(const char *path, srv_model_spec **specs, int *n, char *err, size_t cap) {
    *specs = NULL;
    *n = 0;
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) return fail(err, cap, "%s:%d: %s", path, je.line, je.text);
    json_t *models = json_object_get(root, "models");
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
        if (strcmp(key, "models")) {
            fail(err, cap, "%s: unknown key \"%.64s\"", path, key); /* key lives in root */
            json_decref(root);
            return -1;
        }
    size_t cnt = json_array_size(models);
    if (!json_is_array(models) || cnt == 0 || cnt > SRV_POOL_MAX) {
        json_decref(root);
        return fail(err, cap, "%s: \"models\" must be an array of 1..%d models", path, SRV_POOL_MAX);
    }
    srv_model_spec *s = calloc(cnt, sizeof *s);
    if (!s) { json_decref(root); return fail(err, cap, "out of memory"); }
    char e2[200];
    size_t i;
    for (i = 0; i < cnt; i++) {
        if (srv_model_spec_from_json(json_array_get(models, i), &s[i], e2, sizeof e2) < 0) {
            fail(err, cap, "%s: models[%zu]: %s", path, i, e2);
            goto bad;
        }
        srv_model_spec_finish(&s[i]);
        for (size_t k = 0; k < i; k++)
            if (!strcmp(s[k].id, s[i].id)) {
                fail(err, cap, "%s: two models have the id \"%s\"", path, s[i].id);
                i++;
                goto bad;
            }
    }
    json_decref(root);
    *specs = s;
    *n = (int)cnt;
    return 0;
bad:
    for (size_t k = 0; k < i; k++) srv_model_spec_free(&s[k]);
    free(s);
    json_decref(root);
    return -1;
}
