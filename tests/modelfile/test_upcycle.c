/*
 * test_upcycle.c - modelfile/upcycle.c: every dense fixture (qwen2/llama, F32/F16/BF16/Q8_0, GQA and
 * MHA) upcycled to a hybrid with fusion weights 1/0 and to a MoLE model with B = 0 adapters computes
 * the dense model's logits (prefill and decode, 1 and 3 threads, noisy routers so the invariant cannot
 * depend on which experts are chosen); bad parameters and a non-dense source are refused with a
 * message.
 */
#include <stdint.h>
#include <unistd.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "golden.h"
#include "test.h"

static void upcycle_check(const char *dense, int mole, int threads) {
    char out[256], rel[256];
    snprintf(out, sizeof out, "/tmp/cm_test_upcycle_%d.gguf", (int)getpid());
    snprintf(rel, sizeof rel, "models/%s.gguf", dense);
    cm_upcycle_params p;
    cm_upcycle_default(&p);
    p.a_tok = 1.0f;
    p.a_seg = 0.0f;
    p.n_experts = 4;
    p.top_k = 2;
    p.n_seg_experts = 3;
    p.window = 4;
    p.router_std = 0.5f; /* routing varies per token: the invariant must not depend on it */
    p.seed = 7;
    if (mole) p.mole_langs = "python,rs,c++";
    cm_err err = {0};
    ASSERT_EQ_INT(cm_upcycle(test_fixture(rel), out, &p, &err), 0);
    cm_model *md = golden_load_model(rel);
    cm_model_params mp = {0};
    cm_model *mu = cm_model_load(out, &mp, &err);
    unlink(out);
    if (!mu) TEST_FAIL_("%s upcycled: %s", dense, err.msg);
    ASSERT_TRUE(md && mu);
    ASSERT_STREQ(cm_model_get_info(mu)->arch, mole ? "mole" : "multipl_moe");
    ASSERT_EQ_INT(cm_model_get_info(mu)->rope_neox, cm_model_get_info(md)->rope_neox);
    ASSERT_EQ_INT(cm_model_get_info(mu)->qkv_bias, cm_model_get_info(md)->qkv_bias);
    if (mole) ASSERT_EQ_INT(cm_model_n_adapters(mu), 5);
    int V = cm_model_get_info(md)->n_vocab;
    int32_t tok[40];
    for (int i = 0; i < 40; i++) tok[i] = (int32_t)((i * 37 + 11) % V);
    float *a = malloc((size_t)40 * V * sizeof(float)), *b = malloc((size_t)40 * V * sizeof(float));
    cm_ctx_params cp = {.n_threads = threads, .n_seq_max = 1, .n_ctx = 64, .n_batch_max = 64};
    cm_ctx *cd = cm_ctx_create(md, &cp, &err), *cu = cm_ctx_create(mu, &cp, &err);
    ASSERT_TRUE(cd && cu);
    cm_seq_options o;
    cm_seq_options_default(&o);
    if (mole) o.language = 0; /* every token through {python, shared}: B = 0 adds nothing */
    ASSERT_EQ_INT(golden_run_seq(cd, V, tok, 40, 0, NULL, NULL, a, NULL, NULL), 0);
    ASSERT_EQ_INT(golden_run_seq(cu, V, tok, 40, 0, &o, NULL, b, NULL, NULL), 0);
    double d = golden_max_diff(a, b, (size_t)40 * V);
    /* decode path too */
    ASSERT_EQ_INT(golden_run_seq(cu, V, tok, 40, 1, &o, NULL, b, NULL, NULL), 0);
    double d1 = golden_max_diff(a, b, (size_t)40 * V);
    if (!(d <= 2e-5 && d1 <= 2e-5)) TEST_FAIL_("%s -> %s: logits differ from the dense model by %g / %g", dense,
                                               mole ? "mole" : "hybrid", d, d1);
    if (!mole) {
        const cm_routing *r = cm_seq_routing(cu, 0);
        CHECK_TRUE(r == NULL || r->n_tok_experts == 4);
    }
    free(a);
    free(b);
    cm_ctx_free(cd);
    cm_ctx_free(cu);
    cm_model_free(md);
    cm_model_free(mu);
}

TEST(upcycle_invariant_every_arch) {
    const char *dense[] = {"qwen2-gqa", "llama-mha", "qwen2-mha", "llama-gqa", "qwen2-gqa-f16", "qwen2-gqa-bf16",
                           "qwen2-gqa-q8_0"};
    for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) {
        upcycle_check(dense[i], 0, i % 2 ? 3 : 1);
        upcycle_check(dense[i], 1, i % 2 ? 1 : 3);
    }
}

TEST(upcycle_bad_params) {
    cm_upcycle_params p;
    cm_err err = {0};
    cm_upcycle_default(&p);
    p.top_k = 7;
    ASSERT_EQ_INT(cm_upcycle(test_fixture("models/qwen2-gqa.gguf"), "/tmp/never.gguf", &p, &err), CM_E_INVAL);
    CHECK_TRUE(strstr(err.msg, "top-k") != NULL);
    cm_upcycle_default(&p);
    p.window = 0;
    ASSERT_EQ_INT(cm_upcycle(test_fixture("models/qwen2-gqa.gguf"), "/tmp/never.gguf", &p, &err), CM_E_INVAL);
    cm_upcycle_default(&p);
    ASSERT_TRUE(cm_upcycle(test_fixture("models/hybrid-max.gguf"), "/tmp/never.gguf", &p, &err) < 0);
    CHECK_TRUE(strstr(err.msg, "dense") != NULL);
}

int main(void) {
    /* The invariant compares float paths: the upcycled experts run on f32 activations (moe.c), so the
     * dense model's products must too (the int8 decode default quantises them). */
    setenv("CODEMOE_EXACT_ACTIVATIONS", "1", 1);
    RUN(upcycle_invariant_every_arch);
    RUN(upcycle_bad_params);
    return test_summary();
}
