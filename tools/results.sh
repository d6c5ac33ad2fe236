#!/bin/sh
# results.sh - the experiment's results, end to end, from the stage checkpoints: q8_0 exports where needed,
# held-out bits per byte (PyTorch), expert routing statistics and line completion (the C engine), samples,
# then docs/results.md, its numbers docs/results.json, docs/results-routing.png and the numbers block of
# models/README.md. One thread for torch and codemoe, lowest priority; ~15 min on 2 shared cores.
#
#   tools/results.sh
#   tools/results.sh --render-only    only rebuild docs/results.md and the model card's block from the
#                                     committed docs/results.json (seconds; no checkpoints or corpus needed)
#   CM_TRAIN=DIR (training directory)  CM_EVAL=$CM_TRAIN/eval  CM_BUILD=build-eval  CM_SHIP=moe  CM_LATEST=0
#   CM_STAGES="base dense_cont lora mole moe moe_noseg moe_noshared moe_segbal"
#   CM_LOSSES_ARGS, CM_ROUTING_ARGS, CM_COMPLETE_ARGS: extra flags for `results.py losses|routing|complete`
#   (a quick trial: CM_LOSSES_ARGS="--windows 8 --hex 8" CM_ROUTING_ARGS="--chunks 5" CM_COMPLETE_ARGS="--n 5")
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = --render-only ]; then
    exec /usr/bin/python3 tools/results.py render --numbers docs/results.json --out docs/results.md --card models/README.md
fi
T=${CM_TRAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/codemoe/train}
E=${CM_EVAL:-$T/eval}
B=${CM_BUILD:-build-eval}
SHIP=${CM_SHIP:-moe}
STAGES=${CM_STAGES:-base dense_cont lora mole moe moe_noseg moe_noshared moe_segbal}
LATEST=${CM_LATEST:-0}
# this report is the shipped run's (experiment v1: checkpoints in $CM_TRAIN/ckpt); train.py's default is
# the lowres experiment, whose runs tools/runs.py reports
export CM_TRAIN="$T" CM_BUILD="$B" OMP_NUM_THREADS=1 CM_EXP=v1
PY="nice -n 19 /usr/bin/python3"
R="$PY tools/results.py"
CODEMOE="$B/server/codemoe"
mkdir -p "$E/gguf"
rm -f "$E/losses.json" "$E/routing.json" "$E/complete.json" "$E/samples.json"
: >"$E/timings.tsv"

# timed NAME CMD...: runs CMD, appends NAME <TAB> seconds <TAB> CMD to timings.tsv
timed() {
    name=$1
    shift
    echo "== $name ($(date -u +%H:%M:%S))" >&2
    t0=$(date +%s)
    "$@"
    # the report shows the command with the training directory as $CM_TRAIN, not this machine's path
    printf '%s\t%d\t%s\n' "$name" $(($(date +%s) - t0)) "$*" |
        sed -e "s|nice -n 19 /usr/bin/python3 ||" -e "s|$T/|\$CM_TRAIN/|g" >>"$E/timings.tsv"
}

if [ ! -x "$CODEMOE" ]; then
    [ -d "$B" ] || meson setup "$B" . -Dbuildtype=release >/dev/null
    timed build nice -n 19 ninja -j1 -C "$B" server/codemoe
fi

ckpt() {
    d="$T/ckpt/$1"
    if [ -f "$d/final.pt" ]; then echo "$d/final.pt"
    elif [ "$LATEST" = 1 ] && [ -f "$d/latest.pt" ]; then echo "$d/latest.pt"
    fi
}

# the GGUF of a stage: the pipeline's export when it is newer than the checkpoint, else our own
MODELS=""
have=""
for s in $STAGES; do
    c=$(ckpt "$s")
    [ -n "$c" ] || { echo "results.sh: $s has no checkpoint, skipped" >&2; continue; }
    have="$have${have:+,}$s"
    g="$T/gguf/$s.gguf"
    if [ ! -f "$g" ] || [ "$g" -ot "$c" ]; then
        g="$E/gguf/$s.gguf"
        if [ ! -f "$g" ] || [ "$g" -ot "$c" ]; then
            timed "export $s" $PY tools/train.py export --stage "$s" --ckpt "$c" --type q8_0 --out "$g"
        fi
    fi
    MODELS="$MODELS${MODELS:+,}$s=$g"
    eval "GGUF_$s=\$g"
done
[ -n "$have" ] || { echo "results.sh: no checkpoints in $T/ckpt" >&2; exit 1; }
lat=""
[ "$LATEST" = 1 ] && lat="--latest"

timed "held-out bits per byte (PyTorch)" $R losses --stages "$have" $lat ${CM_LOSSES_ARGS:-} --out "$E/losses.json"
eval "moe_g=\${GGUF_moe:-}"
eval "base_g=\${GGUF_base:-}"
if [ -n "$moe_g" ]; then
    timed "expert routing (codemoe)" $R routing --gguf "$moe_g" ${base_g:+--init-from "$base_g"} ${CM_ROUTING_ARGS:-} \
        --out "$E/routing.json" --png docs/results-routing.png
fi
timed "line completion (codemoe)" $R complete --models "$MODELS" ${CM_COMPLETE_ARGS:-} --out "$E/complete.json"
eval "ship_g=\${GGUF_$SHIP:-}"
if [ -n "$ship_g" ]; then
    timed "samples (codemoe)" $R samples --gguf "$ship_g" --langs python,rust,go --out "$E/samples.json"
fi
$R report --eval "$E" --out docs/results.md --card models/README.md
echo "results.sh: wrote docs/results.md ($(awk -F'\t' '{s += $2} END {print s}' "$E/timings.tsv") s)" >&2
