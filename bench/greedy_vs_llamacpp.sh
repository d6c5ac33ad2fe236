#!/usr/bin/env bash
# greedy_vs_llamacpp.sh - does codemoe's default decode give the same greedy text as llama.cpp on the
# same file? For every model and prompt it runs `codemoe complete` (greedy, top-2 log-probabilities) and
# llama.cpp's `llama-completion` (greedy), both at one thread, and prints how many generated tokens agree,
# and at the first divergence the two tokens and codemoe's logit gap between its top two (a near-tie that
# the two engines' different rounding can flip; random-weight files are full of them).
#
#   bench/greedy_vs_llamacpp.sh [-n 64] CODEMOE LLAMA_COMPLETION MODEL...
set -u
n=64
while getopts "n:h" o; do
    case $o in
    n) n=$OPTARG ;;
    *) sed -n '8p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 3 ] || { sed -n '8p' "$0" | sed 's/^# *//' >&2; exit 2; }
codemoe=$1 lc=$2
shift 2
tmp=$(mktemp -d -t greedy_vs_llamacpp.XXXXXX)
prompts=("def fibonacci(n):" "#include <stdio.h>

int main(void) {" "fn parse(input: &str) -> Result<u32, String> {")
echo "| model | prompt | tokens agreeing | first divergence: codemoe / llama.cpp | codemoe's top-2 logit gap there |"
echo "|---|---|---:|---|---:|"
for m in "$@"; do
    for i in "${!prompts[@]}"; do
        p=${prompts[$i]}
        "$codemoe" complete --model "$m" --prompt "$p" -n "$n" --temperature 0 --logprobs 2 --threads 1 \
            >"$tmp/ours.txt" 2>"$tmp/ours.err" || { echo "codemoe failed: $tmp/ours.err" >&2; continue; }
        "$lc" -m "$m" -p "$p" -n "$n" --temp 0 -t 1 -no-cnv --no-warmup >"$tmp/theirs.txt" 2>"$tmp/theirs.err" ||
            { echo "llama-completion failed: $tmp/theirs.err" >&2; continue; }
        /usr/bin/python3 - "$tmp" "$(basename "$m")" "$i" "$p" <<'PY'
import json, re, sys
tmp, model, idx, prompt = sys.argv[1:]
err = open(tmp + "/ours.err", "rb").read().decode("utf-8", "replace")
theirs = open(tmp + "/theirs.txt", "rb").read().decode("utf-8", "replace")
# llama-completion echoes the prompt before the continuation
theirs = theirs[len(prompt):] if theirs.startswith(prompt) else theirs
dec = json.JSONDecoder()
steps = []  # (piece, logprob, second piece, second logprob)
for entry in err.split("logprobs: ")[1:]:
    def item(s, pos):
        mt = re.compile(r"\s*(-?\d+) ").match(s, pos)
        piece, end = dec.raw_decode(s, mt.end())
        ml = re.compile(r" (-?\d+\.\d+)").match(s, end)
        return piece, float(ml.group(1)), ml.end()
    piece, lp, pos = item(entry, 0)
    pos = entry.index("|", pos) + 1
    p1, l1, pos = item(entry, pos)
    p2, l2, pos = item(entry, pos)
    steps.append((piece, l1, p2, l2))
agree, at = 0, 0
div = "-"
gap = "-"
for piece, l1, p2, l2 in steps:
    if theirs.startswith(piece, at):
        agree += 1
        at += len(piece)
        continue
    rest = theirs[at:at + max(len(piece), 8)]
    div = "%s / %s" % (json.dumps(piece, ensure_ascii=False), json.dumps(rest, ensure_ascii=False))
    gap = "%.4f" % (l1 - l2)
    break
label = json.dumps(prompt.split("\n")[0], ensure_ascii=False)
print("| %s | %s | %d of %d | %s | %s |" % (model, label, agree, len(steps), div.replace("|", "\\|"), gap))
PY
    done
done
rm -rf "$tmp"
