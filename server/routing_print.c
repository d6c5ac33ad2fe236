/*
 * routing_print.c - `codemoe complete --routing`: the routing statistics as a table per layer.
 */
#include "routing_print.h"

static double mean(const cm_route_count *c) {
    uint32_t n = c->tokens[0] + c->tokens[1];
    return n ? (c->gate_sum[0] + c->gate_sum[1]) / n : 0.0;
}

/* the windows an expert served, as "0-3,7" (at most ~60 characters) */
static void windows(FILE *f, const uint32_t *w, int n) {
    int printed = 0, len = 0;
    for (int i = 0; i < n && len < 60; i++) {
        if (!w[i]) continue;
        int j = i;
        while (j + 1 < n && w[j + 1]) j++;
        len += fprintf(f, "%s%d", printed ? "," : "", i);
        if (j > i) len += fprintf(f, "-%d", j);
        printed = 1;
        i = j;
    }
    if (len >= 60) fprintf(f, ",...");
    if (!printed) fprintf(f, "-");
}

void cm_print_routing(FILE *f, const cm_model *m, const cm_routing *r) {
    if (!r) {
        fprintf(f, "routing: %s is a dense model (no experts)\n", cm_model_get_info(m)->arch);
        return;
    }
    cm_moe_info mi;
    cm_model_moe_info(m, &mi);
    if (r->n_tok_experts) {
        fprintf(f, "routing (tokens prompt+generated, mean gate):\n");
        for (int l = 0; l < r->n_layer; l++) {
            fprintf(f, "layer %2d  token:", l);
            for (int e = 0; e < r->n_tok_experts; e++) {
                const cm_route_count *c = &r->tok[l * r->n_tok_experts + e];
                fprintf(f, "  e%d%s %u+%u g%.2f", e, e == r->shared_expert ? "(shared)" : "", c->tokens[0],
                        c->tokens[1], mean(c));
            }
            fputc('\n', f);
            if (!r->n_seg_experts) continue;
            fprintf(f, "          segment (window %d%s):", r->window,
                    mi.segment_route == CM_SEGMENT_ROUTE_PREVIOUS ? ", routed by the previous window; window 0 none" : "");
            for (int e = 0; e < r->n_seg_experts; e++) {
                const cm_route_count *c = &r->seg[l * r->n_seg_experts + e];
                fprintf(f, "  s%d %u+%u g%.3f w[", e, c->tokens[0], c->tokens[1], mean(c));
                windows(f, r->seg_windows + ((size_t)l * r->n_seg_experts + e) * r->n_windows, r->n_windows);
                fputc(']', f);
            }
            fputc('\n', f);
        }
    }
    if (r->n_adapters) {
        fprintf(f, "routing: MoLE tokens per adapter (prompt+generated):");
        for (int a = 0; a < r->n_adapters; a++)
            fprintf(f, "  %s %u+%u", cm_model_adapter_name(m, a), r->adapter[a].tokens[0], r->adapter[a].tokens[1]);
        fputc('\n', f);
    }
}
