#!/bin/sh
# moe_stats_cost.sh - the decode cost of routing statistics, in instructions (callgrind), which a busy
# shared machine cannot disturb. Per-token cost = (Ir at n=40 - Ir at n=8) / 32, with statistics off and
# on. valgrind cannot run AVX-512 code; its emulated cpuid hides AVX-512, so the portable binary picks
# its AVX2 kernels under it (docs/engine.md, Kernels).
# Usage: bench/moe_stats_cost.sh [OUTDIR]   (needs valgrind, /usr/bin/python3 with numpy)
set -e
R=$(cd "$(dirname "$0")/.." && pwd)
O=${1:-$("$R/bench/inputs.sh" dir)/moe-stats}  # default: the benchmark cache (bench/inputs.sh)
mkdir -p "$O"
[ -d "$O/build-portable" ] || meson setup "$O/build-portable" "$R" -Dnative=false >/dev/null
ninja -C "$O/build-portable" server/codemoe >/dev/null
B="$O/build-portable/server/codemoe"
[ -f "$O/dense-768.gguf" ] || /usr/bin/python3 "$R/bench/moe_make_models.py" "$O" >/dev/null
[ -f "$O/hybrid.gguf" ] || "$B" upcycle "$O/dense-768.gguf" "$O/hybrid.gguf" --experts 6 --top-k 2 \
    --segment-experts 6 --window 64 --router-init noise --router-std 0.05 >/dev/null
ir() { # stats n
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$B" bench -m "$O/hybrid.gguf" -p 0 -n "$2" \
        -r 1 -t 1 --routing-stats "$1" 2>&1 >/dev/null | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
off8=$(ir 0 8); off40=$(ir 0 40); on8=$(ir 1 8); on40=$(ir 1 40)
awk -v a="$off8" -v b="$off40" -v c="$on8" -v d="$on40" 'BEGIN {
    off = (b - a) / 32; on = (d - c) / 32;
    printf "instructions per decoded token: stats off %.0f, on %.0f, cost %+.4f%%\n", off, on, 100 * (on - off) / off }'
