#!/bin/sh
# moe_bench.sh - hybrid MoE decode speed vs a dense model of the same active size, and the cost of
# routing statistics. Usage: bench/moe_bench.sh BUILD_DIR [OUTDIR] [THREADS]
#   1. two dense models (bench/moe_make_models.py): F768 and F2304;
#   2. codemoe upcycle F768 -> hybrid (6 token experts, top-2 with the shared one, 6 segment experts,
#      window 64, top-1): per token 3 experts of width 768 run = the FFN work of the F2304 dense model;
#   3. codemoe bench on both (pp128, tg128), then the hybrid with --routing-stats 0 and 1, interleaved.
set -e
B=${1:?usage: moe_bench.sh BUILD_DIR [OUTDIR] [THREADS]}
O=${2:-$("$(dirname "$0")/inputs.sh" dir)/moe-bench}  # default: the benchmark cache (bench/inputs.sh)
T=${3:-1}
/usr/bin/python3 "$(dirname "$0")/moe_make_models.py" "$O"
"$B/server/codemoe" upcycle "$O/dense-768.gguf" "$O/hybrid.gguf" --experts 6 --top-k 2 --segment-experts 6 \
    --window 64 --router-init noise --router-std 0.05
for m in dense-2304 hybrid; do "$B/server/codemoe" bench -m "$O/$m.gguf" -p 128 -n 128 -r 3 -t "$T"; done
for i in 1 2 3; do
    for s in 1 0; do
        printf 'routing-stats %s: ' "$s"
        "$B/server/codemoe" bench -m "$O/hybrid.gguf" -p 0 -n 128 -r 3 -t "$T" --routing-stats "$s" | tail -1
    done
done
