/*
 * cmd_complete.c - `codemoe complete`: one completion from the command line. The prompt (or the FIM
 * prefix/suffix pair, arranged by api/'s api_fim_tokens as for the server) is tokenized and prefilled in
 * one batch, then tokens are sampled one at a time and their text streamed to stdout as soon as it
 * forms complete UTF-8 and can no longer turn into a --stop string (flushed after every token). The
 * choice's text and its end (end-of-generation, -n, --stop) are api_choice_state's, as in the server.
 * Logs, timings and optional logprobs go to stderr, so stdout is exactly the generated text.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "cli.h"
#include "codemoe.h"
#include "routing_print.h"
#include "commands.h"

#define COMPLETE_MAX_PROMPT_BYTES (64u << 20)
#define COMPLETE_DEFAULT_CTX 4096

static void complete_usage(FILE *f) {
    api_limits lim; /* --stop follows the API's rules under its default limits */
    api_limits_default(&lim);
    fprintf(f,
        "usage: codemoe complete --model M (--prompt S | --file F) [flags]\n"
        "  --model M               GGUF model file\n"
        "  --prompt S              prompt text          --file F   read the prompt from a file ('-': stdin)\n"
        "  --suffix S              fill-in-the-middle: [BOS] <fim_prefix>prompt<fim_suffix>S<fim_middle>, as the\n"
        "                          server builds it (prompt and S are plain text: --special does not apply)\n"
        "  -n, --n-predict N       tokens to generate (default 128); stops earlier at end-of-generation\n"
        "  --stop S                end before the first occurrence of S (not printed); repeatable, at most\n"
        "                          %d strings of 1..%d bytes, as the API's \"stop\"\n"
        "  --temperature T         0 = greedy (default 1)\n"
        "  --top-k K               0 = off (default)\n"
        "  --top-p P               1 = off (default)\n"
        "  --min-p P               0 = off (default)\n"
        "  --repeat-penalty R      1 = off (default); over the last --repeat-last-n tokens (default 64, 0 = all)\n"
        "  --presence-penalty P    0 = off (default)\n"
        "  --frequency-penalty F   0 = off (default)\n"
        "  --seed S                random seed (default 0)\n"
        "  --threads T             compute threads (default: online CPUs)\n"
        "  --ctx N                 context length in tokens (default: min(model's, %d))\n"
        CLI_KV_TYPE_HELP
        "  --special               recognise special-token strings (<|fim_prefix|>, ...) in the prompt\n"
        "                          (without --suffix)\n"
        "  --logprobs N            print the chosen token's and the top N log-probabilities to stderr\n"
        "  --routing               print the MoE routing statistics per layer to stderr afterwards\n"
        "  --language L            MoLE: the prompt's language (default: fences, else detected)\n",
        lim.max_stop, API_STOP_MAX_BYTES, COMPLETE_DEFAULT_CTX);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Appends the tokens of text to *ids (growing it). Returns 0, or -1 with a message printed. */
static int complete_tokenize(const cm_model *m, const char *text, size_t len, int flags, int32_t **ids,
                             int *n, int *cap) {
    cm_err err = {0};
    for (;;) {
        int r = cm_tokenize(m, text, len, flags, *ids + *n, *cap - *n, &err);
        if (r < 0) {
            fprintf(stderr, "codemoe complete: tokenize: %s\n", err.msg);
            return -1;
        }
        if (r <= *cap - *n) {
            *n += r;
            return 0;
        }
        int ncap = *n + r + 16;
        int32_t *nb = realloc(*ids, (size_t)ncap * sizeof *nb);
        if (!nb) {
            fprintf(stderr, "codemoe complete: out of memory for %d prompt tokens\n", *n + r);
            return -1;
        }
        *ids = nb;
        *cap = ncap;
    }
}

static int complete_push(int32_t **ids, int *n, int *cap, int32_t tok) {
    if (*n == *cap) {
        int ncap = *cap * 2 + 16;
        int32_t *nb = realloc(*ids, (size_t)ncap * sizeof *nb);
        if (!nb) return -1;
        *ids = nb;
        *cap = ncap;
    }
    (*ids)[(*n)++] = tok;
    return 0;
}

static void print_piece(const cm_model *m, int32_t id) {
    char buf[512];
    int nb = cm_token_bytes(m, id, 1, buf, sizeof buf);
    cli_json_string(stderr, buf, nb < 0 ? 0 : (size_t)nb > sizeof buf ? sizeof buf : (size_t)nb);
}

/* The --stop values as an api_stops, under the API's rules and default limits. Returns 0, or -1 with
 * the reason on stderr (st then holds nothing). */
