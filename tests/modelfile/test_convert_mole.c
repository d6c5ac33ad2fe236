/*
 * test_convert_mole.c - modelfile/convert_mole.c: the MoLE fixture written out as a uw-swag/mole
 * Hugging Face checkpoint (F32 safetensors under HF names, q/k rows in HF order, mlp_moe adapters,
 * config.json with adapter names and alphas) converts back through cm_convert_hf to a model with the
 * same adapters and rope style whose logits equal the golden (batch-routed adapter sets).
 */
#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "gguf.h"
#include "golden.h"
#include "test.h"

#define MAXT 512

/* Writes the mole fixture as a uw-swag/mole HF directory (F32 safetensors, HF q/k order, mlp_moe
 * names), converts it back with cm_convert_hf and checks the logits against the golden. */
static int write_st(const char *path, const gguf_file *g, int n_head, int n_head_kv, int head_dim,
                    const char *const *ad_names) {
    /* header: every tensor under its HF name; q/k un-permuted (inverse of llama.cpp's permutation) */
    size_t cap = 1 << 20, hl = 0;
    char *hdr = malloc(cap);
    uint64_t off = 0;
    hl += (size_t)snprintf(hdr + hl, cap - hl, "{");
    char (*hfn)[160] = calloc(g->n_tensors, sizeof *hfn);
    for (uint64_t t = 0; t < g->n_tensors; t++) {
        const gguf_tensor *gt = &g->tensors[t];
        char nm[160], *hf = hfn[t];
        snprintf(nm, sizeof nm, "%.*s", (int)gt->name.len, gt->name.ptr);
        int l = -1;
        char rest[128] = "", p[16] = "", ab = 0, an[32] = "";
        if (sscanf(nm, "blk.%d.%127s", &l, rest) == 2) {
            if (sscanf(rest, "ffn_%15[a-z].lora_%c.%31s", p, &ab, an) == 3) {
                int j = 0;
                while (strcmp(ad_names[j], an)) j++;
                snprintf(hf, 160, "model.layers.%d.mlp_moe.%s_proj.experts.%d.lora_%c.weight", l, p, j, ab == 'a' ? 'A' : 'B');
            } else if (sscanf(rest, "ffn_%15[a-z].weight", p) == 1 && strcmp(p, "norm")) {
                snprintf(hf, 160, "model.layers.%d.mlp_moe.%s_proj.shared_linear.weight", l, p);
            } else {
                static const char *map[][2] = {{"attn_norm.weight", "input_layernorm.weight"},
                    {"attn_q.weight", "self_attn.q_proj.weight"}, {"attn_k.weight", "self_attn.k_proj.weight"},
                    {"attn_v.weight", "self_attn.v_proj.weight"}, {"attn_output.weight", "self_attn.o_proj.weight"},
                    {"ffn_norm.weight", "post_attention_layernorm.weight"}};
                for (int k = 0; k < 6; k++)
                    if (!strcmp(rest, map[k][0])) snprintf(hf, 160, "model.layers.%d.%s", l, map[k][1]);
            }
        } else if (!strcmp(nm, "token_embd.weight")) snprintf(hf, 160, "model.embed_tokens.weight");
        else if (!strcmp(nm, "output_norm.weight")) snprintf(hf, 160, "model.norm.weight");
        else if (!strcmp(nm, "output.weight")) snprintf(hf, 160, "lm_head.weight");
        if (!hf[0] || gt->type != GGUF_TT_F32) {
            free(hdr);
            free(hfn);
            return -1;
        }
        uint64_t nb = gt->nbytes;
        if (gt->n_dims == 1)
            hl += (size_t)snprintf(hdr + hl, cap - hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%lld],\"data_offsets\":[%llu,%llu]}",
                                   t ? "," : "", hf, (long long)gt->ne[0], (unsigned long long)off, (unsigned long long)(off + nb));
        else
            hl += (size_t)snprintf(hdr + hl, cap - hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%lld,%lld],\"data_offsets\":[%llu,%llu]}",
                                   t ? "," : "", hf, (long long)gt->ne[1], (long long)gt->ne[0], (unsigned long long)off,
                                   (unsigned long long)(off + nb));
        off += nb;
    }
    hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
    FILE *f = fopen(path, "wb");
    uint64_t n = hl;
    fwrite(&n, 8, 1, f);
    fwrite(hdr, 1, hl, f);
    for (uint64_t t = 0; t < g->n_tensors; t++) {
        const gguf_tensor *gt = &g->tensors[t];
        int heads = strstr(hfn[t], "q_proj") ? n_head : strstr(hfn[t], "k_proj") ? n_head_kv : 0;
        if (!heads) {
            fwrite(gt->data, 1, gt->nbytes, f);
            continue;
        }
        size_t row = (size_t)gt->ne[0] * 4;
        char *buf = malloc(gt->nbytes);
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < head_dim / 2; i++)
                for (int j = 0; j < 2; j++)
                    memcpy(buf + (size_t)(h * head_dim + j * (head_dim / 2) + i) * row,
                           (const char *)gt->data + (size_t)(h * head_dim + 2 * i + j) * row, row);
        fwrite(buf, 1, gt->nbytes, f);
        free(buf);
    }
    fclose(f);
    free(hdr);
    free(hfn);
    return 0;
}

