/*
 * tabby.c - Tabby's telemetry: the Tabby IDE agent posts an event to POST /v1/events each time a
 * completion is shown, accepted or dismissed ({type: "view" | "select" | "dismiss", completion_id,
 * choice_index, view_id, elapsed}, query select_kind=line for a partial accept). Tabby's server logs
 * them for its usage reports; this server only counts them (the server's metrics), so that an agent
 * configured for Tabby gets the 200 it expects instead of an error in its log.
 */
#include <string.h>

#include "format.h"

static const char *const kind_names[API_TABBY_EVENT_KINDS] = {"view", "select", "dismiss"};

const char *api_tabby_event_name(api_tabby_event_kind k) {
    return k >= 0 && k < API_TABBY_EVENT_KINDS ? kind_names[k] : "";
}

int api_tabby_event(const char *body, size_t len, const api_limits *lim, const char *select_kind,
                    api_tabby_event_kind *kind, api_error *e) {
    api_completion_req scratch; /* api_format_load_body's contract wants one; nothing is kept in it */
    json_t *root = api_format_load_body(body, len, NULL, lim, &scratch, e);
    if (!root) return -1;
    int rc = -1;
    json_t *type = json_object_get(root, "type"), *id = json_object_get(root, "completion_id"),
           *choice = json_object_get(root, "choice_index"), *view = json_object_get(root, "view_id"),
           *elapsed = json_object_get(root, "elapsed");
    int k = -1;
    for (int i = 0; json_is_string(type) && i < API_TABBY_EVENT_KINDS; i++)
        if (!strcmp(json_string_value(type), kind_names[i])) k = i;
    if (k < 0)
        api_error_set(e, 400, API_ERR_INVALID, "type", NULL, "'type' must be one of 'view', 'select', 'dismiss'");
    else if (!json_is_string(id))
        api_error_set(e, 400, API_ERR_INVALID, "completion_id", NULL, "'completion_id' is a required string");
    else if (!json_is_integer(choice) || json_integer_value(choice) < 0)
        api_error_set(e, 400, API_ERR_INVALID, "choice_index", NULL, "'choice_index' is a required integer >= 0");
    else if (view && !json_is_null(view) && !json_is_string(view))
        api_error_set(e, 400, API_ERR_INVALID, "view_id", NULL, "'view_id' must be a string");
    else if (elapsed && !json_is_null(elapsed) && !json_is_integer(elapsed))
        api_error_set(e, 400, API_ERR_INVALID, "elapsed", NULL, "'elapsed' must be an integer");
    else if (select_kind && strcmp(select_kind, "line"))
        api_error_set(e, 400, API_ERR_INVALID, "select_kind", NULL, "'select_kind' must be 'line'");
    else {
        *kind = (api_tabby_event_kind)k;
        rc = 0;
    }
    json_decref(root);
    return rc;
}
