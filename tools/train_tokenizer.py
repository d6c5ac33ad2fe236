"""train_tokenizer.py - byte-level BPE tokenizer for the codemoe models, trained on the corpus.

    /usr/bin/python3 tools/train_tokenizer.py [--corpus DIR] [--out DIR]
                                              [--vocab 8192] [--sample-mb 1.5]

Model: GPT-2 byte<->unicode alphabet (256 byte tokens, in tools/reference.py's order), then one token per
merge, then the specials <|endoftext|> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|>, so the
vocabulary is exactly --vocab ids. Text is NFC-normalised and pre-tokenised with the Qwen2 regex
(reference.QWEN2_PATTERN). Python's re has no \\p{L}/\\p{N}, so the pattern is compiled into an equivalent
re with explicit character classes built from unicodedata (and \\s as Unicode White_Space, not
str.isspace); it is checked against reference.pretokenize (the hand-written matcher) on every run.

Training: a language-balanced sample (the first --sample-mb MB of each language's shuffled train split);
word counts; then merges by the reference rule (most frequent adjacent pair, ties: smallest (left, right)
pair; a pair whose concatenation is already a token is skipped), kept incremental: pair counts and the
words each pair occurs in are updated only for the words a merge touches, with a lazy max-heap.

Outputs <out>/tokenizer.json (HF: BPE model, NFC normaliser, Sequence[Split(qwen2, Isolated),
ByteLevel(use_regex=false)] pre-tokenizer, ByteLevel decoder, the specials as added special tokens),
<out>/tokenizer_config.json (eos/pad), <out>/stats.json (bytes per token per language on held-out).
`codemoe convert <out> vocab.gguf` turns it into GGUF metadata (tools/check_tokenizer.py compares ids).
"""

import argparse
import heapq
import json
import os
import re
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import reference as ref  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
LANGS = ["python", "java", "cpp", "rust", "go", "ruby", "c", "js"]


# ============================================================================ pre-tokenizer

def _class(pred):
    """A re character-class body for every code point satisfying pred (ranges, escaped)."""
    out, start, prev = [], None, None
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            ok = False
        else:
            ok = pred(chr(cp))
        if ok and start is None:
            start = cp
        if not ok and start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, 0x10FFFF))
    esc = lambda c: "\\U%08x" % c  # noqa: E731
    return "".join(esc(a) if a == b else esc(a) + "-" + esc(b) for a, b in out)


def compile_qwen2():
    L = _class(lambda c: unicodedata.category(c)[0] == "L")
    N = _class(lambda c: unicodedata.category(c)[0] == "N")
    S = "".join("\\U%08x" % ord(c) for c in sorted(ref._WS))
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*|"
           r"[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+").format(L=L, N=N, S=S)
    # (?i:...) in Python also folds some non-ASCII letters (e.g. U+017F long s ~ 's'); HF's Oniguruma does
    # the same (Unicode case folding), so the behaviour is kept.
    return re.compile(pat)


_PRE = None


def pretokenize(text):
    global _PRE
    if _PRE is None:
        _PRE = compile_qwen2()
    return _PRE.findall(text)


def check_pretokenizer(samples):
    for s in samples:
        a, b = pretokenize(s), ref.pretokenize(s)
        if a != b:
            i = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
            raise AssertionError("pre-tokenizer mismatch: %r vs %r" % (a[i:i + 3], b[i:i + 3]))


# ============================================================================ training

def train_merges(word_counts, n_merges, log_every=500):
    """word_counts: {word (str): count} -> list of (a, b) merges (byte-unicode symbols)."""
    words = [[ref.BYTE_ENC[x] for x in w.encode("utf-8")] for w in word_counts]
    counts = list(word_counts.values())
    pair_count, pair_words = {}, {}
    for wi, sym in enumerate(words):
        c = counts[wi]
        for p in zip(sym, sym[1:]):
            pair_count[p] = pair_count.get(p, 0) + c
            pair_words.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    vocab = set(ref.BYTE_ENC.values())
    merges = []
    t0 = time.time()
    while len(merges) < n_merges and heap:
        nc, p = heapq.heappop(heap)
        c = pair_count.get(p, 0)
        if c <= 0 or -nc != c:
            continue  # stale entry (the live count was pushed again when it changed)
        a, b = p
        if a + b in vocab:
            pair_count[p] = 0  # never merged; drop it (the reference skips it the same way)
            continue
        merges.append(p)
        ab = a + b
        vocab.add(ab)
        changed = {}
        for wi in pair_words.pop(p, ()):
            sym, wc = words[wi], counts[wi]
            i, out = 0, []
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    out.append(ab)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            for q in zip(sym, sym[1:]):
                changed[q] = changed.get(q, 0) - wc
            for q in zip(out, out[1:]):
                changed[q] = changed.get(q, 0) + wc
                pair_words.setdefault(q, set()).add(wi)
            words[wi] = out
        pair_count[p] = 0
        for q, d in changed.items():
            if d == 0 or q == p:
                continue
            pair_count[q] = pair_count.get(q, 0) + d
            if pair_count[q] > 0:
                heapq.heappush(heap, (-pair_count[q], q))
        if log_every and len(merges) % log_every == 0:
            print("  %d merges (%.0fs), last %r x%d" % (len(merges), time.time() - t0, ab, c), file=sys.stderr)
    return merges


