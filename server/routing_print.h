/*
 * routing_print.h - human-readable summary of a sequence's MoE routing statistics (codemoe.h
 * cm_routing), for `codemoe complete --routing`.
 */
#ifndef CM_ROUTING_PRINT_H
#define CM_ROUTING_PRINT_H

#include <stdio.h>

#include "codemoe.h"

/* One block per layer: token experts (prompt / generated tokens and mean gate; the shared one marked),
 * segment experts (tokens, mean gate, the windows served), then MoLE tokens per adapter. Prints a single
 * line for a dense model (r == NULL). */
void cm_print_routing(FILE *f, const cm_model *m, const cm_routing *r);

#endif
