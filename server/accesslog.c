/*
 * accesslog.c - the server's log: one JSON object per line on stderr, so that access logs and
 * events can be shipped and queried without parsing free text. Strings are escaped by jansson,
 * so nothing a client sends (paths, request ids, user fields) can forge a line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server.h"

uint64_t srv_now_ns(void) { return uv_hrtime(); }

void srv_log(const char *level, const char *msg, json_t *fields) {
    json_t *o = json_object();
    if (!o) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char t[40];
    size_t n = strftime(t, sizeof t, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(t + n, sizeof t - n, ".%03ldZ", ts.tv_nsec / 1000000);
    json_object_set_new(o, "ts", json_string(t));
    json_object_set_new(o, "level", json_string(level));
    json_object_set_new(o, "msg", json_string(msg));
    if (fields) json_object_update(o, fields);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) return;
    size_t len = strlen(s);
    s[len] = '\n'; /* json_dumps leaves room for exactly the NUL, which we replace */
    fwrite(s, 1, len + 1, stderr);
    fflush(stderr);
    free(s);
}
