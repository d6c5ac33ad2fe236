/*
 * moe_api.c - the public (codemoe.h) face of the mixture-of-experts code: sequence options, routing
 * statistics and their per-token detail, the model's expert shape and adapter names. Dense models accept options and report no statistics.
 */
#include <string.h>

#include "model.h"
#include "moe.h"
#include "util.h"

int cm_seq_set_options(cm_ctx *c, int seq, const cm_seq_options *o, cm_err *err) {
    if (!c || !o) return cm_err_set(err, CM_E_INVAL, "seq: no context or options");
    int len = cm_seq_len(c, seq);
    if (len < 0) return cm_err_set(err, CM_E_RANGE, "seq: %d is not an open sequence", seq);
    cm_moe_ctx *mc = cm_ctx_moe(c);
    if (!mc) return len == 0 ? CM_OK : cm_err_set(err, CM_E_INVAL, "seq: options can change only while sequence %d is empty", seq);
    return cm_moe_seq_set_options(mc, seq, len, o, err);
}

const cm_routing *cm_seq_routing(const cm_ctx *c, int seq) {
    cm_moe_ctx *mc = cm_ctx_moe(c);
    if (!mc || cm_seq_len(c, seq) < 0) return NULL;
    return cm_moe_routing(mc, seq);
}

void cm_seq_routing_reset(cm_ctx *c, int seq) {
    cm_moe_ctx *mc = cm_ctx_moe(c);
    if (mc && cm_seq_len(c, seq) >= 0) cm_moe_routing_reset(mc, seq);
}

int cm_seq_routing_tokens_enable(cm_ctx *c, int seq, int n_max, cm_err *err) {
    int len = cm_seq_len(c, seq);
    if (len < 0) return cm_err_set(err, CM_E_RANGE, "seq: %d is not an open sequence", seq);
    if (len != 0) return cm_err_set(err, CM_E_INVAL, "seq: routing detail can be enabled only while sequence %d is empty", seq);
    cm_moe_ctx *mc = cm_ctx_moe(c);
    return mc ? cm_moe_seq_tokens_enable(mc, seq, n_max, err) : 0;
}

const cm_route_tokens *cm_seq_routing_tokens(const cm_ctx *c, int seq) {
    cm_moe_ctx *mc = cm_ctx_moe(c);
    if (!mc || cm_seq_len(c, seq) < 0) return NULL;
    return cm_moe_seq_tokens(mc, seq);
}

void cm_ctx_set_routing_stats(cm_ctx *c, int on) {
    cm_moe_ctx *mc = cm_ctx_moe(c);
    if (mc) cm_moe_set_stats(mc, on);
}

void cm_model_moe_info(const cm_model *m, cm_moe_info *out) {
    memset(out, 0, sizeof *out);
    out->shared_expert = out->shared_adapter = out->fallback_adapter = -1;
    const cm_moe_model *mm = m ? m->moe : NULL;
    if (!mm) return;
    if (mm->kind == CM_MOE_HYBRID) {
        out->kind = CM_MOE_KIND_HYBRID;
        out->n_experts = mm->n_tok;
        out->top_k = mm->k_used;
        out->shared_expert = mm->shared;
        out->n_seg_experts = mm->n_seg;
        out->window = mm->window;
        out->segment_mode_default = mm->mode_default;
        out->segment_route = mm->route;
    } else if (mm->kind == CM_MOE_SPARSE) {
        out->kind = CM_MOE_KIND_SPARSE;
        out->n_experts = mm->n_tok;
        out->top_k = mm->k_used;
    } else if (mm->kind == CM_MOE_MOLE) {
        out->kind = CM_MOE_KIND_MOLE;
        out->n_adapters = mm->n_adapters;
        out->shared_adapter = mm->ad_shared;
        out->fallback_adapter = mm->ad_fallback;
    }
}

int cm_model_n_adapters(const cm_model *m) {
    return m && m->moe && m->moe->kind == CM_MOE_MOLE ? m->moe->n_adapters : 0;
}

const char *cm_model_adapter_name(const cm_model *m, int i) {
    return i >= 0 && i < cm_model_n_adapters(m) ? m->moe->names[i] : NULL;
}

int cm_model_adapter_id(const cm_model *m, const char *name) {
    char norm[CM_LANG_NAME_MAX + 1];
    if (!name || !cm_lang_normalize(name, strlen(name), norm)) return -1;
    for (int i = 0; i < cm_model_n_adapters(m); i++)
        if (!strcmp(m->moe->names[i], norm)) return i;
    return -1;
}
