"""check_tokenizer.py - the engine tokenizes like our Python encoder.

    /usr/bin/python3 tools/check_tokenizer.py [--tokenizer DIR]
                                              [--codemoe build-data/server/codemoe] [--n 40]

Converts the trained tokenizer.json to a vocab-only GGUF with `codemoe convert` (the path users take),
then, for --n held-out files per language (cut to 4 KiB at a character boundary) plus a few hand-picked
edge cases (unicode letters and digits, CRLF, trailing spaces, special-token strings), compares
`codemoe tokenize --no-bos` with train_tokenizer.Encoder (no special-token parsing, as the engine does
without --special). Exits 1 on the first mismatch, printing both id lists around it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import train_tokenizer as tt  # noqa: E402

EDGE = ["", "x", "  \n\n\t  x = 1  \r\n", "naïve café ñ 日本語 ١٢٣ ½ x²", "it's I'LL they'd ’s",
        "<|endoftext|><|fim_prefix|>a<|fim_suffix|>", "    return f\"{x!r:>10}\"\n\n\n", "\u00a0\u2003x\u3000y",
        "e\u0301 \u212b", "🙂 emoji 👩‍💻", "a" * 3000]


def engine_ids(binary, gguf, text, tmp):
    with open(tmp, "wb") as fh:
        fh.write(text.encode("utf-8"))
    r = subprocess.run([binary, "tokenize", "--model", gguf, "--file", tmp, "--no-bos"], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError("codemoe tokenize failed: %s" % r.stderr.strip())
    return [int(x) for x in r.stdout.split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=os.path.join(corpus.TRAIN_DIR, "tokenizer"))
    ap.add_argument("--corpus", default=os.path.join(corpus.TRAIN_DIR, "corpus"))
    ap.add_argument("--codemoe", default=os.path.join(os.path.dirname(__file__), "..", "build-data", "server",
                                                      "codemoe"))
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    enc = tt.Encoder.load(os.path.join(args.tokenizer, "tokenizer.json"))
    with tempfile.TemporaryDirectory() as d:
        gguf = os.path.join(d, "vocab.gguf")
        subprocess.run([args.codemoe, "convert", args.tokenizer, gguf], check=True, capture_output=True)
        texts = [("edge", t) for t in EDGE]
        for lang in tt.LANGS:
            p = os.path.join(args.corpus, lang, "heldout.jsonl")
            if os.path.exists(p):
                texts += [(lang, t.encode()[:4096].decode("utf-8", "ignore")) for t in tt.read_texts(p, max_files=args.n)]
        n_tok = 0
        for lang, t in texts:
            want = enc.encode(t)
            got = engine_ids(args.codemoe, gguf, t, os.path.join(d, "t.txt"))
            if got != want:
                i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
                print("MISMATCH (%s) at token %d:\n  text   %r\n  engine %s\n  python %s" % (
                    lang, i, enc.decode(want[max(0, i - 3):i + 5]), got[max(0, i - 3):i + 5],
                    want[max(0, i - 3):i + 5]))
                sys.exit(1)
            n_tok += len(want)
        print("check_tokenizer: %d texts, %d tokens: engine == python" % (len(texts), n_tok))


if __name__ == "__main__":
    main()
