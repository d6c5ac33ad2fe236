/*
 * sampler.h - internals of the sampler (sampler.c) that tests and tools need without a loaded model.
 * Internal to engine/; the public entry points are cm_sampling_default / cm_sampler_* in codemoe.h.
 */
#ifndef CM_SAMPLER_H
#define CM_SAMPLER_H

#include "codemoe.h"

/* cm_sampler_create for a vocabulary of n_vocab tokens (what cm_sampler_create does with the model's
 * n_vocab). Same contract: NULL with err set on a bad parameter or a bias token id out of range. */
cm_sampler *cm_sampler_create_n(int n_vocab, const cm_sampling *s, cm_err *err);

/* The logits after logit bias and penalties (what temperature/top-k/... then work on), written to
 * out (n_vocab floats). Records nothing; for tests of the penalty arithmetic. */
void cm_sampler_adjusted_logits(cm_sampler *s, const float *logits, float *out);

#endif