# ============================================================================ encoder

class Encoder:
    """Fast encoder (word cache) with the same rules as reference.Tokenizer."""

    def __init__(self, tokens, merges, specials):
        self.tok = ref.Tokenizer(tokens, merges, specials)
        self.cache = {}

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as fh:
            j = json.load(fh)
        vocab = j["model"]["vocab"]
        n = 1 + max(list(vocab.values()) + [t["id"] for t in j["added_tokens"]])
        tokens = [None] * n
        for t, i in vocab.items():
            tokens[i] = t
        for t in j["added_tokens"]:
            tokens[t["id"]] = t["content"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in j["model"]["merges"]]
        return cls(tokens, merges, [t["content"] for t in j["added_tokens"]])

    def encode(self, text, special=False):
        ids = []
        for piece, is_special in self.tok._split_special(text, special):
            if is_special:
                ids.append(self.tok.ids[piece])
                continue
            for w in pretokenize(unicodedata.normalize("NFC", piece)):
                r = self.cache.get(w)
                if r is None:
                    r = self.tok._bpe(w)
                    if len(self.cache) < 2_000_000:
                        self.cache[w] = r
                ids.extend(r)
        return ids

    def decode(self, ids):
        return self.tok.decode(ids)


def tokenizer_json(tokens, merges, n_base):
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": n_base + k, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for k, s in enumerate(SPECIALS)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": ref.QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            bl]},
        "post_processor": bl, "decoder": bl,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens[:n_base])},
                  "merges": ["%s %s" % m for m in merges]},
    }


def read_texts(path, max_bytes=None, max_files=None):
    out, tot = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            t = json.loads(line)["text"]
            out.append(t)
            tot += len(t.encode())
            if (max_bytes and tot >= max_bytes) or (max_files and len(out) >= max_files):
                break
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.path.join(corpus.TRAIN_DIR, "corpus"))
    ap.add_argument("--out", default=os.path.join(corpus.TRAIN_DIR, "tokenizer"))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sample-mb", type=float, default=1.5, help="training text per language")
    ap.add_argument("--eval-mb", type=float, default=0.3, help="held-out text per language for the stats")
    args = ap.parse_args()
    langs = [l for l in LANGS if os.path.exists(os.path.join(args.corpus, l, "train.jsonl"))]
    t0 = time.time()
    wc, checked = {}, False
    for lang in langs:
        texts = read_texts(os.path.join(args.corpus, lang, "train.jsonl"), int(args.sample_mb * 2**20))
        if not checked:  # the compiled regex must agree with the hand-written matcher
            check_pretokenizer([unicodedata.normalize("NFC", t) for t in texts[:20]])
            checked = True
        for t in texts:
            for w in pretokenize(unicodedata.normalize("NFC", t)):
                wc[w] = wc.get(w, 0) + 1
        print("%s: %d files, %d distinct words so far (%.0fs)" % (lang, len(texts), len(wc), time.time() - t0),
              file=sys.stderr)
    wc = dict(sorted(wc.items()))  # deterministic order
    n_merges = args.vocab - 256 - len(SPECIALS)
    merges = train_merges(wc, n_merges)
    tokens = list(ref.BYTE_ENC.values()) + [a + b for a, b in merges]
    n_base = len(tokens)
    tokens += SPECIALS
    print("trained %d merges in %.0fs" % (len(merges), time.time() - t0), file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(tokenizer_json(tokens, merges, n_base), fh, ensure_ascii=False)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as fh:
        json.dump({"add_bos_token": False, "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|fim_pad|>", "model_max_length": 4096}, fh, indent=1)
    # stats on held-out text; round trip
    enc = Encoder(tokens, merges, SPECIALS)
    stats = {"vocab": len(tokens), "merges": len(merges), "sample_mb_per_lang": args.sample_mb,
             "bytes_per_token": {}}
    for lang in langs:
        texts = read_texts(os.path.join(args.corpus, lang, "heldout.jsonl"), int(args.eval_mb * 2**20))
        nb = nt = 0
        for t in texts:
            ids = enc.encode(t)
            assert enc.decode(ids) == unicodedata.normalize("NFC", t), "round trip failed"
            nb += len(t.encode())
            nt += len(ids)
        stats["bytes_per_token"][lang] = round(nb / max(nt, 1), 3)
        print("%-6s %.3f bytes/token (%d held-out bytes)" % (lang, nb / max(nt, 1), nb), file=sys.stderr)
    with open(os.path.join(args.out, "stats.json"), "w") as fh:
        json.dump(stats, fh, indent=1)


if __name__ == "__main__":
    main()
