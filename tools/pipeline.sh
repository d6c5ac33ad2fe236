#!/bin/sh
# pipeline.sh - the whole training pipeline, one command; every step is skipped when its output exists,
# and every training stage resumes from its latest checkpoint, so re-running after an interruption
# continues where it stopped. Runs at the lowest CPU priority, so the machine stays usable.
#
#   tools/pipeline.sh [stage ...]     # default (CM_EXP=lowres): corpus tokenizer check tokens base
#                                     #   export-base runs (tools/runs.py: the run plan, resumable)
#                                     # CM_EXP=v1 (the shipped run): ... base export-base, then
#                                     #   moe moe_noseg moe_noshared dense_cont lora mole + exports,
#                                     #   results (held-out loss + HumanEval-X solution NLL per language),
#                                     #   report (tools/results.sh: docs/results.md, models/README.md numbers)
#   tools/pipeline.sh snapshot-base   # the base's checkpoint -> models/checkpoints[/lowres]/base.pt (commit it)
#   CM_TRAIN=DIR (working files, outside the repository)  CM_BUILD=build-data  CM_BASE_TOKENS=3000000  CM_POST_TOKENS=500000 (the shipped run)
#   CM_EXP=lowres (the experiment: its base mix, checkpoints under $CM_TRAIN/lowres; v1 = the shipped run)
set -eu
cd "$(dirname "$0")/.."
T=${CM_TRAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/codemoe/train}
export CM_EXP=${CM_EXP:-lowres}
B=${CM_BUILD:-build-data}
PY="nice -n 19 /usr/bin/python3"
BASE_TOKENS=${CM_BASE_TOKENS:-3000000}
POST_TOKENS=${CM_POST_TOKENS:-500000}
mkdir -p "$T/logs" "$T/gguf" "$T/results"
if [ "$CM_EXP" = v1 ]; then MANIFEST=models/corpus-manifest.json; else MANIFEST=models/corpus-manifest-$CM_EXP.json; fi

step() { echo "== $1 ($(date -u +%H:%M:%S))" >&2; }

run_stage() {
    case "$1" in
    corpus)
        # the committed manifest is the corpus every checkpoint and result was trained on: an existing
        # corpus that differs (a source package missing or at another version) is rebuilt, and its
        # token files with it; a rebuilt one that still differs stops the pipeline
        if [ -f "$T/corpus/manifest.json" ] && [ -f "$T/corpus/ruby/heldout_ext.jsonl" ] &&
           $PY tools/corpus.py --out "$T/corpus" --expect "$MANIFEST" --check-only; then
            return 0
        fi
        step corpus
        rm -rf "$T/tokens"
        $PY tools/corpus.py --install --out "$T/corpus" --expect "$MANIFEST" ;;
    tokenizer)
        # the committed tokenizer keeps the token ids of every committed checkpoint
        [ -f "$T/tokenizer/tokenizer.json" ] && return 0
        step tokenizer
        mkdir -p "$T/tokenizer" && cp models/tokenizer/* "$T/tokenizer/" ;;
    train-tokenizer)
        step train-tokenizer
        $PY tools/train_tokenizer.py --corpus "$T/corpus" --out "$T/tokenizer" --vocab 8192 --sample-mb 1.0 ;;
    check)
        [ -x "$B/server/codemoe" ] || { meson setup "$B" . >/dev/null && nice -n 19 ninja -j1 -C "$B" server/codemoe; }
        step check
        $PY tools/check_tokenizer.py --tokenizer "$T/tokenizer" --corpus "$T/corpus" --codemoe "$B/server/codemoe"
        $PY tools/train.py check ;;
    tokens)
        [ -f "$T/tokens/info.json" ] && [ -f "$T/tokens/ruby.heldout_ext.u16" ] && return 0
        step tokens
        $PY tools/train.py tokenize --tokenizer "$T/tokenizer" --corpus "$T/corpus" ;;
    base)
        step base
        $PY tools/train.py train --stage base --tokens "$BASE_TOKENS" --threads 1 --ckpt-min 5 ;;
    runs)
        step runs
        $PY tools/runs.py run --recurve ${CM_STOP_AT:+--stop-at "$CM_STOP_AT"} ;;
    snapshot-*)
        step "$1"
        $PY tools/train.py snapshot --stage "${1#snapshot-}" --with-opt ;;
    moe|moe_noseg|moe_noshared|moe_segbal|dense_cont|lora|mole)
        step "$1"
        $PY tools/train.py train --stage "$1" --tokens "$POST_TOKENS" --lr 5e-4 --threads 1 ;;
    export-*)
        s=${1#export-}
        [ -f "$T/gguf/$s.gguf" ] && return 0
        step "$1"
        $PY tools/train.py export --stage "$s" --type f32 --out "$T/gguf/$s.f32.gguf"
        $PY tools/train.py readback --stage "$s" --gguf "$T/gguf/$s.f32.gguf"
        $PY tools/train.py export --stage "$s" --type q8_0 --out "$T/gguf/$s.gguf" ;;
    results)
        step results
        $PY tools/train.py results | tee "$T/results/table.md" ;;
    report)
        # docs/results.md, docs/results-routing.png, models/README.md's numbers (tools/results.sh)
        step report
        CM_TRAIN="$T" CM_BUILD="$B" tools/results.sh ;;
    *)
        echo "pipeline.sh: unknown stage $1" >&2; exit 2 ;;
    esac
}

if [ $# -eq 0 ] && [ "$CM_EXP" != v1 ]; then
    set -- corpus tokenizer check tokens base export-base runs
elif [ $# -eq 0 ]; then
    set -- corpus tokenizer check tokens base export-base moe export-moe moe_noseg moe_noshared moe_segbal dense_cont \
        export-dense_cont lora export-lora mole export-mole results report
fi
for s in "$@"; do run_stage "$s"; done