static int complete_stops(const char *const *arg, int n, api_stops *st) {
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    char shown[96];
    if (api_stops_check_count((size_t)n, &lim, "", &e) < 0) {
        snprintf(shown, sizeof shown, "%d --stop strings", n);
        api_stops_check_count((size_t)n, &lim, shown, &e);
        fprintf(stderr, "codemoe complete: %s\n", e.message);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        size_t len = strlen(arg[i]);
        snprintf(shown, sizeof shown, "'%.60s%s'", arg[i], len > 60 ? "..." : "");
        if (api_stops_add(st, arg[i], len, shown, &e) < 0) {
            fprintf(stderr, "codemoe complete: --stop %s\n", e.message);
            api_stops_free(st);
            return -1;
        }
    }
    return 0;
}

int cmd_complete(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *file = NULL, *suffix = NULL, *v = NULL;
    int n_predict = 128, n_ctx = 0, special = 0, routing = 0, kv_type = CLI_KV_TYPE_DEFAULT;
    const char *language = NULL;
    const char *stop_arg[API_STOP_MAX + 1]; /* enough to tell that there are too many */
    int n_stop_arg = 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = ncpu > 0 ? (ncpu > 256 ? 256 : (int)ncpu) : 1;
    unsigned long long seed = 0;
    cm_sampling sp;
    cm_sampling_default(&sp);

    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        int r = 0, ok = 1;
#define VALUE_FLAG(name) ((r = cli_flag(argc, argv, &i, name, &v)) != 0)
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            complete_usage(stdout);
            return 0;
        } else if (VALUE_FLAG("--model")) {
            model = v;
        } else if (VALUE_FLAG("--prompt")) {
            prompt = v;
        } else if (VALUE_FLAG("--file")) {
            file = v;
        } else if (VALUE_FLAG("--suffix")) {
            suffix = v;
        } else if (VALUE_FLAG("-n") || VALUE_FLAG("--n-predict")) {
            ok = r < 0 || cli_int("complete", f, v, 0, 1 << 24, &n_predict);
        } else if (VALUE_FLAG("--temperature")) {
            ok = r < 0 || cli_float("complete", f, v, 0, 1e6, &sp.temperature);
        } else if (VALUE_FLAG("--top-k")) {
            ok = r < 0 || cli_int("complete", f, v, 0, 1 << 30, &sp.top_k);
        } else if (VALUE_FLAG("--top-p")) {
            ok = r < 0 || cli_float("complete", f, v, 0, 1, &sp.top_p);
        } else if (VALUE_FLAG("--min-p")) {
            ok = r < 0 || cli_float("complete", f, v, 0, 1, &sp.min_p);
        } else if (VALUE_FLAG("--repeat-penalty")) {
            ok = r < 0 || cli_float("complete", f, v, 1e-6, 1e6, &sp.repetition_penalty);
        } else if (VALUE_FLAG("--repeat-last-n")) {
            ok = r < 0 || cli_int("complete", f, v, 0, 1 << 22, &sp.penalty_last_n);
        } else if (VALUE_FLAG("--presence-penalty")) {
            ok = r < 0 || cli_float("complete", f, v, -1e6, 1e6, &sp.presence_penalty);
        } else if (VALUE_FLAG("--frequency-penalty")) {
            ok = r < 0 || cli_float("complete", f, v, -1e6, 1e6, &sp.frequency_penalty);
        } else if (VALUE_FLAG("--seed")) {
            ok = r < 0 || cli_u64("complete", f, v, &seed);
        } else if (VALUE_FLAG("--threads")) {
            ok = r < 0 || cli_int("complete", f, v, 1, 1024, &n_threads);
        } else if (VALUE_FLAG("--ctx")) {
            ok = r < 0 || cli_int("complete", f, v, 1, 1 << 24, &n_ctx);
        } else if (VALUE_FLAG("--kv-type")) {
            ok = r < 0 || cli_kv_type("complete", f, v, &kv_type);
        } else if (VALUE_FLAG("--logprobs")) {
            ok = r < 0 || cli_int("complete", f, v, 0, CM_LOGPROBS_MAX, &sp.n_logprobs);
        } else if (cli_flag(argc, argv, &i, "--special", NULL)) {
            special = 1;
        } else if (cli_flag(argc, argv, &i, "--routing", NULL)) {
            routing = 1;
        } else if (VALUE_FLAG("--language")) {
            language = v;
        } else if (VALUE_FLAG("--stop")) {
            if (r > 0 && n_stop_arg <= API_STOP_MAX) stop_arg[n_stop_arg] = v;
            if (r > 0) n_stop_arg++;
        } else {
            fprintf(stderr, "codemoe complete: unknown flag '%s' (see codemoe complete --help)\n", f);
            return 2;
        }