TEST(convert_mole_checkpoint) {
    json_t *j = golden_json("mole");
    ASSERT_TRUE(j);
    const char *model = json_string_value(json_object_get(j, "model"));
    cm_model *m = golden_load_model(model);
    ASSERT_TRUE(m);
    const cm_model_info *in = cm_model_get_info(m);
    gguf_file g;
    cm_err err = {0};
    ASSERT_EQ_INT(gguf_open(&g, test_fixture(model), &err), 0);
    char dir[256], p[512];
    snprintf(dir, sizeof dir, "/tmp/cm_test_mole_hf_%d", (int)getpid());
    mkdir(dir, 0755);
    const char *names[4] = {"python", "rust", "shared", "other"};
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    ASSERT_EQ_INT(write_st(p, &g, in->n_head, in->n_head_kv, in->head_dim, names), 0);
    gguf_close(&g);
    snprintf(p, sizeof p, "%s/config.json", dir);
    FILE *f = fopen(p, "w");
    fprintf(f, "{\"model_type\": \"MoE\", \"architectures\": [\"MoLEForCausalLM\"], \"hidden_size\": %d, "
               "\"num_hidden_layers\": %d, \"intermediate_size\": %d, \"num_attention_heads\": %d, "
               "\"num_key_value_heads\": %d, \"vocab_size\": %d, \"rms_norm_eps\": %g, \"rope_theta\": %g, "
               "\"max_position_embeddings\": %d, \"tie_word_embeddings\": false, "
               "\"adapter_names\": [\"python\", \"rust\", \"shared\", \"other\"], \"lora_alphas\": [4, 4, 6, 6]}\n",
            in->n_embd, in->n_layer, in->n_ff, in->n_head, in->n_head_kv, in->n_vocab, (double)in->rms_eps,
            (double)in->rope_theta, in->n_ctx_train);
    fclose(f);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cp %s %s/tokenizer.json", test_fixture("hf/qwen2-gqa-hf/tokenizer.json"), dir);
    ASSERT_EQ_INT(system(cmd), 0);
    char out[300];
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    int rc = cm_convert_hf(dir, out, NULL, &err);
    if (rc) fprintf(stderr, "convert: %s\n", err.msg);
    ASSERT_EQ_INT(rc, 0);
    cm_model_params mp = {0};
    cm_model *mc = cm_model_load(out, &mp, &err);
    if (!mc) fprintf(stderr, "load: %s\n", err.msg);
    ASSERT_TRUE(mc);
    ASSERT_EQ_INT(cm_model_n_adapters(mc), 4);
    ASSERT_EQ_INT(cm_model_get_info(mc)->rope_neox, 0);
    /* golden case 1 with the request's sets */
    json_t *cs = json_array_get(json_object_get(j, "cases"), 1);
    int32_t tok[MAXT];
    uint64_t sets[MAXT];
    int n = golden_ids(json_object_get(cs, "tokens"), tok, MAXT);
    for (int i = 0; i < n; i++) sets[i] = golden_set_mask(json_array_get(json_object_get(cs, "adapter_sets"), (size_t)i));
    int V = in->n_vocab;
    float *gold = golden_f32(json_string_value(json_object_get(cs, "logits")), (size_t)n * V);
    float *lg = malloc((size_t)n * V * sizeof(float));
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = 256, .n_batch_max = 256};
    cm_ctx *c = cm_ctx_create(mc, &cp, &err);
    ASSERT_TRUE(c);
    cm_seq_options o;
    cm_seq_options_default(&o);
    o.adapter_routing = CM_ADAPTERS_BATCH;
    ASSERT_EQ_INT(golden_run_seq(c, V, tok, n, 0, &o, sets, lg, NULL, NULL), 0);
    double d = golden_max_diff(lg, gold, (size_t)n * V);
    fprintf(stderr, "  converted mole checkpoint vs golden: %.3g\n", d);
    CHECK_TRUE(d <= 1e-4);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK_TRUE(system(cmd) == 0);
    free(gold);
    free(lg);
    cm_ctx_free(c);
    cm_model_free(mc);
    cm_model_free(m);
    json_decref(j);
}

int main(void) {
    RUN(convert_mole_checkpoint);
    return test_summary();
}
