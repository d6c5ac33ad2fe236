/*
 * expert_metrics.c - the server's lifetime expert load (an api_route_agg summed over every finished
 * sequence) as Prometheus series for /metrics, one model's at a time (each series carries its model label),
 * so that a pool renders each metric's HELP/TYPE once and then every model's series. The aggregate
 * itself and its JSON live in api/routing.c.
 */
#include "server.h"

void srv_expert_metrics_header(int adapters, srv_buf *b) {
    srv_buf_puts(b, adapters ? "# HELP codemoe_adapter_tokens_total Tokens each MoLE adapter applied to, by phase.\n"
                               "# TYPE codemoe_adapter_tokens_total counter\n"
                             : "# HELP codemoe_expert_tokens_total Tokens routed to each expert, by level, layer and phase.\n"
                               "# TYPE codemoe_expert_tokens_total counter\n");
}

void srv_expert_metrics_render(const api_route_agg *a, const cm_model *m, const char *label, int adapters, srv_buf *b) {
    if (!a->has) return;
    static const char *phase[2] = {"prompt", "generated"};
    if (!adapters) {
        for (int l = 0; l < a->n_layer; l++) {
            for (int e = 0; e < a->n_tok; e++)
                for (int k = 0; k < 2; k++)
                    srv_buf_printf(b, "codemoe_expert_tokens_total{%s,level=\"token\",layer=\"%d\",expert=\"%d\",phase=\"%s\"} %u\n",
                                   label, l, e, phase[k], a->tok[(size_t)l * a->n_tok + e].tokens[k]);
            for (int e = 0; e < a->n_seg; e++)
                for (int k = 0; k < 2; k++)
                    srv_buf_printf(b, "codemoe_expert_tokens_total{%s,level=\"segment\",layer=\"%d\",expert=\"%d\",phase=\"%s\"} %u\n",
                                   label, l, e, phase[k], a->seg[(size_t)l * a->n_seg + e].tokens[k]);
        }
        return;
    }
    for (int i = 0; i < a->n_adapters; i++) {
        const char *name = cm_model_adapter_name(m, i);
        char safe[64];
        /* label values come from the model file: keep [A-Za-z0-9_+.-] only */
        size_t n = 0;
        for (const char *p = name ? name : ""; *p && n < sizeof safe - 1; p++) {
            char c = *p;
            if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                c == '+' || c == '.' || c == '-')
                safe[n++] = c;
        }
        safe[n] = 0;
        for (int k = 0; k < 2; k++)
            srv_buf_printf(b, "codemoe_adapter_tokens_total{%s,adapter=\"%d\",name=\"%s\",phase=\"%s\"} %u\n", label, i,
                           safe, phase[k], a->adapter[i].tokens[k]);
    }
}