#undef VALUE_FLAG
        if (r < 0) {
            fprintf(stderr, "codemoe complete: %s needs a value\n", f);
            return 2;
        }
        if (!ok) return 2;
    }
    sp.seed = seed;
    if (!model || (!prompt == !file)) {
        fprintf(stderr, "codemoe complete: need --model and exactly one of --prompt / --file "
                        "(see codemoe complete --help)\n");
        return 2;
    }
    api_stops stops = {0};
    if (complete_stops(stop_arg, n_stop_arg, &stops) < 0) return 2;

    int rc = 1;
    char *file_text = NULL;
    api_choice_state ch = {0};
    int32_t *ids = NULL;
    int n_prompt = 0, cap = 0;
    cm_model *m = NULL;
    cm_ctx *ctx = NULL;
    cm_sampler *smp = NULL;
    cm_token_logprob *top = NULL;
    cm_err err = {0};
    size_t plen;
    if (file) {
        file_text = cli_read_file("complete", !strcmp(file, "-") ? "/dev/stdin" : file,
                                  COMPLETE_MAX_PROMPT_BYTES, &plen);
        if (!file_text) {
            api_stops_free(&stops);
            return 1;
        }
        prompt = file_text;
    } else {
        plen = strlen(prompt);
    }

    double t0 = now_s();
    cm_model_params mp = {.n_threads = n_threads, .vocab_only = 0};
    m = cm_model_load(model, &mp, &err);
    if (!m) {
        fprintf(stderr, "codemoe complete: %s: %s\n", model, err.msg);
        goto out;
    }
    const cm_model_info *info = cm_model_get_info(m);
    fprintf(stderr, "codemoe complete: loaded %s (%s, %s, %.1fM params) in %.0f ms\n", model, info->arch,
            info->weight_type ? info->weight_type : "?", (double)info->n_params / 1e6, (now_s() - t0) * 1e3);

    /* prompt tokens: the FIM arrangement exactly as the server builds it for "suffix" (prompt and
     * suffix as plain text), or BOS (if the model wants it) + text */
    if (suffix) {
        api_error ae;
        if (api_fim_tokens(m, prompt, plen, suffix, strlen(suffix), &ids, &n_prompt, &ae) < 0) {
            fprintf(stderr, "codemoe complete: --suffix: %s\n", ae.message);
            goto out;
        }
        cap = n_prompt;
    } else {
        const int pflags = special ? CM_TOK_PARSE_SPECIAL : 0;
        if (info->add_bos && info->bos >= 0 && complete_push(&ids, &n_prompt, &cap, info->bos) < 0) goto oom;
        if (complete_tokenize(m, prompt, plen, pflags, &ids, &n_prompt, &cap) < 0) goto out;
    }
    if (n_prompt == 0) {
        fprintf(stderr, "codemoe complete: the prompt is empty (and the model adds no BOS token)\n");
        goto out;
    }

    if (n_ctx == 0) {
        n_ctx = info->n_ctx_train > 0 && info->n_ctx_train < COMPLETE_DEFAULT_CTX ? info->n_ctx_train
                                                                                  : COMPLETE_DEFAULT_CTX;
    }
    if (n_prompt >= n_ctx) {
        fprintf(stderr, "codemoe complete: the prompt is %d tokens but the context holds %d "
                        "(raise --ctx, or shorten the prompt)\n", n_prompt, n_ctx);
        goto out;
    }
    if (n_predict > n_ctx - n_prompt) {
        fprintf(stderr, "codemoe complete: generating at most %d tokens (context %d, prompt %d)\n",
                n_ctx - n_prompt, n_ctx, n_prompt);
        n_predict = n_ctx - n_prompt;
    }

    cm_ctx_params cp = {.n_threads = n_threads, .n_seq_max = 1, .n_ctx = n_ctx, .n_batch_max = n_prompt,
                        .kv_tokens = n_ctx, .kv_type = kv_type};
    ctx = cm_ctx_create(m, &cp, &err);
    if (!ctx) {
        fprintf(stderr, "codemoe complete: %s\n", err.msg);
        goto out;
    }
    smp = cm_sampler_create(m, &sp, &err);
    if (!smp) {
        fprintf(stderr, "codemoe complete: %s\n", err.msg);
        rc = err.code == CM_E_NOMEM ? 1 : 2; /* otherwise a bad sampling parameter */
        goto out;
    }
    if (sp.n_logprobs > 0 && !(top = calloc((size_t)sp.n_logprobs, sizeof *top))) goto oom;
    int seq = cm_seq_open(ctx, &err);
    if (seq < 0) {
        fprintf(stderr, "codemoe complete: %s\n", err.msg);
        goto out;
    }
    for (int i = 0; i < n_prompt; i++) cm_sampler_accept_prompt(smp, ids[i]);
    /* the sequence's options by the API's rule (MoLE: --language, else the prompt's fences, else a guess) */
    cm_seq_options so;
    api_error ae;
    if (api_seq_options(m, language, API_SEGMENT_CAUSAL, prompt, plen, &so, &ae) < 0) {
        fprintf(stderr, "codemoe complete: %s\n", ae.message);
        rc = 2;
        goto out;
    }
    if (cm_seq_set_options(ctx, seq, &so, &err) < 0) {
        fprintf(stderr, "codemoe complete: %s\n", err.msg);
        goto out;
    }

    /* prefill: the whole prompt in one batch, logits for the last token only */
    int32_t *seqs = malloc((size_t)n_prompt * sizeof *seqs);
    if (!seqs) goto oom;
    for (int i = 0; i < n_prompt; i++) seqs[i] = seq;
    cm_batch b = {.n = n_prompt, .token = ids, .seq = seqs, .logits = NULL};
    double t_pre = now_s();
    int fr = cm_forward(ctx, &b, &err);
    free(seqs);
    if (fr < 0) {
        fprintf(stderr, "codemoe complete: prefill: %s\n", err.msg);
        goto out;
    }
    t_pre = now_s() - t_pre;
    const float *logits = cm_logits(ctx, n_prompt - 1);

    /* decode: the choice's state machine decides what text is final and when it ends */
    if (api_choice_state_init(&ch, m, &stops, n_predict, n_ctx) < 0) goto oom;
    if (n_predict == 0) api_choice_state_end(&ch, API_FINISH_LENGTH);
    double t_dec = now_s();
    while (!ch.ended) {
        if (!logits) {
            fprintf(stderr, "codemoe complete: the engine returned no logits\n");
            goto out;
        }
        float lp = 0;
        int32_t tok = cm_sampler_sample(smp, logits, top ? &lp : NULL, top); /* logprobs cost a pass over V */
        if (sp.n_logprobs > 0) {
            fprintf(stderr, "logprobs: %d ", (int)tok);
            print_piece(m, tok);
            fprintf(stderr, " %.4f |", lp);
            for (int k = 0; k < sp.n_logprobs; k++) {
                if (top[k].token < 0) break;
                fprintf(stderr, " %d ", (int)top[k].token);
                print_piece(m, top[k].token);
                fprintf(stderr, " %.4f", top[k].logprob);
            }
            fputc('\n', stderr);
        }
        int cr = api_choice_state_push(&ch, tok, cm_seq_len(ctx, seq));
        if (cr < 0) goto oom; /* the sampler returns only valid ids */
        size_t nt;
        const char *piece = api_choice_state_take(&ch, &nt);
        if (nt > 0) {
            fwrite(piece, 1, nt, stdout);
            fflush(stdout);
        }
        if (cr > 0) break;
        int32_t s32 = seq;
        const int8_t gen = 1;
        cm_batch one = {.n = 1, .token = &tok, .seq = &s32, .logits = NULL, .generated = &gen};
        if (cm_forward(ctx, &one, &err) < 0) {
            fprintf(stderr, "\ncodemoe complete: decode: %s\n", err.msg);
            goto out;
        }
        logits = cm_logits(ctx, 0);
    }
    t_dec = now_s() - t_dec;
    size_t nt;
    const char *tail = api_choice_state_take(&ch, &nt);
    if (nt > 0) fwrite(tail, 1, nt, stdout);
    if (isatty(STDOUT_FILENO)) fputc('\n', stdout);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "codemoe complete: error writing the output\n");
        goto out;
    }
    const char *stop = ch.finish == API_FINISH_LENGTH ? "length"
                       : ch.stop_hit >= 0              ? "stop string"
                                                       : "end of generation";
    fprintf(stderr, "codemoe complete: prompt %d tokens, prefill %.1f ms (%.1f tok/s); generated %d tokens, "
                    "%.1f ms (%.1f tok/s); stop: %s\n",
            n_prompt, t_pre * 1e3, t_pre > 0 ? n_prompt / t_pre : 0.0, ch.n_gen, t_dec * 1e3,
            t_dec > 0 ? ch.n_gen / t_dec : 0.0, stop);
    if (routing) cm_print_routing(stderr, m, cm_seq_routing(ctx, seq));
    rc = 0;
    goto out;
oom:
    fprintf(stderr, "codemoe complete: out of memory\n");
out:
    api_choice_state_free(&ch);
    api_stops_free(&stops);
    free(top);
    cm_sampler_free(smp);
    cm_ctx_free(ctx);
    cm_model_free(m);
    free(ids);
    free(file_text);
    return rc;
}
